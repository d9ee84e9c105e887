"""Live GPU weights: apollo_cas against the original tool's method, same run, same card.

A transformer-shaped bf16 model (default 16 GiB) lives on the GPU. The
sequence: a full save, three saves with about 0.5% of blocks changed in a few
layers, one save where every block changed (a dense optimizer step), then a
restore of the latest to safetensors, a load onto the GPU and a hot restore
into the live tensors. Beside it, a faithful re-implementation of the original
tool: pageable ``.cpu()`` dump of everything to weights.bin, then a 4 KiB block
diff against the previous weights.bin.

    python benchmarks/bench_gpu.py --size 16GiB --dir /root/bench --out results.json

Needs a CUDA GPU with Triton. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apollo_cas import dtypes, examples
from apollo_cas.cli.common import parse_size
from apollo_cas.formats import flat
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store
from apollo_cas.targets.live import restore_live

GB = 1e9


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def build_model(size: int, device: str) -> dict[str, torch.Tensor]:
    shape = examples.ModelShape.for_bytes(size)
    g = torch.Generator(device=device).manual_seed(0)
    model = {}
    for name, s in shape.tensor_shapes().items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.05 * torch.randn(s, generator=g, device=device)
        else:
            t = 0.02 * torch.randn(s, generator=g, device=device)
        model[name] = t.to(torch.bfloat16)
    torch.cuda.synchronize()
    return model


def change_fraction(model: dict[str, torch.Tensor], fraction: float, step: int) -> int:
    """Change rows of a few layers' q/k projections until ~fraction of all bytes differ."""
    total = sum(t.numel() * t.element_size() for t in model.values())
    budget = int(total * fraction)
    names = [n for n in model if "self_attn.q_proj" in n or "self_attn.k_proj" in n]
    layers = sorted({n.split(".")[2] for n in names}, key=int)
    changed = 0
    i = step * 3
    while changed < budget:
        layer = layers[i % len(layers)]
        for n in (
            f"model.layers.{layer}.self_attn.q_proj.weight",
            f"model.layers.{layer}.self_attn.k_proj.weight",
        ):
            t = model[n]
            row_bytes = t.shape[1] * t.element_size()
            rows = min(t.shape[0], max(1, (budget - changed) // row_bytes))
            t[:rows] += 0.01
            changed += rows * row_bytes
            if changed >= budget:
                break
        i += 1
    torch.cuda.synchronize()
    return changed


def dense_step(model: dict[str, torch.Tensor]) -> None:
    """Every weight moves a little (fp32 master weights moved ~1e-3 relative, cast to bf16)."""
    for t in model.values():
        t.copy_((t.float() * (1 + 1e-3 * torch.randn_like(t, dtype=torch.float32))).to(t.dtype))
    torch.cuda.synchronize()


# ---------------------------------------------------------------- the original tool's method


def original_dump(model: dict[str, torch.Tensor], out: Path) -> float:
    """What apollo-checkpoint's Python helper does (bf16 made to work via a uint8 view)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / flat.WEIGHTS, "wb") as f:
        entries = flat.write_weights(
            f,
            model,
            lambda t: (
                dtypes.from_torch(t.dtype),
                t.shape,
                t.contiguous().cpu().view(torch.uint8).numpy().tobytes(),
            ),
        )
    (out / flat.INDEX).write_bytes(flat.dumps_index(entries, indent=None))
    return time.perf_counter() - t0


def original_diff(old: Path, new: Path, block: int = 4096) -> tuple[float, int]:
    """The tool's block diff (memcmp per 4 KiB block), vectorised so Python isn't the bottleneck."""
    t0 = time.perf_counter()
    changed = 0
    with open(old, "rb") as fa, open(new, "rb") as fb:
        a = np.frombuffer(mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        b = np.frombuffer(mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        step = 256 << 20
        for s in range(0, len(a), step):
            x = a[s : s + step]
            y = b[s : s + step]
            n = len(x) // block * block
            ne = (x[:n].reshape(-1, block) != y[:n].reshape(-1, block)).any(axis=1)
            changed += int(ne.sum()) * block
            if n < len(x) and not np.array_equal(x[n:], y[n:]):
                changed += len(x) - n
            del x, y, ne
        del a, b  # the maps close when the last view is gone
    return time.perf_counter() - t0, changed


# ------------------------------------------------------------------------------ the run


def timed_save(st: Store, src: DeviceSource, label: str, rows: list[dict[str, Any]]) -> None:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = st.save(src)
    dt = time.perf_counter() - t0
    s = r.stats
    row = {
        "save": label,
        "seconds": round(dt, 4),
        "new_chunks": s.new_chunks,
        "chunks": s.chunks,
        "new_raw_bytes": s.new_raw_bytes,
        "new_stored_bytes": s.new_stored_bytes,
        "device_to_host_bytes": r.fetched_bytes,
        "hash_seconds": src.hash_seconds,
        "host_peak_rss_gb": round(rss_peak_gb(), 2),
    }
    rows.append(row)
    print(
        f"apollo save {label:18s} {dt:8.3f}s  {s.new_chunks:6d}/{s.chunks} blocks new  "
        f"PCIe {r.fetched_bytes / GB:7.3f} GB  stored {s.new_stored_bytes / GB:7.3f} GB",
        flush=True,
    )


def write_handles(model: dict[str, torch.Tensor], path: Path) -> None:
    from torch.multiprocessing.reductions import reduce_tensor

    torch.save({n: {"handle": reduce_tensor(t)} for n, t in model.items()}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/root/apollo-bench")
    ap.add_argument(
        "--restore-dir", default=None, help="default: /dev/shm if large enough, else --dir"
    )
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--skip-original", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = parse_size(args.size)
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "device": {
            "name": props.name,
            "memory_gb": round(props.total_memory / GB, 1),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }

    model = build_model(size, dev)
    logical = sum(t.numel() * t.element_size() for t in model.values())
    result["model"] = {"tensors": len(model), "bytes": logical, "dtype": "bf16"}
    print(f"model: {len(model)} tensors, {logical / GB:.2f} GB bf16 on {props.name}", flush=True)

    src = DeviceSource(model)
    # GPU hash of the whole model (warm-up first: Triton compiles on first use).
    src.block_digests(1 << 20)
    hash_times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        src.block_digests(1 << 20)
        hash_times.append(time.perf_counter() - t0)
    hash_s = float(np.median(hash_times))
    result["gpu_hash"] = {
        "seconds_median": round(hash_s, 5),
        "tb_per_s": round(logical / hash_s / 1e12, 3),
        "block_size": 1 << 20,
    }
    print(
        f"GPU hash of the whole model: {hash_s * 1e3:.1f} ms = {logical / hash_s / 1e12:.2f} TB/s "
        "(block_digests incl. digest copy and host short paths)",
        flush=True,
    )

    # ---- apollo_cas, in-process (the save call of a process that holds the tensors)
    rows: list[dict[str, Any]] = []
    st = Store.open(work / "store", create=True)
    timed_save(st, src, "full", rows)
    for step in range(1, 4):
        change_fraction(model, 0.005, step)
        timed_save(st, src, f"0.5% changed #{step}", rows)
    timed_save(st, src, "unchanged", rows)

    # Hot restore: roll the last 0.5% step back in place, then forward again.
    latest = st.manifest(st.resolve("latest"))
    previous = st.manifest(latest.parent) if latest.parent else latest
    hot_back = restore_live(model, previous, st.read_chunk)
    hot_fwd = restore_live(model, latest, st.read_chunk)
    print(
        f"hot restore back one step: {hot_back.blocks_written}/{hot_back.blocks_checked} blocks, "
        f"{hot_back.seconds:.3f}s, verified {hot_back.verified}; forward: "
        f"{hot_fwd.blocks_written} blocks, {hot_fwd.seconds:.3f}s, verified {hot_fwd.verified}",
        flush=True,
    )

    # ---- the CLI, start-up included, through a handles file (CUDA IPC into a new process)
    handles = work / "handles.pt"
    write_handles(model, handles)
    change_fraction(model, 0.005, 7)
    env = dict(os.environ, APOLLO_CAS_NO_PROGRESS="1")
    t0 = time.perf_counter()
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "apollo_cas.cli.main",
            "save",
            "--handles",
            str(handles),
            "--store",
            str(work / "store"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    cli_s = time.perf_counter() - t0
    result["cli_incremental_save"] = {
        "wall_seconds": round(cli_s, 3),
        "returncode": cp.returncode,
        "output": cp.stdout[-2000:],
        "stderr": cp.stderr[-2000:],
    }
    print(
        f"CLI incremental save via handles file: {cli_s:.2f}s wall (rc {cp.returncode}) "
        f"{cp.stderr.strip()[-300:]}",
        flush=True,
    )

    dense_step(model)
    timed_save(st, src, "dense (all blocks)", rows)
    result["apollo_saves"] = rows
    # Before restores (load() holds the model in pinned memory by design) and the
    # original method (its mmap diff maps two whole files).
    result["host_peak_rss_gb_saves"] = round(rss_peak_gb(), 2)

    # ---- restores (latest is the dense step: every chunk an XOR delta)
    rdir = (
        Path(args.restore_dir)
        if args.restore_dir
        else (
            Path("/dev/shm/apollo-restore")
            if shutil.disk_usage("/dev/shm").free > 2 * logical
            else work / "restore"
        )
    )
    t0 = time.perf_counter()
    st.restore("latest", rdir)
    rs = time.perf_counter() - t0
    shutil.rmtree(rdir, ignore_errors=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = st.load("latest", device=dev)
    torch.cuda.synchronize()
    ls = time.perf_counter() - t0
    ok = all(torch.equal(loaded[n].view(torch.uint8), model[n].view(torch.uint8)) for n in model)
    del loaded
    torch.cuda.empty_cache()
    # The checkpoint before the dense step: full chunks, the common case.
    before = st.manifest(st.resolve("latest")).parent
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = st.load(before, device=dev)
    torch.cuda.synchronize()
    ls_full = time.perf_counter() - t0
    del loaded
    torch.cuda.empty_cache()
    result["restore"] = {
        "load_to_gpu_full_chunks_seconds": round(ls_full, 3),
        "safetensors_seconds": round(rs, 3),
        "safetensors_gb_per_s": round(logical / rs / GB, 3),
        "safetensors_dir": str(rdir),
        "load_to_gpu_seconds": round(ls, 3),
        "load_to_gpu_gb_per_s": round(logical / ls / GB, 3),
        "load_bit_exact": ok,
        "hot_restore_back": hot_back.to_dict(),
        "hot_restore_forward": hot_fwd.to_dict(),
    }
    print(
        f"restore latest -> safetensors {rs:.2f}s ({logical / rs / GB:.2f} GB/s) in {rdir}; "
        f"load to GPU {ls:.2f}s ({logical / ls / GB:.2f} GB/s), bit-exact {ok}; "
        f"load of the pre-dense checkpoint (full chunks) {ls_full:.2f}s",
        flush=True,
    )

    # ---- original method (last: its mmap diff maps two whole weights.bin files)
    if not args.skip_original:
        full = original_dump(model, work / "orig-0")
        change_fraction(model, 0.005, step=11)
        dump2 = original_dump(model, work / "orig-1")
        diff_s, diff_bytes = original_diff(
            work / "orig-0" / flat.WEIGHTS, work / "orig-1" / flat.WEIGHTS
        )
        result["original"] = {
            "full_dump_seconds": round(full, 3),
            "incremental_seconds": round(dump2 + diff_s, 3),
            "incremental_dump_seconds": round(dump2, 3),
            "diff_seconds": round(diff_s, 3),
            "diff_changed_bytes": diff_bytes,
            "bytes_written_per_save": logical,
        }
        print(
            f"original: full dump {full:.2f}s; incremental {dump2 + diff_s:.2f}s "
            f"(dump {dump2:.2f}s + diff {diff_s:.2f}s), writes {logical / GB:.1f} GB every time",
            flush=True,
        )
        shutil.rmtree(work / "orig-0")
        shutil.rmtree(work / "orig-1")

    inc = [r["seconds"] for r in rows if r["save"].startswith("0.5%")]
    if "original" in result:
        result["ratios"] = {
            "incremental_vs_original": round(
                result["original"]["incremental_seconds"] / max(inc), 1
            ),
            "full_vs_original_full_dump": round(
                result["original"]["full_dump_seconds"] / rows[0]["seconds"], 2
            ),
        }
    result["host_peak_rss_gb"] = round(rss_peak_gb(), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| save | seconds | blocks new | PCIe GB | stored GB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['save']} | {r['seconds']:.3f} | {r['new_chunks']}/{r['chunks']} | "
            f"{r['device_to_host_bytes'] / GB:.3f} | {r['new_stored_bytes'] / GB:.3f} |"
        )
    print(json.dumps(result.get("ratios", {})), f"host peak RSS {result['host_peak_rss_gb']} GB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
