"""Source read benchmark: pread (what safetensors and seed sources do since a
file truncated during a save killed the process through mmap with SIGBUS)
against the mmap views they used before, side by side in one run.

Each variant reads every 1 MiB block of one safetensors file and hashes it
(XXH3-128, what a save does for every block it reads), on the shared thread
pool with the default worker count; the file is in the page cache (read once
first), as on a save that follows a training step's write.

    python benchmarks/bench_source_read.py            # 256 MiB, a few seconds
    python benchmarks/bench_source_read.py --mib 64   # smaller

Writes benchmarks/results/source_read.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from apollo_cas.hashing import digest
from apollo_cas.parallel import bounded_map, default_workers
from apollo_cas.sources import open_path

MiB = 1 << 20


def write_file(path: Path, mib: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    per = 16
    tensors = {
        f"w{i}": rng.standard_normal((per * MiB) // 4, dtype=np.float32) for i in range(mib // per)
    }
    save_file(tensors, str(path))


def run_pread(path: Path, workers: int) -> float:
    with open_path(path) as src:
        jobs = [(t, off) for t in src.tensors() for off in range(0, t.nbytes, MiB)]
        t0 = time.perf_counter()
        for _ in bounded_map(lambda j: digest(j[0].read(j[1], MiB)), jobs, workers):
            pass
        return time.perf_counter() - t0


def run_mmap(path: Path, workers: int) -> float:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    with open_path(path) as src:  # the same blocks, from the mapping
        spans = [
            (t._start + off, min(MiB, t.nbytes - off))  # type: ignore[attr-defined]
            for t in src.tensors()
            for off in range(0, t.nbytes, MiB)
        ]
    t0 = time.perf_counter()
    for _ in bounded_map(lambda s: digest(view[s[0] : s[0] + s[1]]), spans, workers):
        pass
    elapsed = time.perf_counter() - t0
    view.release()
    mm.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    workers = default_workers()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        path = Path(d) / "model.safetensors"
        write_file(path, args.mib)
        size = path.stat().st_size
        path.read_bytes()  # page cache
        best = {"pread": float("inf"), "mmap": float("inf")}
        for _ in range(args.reps):
            best["pread"] = min(best["pread"], run_pread(path, workers))
            best["mmap"] = min(best["mmap"], run_mmap(path, workers))
    out = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "workers": workers,
        "bytes": size,
        "seconds": best,
        "gib_per_s": {k: size / v / (1 << 30) for k, v in best.items()},
        "pread_over_mmap_time": best["pread"] / best["mmap"],
    }
    print(json.dumps(out, indent=2))
    res = Path(__file__).parent / "results" / "source_read.json"
    res.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
