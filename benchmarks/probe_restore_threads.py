"""Which host thread limits the GPU restore and the dense step (a probe, not a benchmark).

On the device, for one generated bf16 model in a format-2 store in /dev/shm: a full
save and a dense step, then warm ``Store.load(device="cuda")`` of each under variants
that change only the host side: the interpreter's GIL switch interval
(``sys.setswitchinterval``: how long a thread that wants the GIL waits for one that
holds it), the batch size and the number of read threads. Each load reports its wall
time beside each thread's wall and CPU seconds (RestoreStats: ``queue_s``,
``finish_s``, ``main_cpu_s``, ``read_cpu_s``, ``arena_wait_s``), so a thread that waits
for the GIL shows as wall time without CPU time. Then one more dense step is saved
(``dense_save`` also takes a switch interval: run 1 compared three). Every load is
checked bit-exact.

    python benchmarks/probe_restore_threads.py --size 16GiB --out $OUT/threads.json

``--smoke`` runs a tiny model on the CPU (checks the script only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_gpu_restore as bgr  # noqa: E402

from apollo_cas.cli.common import parse_size  # noqa: E402
from apollo_cas.store import Store  # noqa: E402

GB = 1e9
KEYS = (
    "read_s",
    "arena_wait_s",
    "read_cpu_s",
    "stage_cpu_s",
    "wait_s",
    "queue_s",
    "finish_s",
    "main_cpu_s",
    "upload_wait_s",
    "copy_s",
    "decode_s",
    "verify_s",
)


def variant(
    st: Store, ref: str, dev: str, switch: float | None, sync: bool = False, **options: Any
) -> dict[str, Any]:
    """One warm load; ``sync``: nvCOMP without a prebuilt configuration (it then
    synchronises the stream on every batch, as before 2026-12-02's second session)."""
    from apollo_cas.gpu.zstd import NvcompFrames

    old = sys.getswitchinterval()
    if switch is not None:
        sys.setswitchinterval(switch)
    NvcompFrames.PRECONFIGURED = not sync
    try:
        got = bgr.timed_load(st, ref, dev, **options)
    finally:
        sys.setswitchinterval(old)
        NvcompFrames.PRECONFIGURED = True
    ph = got.get("phases", {})
    got["threads"] = {k: ph.get(k) for k in KEYS}
    got.pop("phases", None)
    return got


def dense_save(st: Store, model: dict[str, torch.Tensor], seed: int, switch: float | None) -> Any:
    bgr.dense_step(model, seed)
    bgr.sync(str(next(iter(model.values())).device))
    old = sys.getswitchinterval()
    if switch is not None:
        sys.setswitchinterval(switch)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        r = st.save(model)
        return {
            "switch_interval": switch,
            "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 2),
            "stored_bytes": r.stats.new_stored_bytes,
        }
    finally:
        sys.setswitchinterval(old)


def profiles(st: Store, refs: dict[str, str], dev: str, binary: str, where: Path) -> dict[str, Any]:
    """Three warm loads of each checkpoint under py-spy: every thread where it is
    (``idle``: a thread waiting for the GIL shows the line it resumes at), then only
    the thread that holds the GIL (``gil``); the most common frames per thread group."""
    from pyspy import Recording, summarize

    out: dict[str, Any] = {}
    for ckpt, ref in refs.items():
        for mode in ("idle", "gil"):
            path = where.parent / f"pyspy-{ckpt}-{mode}.txt"
            with Recording(binary, path, rate=250, idle=mode == "idle", gil=mode == "gil") as rec:
                for _ in range(3):
                    bgr.timed_load(st, ref, dev)
            key = f"{ckpt}_{mode}"
            out[key] = {"error": rec.error} if rec.error else summarize(path, top=12, depth=4)
            print(key, json.dumps(out[key])[:3000], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-probe")
    ap.add_argument("--out", default="threads.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--py-spy", default=None, help="py-spy's binary: also profile the loads")
    args = ap.parse_args()
    dev = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    size = parse_size("8MiB" if args.smoke else args.size)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"size": size, "device": dev, "default_switch": sys.getswitchinterval()}

    def dump() -> None:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    model = bgr.build_model(size, dev)
    st = Store.open(root, create=True, format=2)
    t0 = time.perf_counter()
    st.save(model)
    out["full_save_seconds"] = round(time.perf_counter() - t0, 2)
    full = st.resolve("latest")
    out["dense_saves"] = [dense_save(st, model, 1, None)]
    dense = st.resolve("latest")
    print("saves", out["full_save_seconds"], out["dense_saves"], flush=True)
    mib = 1 << 20
    gib = 1024 * mib
    # (nvCOMP's syncing configuration was settled on 2026-12-02: not rerun.)
    variants: list[tuple[str, float | None, bool, dict[str, Any]]] = [
        ("1 GiB batches", None, False, {"batch_bytes": gib}),
        ("1 GiB batches, 16 read threads", None, False, {"batch_bytes": gib, "read_workers": 16}),
        ("1 GiB batches, 4 read threads", None, False, {"batch_bytes": gib, "read_workers": 4}),
        ("1 GiB batches again", None, False, {"batch_bytes": gib}),
        (
            "1 GiB batches, 16 read threads, again",
            None,
            False,
            {"batch_bytes": gib, "read_workers": 16},
        ),
    ]
    for _label, _s, _y, options in variants:  # pinned arenas of every size cached first
        bgr.timed_load(st, full, dev, **options)
    out["loads"] = []
    for ckpt, ref in (("full", full), ("dense", dense)):
        for label, switch, sync, options in variants:
            got = variant(st, ref, dev, switch, sync, **options)
            got.update({"checkpoint": ckpt, "variant": label})
            out["loads"].append(got)
            print(ckpt, label, got["seconds"], got.get("bit_exact"), got["threads"], flush=True)
            dump()
    if args.py_spy:
        out["py_spy"] = profiles(st, {"full": full, "dense": dense}, dev, args.py_spy, root)
        dump()
    out["dense_saves"].append(dense_save(st, model, 2, None))  # after the loads, same host
    print("dense save", out["dense_saves"][-1], flush=True)
    st.close()
    shutil.rmtree(root, ignore_errors=True)
    dump()


if __name__ == "__main__":
    main()
