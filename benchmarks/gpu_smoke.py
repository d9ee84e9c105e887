"""Device check of the live-weights path: handles file, GPU hashing, pinned fetch, hot restore.

Run on a CUDA machine (not a test; CI has no GPU)::

    python benchmarks/gpu_smoke.py [--gib 2] [--hash-gib 16] [--json OUT.json]

What it does, printing ``PASS``/``FAIL``/``INFO`` lines and timings:

1. starts a *holder* process (the stand-in for vLLM) that allocates ~``--gib`` GiB
   of transformer-shaped bf16 tensors (plus odd sizes and dtypes), exports them
   with ``apollo_cas.sources.handles.write_handles`` (with ``__meta__``) and in the
   original format (no metadata), then waits for commands on stdin;
2. opens both files in this process (real CUDA IPC across processes), checks the
   GPU block digests against ``xxhash`` of CPU copies (1 MiB and 4 KiB blocks),
   ``fetch`` of random blocks and of everything (throughput, host memory);
3. saves into a store, has the holder change a few rows, saves again
   (incremental: bytes that crossed PCIe), hot-restores the first checkpoint
   and asks the holder to hash the tensor it changed (cross-process visibility);
4. stale handles: the holder exits, a fresh process opens the file (refused);
   a holder with ``expandable_segments:True`` (what happens to its handles);
5. hash throughput of a ~``--hash-gib`` GiB, 218-tensor model in one process with
   several stream counts, beside the kernel on one contiguous buffer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: dict[str, Any] = {"checks": []}
MiB = 1 << 20


def report(status: str, name: str, detail: str = "") -> None:
    print(f"{status} {name}: {detail}", flush=True)
    RESULTS["checks"].append({"status": status, "name": name, "detail": detail})


def check(name: str, ok: bool, detail: str = "") -> bool:
    report("PASS" if ok else "FAIL", name, detail)
    return ok


# ------------------------------------------------------------------------------ model


def model_shapes(gib: float) -> list[tuple[str, tuple[int, ...], str]]:
    """Transformer-shaped tensors (hidden 2048, mlp 5632, vocab 32000), ~gib GiB of bf16."""
    h, f, v = 2048, 5632, 32000
    per_layer = (4 * h * h + 3 * h * f + 2 * h) * 2
    layers = max(1, int((gib * (1 << 30) - 2 * v * h * 2) // per_layer))
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (v, h), "bfloat16"),
        ("lm_head.weight", (v, h), "bfloat16"),
        ("model.norm.weight", (h,), "bfloat16"),
        ("odd.full_plus_long_tail", (1000, 1001), "bfloat16"),  # 1 MiB block + 953 KB tail
        ("odd.full_plus_short_tail", (MiB + 100,), "uint8"),  # 1 MiB block + 100-byte tail
        ("odd.fp8", (4096, 33), "float8_e4m3fn"),
        ("odd.mask", (777,), "bool"),
        ("odd.scalar", (), "int64"),
        ("odd.tiny", (3,), "float32"),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (h, h), "bfloat16") for n in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (f, h), "bfloat16"),
            (p + "mlp.up_proj.weight", (f, h), "bfloat16"),
            (p + "mlp.down_proj.weight", (h, f), "bfloat16"),
            (p + "input_layernorm.weight", (h,), "bfloat16"),
            (p + "post_attention_layernorm.weight", (h,), "bfloat16"),
        ]
    return out


def make_tensors(shapes: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(1234)
    out = {}
    for name, shape, dt in shapes:
        dtype = getattr(torch, dt)
        if dtype.is_floating_point:
            t = torch.randn(shape, device="cuda", generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(shape, device="cuda", generator=g) > 0.5
        else:
            t = torch.randint(0, 100, shape, device="cuda", generator=g, dtype=dtype)
        out[name] = t
    torch.cuda.synchronize()
    return out


def raw(t: Any) -> bytes:
    return (
        t.detach().contiguous().reshape(-1).view(__import__("torch").uint8).cpu().numpy().tobytes()
    )


# ------------------------------------------------------------------------------ holder


def holder(path: str, plain_path: str, gib: float) -> None:
    """The server stand-in: allocate, export, then obey stdin."""
    import torch
    import xxhash

    from apollo_cas.sources import handles

    tensors = make_tensors(model_shapes(gib))
    err = ""
    try:
        handles.write_handles(path, tensors, rank=0, world_size=1)
        handles.write_handles(plain_path, tensors, include_meta=False)
    except Exception as exc:  # report to the parent, stay alive for its checks
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(
        f"READY {os.getpid()} {sum(t.numel() * t.element_size() for t in tensors.values())} {err}",
        flush=True,
    )
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "MODIFY":
            t = tensors[arg]
            t.view(-1)[:1024].add_(1)  # one block's worth of rows, like a tiny update
            torch.cuda.synchronize()
            print("OK", flush=True)
        elif cmd == "HASH":
            print(xxhash.xxh3_128_hexdigest(raw(tensors[arg])), flush=True)
        elif cmd == "EXIT":
            break


class Holder:
    def __init__(
        self, tmp: Path, gib: float, env: dict[str, str] | None = None, tag: str = "h"
    ) -> None:
        self.path = tmp / f"{tag}.pt"
        self.plain = tmp / f"{tag}-plain.pt"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--holder", str(self.path), str(self.plain), str(gib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        parts = line.split(" ", 3)
        if not line.startswith("READY"):
            raise RuntimeError(f"holder failed: {line!r}")
        self.pid, self.nbytes = int(parts[1]), int(parts[2])
        self.error = parts[3] if len(parts) > 3 else ""

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("EXIT\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------- parts


def timed(fn: Any, repeat: int = 3) -> tuple[float, Any]:
    import torch

    best, out = float("inf"), None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def verify_digests(src: Any, bs: int, sample: list[int], label: str) -> None:
    import xxhash

    fn = lambda: src.block_digests(bs)  # noqa: E731
    fn()  # compile
    secs, digests = timed(fn)
    total = sum(t.nbytes for t in src.tensors())
    RESULTS[f"hash_{label}_s"] = secs
    report(
        "INFO",
        f"block_digests {label}",
        f"{total / 1e9:.2f} GB in {secs * 1e3:.1f} ms "
        f"({total / secs / 1e12:.2f} TB/s), {sum(len(d) for d in digests)} blocks, "
        f"{src.device_to_host_bytes} B gathered so far",
    )
    bad = []
    for i in sample:
        t = src.tensors()[i]
        b = raw(t.tensor)
        want = [xxhash.xxh3_128_digest(b[o : o + bs]) for o in range(0, len(b), bs)]
        if digests[i] != want:
            bad.append(t.name)
    check(f"digests {label} == xxhash (sample of {len(sample)})", not bad, ", ".join(bad[:5]))


def fetch_checks(src: Any, bs: int) -> None:
    import torch

    from apollo_cas.sources.base import BlockRequest

    ts = src.tensors()
    rng = random.Random(0)
    all_reqs = [
        BlockRequest(ti, o, min(bs, t.nbytes - o))
        for ti, t in enumerate(ts)
        for o in range(0, t.nbytes, bs)
    ]
    sample = rng.sample(all_reqs, min(300, len(all_reqs)))
    cpu = {r.tensor: raw(ts[r.tensor].tensor) for r in sample}
    bad = 0
    for i, view in src.fetch(sample):
        r = sample[i]
        bad += bytes(view) != cpu[r.tensor][r.offset : r.offset + r.length]
    check("fetch of 300 random blocks", bad == 0, f"{bad} wrong")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = src.device_to_host_bytes
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _, view in src.fetch(all_reqs):
        n += len(view)
    secs = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    RESULTS["fetch_all_gbps"] = n / secs / 1e9
    report(
        "INFO",
        "fetch of every block",
        f"{n / 1e9:.2f} GB in {secs:.2f} s = "
        f"{n / secs / 1e9:.1f} GB/s through 2 x {src.buffer_bytes >> 20} MiB pinned buffers; "
        f"max RSS grew {(rss1 - rss0) / 1024:.0f} MiB",
    )
    check("fetch counted bytes", src.device_to_host_bytes - before == n)


def store_checks(src: Any, holder_: Holder, tmp: Path) -> None:
    import xxhash

    from apollo_cas.targets.live import restore_live

    target = "model.layers.1.self_attn.q_proj.weight"
    names = [t.name for t in src.tensors()]
    ti = names.index(target)
    original = raw(src.tensors()[ti].tensor)
    try:
        from apollo_cas.store import Store

        store: Any = Store.open(tmp / "store", create=True)
    except Exception as exc:
        report("INFO", "store unavailable", f"{type(exc).__name__}: {exc}")
        store = None
    bs = MiB
    if store is not None:
        t0 = time.perf_counter()
        r1 = store.save(src, block_size=bs)
        report(
            "INFO",
            "full save (store)",
            f"{time.perf_counter() - t0:.2f} s, {r1.fetched_bytes / 1e9:.2f} GB crossed PCIe",
        )
        manifest = r1.manifest
        read_chunk = store.read_chunk
    else:
        from apollo_cas.manifest import Manifest, SourceInfo, TensorEntry

        digests = src.block_digests(bs)
        entries = tuple(
            TensorEntry(t.name, t.dtype.name, t.shape, t.nbytes, tuple(d))
            for t, d in zip(src.tensors(), digests, strict=True)
        )
        manifest = Manifest("default", time.time(), bs, entries, SourceInfo(kind="handles"))
        chunks = {
            xxhash.xxh3_128_digest(original[o : o + bs]): original[o : o + bs]
            for o in range(0, len(original), bs)
        }

        def read_chunk(cid: bytes, _size: int | None = None) -> bytes:
            return chunks[cid]

    check("holder modifies a tensor", holder_.ask(f"MODIFY {target}") == "OK")
    if store is not None:
        t0 = time.perf_counter()
        fetched0 = src.device_to_host_bytes
        r2 = store.save(src, block_size=bs)
        secs = time.perf_counter() - t0
        RESULTS["incremental_save_s"] = secs
        report(
            "INFO",
            "incremental save (store)",
            f"{secs * 1e3:.0f} ms, {r2.fetched_bytes} B "
            f"fetched, {src.device_to_host_bytes - fetched0} B crossed PCIe in all, "
            f"{r2.stats.new_chunks} new chunk(s)",
        )
        check("incremental save fetched one block", r2.fetched_bytes == bs, str(r2.fetched_bytes))
    rep = restore_live(src.live_tensors(), manifest, read_chunk)
    RESULTS["hot_restore"] = rep.to_dict()
    report(
        "INFO",
        "hot restore",
        f"{rep.blocks_written}/{rep.blocks_checked} blocks written in "
        f"{rep.seconds * 1e3:.0f} ms (hash {rep.hash_seconds * 1e3:.0f}, write "
        f"{rep.write_seconds * 1e3:.0f}, verify {rep.verify_seconds * 1e3:.0f}); {rep.notice}",
    )
    check(
        "hot restore wrote the changed block and verified",
        rep.blocks_written == 1 and rep.verified,
        str(rep.blocks_written),
    )
    check(
        "holder sees the restored tensor",
        holder_.ask(f"HASH {target}") == xxhash.xxh3_128_hexdigest(original),
    )


def fresh_open(path: Path, check_owner: bool = True, digest: bool = False) -> str:
    """Open a handles file in a new process (the IPC cache of this one would hide errors)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from apollo_cas.sources import handles\n"
        "try:\n"
        "    s = handles.open_handles(sys.argv[2], check_owner_pid=sys.argv[3] == '1')\n"
        "    d = s.block_digests(1 << 20) if sys.argv[4] == '1' else None\n"
        "    print('OPENED', len(s.tensors()), s.info.metadata.get('handle_kind'),"
        " None if d is None else sum(len(x) for x in d))\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, str(e))\n"
    )
    argv = [
        str(Path(__file__).resolve().parents[1]),
        str(path),
        str(int(check_owner)),
        str(int(digest)),
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("OPENED", "ERROR"))]
    return lines[-1] if lines else f"no output (rc {out.returncode}): {out.stderr[-500:]}"


