"""``apollo-cas demo``: the main job end to end on built-in example weights.

Generates a small transformer-shaped bf16 model, saves it, fine-tunes a few
layers (twice), saves again, shows list / diff / stats, restores the latest
checkpoint to safetensors and to the flat format, and checks both bit for bit.
No GPU needed.

The demo never writes into a store that holds anything but earlier demo runs
(it would move that store's ``latest`` to the demo model), and it removes
every file it made in the temporary directory when it ends, the temporary
store included unless ``--keep``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from .. import examples, reports
from ..errors import ApolloError, Refused, StoreNotFound, UsageError
from ..formats import safetensors as st_format
from ..sources import open_path
from ..store import Store
from .common import emit_json, human_bytes, json_option, parse_size, ratio

#: The demo fine-tunes layers 1 and 2, so the model needs three.
DEMO_LAYERS = 3
DEMO_KEY = "demo"


def _same(weights: dict[str, np.ndarray], restored_dir: Path) -> bool:
    with open_path(restored_dir) as src:
        got = {t.name: bytes(t.read(0, t.nbytes)) for t in src.tensors()}
    return got.keys() == weights.keys() and all(
        got[k] == np.ascontiguousarray(v).tobytes() for k, v in weights.items()
    )


def model_shape(size: str) -> examples.ModelShape:
    """The example model for ``--size``; a size below the smallest model that
    shows the demo's changes is refused, naming that minimum."""
    target = parse_size(size, "size")
    smallest = examples.ModelShape.smallest(DEMO_LAYERS)
    if target < smallest.nbytes():
        raise UsageError(
            f"--size {size} is below the smallest example model, "
            f"{human_bytes(smallest.nbytes())} ({DEMO_LAYERS} layers: the demo fine-tunes "
            "layers 1 and 2)",
            f"pass --size {smallest.nbytes()} or more; the default is 64MiB",
        )
    return examples.ModelShape.for_bytes(target, min_layers=DEMO_LAYERS)


def check_demo_store(path: Path) -> None:
    """Refuse a store (or directory) the demo must not write into: only a new
    path, an empty directory, or a store of earlier demo runs."""
    if not path.exists():
        return
    if not path.is_dir():
        raise UsageError(f"{path} is a file", "name a new directory for the demo store")
    if not any(path.iterdir()):
        return
    try:
        st = Store.open(path)
    except StoreNotFound:
        raise Refused(
            f"{path} is not empty and is not an apollo_cas store",
            "name a new directory for the demo store, or leave --store out (a temporary one)",
        ) from None
    with st:
        foreign = [
            c.checkpoint_id[:12]
            for c in st.checkpoints()
            if DEMO_KEY not in c.manifest.source.metadata
        ]
    if foreign:
        raise Refused(
            f"{path} holds checkpoints that are not the demo's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); the demo would move its latest",
            "name a new directory for the demo store, or leave --store out (a temporary one)",
        )


@click.command()
@click.option(
    "--store",
    "store",
    type=click.Path(path_type=Path),
    help="Store directory: new, empty, or an earlier demo's (default: a temporary one, "
    "removed at the end).",
)
@click.option(
    "--size",
    default="64MiB",
    show_default=True,
    help="Size of the example model (at least about 8 MiB: the smallest with three layers).",
)
@click.option(
    "--keep", is_flag=True, help="Keep the temporary directory (store, model, restored files)."
)
@json_option
def demo(store: Path | None, size: str, keep: bool, as_json: bool) -> None:
    """Run save / list / diff / stats / restore on generated example weights."""
    shape = model_shape(size)
    if store is not None:
        check_demo_store(store)
    work = Path(tempfile.mkdtemp(prefix="apollo-demo-"))
    try:
        out = _run(work, store or work / "store", shape, as_json)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    where = store or work / "store"
    if as_json:
        emit_json({**out, "store": str(where), "kept": bool(store) or keep})
        return
    if store is not None or keep:
        click.echo(f"\ntry: apollo-cas list --store {where}")
    else:
        click.echo(
            "\nthe temporary store was removed; run 'apollo-cas demo --keep' (or --store DIR) "
            "to look at it with 'apollo-cas list'"
        )


def _run(work: Path, store: Path, shape: examples.ModelShape, as_json: bool) -> dict[str, Any]:
    def say(text: str) -> None:
        if not as_json:
            click.echo(text)

    v0 = examples.generate(shape)
    versions = {
        "v0 (initial)": v0,
        "v1 (layer 1 attention fine-tuned)": examples.perturb_layers(v0, [1], fraction=0.25),
    }
    versions["v2 (layers 1-2 fine-tuned)"] = examples.perturb_layers(
        versions["v1 (layer 1 attention fine-tuned)"], [2], fraction=0.25, seed=2
    )
    versions["v3 (no change)"] = versions["v2 (layers 1-2 fine-tuned)"]
    model_bytes = sum(a.nbytes for a in v0.values())
    say(
        f"example model: {len(v0)} tensors, {shape.layers} layers, "
        f"{human_bytes(model_bytes)} bf16; store: {store}\n"
    )
    saves = []
    with Store.open(store, create=True) as st:
        for label, w in versions.items():
            path = work / st_format.SINGLE
            examples.write_safetensors(w, str(path))
            with open_path(path) as src:
                r = st.save(src, metadata={DEMO_KEY: label.split()[0]})
            saves.append({"version": label, **r.to_json()})
            s = r.stats
            verdict = (
                "unchanged, no checkpoint added"
                if r.unchanged
                else (
                    f"{s.new_chunks}/{s.chunks} blocks new, {human_bytes(s.new_stored_bytes)} written"
                )
            )
            say(
                f"save {label:36s} -> {(r.checkpoint_id or '')[:12]}  {verdict}  ({r.seconds:.2f}s)"
            )
        path.unlink()
        d = reports.diff(st, saves[0]["checkpoint"], "latest")
        say(
            f"\ndiff first -> latest: {d.tensors_changed} of {d.tensors_total} tensors, "
            f"{human_bytes(d.bytes_changed)} in changed blocks"
        )
        for c in d.changes:
            say(f"  {c.name:42s} {c.blocks_changed}/{c.blocks_total} blocks")
        s2 = reports.store_stats(st)
        say(
            f"\nstats: {s2.checkpoints} checkpoints, {human_bytes(s2.logical_bytes)} original, "
            f"{human_bytes(s2.stored_bytes)} stored (dedup {ratio(s2.dedup_ratio)}, "
            f"compression {ratio(s2.compression_ratio)}, overall {ratio(s2.total_ratio)})"
        )
        latest = versions["v3 (no change)"]
        st.restore("latest", work / "restored-st")
        st.restore("latest", work / "restored-flat", format="flat")
    ok = _same(latest, work / "restored-st") and _same(latest, work / "restored-flat")
    say(
        "\nrestore latest to safetensors and to the flat weights.bin + weights.json: "
        + ("bit-exact" if ok else "MISMATCH")
    )
    if not ok:
        raise ApolloError("demo restore did not match the saved weights", "please report this")
    return {
        "model": {"tensors": len(v0), "layers": shape.layers, "bytes": model_bytes},
        "saves": saves,
        "diff": d.to_json(),
        "stats": {k: v for k, v in s2.to_json().items() if k != "per_checkpoint"},
        "restore": {"formats": ["safetensors", "flat"], "bit_exact": ok},
    }
