"""The vLLM worker extension in a worker-shaped object: in-process saves and their cost to serving.

A transformer-shaped bf16 model (default 16 GiB) is built as an ``nn.Module``
on the device, wrapped like vLLM's worker (``model_runner.model`` behind a
CUDA-graph-style wrapper, tensor attributes as quantization scales). Then, in
one run:

1. a full save through ``apollo_save`` (the first one compiles the GPU hash);
2. saves with about 0.5% of the bytes changed (rows of a few layers' q/k
   projections), each through ``apollo_save`` as ``collective_rpc`` would call
   it: target at most 0.3 s per rank;
3. a matmul loop standing in for serving: its throughput alone, with the
   periodic saver running beside it (an update of 0.5% under the update guard,
   then a save, every ``--interval`` seconds: far more often than the 10
   minutes of production, so the loss per save is measurable), and alone
   again. The loss is reported as measured and extrapolated to one save per
   ``--production-interval`` seconds (target under 1%);
4. a hot restore of the first incremental checkpoint through ``apollo_restore``;
5. with ``--check-export`` (GPU only): ``apollo_export_handles`` and a save of
   that handles file by the CLI in another process (the cron path).

    python benchmarks/bench_vllm_extension.py --size 16GiB --dir /dev/shm/vx \\
        --out benchmarks/results/vllm_extension.json

On a CPU machine it runs small (``--size 64MiB --device cpu``) as a smoke run;
its numbers say nothing about a GPU. The JSON is rewritten after every phase,
so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.integrations.vllm import ApolloCasWorkerExtension
from apollo_cas.integrations.vllm.ops import save_module
from apollo_cas.integrations.vllm.periodic import PeriodicSaver, UpdateGuard
from apollo_cas.store import Store

GB = 1e9


class GraphWrapper:
    """Like vLLM's CUDAGraphWrapper: not a module, ``runnable`` and ``unwrap()``."""

    def __init__(self, runnable: nn.Module) -> None:
        self.runnable = runnable

    def unwrap(self) -> nn.Module:
        return self.runnable


