"""Choosing the pack size: write + fsync and read throughput, and object count, for 4-64 MiB.

Writes ``--total`` bytes of incompressible data as packs of each size the way
the local backend does (temp file, write, fsync, rename, one directory fsync at
the end), then reads them back from the page cache with ``--threads`` threads,
whole packs and 1 MiB ranges. Prints a table and writes JSON.

    python benchmarks/bench_pack_size.py --total 256MiB --out benchmarks/results/pack_size.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from apollo_cas.cli.common import parse_size

MiB = 1 << 20


def write_packs(root: Path, total: int, pack: int, payload: bytes) -> tuple[float, list[Path]]:
    root.mkdir(parents=True)
    paths = []
    t0 = time.perf_counter()
    for i in range(max(1, total // pack)):
        path = root / f"{i:08d}"
        tmp = root / f".tmp-{i:08d}"
        with open(tmp, "wb") as f:
            f.write(payload[:pack])
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        paths.append(path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0, paths


def read_packs(paths: list[Path], threads: int, piece: int) -> float:
    def one(path: Path) -> int:
        n = 0
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(piece)
            while got := f.readinto(buf):
                n += got
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sum(pool.map(one, paths))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", default="256MiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/pack_size.json")
    args = ap.parse_args()
    total = parse_size(args.total)
    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-packsize-"))
    payload = os.urandom(64 * MiB)
    rows = []
    for mib in (4, 8, 16, 32, 64):
        root = work / f"p{mib}"
        shutil.rmtree(root, ignore_errors=True)
        wsec, paths = write_packs(root, total, mib * MiB, payload)
        nbytes = len(paths) * mib * MiB
        rsec = read_packs(paths, args.threads, min(mib * MiB, 16 * MiB))
        rows.append(
            {
                "pack_mib": mib,
                "objects_per_gb": round((1 << 30) / (mib * MiB), 1),
                "objects_54gb_full_save": round(54e9 * 0.67 / (mib * MiB)),
                "write_fsync_gb_s": round(nbytes / wsec / 1e9, 3),
                "read_page_cache_gb_s": round(nbytes / rsec / 1e9, 3),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(root)
    out = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "total_bytes": total,
        "threads": args.threads,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
