"""What the GPU does during a restore: device time per kernel and copy (a probe).

The pipeline's phase times come from CUDA events between its steps, and an interval
between two events also counts the device waiting for the host to queue the next step,
so they cannot say whether the device or the host limits a load. This probe runs one
warm ``Store.load(device="cuda")`` of a full save and one of a dense step under
``torch.profiler`` (CUDA activity: every kernel and copy with its device duration) and
reports, per operation name, the device seconds and calls, the bytes and GB/s of the
host-to-device copies, and the sum of all device time beside the load's wall time.

    python benchmarks/probe_restore_kernels.py --size 16GiB --out $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu_restore as bgr

from apollo_cas.cli.common import parse_size
from apollo_cas.gpu.accounting import LOAD_BATCH_BYTES
from apollo_cas.store import Store
from apollo_cas.targets.tensors import load_tensors_pipeline

GB = 1e9


def profiled_load(st: Store, ref: str, top: int) -> dict[str, Any]:
    """One load under the profiler: device time per operation name, and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    m = st.manifest(st.resolve(ref))
    pipe = st.restore_pipeline(m.block_size, "cuda", batch_bytes=LOAD_BATCH_BYTES)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CPU ops not recorded
        t0 = time.perf_counter()
        out = load_tensors_pipeline(pipe, m)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    h2d = pipe.stats.h2d_bytes
    pipe.close()
    del out
    bgr.free("cuda")
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    first = last = None
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.time_range.elapsed_us()
        per[ev.name][0] += us / 1e6
        per[ev.name][1] += 1
        start, end = ev.time_range.start, ev.time_range.end
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    busy = sum(v[0] for v in per.values())
    return {
        "wall_s": round(wall, 4),
        "device_seconds_summed": round(busy, 4),
        "device_span_s": round(((last or 0) - (first or 0)) / 1e6, 4),
        "top": [{"name": k[:120], "seconds": round(v[0], 5), "calls": v[1]} for k, v in rows[:top]],
        "h2d_bytes": h2d,
        "h2d_gb_per_s_of_memcpy_time": round(
            h2d / max(1e-9, sum(v[0] for k, v in per.items() if "HtoD" in k)) / GB, 2
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-kernels")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="kernels.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device: it profiles the GPU's kernels and copies")
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    res: dict[str, Any] = {"size": a.size, "device": torch.cuda.get_device_name()}
    model = bgr.build_model(parse_size(a.size), "cuda")
    with Store.open(root, create=True, format=2) as st:
        st.save(model)
        full = st.resolve("latest")
        bgr.dense_step(model, 1)
        st.save(model)
        dense = st.resolve("latest")
        del model
        bgr.free("cuda")
        for name, ref in (("full", full), ("dense", dense)):
            bgr.timed_load(st, ref, "cuda")  # warm: compiles, pinned arenas
            res[name] = got = profiled_load(st, ref, a.top)
            print(name, json.dumps(got, indent=1), flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
