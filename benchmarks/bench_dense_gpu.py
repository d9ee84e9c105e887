"""Dense steps of live GPU weights: the GPU delta path beside today's CPU delta path, same run.

Per size: a transformer-shaped bf16 model on the device, a full save, then one dense
step (``bench_gpu.dense_step``'s generator: every weight moved ~1e-3 relative, cast to
bf16; 0.26 GB stored for 17.1 GB in benchmarks/results/gpu.md) saved twice from the
same parent: once through the GPU delta path (``Store.device_delta = "auto"``: parent
blocks decoded on the GPU, XOR planes only across PCIe) and, for the sizes in
``--cpu-sizes``, through today's CPU path (``"never"``) into a hard-linked copy of the
store (chunk files are write-once, so both saves see the same parent). Wall seconds,
process CPU seconds (``time.process_time``, all threads), stored bytes, bytes copied to
the host, host RSS and the GPU path's phases and buffers are recorded; a sample of the
new chunks is decoded by today's CPU reader and compared with the live weights.

    python benchmarks/bench_dense_gpu.py --sizes 16GiB,50GiB --out benchmarks/results/dense_gpu.json

``--device cpu --sizes 4MiB`` runs the same code on CPU tensors (a smoke run: the GPU
path's steps as torch CPU ops).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.gpu.blocks import host_block_digests
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store

GB = 1e9


class HostHashed(DeviceSource):
    """CPU tensors hashed all at once like a GPU source (``--device cpu`` only)."""

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        return host_block_digests([t.bytes.numpy().data for t in self.tensors()], block_size)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    return 0.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bench_gpu() -> Any:
    """benchmarks/bench_gpu.py (its model and dense-step generators, on CUDA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    return bench_gpu


def build_model(size: int, device: str) -> dict[str, torch.Tensor]:
    """bench_gpu.build_model itself on CUDA; the same recipe on the CPU."""
    if device.startswith("cuda"):
        model: dict[str, torch.Tensor] = _bench_gpu().build_model(size, device)
        return model
    shape = examples.ModelShape.for_bytes(size)
    g = torch.Generator(device=device).manual_seed(0)
    model = {}
    for name, s in shape.tensor_shapes().items():
        scale, shift = (0.05, 1.0) if name.endswith("norm.weight") else (0.02, 0.0)
        t = shift + scale * torch.randn(s, generator=g, device=device)
        model[name] = t.to(torch.bfloat16)
    sync(device)
    return model


def dense_step(model: dict[str, torch.Tensor], device: str, seed: int = 1) -> None:
    """bench_gpu.dense_step (the generator behind its 0.26 GB figure) on CUDA; the same
    recipe, seeded with ``seed``, on the CPU."""
    if device.startswith("cuda"):
        _bench_gpu().dense_step(model)
        return
    g = torch.Generator(device=device).manual_seed(seed)
    for t in model.values():
        noise = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
        t.copy_((t.float() * (1 + 1e-3 * noise)).to(t.dtype))
    sync(device)


#: Store.device_delta_switch_interval of every save (``--delta-switch-interval``).
DELTA_SWITCH: list[float | None] = [None]


def timed_save(st: Store, model: dict[str, torch.Tensor], device: str, mode: str) -> dict[str, Any]:
    st.device_delta = mode
    st.device_delta_switch_interval = DELTA_SWITCH[0]
    src = (HostHashed if device == "cpu" else DeviceSource)(model)
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    r = st.save(src, force=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    src.close()
    s = r.stats
    row: dict[str, Any] = {
        "path": mode,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "new_chunks": s.new_chunks,
        "chunks": s.chunks,
        "new_raw_bytes": s.new_raw_bytes,
        "stored_bytes": s.new_stored_bytes,
        "device_to_host_bytes": r.fetched_bytes,
        "host_rss_gb_after": round(rss_gb(), 3),
        "host_peak_rss_gb": round(peak_rss_gb(), 3),
        "phases": {k: round(v, 3) for k, v in r.phases.items()},
    }
    if st.last_device_delta is not None:
        row["gpu_delta"] = d = st.last_device_delta.to_dict()
        p = d.get("pipeline", {})
        log(
            f"  GPU path: decode {d['decode_s']:.2f} s, callback {d['device_s']:.2f} s, "
            f"slot wait {d['wait_s']:.2f} s; steps {d['steps']}; host "
            f"{d.get('steps_host')}; pipeline read "
            f"{p.get('read_s', 0):.2f} s, queue {p.get('queue_s', 0):.2f} s, copy "
            f"{p.get('copy_s', 0):.2f} s, decode {p.get('decode_s', 0):.2f} s"
        )
    log(
        f"  save ({mode}): {wall:.3f} s wall, {cpu:.2f} s CPU, stored {s.new_stored_bytes / GB:.3f}"
        f" GB, to host {r.fetched_bytes / GB:.3f} GB, {s.new_chunks}/{s.chunks} chunks new"
    )
    return row


def check_sample(st: Store, model: dict[str, torch.Tensor], n: int = 64) -> bool:
    """Decode ``n`` random chunks of latest with today's CPU reader; compare with live bytes."""
    m = st.manifest(st.resolve("latest"))
    places = [(t, i) for t in m.tensors for i in range(len(t.chunks))]
    rng = random.Random(0)
    for t, i in rng.sample(places, min(n, len(places))):
        raw = st.read_chunk(t.chunks[i])
        live = model[t.name].view(-1).view(torch.uint8)
        off = i * m.block_size
        if raw != live[off : off + len(raw)].cpu().numpy().tobytes():
            return False
    return True


def run_size(size: int, args: argparse.Namespace, with_cpu: bool) -> dict[str, Any]:
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model = build_model(size, args.device)
    logical = sum(t.numel() * t.element_size() for t in model.values())
    log(f"model {logical / GB:.2f} GB bf16, {len(model)} tensors on {args.device}")
    out: dict[str, Any] = {"model_bytes": logical, "tensors": len(model)}
    gpu_store = Store.open(work / "gpu", create=True)
    gpu_store.device_delta_timing = args.device_timing
    out["device_timing"] = args.device_timing
    log("full save")
    out["full"] = timed_save(gpu_store, model, args.device, "auto")
    # Same parent for every dense save of step 1: chunk and pack files are write-once,
    # so a hard-linked copy is a second store holding exactly the same checkpoint.
    if with_cpu:
        subprocess.run(["cp", "-al", str(work / "gpu"), str(work / "cpu")], check=True)
    batches = [parse_size(b) for b in args.batch_bytes.split(",") if b]
    # One copy per extra batch size, by position: a size given twice (its first step as
    # the process's warm-up) gets a parent of its own each time.
    for i, _b in enumerate(batches[1:]):
        subprocess.run(["cp", "-al", str(work / "gpu"), str(work / f"gpu-{i}")], check=True)
    dense_step(model, args.device)
    mode = "always" if args.device == "cpu" else "auto"
    for i, b in enumerate(batches[1:]):
        log(f"dense step 1, GPU delta path, batches of {b >> 20} MiB")
        other = Store.open(work / f"gpu-{i}")
        other.device_delta_batch_bytes = b
        other.device_delta_timing = args.device_timing
        row = timed_save(other, model, args.device, mode)
        row["batch_bytes"] = b
        row["sample_decodes_bit_exact"] = check_sample(other, model)
        key = f"dense_gpu_batch_{b >> 20}MiB"
        out[key if key not in out else f"{key}_again"] = row
        other.close()
        shutil.rmtree(work / f"gpu-{i}", ignore_errors=True)
    log("dense step 1, GPU delta path")
    gpu_store.device_delta_batch_bytes = batches[0] if batches else None
    out["dense_gpu"] = timed_save(gpu_store, model, args.device, mode)
    out["dense_gpu"]["sample_decodes_bit_exact"] = check_sample(gpu_store, model)
    if with_cpu:
        log("dense step, today's CPU path (same parent)")
        cpu_store = Store.open(work / "cpu")
        out["dense_cpu"] = timed_save(cpu_store, model, args.device, "never")
        cpu_store.close()
        g, c = out["dense_gpu"], out["dense_cpu"]
        out["ratios"] = {
            "wall_cpu_path_over_gpu_path": round(c["wall_s"] / max(g["wall_s"], 1e-9), 2),
            "cpu_seconds_gpu_path_over_cpu_path": round(g["cpu_s"] / max(c["cpu_s"], 1e-9), 3),
            "stored_gpu_path_over_cpu_path": round(
                g["stored_bytes"] / max(c["stored_bytes"], 1), 4
            ),
        }
        log(f"  ratios {out['ratios']}")
    # Later steps only where the CPU path runs too (the first size by default): keeps the
    # default run of 17 GB and 54 GB within 4 minutes on the H200.
    for step in range(2, (args.steps if with_cpu else 1) + 1):
        # The next step's parent is itself a checkpoint of deltas: the pipeline resolves
        # each parent block's chain (delta + base) on the device.
        dense_step(model, args.device)
        log(f"dense step {step}, GPU delta path (parent: the deltas of step {step - 1})")
        row = timed_save(gpu_store, model, args.device, mode)
        row["sample_decodes_bit_exact"] = check_sample(gpu_store, model)
        out[f"dense_gpu_step{step}"] = row
    gpu_store.close()
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    out["size_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16GiB,50GiB", help="comma-separated model sizes")
    ap.add_argument(
        "--cpu-sizes",
        default=None,
        help="sizes that also run today's CPU path (default: the first of --sizes)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=2,
        help="dense steps for the --cpu-sizes (steps after the first: GPU path only)",
    )
    ap.add_argument(
        "--batch-bytes",
        default="256MiB",
        help="batch sizes of the GPU path, comma-separated: the first for every step, "
        "each other for step 1 only, from the same parent",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--device-timing",
        action="store_true",
        help="CUDA events between the GPU path's steps too (Store.device_delta_timing)",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the whole run (seconds; default: Python's 5 ms)",
    )
    ap.add_argument(
        "--delta-switch-interval",
        type=float,
        default=None,
        help="Store.device_delta_switch_interval of every dense step (seconds)",
    )
    ap.add_argument("--dir", default="/root/apollo-dense")
    ap.add_argument("--out", default="benchmarks/results/dense_gpu.json")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    DELTA_SWITCH[0] = args.delta_switch_interval
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    cpu_sizes = (
        {parse_size(s) for s in args.cpu_sizes.split(",") if s}
        if args.cpu_sizes is not None
        else set(sizes[:1])
    )
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpus": os.cpu_count(),
        "switch_interval_s": sys.getswitchinterval(),
        "delta_switch_interval_s": args.delta_switch_interval,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "targets": {"dense_17GB_s": 2.0, "dense_54GB_s": 6.0, "cpu_seconds_ratio": 0.25},
        "runs": [],
    }
    for size in sizes:
        log(f"size {size / GB:.1f} GB")
        result["runs"].append(run_size(size, args, size in cpu_sizes))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        "\n| model GB | path | wall s | CPU s | stored GB | to host GB |\n|---|---|---|---|---|---|"
    )
    for run in result["runs"]:
        for key in sorted(k for k in run if k.startswith("dense_")):
            r = run[key]
            if r:
                print(
                    f"| {run['model_bytes'] / GB:.1f} | {key} ({r['path']}) | {r['wall_s']:.2f} | "
                    f"{r['cpu_s']:.1f} | {r['stored_bytes'] / GB:.3f} | "
                    f"{r['device_to_host_bytes'] / GB:.2f} |"
                )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
