"""Block digests of tensors: XXH3-128 of every fixed-size block, where the bytes live.

One home for the hashing that sources (a save of live weights) and targets (hot restore,
the GPU restore pipeline's verification) share (docs/DESIGN.md, design move 3):

* :func:`device_block_digests`: every block of many CUDA tensors in one Triton launch
  (:func:`~apollo_cas.gpu.xxh3_kernel.block_digests_many`); tensors smaller than one
  block and trailing blocks of 240 bytes or less (XXH3's short paths) are gathered on
  the device, copied once and hashed on the host;
* :func:`host_block_digests`: the same on the host, on all cores (xxhash drops the GIL);
* :func:`tensor_digests`: per tensor, per block ids of any mix of CPU and CUDA tensors,
  on each GPU when the kernel runs there, else on the host.

Why all tensors go to one launch: XXH3 is sequential inside a block, so the kernel's
parallelism is across blocks, and one tensor of ~70 MiB holds only ~70 blocks of 1 MiB.
Measured on an H200 (17.1 GB, 417 bf16 tensors, 1 MiB blocks): 46 ms (0.37 TB/s) per
tensor on 16 streams, 6.7 ms (2.57 TB/s) in one launch (docs/GPU_HASH.md).

Imports torch (not triton: the kernel module is imported only when a GPU is present).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import xxhash

from .staging import Uploads

log = logging.getLogger(__name__)

#: CUDA streams a per-tensor ``kernel`` of :func:`device_block_digests` is spread over
#: (the default one-launch path uses none).
DEFAULT_STREAMS = 16
#: XXH3 inputs of this length or less take the short paths (hashed on the host).
SHORT_INPUT_MAX = 240
#: Upper bound of one host gather of small tensors / short tails (device and pinned).
_GATHER_BYTES = 64 << 20

__all__ = [
    "DEFAULT_STREAMS",
    "SHORT_INPUT_MAX",
    "byte_view",
    "device_block_digests",
    "host_block_digests",
    "kernel_accepts",
    "kernel_module",
    "plan_hashing",
    "tensor_digests",
]


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The row-major bytes of ``t`` as a 1-D ``uint8`` tensor on its device.

    A contiguous tensor is viewed, never copied (this is what lets hot restore
    write into live weights through it); a non-contiguous one is copied on its
    own device. Works for every dtype, bf16 and fp8 included, because it never
    goes through numpy's dtypes.
    """
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    if flat.dtype == torch.uint8:
        return flat
    # A dtype view reinterprets the same memory (bool, fp8 and bf16 included).
    return flat.view(torch.uint8)


# ----------------------------------------------------------------------------- hashing


def _kernel_module() -> ModuleType | None:
    """The Triton kernel module when it can run here, else None (host hashing)."""
    if not torch.cuda.is_available():
        return None  # and do not import triton on a CPU-only machine
    try:
        from . import xxh3_kernel
    except Exception as exc:  # triton missing or broken: fall back, do not fail the save
        log.debug("GPU hashing unavailable: %s", exc)
        return None
    try:
        if not xxh3_kernel.available():
            return None
    except Exception:
        return None
    return xxh3_kernel


def kernel_accepts(block_size: int) -> bool:
    """True if the GPU kernel can hash blocks of ``block_size`` here."""
    k = _kernel_module()
    if k is None:
        return False
    try:
        k.check_block_size(block_size)
    except (ValueError, AttributeError):
        return False
    return True


def host_block_digests(
    views: Sequence[memoryview], block_size: int, workers: int | None = None
) -> list[list[bytes]]:
    """XXH3-128 of every block of host buffers, on ``workers`` threads (xxhash drops the GIL)."""
    from ..parallel import bounded_map, default_workers

    jobs = [(ti, o) for ti, v in enumerate(views) for o in range(0, len(v), block_size)]
    out: list[list[bytes]] = [[] for _ in views]

    def task(job: tuple[int, int]) -> bytes:
        ti, o = job
        return xxhash.xxh3_128_digest(views[ti][o : o + block_size])

    for (ti, _), d in zip(jobs, bounded_map(task, jobs, workers or default_workers()), strict=True):
        out[ti].append(d)
    return out


