"""Where the device time of a dense step's GPU delta save goes (a probe, not a benchmark).

Builds a generated bf16 model on the GPU (``--size``), saves it in full into a new
store under ``--dir``, applies one dense step (bench_dense_gpu's), then saves the step
through the GPU delta path, then a second step the same way: once plainly (wall time and the path's own step
timings from CUDA events), once under ``torch.profiler`` with CPU and CUDA activities.
Prints and writes the top operators by device time and by host time, so the event
intervals of ``DeltaStats.steps`` (which include the GPU idling while the host
catches up) can be told apart from what the kernels themselves cost.

    python benchmarks/probe_dense_profile.py --size 16GiB --dir /dev/shm/apollo-prof \\
        --out $OUT/dense_profile.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dense_gpu import HostHashed, build_model, dense_step, log, sync

from apollo_cas.cli.common import parse_size
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store

GB = 1e9


def table(prof: Any, key: str, top: int) -> list[dict[str, Any]]:
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]:
        rows.append(
            {
                "name": e.key,
                "count": e.count,
                "device_ms": round(getattr(e, "device_time_total", 0.0) / 1e3, 2),
                "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 2),
                "host_ms": round(e.cpu_time_total / 1e3, 2),
                "self_host_ms": round(e.self_cpu_time_total / 1e3, 2),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-prof")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="dense_profile.json")
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    dev = args.device
    cuda = dev.startswith("cuda")
    source = DeviceSource if cuda else HostHashed
    model = build_model(parse_size(args.size), dev)
    st = Store.open(work / "store", create=True)
    st.save(source(model))
    res: dict[str, Any] = {
        "size": args.size,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    st.device_delta = "auto" if cuda else "always"
    st.device_delta_timing = True  # the event intervals, to set beside the profile
    for label in ("plain", "profiled"):
        dense_step(model, dev)  # a new step each time: the same one again would dedup
        sync(dev)
        t0 = time.perf_counter()
        if label == "plain":
            st.save(source(model), force=True)
            prof = None
        else:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                st.save(source(model), force=True)
        wall = time.perf_counter() - t0
        d = st.last_device_delta.to_dict() if st.last_device_delta else {}
        res[label] = {
            "wall_s": round(wall, 3),
            "steps": d.get("steps"),
            "device_s": d.get("device_s"),
        }
        log(f"{label}: {wall:.2f} s, callback {d.get('device_s')}, steps {d.get('steps')}")
        if prof is not None:
            res["by_device_time"] = table(prof, "self_device_time_total", args.top)
            res["by_host_time"] = table(prof, "self_cpu_time_total", args.top)
            for title, rows in (("device", res["by_device_time"]), ("host", res["by_host_time"])):
                log(f"top by {title} time:")
                for r in rows:
                    log(
                        f"  {r['name'][:60]:60s} n={r['count']:6d} dev {r['self_device_ms']:9.2f} ms "
                        f"host {r['host_ms']:9.2f} (self {r['self_host_ms']:8.2f}) ms"
                    )
    st.close()
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
