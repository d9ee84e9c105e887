"""Correctness at scale and throughput of the Triton XXH3-128 block kernel.

Run on a CUDA machine::

    python benchmarks/bench_gpu_hash.py --out benchmarks/results/gpu_hash.json

What it does, in order (the JSON is rewritten after every step, so a run cut short
still leaves its results):

1. correctness: every block of a 64 MiB buffer plus an odd tail (one tail of <= 240
   bytes, hashed on the host, and one longer tail with an unaligned final stripe, hashed
   by the tail kernel) for several block sizes, and a random sample of blocks of a
   1 GiB buffer in 64 KiB, 1 MiB and 4 MiB blocks, all against ``xxhash`` on the CPU;
2. a sweep of launch configurations on the large buffer (16 GiB by default) in 1 MiB
   blocks, then the best few on 64 KiB and 4 MiB blocks;
3. throughput of the best configuration per block size on the large buffer, and on
   1 GiB in 1 MiB blocks (too few blocks to fill the GPU); each with a sample of its
   digests checked against ``xxhash``.

Throughput is bytes hashed per second of the median call (``triton.testing.do_bench``,
which flushes L2 between calls) of the public entry point, launch overhead included.
GB/s are 1e9 bytes per second.

4. the whole-model case (``whole_model`` in the JSON): a transformer-shaped bf16 model
   of ``--model-gib`` GiB (``ModelShape.for_bytes``: ~420 separate tensors on the GPU),
   hashed through ``DeviceSource(model).block_digests(block_size)``, the call a save
   makes: wall-clock median of several calls after warm-up (digests copied to the host
   and split into ``bytes`` included). Against it: the older method (one launch per
   tensor over 16 streams), the GPU time of the single ``block_digests_many`` launch
   per launch configuration, one contiguous buffer of the same size, and the same
   model with every tensor ending in a long tail (tail kernel). Every digest of the
   new path is compared with the old path's, and a sample with ``xxhash``.

``--model-only`` runs only step 4 and merges it into an existing ``--out`` file.
``--smoke`` runs every step on tiny sizes (works on the CPU with TRITON_INTERPRET=1),
to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash

if TYPE_CHECKING:
    from apollo_cas.gpu.xxh3_kernel import LaunchConfig

_REPO = Path(__file__).resolve().parents[1]


def _import_kernel_module() -> Any:
    """apollo_cas.gpu.xxh3_kernel; loaded by path if the package's other dependencies
    (zstandard, msgpack, ...) are missing, as on a bare GPU box with torch and triton."""
    sys.path.insert(0, str(_REPO))
    try:
        from apollo_cas.gpu import xxh3_kernel

        return xxh3_kernel
    except ImportError:
        return load_kernel_by_path()


def load_kernel_by_path() -> Any:
    """The kernel modules (xxh3_kernel and the xxh3_device it imports) as submodules of a
    stand-in package over apollo_cas/gpu, so apollo_cas/__init__ and its imports never run."""
    import importlib
    import types

    name = "apollo_cas_gpu_kernels"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(_REPO / "apollo_cas" / "gpu")]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.xxh3_kernel")


xk = _import_kernel_module()

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Candidate launch configurations: blocks per program x loop unroll x warps x stages.
SWEEP = [
    xk.LaunchConfig(group=8, unroll=1, num_warps=1),
    xk.LaunchConfig(group=8, unroll=2, num_warps=1),
    xk.LaunchConfig(group=8, unroll=4, num_warps=1),
    xk.LaunchConfig(group=8, unroll=1, num_warps=1, evict_first=True),
    xk.LaunchConfig(group=8, unroll=1, num_warps=1, num_stages=3),
    xk.LaunchConfig(group=16, unroll=1, num_warps=2),
    xk.LaunchConfig(group=32, unroll=1, num_warps=4),
    xk.LaunchConfig(group=4, unroll=1, num_warps=1),
    xk.LaunchConfig(group=1, unroll=1, num_warps=1),
]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _random_buffer(n: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    # random_ on uint8 fills with 0..255 in place (no int64 temporary of the full size).
    buf.random_(0, 256, generator=gen)
    return buf


def _digest_rows(digests: torch.Tensor, rows: list[int]) -> list[bytes]:
    idx = torch.tensor(rows, dtype=torch.long, device=digests.device)
    picked = digests.index_select(0, idx).cpu().numpy()
    return [bytes(r) for r in picked]


def _block_bytes(buf: torch.Tensor, i: int, block_size: int) -> bytes:
    return bytes(buf[i * block_size : (i + 1) * block_size].cpu().numpy().tobytes())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_all_blocks(buf: torch.Tensor, block_size: int, config: LaunchConfig) -> dict[str, Any]:
    """Compare every block's digest with xxhash (the buffer is copied to the host once)."""
    host = buf.cpu().numpy().tobytes()
    got = xk.block_digests(buf, block_size, config).cpu().numpy()
    expected = [
        xxhash.xxh3_128_digest(host[i : i + block_size]) for i in range(0, len(host), block_size)
    ]
    bad = [i for i, e in enumerate(expected) if bytes(got[i]) != e]
    return {
        "bytes": len(host),
        "block_size": block_size,
        "blocks": len(expected),
        "last_block_len": len(host) - (len(expected) - 1) * block_size,
        "mismatches": len(bad),
        "first_mismatches": bad[:5],
        "ok": not bad and got.shape == (len(expected), 16),
    }