@dataclass(frozen=True)
class _Plan:
    """How one device's tensors are hashed: kernel launches and a host gather."""

    #: (tensor index, bytes handed to the kernel: whole blocks, plus a tail > 240 bytes)
    launches: tuple[tuple[int, int], ...]
    #: (tensor index, byte offset, length): pieces of one partial block each, hashed on the host
    gathers: tuple[tuple[int, int, int], ...]


def plan_hashing(nbytes: Sequence[int], block_size: int) -> _Plan:
    """Split each tensor between the kernel and the host gather.

    A tensor no larger than one block is a single (partial or whole) block: it
    goes to the host gather when shorter than a block — launching a kernel for a
    layernorm weight costs more than copying it — and to the kernel when it is
    exactly one block. A trailing partial block of 240 bytes or less also goes to
    the host (XXH3's short paths; the kernel would synchronise to do the same).
    """
    launches: list[tuple[int, int]] = []
    gathers: list[tuple[int, int, int]] = []
    for ti, n in enumerate(nbytes):
        if n == 0:
            continue
        if n < block_size:
            gathers.append((ti, 0, n))
            continue
        full = n // block_size * block_size
        tail = n - full
        if 0 < tail <= SHORT_INPUT_MAX:
            launches.append((ti, full))
            gathers.append((ti, full, tail))
        else:
            launches.append((ti, n))
    # Biggest first: long launches start early and short ones fill in behind them.
    launches.sort(key=lambda x: -x[1])
    return _Plan(tuple(launches), tuple(gathers))


