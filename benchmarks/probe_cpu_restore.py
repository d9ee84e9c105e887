"""Where a CPU restore into tmpfs spends its time (a probe, not a benchmark).

Issue 13 asks for restores to safetensors or flat into /dev/shm at 10 GB/s on the
16-core host; 4.3 GB went at 2.06 GB/s (one file) and 2.46 GB/s (five shards) on
2026-12-03 (results/h200_2026-12-03g). This probe builds a store of a generated bf16
model (``--size``) under ``--dir`` and, over ``--rounds`` alternating rounds, restores
latest with each decoder (worker processes writing through mappings or with
``pwrite``, threads) and worker count of
``--workers`` into flat and into safetensors shards of ``--shard-size``. Per restore it
records the wall time and CPU seconds of the parent and of its worker processes
(user and system apart: a worker's system time is mostly page faults on the output
files' mappings). It also times ``--workers`` decode workers that start, open the
store and exit with nothing to do: the fixed cost every process restore pays.

Every restore is checked by the restore itself (every chunk re-hashed); the first
restore of each output form gives the bytes that every later one must match.

    python benchmarks/probe_cpu_restore.py --size 4GiB --workers 8,16 --out cpu_restore.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools import digest_file

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.store import Store


def children_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


def start_up(location: Path, n: int) -> dict[str, float]:
    """``n`` decode workers started at once, each opening the store, then told to exit."""
    u0, s0 = children_cpu()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "apollo_cas.decode_worker", str(location)],
            stdin=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    for p in procs:
        p.wait()
    u1, s1 = children_cpu()
    return {
        "workers": n,
        "wall_s": round(time.perf_counter() - t0, 3),
        "cpu_user_s": round(u1 - u0, 3),
        "cpu_sys_s": round(s1 - s0, 3),
    }


def digest_dir(path: Path) -> dict[str, str]:
    """Every file under ``path`` (its path relative to it) -> a digest of its bytes."""
    return {
        str(f.relative_to(path)): digest_file(f) for f in sorted(path.rglob("*")) if f.is_file()
    }


#: ``--decoders`` -> (APOLLO_CAS_PROCESSES, APOLLO_CAS_WORKER_WRITES)
DECODERS = {
    "processes": ("1", "mmap"),
    "processes-pwrite": ("1", "pwrite"),
    "threads": ("0", "auto"),
}


def one_restore(
    location: Path, out: Path, fmt: str, decoder: str, workers: int, shard: int | None
) -> dict[str, Any]:
    os.environ["APOLLO_CAS_PROCESSES"], os.environ["APOLLO_CAS_WORKER_WRITES"] = DECODERS[decoder]
    with Store.open(location, workers=workers) as st:
        u0, s0 = children_cpu()
        c0, t0 = time.process_time(), time.perf_counter()
        st.restore("latest", out, format=fmt, max_shard_size=shard if fmt != "flat" else None)
        wall = time.perf_counter() - t0
        parent = time.process_time() - c0
        u1, s1 = children_cpu()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {
        "format": fmt,
        "decoder": decoder,
        "workers": workers,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "wall_s": round(wall, 3),
        "parent_cpu_s": round(parent, 3),
        "workers_cpu_user_s": round(u1 - u0, 3),
        "workers_cpu_sys_s": round(s1 - s0, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-cpu-restore")
    ap.add_argument("--workers", default="16", help="worker counts, comma-separated")
    ap.add_argument(
        "--decoders",
        default="processes,threads",
        help="of " + ",".join(DECODERS) + " (processes-pwrite: APOLLO_CAS_WORKER_WRITES=pwrite)",
    )
    ap.add_argument("--formats", default="flat,safetensors")
    ap.add_argument("--shard-size", default="1GiB", help="safetensors shards of at most this")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="cpu_restore.json")
    args = ap.parse_args(argv)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    counts = [int(x) for x in args.workers.split(",") if x]
    decoders = [d for d in args.decoders.split(",") if d]
    for d in decoders:
        if d not in DECODERS:
            ap.error(f"--decoders: {d!r} is none of " + ", ".join(DECODERS))
    formats = [f for f in args.formats.split(",") if f]
    shard = parse_size(args.shard_size)
    weights = examples.generate(examples.ModelShape.for_bytes(parse_size(args.size)))
    raw = sum(a.nbytes for a in weights.values())
    location = work / "store"
    with Store.open(location, create=True) as st:
        st.save(weights)
    del weights
    res: dict[str, Any] = {
        "size": args.size,
        "raw_bytes": raw,
        "cpus": os.cpu_count(),
        "start_up": [],
        "restores": [],
    }

    def dump() -> None:  # after every restore: a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    want: dict[str, dict[str, str]] = {}
    for n in counts:
        res["start_up"].append(row := start_up(location, n))
        print(f"{n} workers start and exit: {row}", flush=True)
    for rnd in range(args.rounds):
        for fmt in formats:
            for decoder in decoders:
                for n in counts:
                    out = work / "out"
                    row = one_restore(location, out, fmt, decoder, n, shard)
                    got = digest_dir(out)
                    if want.setdefault(fmt, got) != got:
                        raise SystemExit(f"{fmt} restore by {decoder} x{n}: different bytes")
                    shutil.rmtree(out)
                    row["round"] = rnd
                    row["gb_per_s"] = round(raw / row["wall_s"] / 1e9, 2)
                    res["restores"].append(row)
                    print(json.dumps(row), flush=True)
                    dump()
    shutil.rmtree(work, ignore_errors=True)
    dump()


if __name__ == "__main__":
    main()
