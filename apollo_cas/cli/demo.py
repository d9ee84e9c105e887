"""``apollo-cas demo``: the main job end to end on built-in example weights.

Generates a small transformer-shaped bf16 model, saves it, fine-tunes a few
layers (twice), saves again, shows list / diff / stats, restores the latest
checkpoint to safetensors and to the flat format, and checks both bit for bit.
No GPU needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from .. import examples, reports
from ..errors import ApolloError
from ..sources import open_path
from ..store import Store
from .common import human_bytes, parse_size, ratio


def _same(weights: dict[str, np.ndarray], restored_dir: Path) -> bool:
    with open_path(restored_dir) as src:
        got = {t.name: bytes(t.read(0, t.nbytes)) for t in src.tensors()}
    return got.keys() == weights.keys() and all(
        got[k] == np.ascontiguousarray(v).tobytes() for k, v in weights.items()
    )


@click.command()
@click.option(
    "--store",
    "store",
    type=click.Path(path_type=Path),
    help="Store directory (default: a new temporary one).",
)
@click.option("--size", default="64MiB", show_default=True, help="Size of the example model.")
def demo(store: Path | None, size: str) -> None:
    """Run save / list / diff / stats / restore on generated example weights."""
    work = Path(tempfile.mkdtemp(prefix="apollo-demo-"))
    store = store or work / "store"
    shape = examples.ModelShape.for_bytes(parse_size(size, "size"))
    v0 = examples.generate(shape)
    versions = {
        "v0 (initial)": v0,
        "v1 (layer 1 attention fine-tuned)": examples.perturb_layers(v0, [1], fraction=0.25),
    }
    versions["v2 (layers 1-2 fine-tuned)"] = examples.perturb_layers(
        versions["v1 (layer 1 attention fine-tuned)"], [2], fraction=0.25, seed=2
    )
    versions["v3 (no change)"] = versions["v2 (layers 1-2 fine-tuned)"]
    click.echo(
        f"example model: {len(v0)} tensors, "
        f"{human_bytes(sum(a.nbytes for a in v0.values()))} bf16; store: {store}\n"
    )
    with Store.open(store, create=True) as st:
        for label, w in versions.items():
            path = work / "model.safetensors"
            examples.write_safetensors(w, str(path))
            with open_path(path) as src:
                r = st.save(src, metadata={"demo": label.split()[0]})
            s = r.stats
            verdict = (
                "unchanged, no checkpoint added"
                if r.unchanged
                else (
                    f"{s.new_chunks}/{s.chunks} blocks new, {human_bytes(s.new_stored_bytes)} written"
                )
            )
            click.echo(
                f"save {label:36s} -> {(r.checkpoint_id or '')[:12]}  {verdict}  ({r.seconds:.2f}s)"
            )
        rows = reports.list_rows(st)
        d = reports.diff(st, rows[0].id, "latest")
        click.echo(
            f"\ndiff first -> latest: {d.tensors_changed} of {d.tensors_total} tensors, "
            f"{human_bytes(d.bytes_changed)} in changed blocks"
        )
        for c in d.changes:
            click.echo(f"  {c.name:42s} {c.blocks_changed}/{c.blocks_total} blocks")
        s2 = reports.store_stats(st)
        click.echo(
            f"\nstats: {s2.checkpoints} checkpoints, {human_bytes(s2.logical_bytes)} logical, "
            f"{human_bytes(s2.stored_bytes)} stored (dedup {ratio(s2.dedup_ratio)}, "
            f"compression {ratio(s2.compression_ratio)}, overall {ratio(s2.total_ratio)})"
        )
        latest = versions["v3 (no change)"]
        st.restore("latest", work / "restored-st")
        st.restore("latest", work / "restored-flat", format="flat")
    ok = _same(latest, work / "restored-st") and _same(latest, work / "restored-flat")
    click.echo(
        f"\nrestore latest -> {work / 'restored-st'} (safetensors) and "
        f"{work / 'restored-flat'} (flat): {'bit-exact' if ok else 'MISMATCH'}"
    )
    if not ok:
        raise ApolloError("demo restore did not match the saved weights", "please report this")
    click.echo(f"\ntry: apollo-cas list --store {store}")