def device_block_digests(
    views: Sequence[torch.Tensor],
    block_size: int,
    *,
    streams: int = DEFAULT_STREAMS,
    kernel: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    many: Callable[[Sequence[torch.Tensor], int], torch.Tensor] | None = None,
    stats: dict[str, int] | None = None,
) -> list[list[bytes]]:
    """Chunk ids of every block of 1-D ``uint8`` tensors that share one device.

    By default every tensor's kernel work goes to one call of ``many(views,
    block_size) -> (rows, 16) uint8`` (the Triton
    :func:`~apollo_cas.gpu.xxh3_kernel.block_digests_many`: one launch for all
    full blocks). ``kernel(data, block_size) -> (n, 16) uint8``, when given instead,
    is called once per tensor, round-robin over ``streams`` CUDA streams: the
    older, slower method, kept as the benchmarks' baseline and for tests that pass
    an xxhash-backed stand-in to run the same bookkeeping on the CPU.
    Only the digests and the small gathered pieces cross to the host. ``stats``,
    when given, receives ``gathered_bytes`` (bytes copied to the host for
    hashing) and ``launches`` (kernel calls made from here).
    """
    if not views:
        return []
    if kernel is not None and many is not None:
        raise ValueError("pass kernel or many, not both")
    device = views[0].device
    cuda = device.type == "cuda"
    if kernel is None and many is None:
        k = _kernel_module()
        if k is None:
            raise RuntimeError("the Triton XXH3 kernel is not available")
        many = k.block_digests_many
        table = getattr(k, "_secret_table", None)
        if cuda and table is not None:
            # The kernel uploads its constant table on first use; do it here, before
            # the gather below is queued, so the upload does not wait behind it.
            table(device)
    plan = plan_hashing([int(v.numel()) for v in views], block_size)
    out: list[list[bytes]] = [[] for _ in views]

    # 1. Host gather of small pieces, issued first on the current stream so its
    #    copy overlaps the kernels below.
    pending_gathers = _issue_gathers(views, plan.gathers, cuda)

    # 2. The kernel: one call for every tensor, or (a given per-tensor kernel) one
    #    per tensor spread over side streams.
    launches = plan.launches
    all_d: torch.Tensor | None = None
    n_calls = 0
    if many is not None and launches:
        # Slice only tensors that end in a short tail: a slice is a new tensor object
        # (microseconds each, hundreds per model), and most weights end on a block.
        parts = [views[ti] if n == views[ti].numel() else views[ti][:n] for ti, n in launches]
        all_d = many(parts, block_size)
        n_calls = 1
    elif kernel is not None and launches:
        results = _per_tensor(views, launches, block_size, kernel, streams, cuda)
        all_d = torch.cat(results) if len(results) > 1 else results[0]
        n_calls = len(results)

    # 3. One device-to-host copy of every kernel digest, split into one ``bytes`` per
    #    block by numpy (a 16-byte void dtype's tolist() gives bytes, ~7x faster than
    #    slicing a bytes object in a Python loop).
    if all_d is not None:
        host = np.ascontiguousarray(all_d.cpu().numpy())
        rows: list[bytes] = host.view(np.dtype("V16")).reshape(-1).tolist()
        pos = 0
        for ti, n in launches:
            nb = -(-n // block_size)
            out[ti] = rows[pos : pos + nb]
            pos += nb
        if pos != len(rows):
            raise RuntimeError(f"the kernel returned {len(rows)} digests, expected {pos}")

    # 4. Host hashing of the gathered pieces (each is one block, or a tensor's tail).
    gathered = 0
    for grp, host_buf, ev in pending_gathers:
        if ev is not None:
            ev.synchronize()
        mv = host_buf.numpy().data
        pos = 0
        for ti, _o, n in grp:
            out[ti].append(xxhash.xxh3_128_digest(mv[pos : pos + n]))
            pos += n
        gathered += pos
    if stats is not None:
        stats["gathered_bytes"] = stats.get("gathered_bytes", 0) + gathered
        stats["launches"] = stats.get("launches", 0) + n_calls
    return out


def _issue_gathers(
    views: Sequence[torch.Tensor], gathers: Sequence[tuple[int, int, int]], cuda: bool
) -> list[tuple[list[tuple[int, int, int]], torch.Tensor, Any]]:
    """Queue device-to-host copies of the small pieces, in groups of at most
    ``_GATHER_BYTES``: (pieces, host buffer, CUDA event or None) per group."""
    groups: list[list[tuple[int, int, int]]] = []
    group: list[tuple[int, int, int]] = []
    size = 0
    for g in gathers:
        if group and size + g[2] > _GATHER_BYTES:
            groups.append(group)
            group, size = [], 0
        group.append(g)
        size += g[2]
    if group:
        groups.append(group)
    pending: list[tuple[list[tuple[int, int, int]], torch.Tensor, Any]] = []
    for grp in groups:
        parts = [views[ti][o : o + n] for ti, o, n in grp]
        joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        host = torch.empty(joined.numel(), dtype=torch.uint8, pin_memory=cuda)
        host.copy_(joined, non_blocking=cuda)
        ev = None
        if cuda:
            ev = torch.cuda.Event()
            ev.record()
        pending.append((grp, host, ev))
    return pending


def _per_tensor(
    views: Sequence[torch.Tensor],
    launches: Sequence[tuple[int, int]],
    block_size: int,
    kernel: Callable[[torch.Tensor, int], torch.Tensor],
    streams: int,
    cuda: bool,
) -> list[torch.Tensor]:
    """One ``kernel`` call per tensor, round-robin over ``streams`` side streams on CUDA."""
    if not cuda:
        return [kernel(views[ti][:n], block_size) for ti, n in launches]
    results: list[torch.Tensor] = []
    device = views[0].device
    pool = _stream_pool(device, max(1, streams))
    current = torch.cuda.current_stream(device)
    for s in pool:
        s.wait_stream(current)  # writes queued before us (hot restore) come first
    for j, (ti, n) in enumerate(launches):
        with torch.cuda.stream(pool[j % len(pool)]):
            results.append(kernel(views[ti][:n], block_size))
    for s in pool:
        current.wait_stream(s)
    return results


_STREAMS: dict[tuple[int, int], list[Any]] = {}
_STREAMS_LOCK = threading.Lock()


def _stream_pool(device: torch.device, n: int) -> list[Any]:
    """``n`` side streams on ``device``, created once per process (creation is not free)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), n)
    with _STREAMS_LOCK:
        pool = _STREAMS.get(key)
        if pool is None:
            pool = [torch.cuda.Stream(device=key[0]) for _ in range(n)]
            _STREAMS[key] = pool
        return pool


def kernel_module() -> ModuleType | None:
    """The Triton kernel module when it can run here, else None (public alias)."""
    return _kernel_module()


def tensor_digests(views: Sequence[torch.Tensor], block_size: int) -> list[list[bytes]]:
    """Per view, per block XXH3-128 ids of 1-D uint8 views on any mix of devices.

    CUDA views are hashed on their GPU (one launch per device) when the kernel runs
    there and takes ``block_size``; CPU views, and CUDA views where it does not, are
    hashed on the host (CUDA bytes are copied over in pieces of at most 256 MiB).
    """
    out: list[list[bytes]] = [[] for _ in views]
    by_dev: dict[str, list[int]] = {}
    for i, v in enumerate(views):
        by_dev.setdefault(str(v.device), []).append(i)
    gpu_ok = any(d != "cpu" for d in by_dev) and kernel_accepts(block_size)
    for dev, idx in by_dev.items():
        sub = [views[i] for i in idx]
        if dev == "cpu":
            ds = host_block_digests([v.numpy().data for v in sub], block_size)
        elif gpu_ok:
            with torch.cuda.device(sub[0].device):
                ds = device_block_digests(sub, block_size)
        else:
            ds = _digests_via_host(sub, block_size)
        for i, d in zip(idx, ds, strict=True):
            out[i] = d
    return out


def _digests_via_host(views: Sequence[torch.Tensor], block_size: int) -> list[list[bytes]]:
    """CUDA bytes hashed on the host in pieces (no kernel here): bounded host memory."""
    piece = max(block_size, (256 << 20) // block_size * block_size)
    out: list[list[bytes]] = []
    for v in views:
        ds: list[bytes] = []
        for o in range(0, int(v.numel()), piece):
            host = v[o : o + piece].cpu().numpy()
            ds += host_block_digests([host.data], block_size)[0]
        out.append(ds)
    return out


def mismatches_later(
    got: torch.Tensor,
    ids: Sequence[bytes],
    uploads: Uploads | None = None,
    want: torch.Tensor | None = None,
) -> Callable[[], list[int]]:
    """Compare the ``(n, 16)`` device digests ``got`` with the chunk ids ``ids``, queued
    on the current stream; returns the verdict: a function giving the indices that
    differ, which waits for the device only when called (so the host goes on queueing
    the next steps instead of idling through a round trip per batch). ``want``: the
    ids already on the device, as ``(n, 16)`` uint8 (else they are uploaded)."""
    if got.device.type != "cuda":
        host = torch.frombuffer(bytearray(b"".join(ids)), dtype=torch.uint8).view(-1, 16)
        bad = (got != host).any(dim=1).nonzero().flatten().tolist()
        return lambda: [int(i) for i in bad]
    if want is None:
        table = np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 16)
        want = (uploads or Uploads(1)).from_numpy(table, got.device)
    flags = torch.empty(len(ids), dtype=torch.bool, pin_memory=True)
    flags.copy_((got != want).any(dim=1), non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def verdict() -> list[int]:
        done.synchronize()
        return [int(i) for i in flags.nonzero().flatten().tolist()]

    return verdict
