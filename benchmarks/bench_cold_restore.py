"""Restores from disk with a cold page cache, beside the disk's read bandwidth, same run.

Issue 13, item 4, and its CPU figure. For one generated bf16 model (``--size``) in a
format-2 store on the disk under test (``--dir``), with the same weights written as one
safetensors file beside it:

* the disk's read floor: every pack file of the store read cold with ``--threads``
  threads (16 MiB ``pread`` pieces), then the safetensors file the same way;
* ``Store.load(device=...)`` cold and warm (phases from RestoreStats), checked bit-exact;
* ``safetensors.torch.load_file(device=...)`` cold and warm;
* the CPU restore (``Store.restore``) of the warm store to ``--cpu-target`` (default
  /dev/shm) as safetensors and as flat ``weights.bin``, in GB/s of output.

"Cold": ``/proc/sys/vm/drop_caches`` when it is writable (root), else
``posix_fadvise(DONTNEED)`` on every file read (after an fsync, so the pages are
clean and can be dropped). The JSON names the method; the floor's own GB/s shows whether
it worked (a page-cache read on the H200 host runs at ~40 GB/s).

    python benchmarks/bench_cold_restore.py --size 16GiB --dir /root/apollo-cold \\
        --out benchmarks/results/cold_restore.json

``--device cpu --size 8MiB`` runs everything on CPU tensors (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dense_gpu import build_model, log, sync

from apollo_cas.cli.common import parse_size
from apollo_cas.gpu.accounting import LOAD_BATCH_BYTES
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store
from apollo_cas.targets.tensors import load_tensors_pipeline

GB = 1e9
MiB = 1 << 20
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(paths: list[Path]) -> str:
    """Empty the page cache of ``paths``; returns the method that was used."""
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def read_floor(paths: list[Path], threads: int, piece: int = 16 * MiB) -> dict[str, Any]:
    """GB/s of reading every byte of ``paths`` in ``piece``-sized preads on ``threads``."""
    jobs = [
        (p, off, min(piece, p.stat().st_size - off))
        for p in paths
        for off in range(0, p.stat().st_size, piece)
    ]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(lambda j: len(os.pread(fds[j[0]], j[2], j[1])), jobs))
        dt = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"bytes": got, "seconds": round(dt, 4), "gb_per_s": round(got / dt / GB, 2)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].to(a[k].device).view(torch.uint8)) for k in a
    )


def timed_load(
    st: Store, model: dict[str, torch.Tensor], device: str, arenas: int | None = None
) -> dict[str, Any]:
    """``Store.load(device=...)``: on CUDA its own steps (pipeline at LOAD_BATCH_BYTES,
    load_tensors_pipeline) so the phases can be read; elsewhere ``Store.load`` itself."""
    m = st.manifest(st.resolve("latest"))
    sync(device)
    t0 = time.perf_counter()
    phases = None
    if device.startswith("cuda"):
        opts = {} if arenas is None else {"arenas": arenas}
        pipe = st.restore_pipeline(m.block_size, device, batch_bytes=LOAD_BATCH_BYTES, **opts)
        try:
            got = load_tensors_pipeline(pipe, m)
            sync(device)
        finally:
            phases = pipe.stats.to_dict()
            pipe.close()
    else:
        got = st.load("latest", device=device)
    dt = time.perf_counter() - t0
    row: dict[str, Any] = {"seconds": round(dt, 4), "gb_per_s": round(m.logical_bytes / dt / GB, 2)}
    row["bit_exact"] = same(model, got)
    if phases is not None:
        row["phases"] = phases
    del got
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def timed_safetensors(path: Path, device: str) -> float:
    from safetensors.torch import load_file

    sync(device)
    t0 = time.perf_counter()
    got = load_file(str(path), device=device)
    sync(device)
    dt = time.perf_counter() - t0
    del got
    return round(dt, 4)


def cpu_restores(st: Store, target: Path, raw: int) -> dict[str, Any]:
    out: dict[str, Any] = {"target": str(target), "workers": st.workers}
    for fmt in ("safetensors", "flat"):
        dest = target / fmt
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        st.restore("latest", dest, format=fmt)
        dt = time.perf_counter() - t0
        out[fmt] = {"seconds": round(dt, 3), "gb_per_s": round(raw / dt / GB, 2)}
        log(f"  CPU restore to {dest} as {fmt}: {dt:.2f} s, {raw / dt / GB:.2f} GB/s")
        shutil.rmtree(dest, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/root/apollo-cold", help="work directory on the disk")
    ap.add_argument("--cpu-target", default="/dev/shm/apollo-cold-restore")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--arenas",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="arena counts to time the loads with besides the default (3)",
    )
    ap.add_argument("--out", default="benchmarks/results/cold_restore.json")
    args = ap.parse_args()
    from safetensors.torch import save_file

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = build_model(parse_size(args.size), args.device)
    raw = sum(t.nbytes for t in model.values())
    log(f"model {raw / GB:.2f} GB bf16, {len(model)} tensors on {args.device}")
    res: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "raw_bytes": raw,
        "work_dir": str(work),
    }
    st = Store.open(work / "store", create=True)
    t0 = time.perf_counter()
    st.save(DeviceSource(model))
    res["full_save_seconds"] = round(time.perf_counter() - t0, 3)
    st_file = work / "model.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in model.items()}, str(st_file))
    packs = [p for p in files_under(work / "store") if "/packs/" in str(p)]
    res["stored_pack_bytes"] = sum(p.stat().st_size for p in packs)
    store_files = files_under(work / "store")

    res["evict_method"] = evict(store_files)
    res["floor_packs_cold"] = read_floor(packs, args.threads)
    res["floor_packs_warm"] = read_floor(packs, args.threads)
    res["evict_method_safetensors"] = evict([st_file])
    res["floor_safetensors_cold"] = read_floor([st_file], args.threads)
    log(
        f"floors: packs cold {res['floor_packs_cold']}, warm {res['floor_packs_warm']}, "
        f"safetensors cold {res['floor_safetensors_cold']} ({res['evict_method']})"
    )

    st.close()
    st = Store.open(work / "store")
    # The first load in a process pays one-time costs (nvCOMP and Triton set-up): on
    # the H200 the first cold load took 9.3-9.7 s and a second one 5.7-6.9 s, whatever
    # its arena count (results/h200_2026-12-03b), so every timed load comes after one.
    res["load_warmup"] = timed_load(st, model, args.device)
    evict(store_files)
    res["load_cold"] = timed_load(st, model, args.device)
    res["load_warm"] = timed_load(st, model, args.device)
    log(f"Store.load cold {res['load_cold']['seconds']} s, warm {res['load_warm']['seconds']} s")
    for n in args.arenas:
        # The same loads with another arena count (2: the default until 2026-12-03).
        evict(store_files)
        res[f"load_cold_{n}_arenas"] = timed_load(st, model, args.device, n)
        res[f"load_warm_{n}_arenas"] = timed_load(st, model, args.device, n)
        log(
            f"  {n} arenas: cold {res[f'load_cold_{n}_arenas']['seconds']} s, "
            f"warm {res[f'load_warm_{n}_arenas']['seconds']} s"
        )
    evict([st_file])
    res["safetensors_cold_seconds"] = timed_safetensors(st_file, args.device)
    res["safetensors_warm_seconds"] = timed_safetensors(st_file, args.device)
    log(
        f"safetensors load_file cold {res['safetensors_cold_seconds']} s, "
        f"warm {res['safetensors_warm_seconds']} s"
    )
    cold = res["load_cold"]["seconds"]
    floor = res["floor_packs_cold"]["gb_per_s"]
    res["cold_load_over_disk_read"] = round(
        res["stored_pack_bytes"] / cold / GB / max(floor, 1e-9), 3
    )
    res["cpu_restore"] = cpu_restores(st, Path(args.cpu_target), raw)
    st.close()
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
