"""How fast N processes can fill restore outputs on tmpfs (a probe, not a benchmark).

The CPU restore's worker processes copy decoded chunks into shared mappings of the
output files (``decode_worker.OutputMaps``). This probe times only that write side,
with no decoding: ``--procs`` processes each write ``--per-proc`` bytes of one
prepared buffer, in 1 MiB pieces, into

* ``one-file-mmap``: disjoint ranges of one file through a shared mapping (today's
  restore to one ``weights.bin``);
* ``one-file-mmap-populate``: the same with ``MADV_POPULATE_WRITE`` on each range first;
* ``one-file-pwrite``: disjoint ranges of one file with ``pwrite``;
* ``own-file-mmap``: a file per process (a restore to shards);
* ``own-file-mmap-populate`` and ``own-file-pwrite``: the same with ``MADV_POPULATE_WRITE``
  first, or with ``pwrite`` (one writer per inode: no lock to share; on the H200 host one
  process wrote one file at 3.10 GB/s with ``pwrite`` against 1.23 through a mapping);
* ``one-file-fallocated-mmap``: one file whose pages the parent allocates first with
  ``posix_fallocate`` (timed apart, and in the wall time), then ``one-file-mmap``'s
  writes: whether one process allocating tmpfs pages, with the writers only mapping
  them, beats writers that each allocate (16 of them share one inode's page cache);

and reports GB/s for each, so a restore's rate can be read against what the kernel
allows for its target.

    python benchmarks/probe_shm_writes.py --dir /dev/shm/apollo-writes --procs 16
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
GB = 1e9
#: Linux 5.14's MADV_POPULATE_WRITE (Python's mmap module names it from 3.13 only).
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _worker(args: tuple[str, str, int, int]) -> tuple[float, float, float]:
    """(wall, user CPU, system CPU) seconds of one process's writes."""
    mode, path, offset, nbytes = args
    piece = os.urandom(MiB)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    try:
        if mode.endswith("-pwrite"):
            for off in range(offset, offset + nbytes, MiB):
                os.pwrite(fd, piece, off)
        else:
            m = mmap.mmap(fd, 0)
            try:
                if mode.endswith("-populate"):
                    start = offset - offset % mmap.PAGESIZE
                    m.madvise(MADV_POPULATE_WRITE, start, nbytes)
                for off in range(offset, offset + nbytes, MiB):
                    m[off : off + MiB] = piece
            finally:
                m.close()
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def run(mode: str, root: Path, procs: int, per_proc: int) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if mode.startswith("own-file"):
        jobs = []
        for i in range(procs):
            p = root / f"out-{i}"
            with open(p, "wb") as f:
                f.truncate(per_proc)
            jobs.append((mode, str(p), 0, per_proc))
    else:
        p = root / "out"
        with open(p, "wb") as f:
            f.truncate(per_proc * procs)
        jobs = [(mode, str(p), i * per_proc, per_proc) for i in range(procs)]
    alloc = 0.0
    with mp.get_context("fork").Pool(procs) as pool:
        t0 = time.perf_counter()
        if mode == "one-file-fallocated-mmap":
            fd = os.open(root / "out", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, per_proc * procs)
            finally:
                os.close(fd)
            alloc = time.perf_counter() - t0
        times = pool.map(_worker, jobs)
        wall = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    total = per_proc * procs
    return {
        "mode": mode,
        "procs": procs,
        "bytes": total,
        "wall_s": round(wall, 3),
        "gb_per_s": round(total / wall / GB, 2),
        "slowest_proc_s": round(max(t[0] for t in times), 3),
        # CPU per byte (the writers' own): what decoding workers would pay beside it.
        "writers_user_s": round(sum(t[1] for t in times), 3),
        "writers_sys_s": round(sum(t[2] for t in times), 3),
        "fallocate_s": round(alloc, 6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm/apollo-writes")
    ap.add_argument("--procs", default="1,16", help="comma-separated process counts")
    ap.add_argument("--per-proc", type=int, default=1 << 30, help="bytes per process")
    ap.add_argument("--out", default="shm_writes.json")
    args = ap.parse_args()
    modes = [
        "one-file-mmap",
        "one-file-mmap-populate",
        "one-file-pwrite",
        "own-file-mmap",
        "own-file-mmap-populate",
        "own-file-pwrite",
        "one-file-fallocated-mmap",
    ]
    rows = []
    for procs in (int(p) for p in args.procs.split(",")):
        for mode in modes:
            row = run(mode, Path(args.dir), procs, args.per_proc)
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