def hash_bench(gib: float) -> None:
    """GPU hash throughput on a ~gib GiB model of 218 tensors, per stream count."""
    import torch

    from apollo_cas.gpu import xxh3_kernel
    from apollo_cas.sources.device import byte_view, device_block_digests

    # 218 tensors like the brief's 15.9 GB model: 27 layers x 8 + embed + head.
    h = 4096
    f = int((gib * (1 << 30) / 2 - 2 * 32000 * h) / 27 / h - 4 * h) // 3 // 128 * 128
    shapes = [(32000, h), (32000, h)] + [(h, h)] * 4 * 27 + [(f, h)] * 3 * 27 + [(h,)] * 27
    ts = [torch.empty(s, dtype=torch.bfloat16, device="cuda").normal_() for s in shapes]
    views = [byte_view(t) for t in ts]
    total = sum(v.numel() for v in views)
    env = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default")
    res: dict[str, Any] = {"gib": total / (1 << 30), "tensors": len(ts), "max_connections": env}
    for bs, counts in ((MiB, (1, 8, 16, 32, 64)), (4096, (16,))):
        device_block_digests(views, bs, streams=16)  # compile
        for streams in counts:
            secs, _ = timed(lambda s=streams, b=bs: device_block_digests(views, b, streams=s))
            res[f"bs{bs}_streams{streams}_tbps"] = total / secs / 1e12
            print(
                f"INFO hash bs={bs} streams={streams} CUDA_DEVICE_MAX_CONNECTIONS={env}: "
                f"{secs * 1e3:.1f} ms = {total / secs / 1e12:.2f} TB/s",
                flush=True,
            )
    del ts
    torch.cuda.empty_cache()
    flat = torch.empty(total, dtype=torch.uint8, device="cuda")
    for bs in (MiB, 4096):
        xxh3_kernel.block_digests(flat, bs)
        secs, _ = timed(lambda b=bs: xxh3_kernel.block_digests(flat, b))
        res[f"bs{bs}_contiguous_tbps"] = total / secs / 1e12
        print(
            f"INFO hash bs={bs} one contiguous buffer: {secs * 1e3:.1f} ms = "
            f"{total / secs / 1e12:.2f} TB/s",
            flush=True,
        )
    print("HASHBENCH " + json.dumps(res), flush=True)


