"""Whether smaller zstd frames per byte plane pay (a probe, not a benchmark).

Today each plane of a block is one zstd frame: a 1 MiB bf16 block has one 512 KiB
exponent frame. NVIDIA recommends 64-128 KiB frames for nvCOMP's batched zstd decode,
and nvCOMP's rate grew with the frames per call in our runs (13.1 GB/s of output at
256 frames, 38.8 at 1,024, 65 at 4,096; docs/GPU_RESTORE.md). Cutting every plane into
frames of ``F`` decoded bytes gives ``plane / F`` times the frames per call at the
cost of one frame header and one entropy table each.

The old ``bench_gpu_restore.py --frames`` timed 1,000 real exponent planes on the H200
with the host's clock (each call's descriptors included): 37.4 GB/s of output at
512 KiB frames, 35.3 at 128 KiB, 41.3 at 64 KiB (``results/gpu_restore.md``). This
probe also times the device alone (CUDA events), which is what a writer change (framed
planes: commits a27e914 and 5b1178d, taken out by 248766f) would have to lower.

For each ``--frame-sizes`` F, over ``--size`` bytes of bf16 weights (the benchmarks'
recipe, ``bench_dense_gpu.build_model``) in 1 MiB blocks, and over the XOR of those
weights with one dense step of them (the planes a delta checkpoint stores), this
reports

* stored bytes of the compressed planes (the writer's ``compress_plane`` at level 1),
  as a fraction of the same planes in one frame each;
* host compress and decompress rates (python-zstandard, ``--threads`` threads);
* with a CUDA device and nvCOMP: the decode, in one call, of the frames of ``--batch``
  bytes of blocks (``Store.load``'s 1 GiB batch: 512 MiB of exponent planes), median
  of ``--repeats``, in GB/s of decoded output, timed with CUDA events.

    python benchmarks/probe_frame_sizes.py --size 1GiB --frame-sizes 512KiB,128KiB,64KiB
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apollo_cas.cli.common import parse_size
from apollo_cas.codecs import planes, zstd_frames

MiB = 1 << 20
GB = 1e9


def planes_of(model: dict[str, Any], block: int) -> list[np.ndarray]:
    """Every block's byte planes (2 per bf16 block), cut by the planes codec itself."""
    import torch

    out = []
    for t in model.values():
        raw = t.contiguous().view(-1).view(torch.uint8).cpu().numpy()
        for at in range(0, raw.size - raw.size % 2, block):
            out.extend(planes.split(raw[at : at + block].data, 2)[0])
    return out


def cut(plane_list: list[np.ndarray], frame: int) -> list[memoryview]:
    return [p[a : a + frame].data for p in plane_list for a in range(0, p.size, frame)]


def compress_all(pieces: list[memoryview], threads: int) -> tuple[list[bytes], float]:
    def one(piece: memoryview) -> bytes:
        return zstd_frames.compress_plane(piece, 1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        frames = list(pool.map(one, pieces, chunksize=64))
    return frames, time.perf_counter() - t0


def decompress_all(frames: list[bytes], sizes: list[int], threads: int) -> float:
    def one(i: int) -> None:
        zstd_frames.decompress_exact(frames[i], sizes[i])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(frames)), chunksize=64))
    return time.perf_counter() - t0


def nvcomp_rate(frames: list[bytes], sizes: list[int], batch: int, repeats: int) -> dict[str, Any]:
    """nvCOMP's decode of the frames of the first ``batch`` decoded bytes, in one call."""
    import torch

    from apollo_cas.gpu.zstd import NvcompFrames

    n, raw = 0, 0
    while n < len(frames) and raw + sizes[n] <= batch:
        raw += sizes[n]
        n += 1
    from bench_gpu_restore import packed_frames

    src, src_off = packed_frames(frames[:n])  # each 16-byte aligned, as nvCOMP wants
    out_off = np.cumsum([0, *sizes[:n]]).tolist()  # F is a multiple of 16: aligned too
    dev = torch.device("cuda")
    out = torch.empty(out_off[-1], dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    dec = NvcompFrames(dev, stream)
    lengths = [len(f) for f in frames[:n]]
    times, walls = [], []
    with torch.cuda.stream(stream):
        for _ in range(repeats + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream.synchronize()
            t0 = time.perf_counter()
            a.record(stream)
            keep = dec.decode(src, src_off, lengths, out, out_off[:-1], sizes[:n])
            b.record(stream)
            b.synchronize()
            walls.append(time.perf_counter() - t0)
            del keep
            times.append(a.elapsed_time(b) / 1e3)
    # The first call pays nvCOMP's set-up. Device time (CUDA events) is what the
    # pipeline's device spends; the host's wall time also has the call's descriptors
    # built, which the pipeline's feeding thread pays.
    times, walls = times[1:], walls[1:]
    # Bit-exact against the host's decode of the same frames.
    want = b"".join(
        zstd_frames.decompress_exact(f, s) for f, s in zip(frames[:n], sizes[:n], strict=True)
    )
    ok = bytes(out.cpu().numpy()) == want
    med = statistics.median(times)
    return {
        "frames_per_call": n,
        "decoded_bytes": raw,
        "nvcomp_device_s_median": round(med, 5),
        "nvcomp_device_gb_per_s": round(raw / med / GB, 1),
        "host_wall_s_median": round(statistics.median(walls), 5),
        "bit_exact": ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--frame-sizes", default="512KiB,256KiB,128KiB,64KiB")
    ap.add_argument(
        "--batch", default="1GiB", help="bytes of blocks whose frames go to one nvCOMP call"
    )
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="frame_sizes.json")
    args = ap.parse_args()
    import torch
    from bench_dense_gpu import build_model, dense_step

    from apollo_cas.gpu.zstd import nvcomp_available

    gpu = torch.cuda.is_available()
    nvcomp = nvcomp_available()  # False without the extra or a GPU
    model = build_model(parse_size(args.size), "cpu")
    full = planes_of(model, MiB)
    before = {k: v.clone() for k, v in model.items()}
    dense_step(model, "cpu")
    for k, v in model.items():
        v.view(torch.int16).bitwise_xor_(before[k].view(torch.int16))
    delta = planes_of(model, MiB)
    del before, model
    rows = []
    for kind, plane_list, keep in (
        ("full, exponent planes", full, 1),
        ("dense-step XOR, both planes", delta, None),
    ):
        chosen = plane_list[keep::2] if keep is not None else plane_list
        base = None
        for fs in args.frame_sizes.split(","):
            frame = parse_size(fs)
            pieces = cut(chosen, frame)
            sizes = [len(p) for p in pieces]
            frames, c_s = compress_all(pieces, args.threads)
            d_s = decompress_all(frames, sizes, args.threads)
            stored = sum(len(f) for f in frames)
            base = stored if base is None else base
            raw = sum(sizes)
            row: dict[str, Any] = {
                "planes": kind,
                "frame_bytes": frame,
                "frames": len(frames),
                "raw_bytes": raw,
                "stored_bytes": stored,
                "stored_vs_first": round(stored / base, 4),
                "host_compress_gb_per_s": round(raw / c_s / GB, 2),
                "host_decompress_gb_per_s": round(raw / d_s / GB, 2),
            }
            if gpu and nvcomp:
                limit = parse_size(args.batch) // (2 if keep is not None else 1)
                row.update(nvcomp_rate(frames, sizes, limit, args.repeats))
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = {"threads": args.threads, "size": args.size, "gpu": gpu, "nvcomp": nvcomp}
    Path(args.out).write_text(json.dumps({**info, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