def check_sample(
    buf: torch.Tensor,
    block_size: int,
    digests: torch.Tensor,
    n_sample: int,
    seed: int,
) -> dict[str, Any]:
    """Compare a random sample of blocks (always the first and last) with xxhash."""
    n_blocks = digests.shape[0]
    rng = random.Random(seed)
    rows = sorted({0, n_blocks - 1, *(rng.randrange(n_blocks) for _ in range(n_sample))})
    got = _digest_rows(digests, rows)
    bad = [
        r
        for r, g in zip(rows, got, strict=True)
        if g != xxhash.xxh3_128_digest(_block_bytes(buf, r, block_size))
    ]
    return {"blocks_checked": len(rows), "mismatches": len(bad), "ok": not bad}


def time_call(buf: torch.Tensor, block_size: int, config: LaunchConfig, device: str) -> float:
    """Median seconds per block_digests call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        ms = do_bench(
            lambda: xk.block_digests(buf, block_size, config),
            warmup=50,
            rep=200,
            return_mode="median",
        )
        return float(ms) / 1e3
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        xk.block_digests(buf, block_size, config)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def _wall_median(fn: Any, device: str, reps: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``fn()`` (the device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


# Launch configurations tried for the single many-tensor launch (GPU time only).
MANY_SWEEP = [
    (8, 1, 1, 1),
    (8, 1, 1, 3),
    (16, 1, 2, 1),
]


def whole_model(gib: float, device: str, smoke: bool, block_sizes: list[int]) -> dict[str, Any]:
    """Step 4: a whole model of separate tensors through DeviceSource.block_digests."""
    from apollo_cas.examples import ModelShape
    from apollo_cas.sources.device import (
        DeviceSource,
        device_block_digests,
        plan_hashing,
    )

    # Smoke: a toy shape small enough for the interpreter (MB/s), with odd tensor sizes.
    shape = (
        ModelShape.for_bytes(int(gib * GiB))
        if not smoke
        else ModelShape(vocab=100, hidden=64, intermediate=160, layers=2)
    )
    shapes = shape.tensor_shapes()
    gen = torch.Generator(device=device).manual_seed(4)
    model = {}
    for name, dims in shapes.items():
        t = torch.empty(dims, dtype=torch.bfloat16, device=device)
        t.normal_(generator=gen)
        model[name] = t
    src = DeviceSource(model)
    views = [t.bytes for t in src.tensors()]
    total = sum(v.numel() for v in views)
    res: dict[str, Any] = {
        "model_bytes": total,
        "tensors": len(views),
        "shape": str(shape),
        "runs": [],
    }
    _log(f"whole model: {len(views)} tensors, {total / 1e9:.2f} GB on {device}")
    reps = 3 if smoke else 15
    cuda = device.startswith("cuda")

    def new_path(vs: list[torch.Tensor], bs: int) -> Any:
        if cuda:
            return lambda: device_block_digests(vs, bs)
        return lambda: device_block_digests(vs, bs, many=xk.block_digests_many)

    def old_path(vs: list[torch.Tensor], bs: int) -> Any:
        return lambda: device_block_digests(vs, bs, kernel=xk.block_digests, streams=16)

    def sample_ok(vs: list[torch.Tensor], digests: list[list[bytes]], bs: int) -> dict[str, Any]:
        rng = random.Random(bs)
        picks = {0, len(vs) - 1, *(rng.randrange(len(vs)) for _ in range(40))}
        checked = bad = 0
        for ti in sorted(picks):
            n_blocks = len(digests[ti])
            for b in {0, n_blocks - 1, rng.randrange(max(1, n_blocks))}:
                if n_blocks == 0:
                    continue
                raw = vs[ti][b * bs : (b + 1) * bs].cpu().numpy().tobytes()
                checked += 1
                bad += digests[ti][b] != xxhash.xxh3_128_digest(raw)
        return {"blocks_checked": checked, "mismatches": bad, "ok": bad == 0}

    for k, bs in enumerate(block_sizes):
        # The first block size gets everything; the others only the save's own call
        # (each block size is a new compile of every kernel: the device time is short).
        full = k == 0
        row: dict[str, Any] = {"block_size": bs, "blocks": total // bs}
        plan = plan_hashing([v.numel() for v in views], bs)
        row["kernel_tensors"] = len(plan.launches)
        row["host_pieces"] = len(plan.gathers)
        # New path: the call a save makes. The first call compiles and builds the plan.
        t0 = time.perf_counter()
        got = src.block_digests(bs) if cuda else new_path(views, bs)()
        row["first_call_s"] = time.perf_counter() - t0
        assert got is not None
        if full:
            row["same_as_per_tensor_path"] = got == old_path(views, bs)()
        row.update({f"sample_{key}": v for key, v in sample_ok(views, got, bs).items()})
        del got
        fn = (lambda b=bs, s=src: s.block_digests(b)) if cuda else new_path(views, bs)
        sec, times = _wall_median(fn, device, reps)
        row["median_ms"] = sec * 1e3
        row["times_ms"] = [round(x * 1e3, 3) for x in times]
        row["TB_per_s"] = total / sec / 1e12
        msg = f"whole model bs={bs}: DeviceSource.block_digests {sec * 1e3:.2f} ms = "
        msg += f"{row['TB_per_s']:.2f} TB/s, sample ok={row['sample_ok']}"
        if full:
            osec, _ = _wall_median(old_path(views, bs), device, max(3, reps // 2))
            row["per_tensor_16_streams_ms"] = osec * 1e3
            row["per_tensor_16_streams_TB_per_s"] = total / osec / 1e12
            msg += f"; per-tensor launches on 16 streams {osec * 1e3:.2f} ms = "
            msg += f"{row['per_tensor_16_streams_TB_per_s']:.2f} TB/s; "
            msg += f"same digests={row['same_as_per_tensor_path']}"
        _log(msg)
        if not full:
            res["runs"].append(row)
            continue
        # GPU time of the single launch alone, per launch configuration.
        parts = [views[ti][:n] for ti, n in plan.launches]
        kernel_bytes = sum(p.numel() for p in parts)
        row["many_launch"] = []
        for group, unroll, warps, stages in MANY_SWEEP if cuda else MANY_SWEEP[:1]:
            cfg = xk.LaunchConfig(group=group, unroll=unroll, num_warps=warps, num_stages=stages)
            try:
                xk.block_digests_many(parts, bs, cfg)
                if cuda:
                    from triton.testing import do_bench

                    ms = float(
                        do_bench(
                            lambda c=cfg, p=parts, b=bs: xk.block_digests_many(p, b, c),
                            warmup=25,
                            rep=100,
                            return_mode="median",
                        )
                    )
                else:
                    ms = (
                        1e3
                        * _wall_median(
                            lambda c=cfg, p=parts, b=bs: xk.block_digests_many(p, b, c), device, 1
                        )[0]
                    )
                entry = {
                    "config": dataclasses.asdict(cfg),
                    "median_ms": ms,
                    "TB_per_s": kernel_bytes / ms / 1e9,
                }
            except Exception as exc:  # one bad config must not lose the run
                entry = {"config": dataclasses.asdict(cfg), "error": f"{exc!r}"[:300]}
            row["many_launch"].append(entry)
            _log(f"  one launch {entry}")
        # Long tails: every kernel tensor cut 777 bytes short of a block boundary.
        cut = [v[: v.numel() - 777] if v.numel() > bs else v for v in views]
        row["tails_same_as_per_tensor_path"] = new_path(cut, bs)() == old_path(cut, bs)()
        tsec, _ = _wall_median(new_path(cut, bs), device, reps)
        row["tails_median_ms"] = tsec * 1e3
        row["tails_TB_per_s"] = sum(v.numel() for v in cut) / tsec / 1e12
        _log(
            f"  every tensor with a long tail: {tsec * 1e3:.2f} ms, same digests="
            f"{row['tails_same_as_per_tensor_path']}"
        )
        del cut, parts
        res["runs"].append(row)
    # The same bytes in one contiguous buffer: the kernel's ceiling on this card.
    del src, views, model, fn, t
    if cuda:
        torch.cuda.empty_cache()
    flat = _random_buffer(total, device, seed=5)
    for bs in block_sizes:
        if cuda:
            from triton.testing import do_bench

            xk.block_digests(flat, bs)
            ms = float(do_bench(lambda b=bs: xk.block_digests(flat, b), return_mode="median"))
        else:
            ms = _wall_median(lambda b=bs: xk.block_digests(flat, b), device, 1)[0] * 1e3
        res[f"contiguous_bs{bs}_ms"] = ms
        res[f"contiguous_bs{bs}_TB_per_s"] = total / ms / 1e9
        _log(f"  one contiguous buffer bs={bs}: {ms:.2f} ms = {total / ms / 1e9:.2f} TB/s")
    res["ok"] = all(
        r["sample_ok"]
        and r.get("same_as_per_tensor_path", True)
        and r.get("tails_same_as_per_tensor_path", True)
        for r in res["runs"]
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu_hash.json")
    ap.add_argument("--big-gib", type=float, default=16.0, help="size of the large buffer")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script")
    ap.add_argument("--no-sweep", action="store_true", help="only the default configuration")
    ap.add_argument("--model-gib", type=float, default=16.0, help="size of the whole model")
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="only the whole-model case, merged into an existing --out file",
    )
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    scale = 1 if not smoke else 0  # smoke: sizes below are replaced by tiny ones

    result: dict[str, Any] = {
        "benchmark": "XXH3-128 (seed 0) of every block, Triton kernel, bit-exact with xxhash",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
            "sm_count": (
                torch.cuda.get_device_properties(0).multi_processor_count
                if device == "cuda"
                else None
            ),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "xxhash": xxhash.VERSION,
            "python": platform.python_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        },
        "default_config": dataclasses.asdict(xk.DEFAULT_CONFIG),
        "correctness": [],
        "sweep": [],
        "throughput": [],
    }

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    model_sizes = [MiB, 64 * KiB] if not smoke else [4 * KiB]
    if args.model_only:
        if out_path.exists():
            result = json.loads(out_path.read_text())
        # The other steps' results (and their "env") stay as they were measured.
        result["whole_model_env"] = {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        result["whole_model"] = whole_model(args.model_gib, device, smoke, model_sizes)
        save()
        return 0 if result["whole_model"]["ok"] else 1

    save()
    t_start = time.perf_counter()
    cfg0 = xk.DEFAULT_CONFIG

    # ---- 1. correctness ---------------------------------------------------------------
    base_len = 64 * MiB if scale else 16 * KiB
    sizes = [256, 4 * KiB, 64 * KiB, MiB] if scale else [256, 1024, 4 * KiB]
    src = _random_buffer(base_len + 2 * max(sizes), device, seed=1)
    for bs in sizes:
        for tail in (101, bs - 13):  # short-path tail on the host; tail kernel, unaligned
            r = check_all_blocks(src[: base_len + tail], bs, cfg0)
            r["kind"] = "all blocks"
            result["correctness"].append(r)
            _log(f"all blocks bs={bs} tail={tail}: {r}")
            save()
    del src

    mid_len = GiB if scale else 64 * KiB
    mid = _random_buffer(mid_len, device, seed=2)
    for bs in [64 * KiB, MiB, 4 * MiB] if scale else [1024, 4 * KiB]:
        digests = xk.block_digests(mid, bs, cfg0)
        r = check_sample(mid, bs, digests, n_sample=256, seed=bs)
        r.update(kind="sample", bytes=mid_len, block_size=bs, blocks=digests.shape[0])
        result["correctness"].append(r)
        _log(f"sample bs={bs}: {r}")
        save()

    # ---- 2. sweep ---------------------------------------------------------------------
    big_len = int(args.big_gib * GiB) if scale else 256 * KiB
    big_len -= big_len % (MiB if scale else 64 * KiB)
    del mid
    if device == "cuda":
        torch.cuda.empty_cache()
    big = _random_buffer(big_len, device, seed=3)
    _sync(device)
    result["big_bytes"] = big_len

    def bench(bs: int, cfg: LaunchConfig, buf: torch.Tensor, tag: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        digests = xk.block_digests(buf, bs, cfg)  # compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
        chk = check_sample(buf, bs, digests, n_sample=32, seed=7)
        sec = time_call(buf, bs, cfg, device)
        row = {
            "tag": tag,
            "config": dataclasses.asdict(cfg),
            "bytes": buf.numel(),
            "block_size": bs,
            "blocks": digests.shape[0],
            "median_ms": sec * 1e3,
            "GB_per_s": buf.numel() / sec / 1e9,
            "first_call_s": compile_s,
            "sample_ok": chk["ok"],
        }
        _log(
            f"{tag} bs={bs} {cfg}: {row['GB_per_s']:.0f} GB/s "
            f"({row['median_ms']:.2f} ms), sample ok={chk['ok']}"
        )
        return row

    sweep_sizes = [MiB, 64 * KiB, 4 * MiB] if scale else [4 * KiB, 64 * KiB]
    best: dict[int, LaunchConfig] = {}
    configs = [cfg0] if args.no_sweep else SWEEP if scale else SWEEP[:2]
    ranked: list[LaunchConfig] = []
    for k, bs in enumerate(sweep_sizes):
        # Every candidate on the first block size, the best four on the others.
        cands = configs if k == 0 else ranked[:4]
        rows = []
        for cfg in cands:
            try:
                row = bench(bs, cfg, big, "sweep")
            except Exception as exc:  # keep going: one bad config must not lose the run
                row = {"tag": "sweep", "config": dataclasses.asdict(cfg), "block_size": bs}
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                _log(f"sweep bs={bs} {cfg}: ERROR {row['error']}")
            rows.append((cfg, row))
            result["sweep"].append(row)
            save()
        ok_rows = [(c, r) for c, r in rows if r.get("sample_ok")]
        ok_rows.sort(key=lambda cr: -cr[1]["GB_per_s"])
        if k == 0:
            ranked = [c for c, _ in ok_rows]
        if ok_rows:
            best[bs] = ok_rows[0][0]

    # ---- 3. throughput per block size -------------------------------------------------
    overall = ranked[0] if ranked else cfg0
    result["best_config_1MiB"] = dataclasses.asdict(overall)
    table_sizes = [4 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB] if scale else [4 * KiB]
    for bs in table_sizes:
        for cfg, tag in ((cfg0, "default"), (best.get(bs, overall), "best")):
            if tag == "best" and cfg == cfg0:
                continue
            try:
                result["throughput"].append(bench(bs, cfg, big, tag))
            except Exception as exc:
                result["throughput"].append(
                    {"tag": tag, "block_size": bs, "error": f"{type(exc).__name__}: {exc}"[:500]}
                )
            save()
    small_len = GiB if scale else 64 * KiB
    small = big[:small_len]
    small_bs = MiB if scale else 4 * KiB
    for cfg, tag in ((cfg0, "default-1GiB"), (overall, "best-1GiB")):
        if tag.startswith("best") and cfg == cfg0:
            continue
        result["throughput"].append(bench(small_bs, cfg, small, tag))
        save()

    del big, small
    if device == "cuda":
        torch.cuda.empty_cache()
    result["whole_model"] = whole_model(args.model_gib, device, smoke, model_sizes)
    save()

    result["elapsed_s"] = time.perf_counter() - t_start
    result["all_correct"] = (
        result["whole_model"]["ok"]
        and all(r.get("ok") for r in result["correctness"])
        and all(r.get("sample_ok", True) for r in result["sweep"] + result["throughput"])
    )
    save()
    _log(f"done in {result['elapsed_s']:.0f} s; all_correct={result['all_correct']}")
    return 0 if result["all_correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