# -------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--hash-gib", type=float, default=16.0)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_smoke.json"))
    ap.add_argument("--holder", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--hash-bench", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.holder:
        holder(args.holder[0], args.holder[1], float(args.holder[2]))
        return 0
    if args.hash_bench:
        hash_bench(args.hash_bench)
        return 0

    import torch

    from apollo_cas.sources import handles

    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    print(f"INFO device: {RESULTS['device']}, torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="apollo-smoke-"))
    t0 = time.perf_counter()
    h = Holder(tmp, args.gib)
    report(
        "INFO",
        "holder",
        f"pid {h.pid}, {h.nbytes / 1e9:.2f} GB, up in {time.perf_counter() - t0:.1f} s {h.error}",
    )
    try:
        hf = handles.read_handles(h.path)
        e = hf.entries[0]
        report(
            "INFO",
            "handle layout",
            f"storage handle {len(e.storage_handle or b'')} B "
            f"prefix {(e.storage_handle or b'')[:2]!r} kind {e.handle_kind}; ref counter "
            f"{e.ref_counter_handle!r}; event handle {len(e.event_handle or b'')} B, sync "
            f"{e.event_sync_required}; owner pid {e.owner_pid}",
        )
        shm = sorted(p.name for p in Path("/dev/shm").glob(f"torch_{h.pid}_*"))
        report("INFO", "ref-counter files", f"{len(shm)} in /dev/shm: {shm[:3]}")
        t0 = time.perf_counter()
        src = handles.open_handles(h.path, buffer_bytes=256 * MiB)
        secs = time.perf_counter() - t0
        check(
            "open handles file (with __meta__)",
            len(src.tensors()) == len(hf.entries),
            f"{len(src.tensors())} tensors in {secs:.2f} s; {src.info.metadata}",
        )
        check("rank/world size from metadata", (src.info.rank, src.info.world_size) == (0, 1))
        check("owner pid", src.info.metadata.get("owner_pid") == str(h.pid))
        plain = handles.open_handles(h.plain)
        check(
            "open original-format file (no metadata)",
            len(plain.tensors()) == len(hf.entries),
            plain.info.metadata.get("device_rule", ""),
        )
        names = [t.name for t in src.tensors()]
        rng = random.Random(1)
        sample = sorted(
            {
                *rng.sample(range(len(names)), 6),
                *(
                    i
                    for i, n in enumerate(names)
                    if n.startswith(("odd.", "model.norm", "lm_head"))
                ),
            }
        )
        verify_digests(src, MiB, sample, "1MiB")
        verify_digests(src, 4096, sample[:6], "4KiB")
        fetch_checks(src, MiB)
        store_checks(src, h, tmp)
        plain.close()
        src.close()
    finally:
        h.stop()
    out = fresh_open(h.path)
    check("dead owner refused", out.startswith("ERROR StaleHandles") and "is gone" in out, out)
    out = fresh_open(h.path, check_owner=False)
    check(
        "dead owner, no pid check: opening fails cleanly", out.startswith("ERROR StaleHandles"), out
    )

    # expandable_segments in the server's allocator.
    try:
        h2 = Holder(tmp, 0.05, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "exp")
        try:
            if h2.error:
                report("INFO", "expandable_segments: the server cannot export", h2.error)
            else:
                kinds = {e.handle_kind for e in handles.read_handles(h2.path).entries}
                out = fresh_open(h2.path, digest=True)
                report(
                    "INFO",
                    "expandable_segments: open in another process",
                    f"handle kinds {kinds}: {out}",
                )
                ok = out.startswith("OPENED") or (
                    "StaleHandles" in out and "expandable_segments" in out
                )
                check("expandable_segments: works or refused with the cause", ok, out[:300])
        finally:
            h2.stop()
    except Exception as exc:
        report("INFO", "expandable_segments holder failed", f"{type(exc).__name__}: {exc}")

    # GPU hash throughput per stream count, with the default and a raised number of
    # hardware queues (CUDA_DEVICE_MAX_CONNECTIONS must be set before CUDA starts).
    if args.hash_gib:
        for env in ({}, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}):
            proc = subprocess.run(
                [sys.executable, __file__, "--hash-bench", str(args.hash_gib)],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, **env},
            )
            for line in proc.stdout.splitlines():
                if line.startswith("HASHBENCH "):
                    RESULTS.setdefault("hash_bench", []).append(json.loads(line[10:]))
                else:
                    print(line, flush=True)
            if proc.returncode:
                report("FAIL", "hash bench", proc.stderr[-1500:])
    fails = [c for c in RESULTS["checks"] if c["status"] == "FAIL"]
    print(
        f"{'FAIL' if fails else 'PASS'} summary: {len(fails)} failed of "
        f"{sum(c['status'] != 'INFO' for c in RESULTS['checks'])} checks",
        flush=True,
    )
    with contextlib.suppress(OSError):
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