class Worker(ApolloCasWorkerExtension):
    """The attributes the extension reads from a vLLM worker."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model_runner = SimpleNamespace(model=GraphWrapper(model))
        self.rank = 0
        self.device = device
        self.parallel_config = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)


def build_model(size: int, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The generated transformer shape as a module tree, plus one scale attribute per layer."""
    shape = examples.ModelShape.for_bytes(size)
    root = nn.Module()
    params: dict[str, torch.Tensor] = {}
    g = torch.Generator(device=device).manual_seed(0)
    for name, s in shape.tensor_shapes().items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, nn.Module())
            m = m._modules[p]  # type: ignore[assignment]
        base = 1.0 if name.endswith("norm.weight") else 0.0
        t = (base + 0.02 * torch.randn(s, generator=g, device=device)).to(torch.bfloat16)
        m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        params[name] = t
        if leaf == "weight" and path[-1] == "q_proj":
            attn = root.get_submodule(".".join(path[:-1]))
            attn._k_scale = torch.ones((), device=device)  # a tensor attribute, as vLLM's
    sync(device)
    return root, params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def change_fraction(
    params: dict[str, torch.Tensor], fraction: float, step: int, device: torch.device
) -> int:
    """Rows of a few layers' q/k projections, until ~fraction of all bytes differ."""
    total = sum(t.numel() * t.element_size() for t in params.values())
    budget = max(1, int(total * fraction))
    names = [n for n in params if "self_attn.q_proj" in n or "self_attn.k_proj" in n]
    layers = sorted({n.split(".")[2] for n in names}, key=int)
    changed, i = 0, step * 3
    while changed < budget:
        layer = layers[i % len(layers)]
        for kind in ("q_proj", "k_proj"):
            t = params[f"model.layers.{layer}.self_attn.{kind}.weight"]
            row = t.shape[1] * t.element_size()
            rows = min(t.shape[0], max(1, (budget - changed) // row))
            t[:rows] += 0.01
            changed += rows * row
            if changed >= budget:
                break
        i += 1
    sync(device)
    return changed


def matmul_rate(
    seconds: float, n: int, device: torch.device, stop: threading.Event | None
) -> float:
    """Matmuls per second of an n x n bf16 (fp32 on CPU) loop: the stand-in for serving."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (stop and stop.is_set()):
        for _ in range(10):
            torch.matmul(a, b, out=out)
        sync(device)
        iters += 10
    return iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", help="store directory (default: a temporary one)")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--incremental", type=int, default=3, help="saves with 0.5%% changed")
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--seconds", type=float, default=20.0, help="each matmul phase")
    ap.add_argument("--interval", type=float, default=2.0, help="periodic saves, seconds")
    ap.add_argument("--production-interval", type=float, default=600.0)
    ap.add_argument("--matmul", type=int, default=8192, help="matrix size of the loop")
    ap.add_argument("--check-export", action="store_true", help="export handles, save via CLI")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = parse_size(args.size)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vx-"))
    shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "bench_vllm_extension",
        "argv": sys.argv[1:] if argv is None else argv,
        "host": platform.node(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "store_dir": str(work),
        "targets": {"incremental_save_seconds": 0.3, "periodic_throughput_loss_pct": 1.0},
    }

    def dump() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    model, params = build_model(size, device)
    w = Worker(model, device)
    result["model"] = {
        "bytes": sum(t.numel() * t.element_size() for t in params.values()),
        "parameters": len(params),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    store = str(work / "store")
    t0 = time.perf_counter()
    full = w.apollo_save(store=store)
    assert full["ok"], full
    full["wall_seconds"] = round(time.perf_counter() - t0, 4)
    result["full_save"] = full
    print(f"full save: {full['wall_seconds']:.2f} s, {full['tensors']} tensors", flush=True)
    dump()

    incs = []
    for step in range(args.incremental):
        changed = change_fraction(params, args.fraction, step, device)
        t0 = time.perf_counter()
        r = w.apollo_save(store=store)
        assert r["ok"], r
        r["wall_seconds"] = round(time.perf_counter() - t0, 4)
        r["changed_bytes"] = changed
        incs.append(r)
        print(
            f"incremental {step}: {r['wall_seconds']:.3f} s (hash {r['hash_seconds']:.4f} s, "
            f"guard {r['guard_seconds']:.4f} s, {r['new_chunks']} new chunks)",
            flush=True,
        )
    result["incremental_saves"] = incs
    best = min(r["wall_seconds"] for r in incs) if incs else None
    result["incremental_best_seconds"] = best
    result["incremental_median_seconds"] = (
        sorted(r["wall_seconds"] for r in incs)[len(incs) // 2] if incs else None
    )
    dump()

    # Serving stand-in alone, with periodic update+save beside it, alone again.
    n = args.matmul if device.type == "cuda" else min(args.matmul, 256)
    base1 = matmul_rate(args.seconds, n, device, None)
    guard = UpdateGuard()
    target = Store.open(store)
    saves: list[dict[str, Any]] = []
    step = [args.incremental]

    def periodic(slot: float) -> dict[str, Any]:
        stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            with guard.updating(weight_version=step[0]):  # the trainer's update
                change_fraction(params, args.fraction, step[0], device)
            step[0] += 1
            t = time.perf_counter()
            r = save_module(target, model, guard=guard, metadata={"trigger": "bench"})
            r["wall_seconds"] = round(time.perf_counter() - t, 4)
        saves.append(r)
        return r

    saver = PeriodicSaver(periodic, args.interval, backoff=1.0)
    saver.start()
    try:
        loaded = matmul_rate(args.seconds, n, device, None)
    finally:
        saver.stop(timeout=120)
    base2 = matmul_rate(args.seconds, n, device, None)
    baseline = (base1 + base2) / 2
    loss = 100.0 * (baseline - loaded) / baseline
    lost_per_save = (baseline - loaded) / baseline * args.seconds / max(1, len(saves))
    flops = 2.0 * n**3
    result["periodic"] = {
        "matmul_n": n,
        "phase_seconds": args.seconds,
        "interval_seconds": args.interval,
        "baseline_before_matmuls_per_s": round(base1, 2),
        "baseline_after_matmuls_per_s": round(base2, 2),
        "with_saves_matmuls_per_s": round(loaded, 2),
        "baseline_tflops": round(baseline * flops / 1e12, 2),
        "with_saves_tflops": round(loaded * flops / 1e12, 2),
        "saves": len(saves),
        "save_failures": saver.status().failures,
        "save_wall_seconds": [s["wall_seconds"] for s in saves],
        "guard_seconds": [s["guard_seconds"] for s in saves],
        "hash_seconds": [s["hash_seconds"] for s in saves],
        "loss_pct_at_interval": round(loss, 3),
        "serving_seconds_lost_per_save": round(lost_per_save, 4),
        "loss_pct_at_production_interval": round(
            100.0 * lost_per_save / args.production_interval, 4
        ),
        "production_interval_seconds": args.production_interval,
    }
    print(json.dumps(result["periodic"], indent=2), flush=True)
    dump()

    # Roll back in place: the first incremental checkpoint, written into the live weights.
    if incs:
        ref = incs[0]["checkpoint"]
        t0 = time.perf_counter()
        r = w.apollo_restore(store=store, ref=ref)
        assert r["ok"], r
        r["wall_seconds"] = round(time.perf_counter() - t0, 4)
        r.pop("must_pause", None)
        result["restore_in_place"] = r
        print(
            f"restore in place: {r['wall_seconds']:.3f} s, {r['blocks_written']} blocks", flush=True
        )
        dump()

    # The cron path: export the handles file, save it from another process.
    if device.type == "cuda" and args.check_export:
        handles = work / "handles.pt"
        r = w.apollo_export_handles(path=str(handles))
        assert r["ok"], r
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "apollo_cas.cli.main", "save", str(handles)]
        cmd += ["--store", str(work / "store-cron"), "--json"]
        cli = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
        )
        r["cron_save_wall_seconds"] = round(time.perf_counter() - t0, 3)
        r["cron_save_rc"] = cli.returncode
        r["cron_save"] = json.loads(cli.stdout) if cli.returncode == 0 else cli.stderr[-2000:]
        result["export_handles"] = r
        print(
            f"export + cron save: rc {cli.returncode}, {r['cron_save_wall_seconds']} s", flush=True
        )
        dump()
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
