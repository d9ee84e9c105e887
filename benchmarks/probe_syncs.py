"""Where a dense step's save and a load of its deltas make the host wait for the GPU (a probe).

Every call that synchronises the host with a CUDA stream (``.item()``, ``.cpu()``, a
pageable host-to-device copy such as ``torch.tensor(rows, device="cuda")``,
``torch.nonzero``) stops the host from queueing ahead of the device. Under
``torch.cuda.set_sync_debug_mode("warn")`` each one warns, and the warning names the
Python line that made it. This probe saves a generated bf16 model on the GPU in full,
takes one dense step, then counts those lines over the step's save (the GPU delta
path) and over a load of the result into GPU memory (the restore pipeline, XOR chains
and codec 4 included). Each is run once first, unrecorded, so compilation and first
allocations stay out of the counts.

    python benchmarks/probe_syncs.py --size 1GiB --out $OUT/syncs.json
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dense_gpu import build_model, dense_step, log, sync

from apollo_cas.cli.common import parse_size
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store


def recorded(fn: Any) -> dict[str, int]:
    """``fn()`` under the sync debug mode: the lines that synchronised, with counts."""
    sync("cuda")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync("cuda")
    where = collections.Counter(
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in seen
        if "synchroniz" in str(w.message)
    )
    return dict(where.most_common())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-syncs")
    ap.add_argument("--out", default="syncs.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA (the sync debug mode is a CUDA feature)")
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    model = build_model(parse_size(args.size), "cuda")
    st = Store.open(work / "store", create=True)
    st.save(DeviceSource(model))
    res: dict[str, Any] = {"size": args.size}
    for label in ("warm_up", "recorded"):
        dense_step(model, "cuda")
        sync("cuda")

        def save() -> None:
            st.save(DeviceSource(model), force=True)

        def load() -> None:
            st.load("latest", device="cuda")

        if label == "warm_up":
            save()
            load()
            continue
        res["save"] = recorded(save)
        res["load"] = recorded(load)
        d = st.last_device_delta.to_dict() if st.last_device_delta else {}
        res["save_batches"] = d.get("batches")
        res["save_kernel_pieces"] = d.get("kernel_pieces")
    for what in ("save", "load"):
        log(f"{what}: {sum(res[what].values())} synchronising calls")
        for line, n in res[what].items():
            log(f"  {n:6d} {line}")
    st.close()
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
