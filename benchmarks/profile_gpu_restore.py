"""Where the GPU restore's and the GPU dense step's time goes (a profile, not a benchmark).

On the device, for one generated bf16 model in a format-2 store in /dev/shm:

* a warm ``Store.load(device="cuda")`` with the host time of each pipeline step summed
  (parse, layout, device-side fill, nvCOMP call, interleave, verify, place) beside the
  device phases, and a cProfile of the main thread;
* nvCOMP on real exponent-plane frames: batches of 256 to 4,096 frames decoded with the
  stream synchronisation nvCOMP does to read sizes, and without it (a decompression
  config built from the known sizes), checked equal;
* a dense step (GPU delta path), the load of it (sparse chunks, codec 4), and a second
  dense step on top (its parent's chunks are sparse deltas), each with a cProfile.

    python benchmarks/profile_gpu_restore.py --size 16GiB --out $OUT/profile.json

Prints what it measures; writes JSON and the profiles' top lines.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import shutil
import statistics
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
from apollo_cas.gpu import gather as gather_mod  # noqa: E402
from apollo_cas.gpu import restore as restore_mod  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402

GB = 1e9
HOST: dict[str, float] = {}
#: CPU seconds (``time.thread_time``) per wrapped function, summed over threads: where
#: the dense step's CPU time goes (cProfile sees only the main thread).
CPU: dict[str, float] = {}


def timed(name: str, fn: Any) -> Any:
    """``fn`` with its wall time added to HOST[name] (any thread)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            HOST[name] = HOST.get(name, 0.0) + time.perf_counter() - t0

    return wrapper


def cputimed(name: str, fn: Any) -> Any:
    """``fn`` with its thread CPU time added to CPU[name] (any thread)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            CPU[name] = CPU.get(name, 0.0) + time.thread_time() - t0

    return wrapper


def instrument_dense() -> None:
    """CPU time of the dense step's host work, on every thread."""
    from apollo_cas import chunkstore
    from apollo_cas.gpu import delta_save

    delta_save.encode_delta = cputimed("encode_delta", delta_save.encode_delta)
    delta_save.choose = cputimed("choose (full encode)", delta_save.choose)
    cls = delta_save.GpuDeltaSaver
    for name in ("_piece", "_encode", "_compare", "_collect"):
        setattr(cls, name, cputimed(name, getattr(cls, name)))
    cs = chunkstore.ChunkStore
    cs.put_encoded = cputimed("put_encoded", cs.put_encoded)  # type: ignore[method-assign]
    rp = restore_mod.RestorePipeline
    for name in ("_gather_finish", "_layout", "_fill_on_device", "_verify"):
        setattr(rp, name, cputimed("pipeline" + name, getattr(rp, name)))


def instrument() -> None:
    """Host time of each step: a profile script's wrappers, never the library's code."""
    gather_mod.parse_chunk = timed("parse_chunk", gather_mod.parse_chunk)
    cls = restore_mod.RestorePipeline
    for name in (
        "_layout",
        "_fill_on_device",
        "_interleave",
        "_verify",
        "_place",
        "_gather_finish",
    ):
        setattr(cls, name, timed(name, getattr(cls, name)))
    from apollo_cas.gpu import zstd

    zstd.NvcompFrames.decode = timed("nvcomp_decode_call", zstd.NvcompFrames.decode)


def top(prof: cProfile.Profile, n: int = 35) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(n)
    return s.getvalue()


def load_once(st: Store, ref: str, prof: bool = False, **options: Any) -> dict[str, Any]:
    m = st.manifest(st.resolve(ref))
    pipe = st.restore_pipeline(m.block_size, "cuda", **options)
    HOST.clear()
    torch.cuda.synchronize()
    p = cProfile.Profile() if prof else None
    t0 = time.perf_counter()
    if p:
        p.enable()
    out = load_tensors_pipeline(pipe, m)
    torch.cuda.synchronize()
    if p:
        p.disable()
    dt = time.perf_counter() - t0
    ok = bgr.exact(st, ref, out)
    res = {
        "seconds": round(dt, 4),
        "bit_exact": ok,
        "phases": pipe.stats.to_dict(),
        "host_step_seconds": {k: round(v, 4) for k, v in HOST.items()},
    }
    if p:
        res["profile"] = top(p)
    pipe.close()
    del out
    bgr.free("cuda")
    return res


