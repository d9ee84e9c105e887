"""How the save's host encoding scales with threads (a probe, not a benchmark).

1 MiB bf16 blocks (randn * 0.02), ``--mib`` of them, no store: GB/s of raw bytes on N
threads for each step of a full save's encoding (hash, plane split, zstd of the planes,
``codecs.encode``, hash + encode), and ``codecs.encode`` with the envelope assembled by
``bytes.join`` as before 2026-12-03 (CPython holds the GIL through a join under 1 MiB),
side by side in one run.

    python benchmarks/probe_encode_scaling.py --threads 1,4,8,16 --out $OUT/encode_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from apollo_cas import codecs
from apollo_cas.codecs import envelope, planes, zstd_frames
from apollo_cas.hashing import digest

GB = 1e9


def blocks(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        f = (rng.standard_normal(1 << 19) * 0.02).astype(np.float32)
        out.append((f.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return out


def rate(fn: Callable[[bytes], Any], data: list[bytes], threads: int, repeat: int) -> float:
    work = data * repeat
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, data[: threads * 2]))  # warm the threads' compressors
        t0 = time.perf_counter()
        for _ in pool.map(fn, work):
            pass
        dt = time.perf_counter() - t0
    return round(sum(len(b) for b in work) / dt / GB, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,4,8,16")
    ap.add_argument("--mib", type=int, default=256, help="distinct 1 MiB blocks")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="encode_scaling.json")
    args = ap.parse_args()
    policy = codecs.CodecPolicy()
    data = blocks(args.mib)

    def split(b: bytes) -> Any:
        return planes.split(b, 2)

    def zstd_planes(b: bytes) -> Any:
        p, _ = planes.split(b, 2)
        return [zstd_frames.compress_plane(p[k], policy.level) for k in range(2)]

    def encode(b: bytes) -> Any:
        return codecs.encode(b, policy, 2)

    def encode_join(b: bytes) -> Any:
        # The envelope as before: one bytes.join of header, parameters and pieces.
        codec, params, pieces, _ = codecs._encode_as(codecs.PLANES, memoryview(b), policy.level, 2)
        head = envelope._HEAD.pack(
            envelope.MAGIC, envelope.ENVELOPE_VERSION, codec, 0, len(b), len(params)
        )
        return b"".join((head, params, *pieces))

    def digest_encode(b: bytes) -> Any:
        digest(b)
        return codecs.encode(b, policy, 2)

    steps = {
        "digest": digest,
        "planes.split": split,
        "zstd of the two planes only": zstd_planes,
        "codecs.encode": encode,
        "codecs.encode, envelope by bytes.join (before)": encode_join,
        "digest + codecs.encode": digest_encode,
    }
    res: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "what": f"{args.mib} x 1 MiB bf16 blocks (randn * 0.02) x {args.repeat}, no store: "
        "GB/s of raw bytes on N threads",
    }
    for name, fn in steps.items():
        res[name] = {t: rate(fn, data, int(t), args.repeat) for t in args.threads.split(",")}
        print(f"{name:50s} {res[name]}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