def nvcomp_experiment(st: Store, ref: str) -> dict[str, Any]:
    import numpy as np
    from nvidia import nvcomp

    from apollo_cas.codecs import planes, zstd_frames

    m = st.manifest(st.resolve(ref))
    ids = [c for e in m.tensors for c in e.chunks if e.nbytes >= m.block_size][:4096]
    exps = [planes.split(st.chunks.read(c), 2)[0][1] for c in ids]
    plane = len(exps[0])
    frames = [zstd_frames.compress_plane(p, 1) for p in exps]
    src, offs = bgr.packed_frames(frames)
    outs = torch.empty(len(exps) * plane, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    s = int(stream.cuda_stream)
    res: dict[str, Any] = {"plane_bytes": plane}
    for policy in ("CONCURRENCY", "LATENCY"):
        codec = nvcomp.Codec(
            algorithm="Zstd",
            bitstream_kind=nvcomp.BitstreamKind.RAW,
            device_id=0,
            cuda_stream=s,
            execution_policy=getattr(nvcomp.ExecutionPolicy, policy),
        )
        for n in (256, 1024, 4096):
            n = min(n, len(frames))
            so, ss = offs[:n], [len(f) for f in frames[:n]]
            oo, osz = [i * plane for i in range(n)], [plane] * n
            row: dict[str, Any] = {}
            for mode in ("sync", "preconfigured"):
                times, cfg_times = [], []
                for _ in range(5):
                    outs[: n * plane].zero_()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    a = nvcomp.as_arrays(src, so, ss, cuda_stream=s)
                    b = nvcomp.as_arrays(outs, oo, osz, cuda_stream=s)
                    if mode == "sync":
                        r = codec.decode(a, out=b)
                    else:
                        tc = time.perf_counter()
                        cfg = codec.decompression_config(codec.compression_config(osz))
                        cfg_times.append(time.perf_counter() - tc)
                        r = codec.decode(a, out=b, decompression_config=cfg)
                    t_host = time.perf_counter() - t0
                    stream.synchronize()
                    times.append((time.perf_counter() - t0, t_host))
                    del r, a, b
                ok = all(
                    torch.equal(
                        outs[i * plane : (i + 1) * plane].cpu(),
                        torch.from_numpy(np.asarray(exps[i])),
                    )
                    for i in (0, n - 1)
                )
                med = statistics.median(t for t, _ in times[1:])
                row[mode] = {
                    "seconds_median": round(med, 5),
                    "host_call_median": round(statistics.median(h for _, h in times[1:]), 5),
                    "output_gb_per_s": round(n * plane / med / GB, 1),
                    "config_build_s": round(statistics.median(cfg_times), 5) if cfg_times else None,
                    "exact": ok,
                }
            res[f"{policy}_{n}"] = row
            print(f"  nvcomp {policy} {n} frames: {row}", flush=True)
    return res


def timed_save(st: Store, model: dict[str, torch.Tensor], prof: bool) -> dict[str, Any]:
    torch.cuda.synchronize()
    CPU.clear()
    p = cProfile.Profile() if prof else None
    c0, t0 = time.process_time(), time.perf_counter()
    if p:
        p.enable()
    r = st.save(model, force=True)
    if p:
        p.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "stored_bytes": r.stats.new_stored_bytes,
        "new_chunks": r.stats.new_chunks,
    }
    if st.last_device_delta is not None:
        out["gpu_delta"] = st.last_device_delta.to_dict()
    out["cpu_by_function_s"] = {k: round(v, 3) for k, v in sorted(CPU.items())}
    if p:
        out["profile"] = top(p, 30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-profile")
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    out = Path(args.out)

    def dump() -> None:
        out.write_text(json.dumps(res, indent=1))

    model = bgr.build_model(parse_size(args.size), "cuda")
    st = Store.open(root, create=True)
    t0 = time.perf_counter()
    st.save(model)
    res["save_full_s"] = round(time.perf_counter() - t0, 2)
    print("full save", res["save_full_s"], flush=True)
    full = st.resolve("latest")
    instrument()
    res["load_first"] = load_once(st, full)
    print("load first", res["load_first"]["seconds"], res["load_first"]["host_step_seconds"])
    res["load_warm"] = load_once(st, full)
    print("load warm", res["load_warm"]["seconds"], res["load_warm"]["phases"])
    print("  host steps", res["load_warm"]["host_step_seconds"], flush=True)
    res["load_warm_profiled"] = load_once(st, full, prof=True)
    print(res["load_warm_profiled"]["profile"], flush=True)
    res["load_batch_1GiB"] = load_once(st, full, batch_bytes=1 << 30)
    print("load 1 GiB batches", res["load_batch_1GiB"]["seconds"], flush=True)
    dump()
    try:
        res["nvcomp"] = nvcomp_experiment(st, full)
    except Exception as exc:
        res["nvcomp"] = {"error": repr(exc)}
        print("nvcomp experiment failed", repr(exc), flush=True)
    dump()
    if not args.skip_dense:
        instrument_dense()
        bgr.dense_step(model, 1)
        res["dense_step_1"] = timed_save(st, model, prof=True)
        print("dense step 1", {k: v for k, v in res["dense_step_1"].items() if k != "profile"})
        print(res["dense_step_1"]["profile"], flush=True)
        dump()
        dense = st.resolve("latest")
        res["load_dense"] = load_once(st, dense)
        print("load dense", res["load_dense"]["seconds"], res["load_dense"]["phases"], flush=True)
        print("  host steps", res["load_dense"]["host_step_seconds"], flush=True)
        dump()
        bgr.dense_step(model, 2)
        res["dense_step_2"] = timed_save(st, model, prof=True)
        print("dense step 2", {k: v for k, v in res["dense_step_2"].items() if k != "profile"})
        print(res["dense_step_2"]["profile"], flush=True)
        dump()
    st.close()
    shutil.rmtree(root, ignore_errors=True)
    dump()


if __name__ == "__main__":
    main()
