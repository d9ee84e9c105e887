"""Tensors on a CUDA device: hashed where they live, fetched through pinned buffers.

This is the hot path of a checkpoint of live weights (a handles file, or a
``state_dict()`` passed in-process). Two rules shape it:

* **Only changed blocks cross PCIe.** :meth:`DeviceSource.block_digests` computes
  every block's chunk id on the GPU with the Triton XXH3-128 kernel
  (:mod:`apollo_cas.gpu.xxh3_kernel`, bit-exact with ``xxhash``), and copies
  only the digests (16 bytes per block) to the host, once, at the end.
* **Host memory is bounded, never proportional to the model.**
  :meth:`DeviceSource.fetch` copies the blocks the store lacks through two
  reusable pinned buffers (``buffer_bytes`` each, 256 MiB by default) on a side
  CUDA stream: the copy of batch k+1 is in flight while the consumer hashes,
  compresses and writes batch k. No ``.cpu()`` of whole tensors, no pageable
  copies (pageable device-to-host runs at ~1.3 GB/s on an H100, pinned at ~54).

Why all tensors go to one launch: XXH3 is sequential inside a block, so the
kernel's parallelism is across blocks, and one tensor of ~70 MiB holds only ~70
blocks of 1 MiB — a few warps. One launch per tensor left the GPU nearly idle,
even spread over 16 streams. :func:`device_block_digests` therefore hands every
tensor's full blocks to :func:`~apollo_cas.gpu.xxh3_kernel.block_digests_many`,
one launch per device over a (cached) table of block addresses. Measured on an
H200 (17.1 GB, 417 bf16 tensors, 1 MiB blocks, ``DeviceSource.block_digests``):
46 ms (0.37 TB/s) per tensor on 16 streams, 6.7 ms (2.57 TB/s) in one launch,
of which the launch itself is 4.3 ms (docs/GPU_HASH.md). Tensors smaller than one block, and
trailing blocks of 240 bytes or less (XXH3's short paths, which the kernel leaves
to the host), are gathered on the device into one buffer, copied once and hashed
with ``xxhash`` on the host; they are a few MB in a transformer.

CPU fallback: tensors on the CPU are read through zero-copy views, and
``block_digests`` returns ``None`` when every tensor is on the CPU (the pipeline
then hashes while it reads, on all cores). The same class therefore runs in CI,
which has no GPU.

A caveat the caller owns: the digests and the fetched bytes are two reads of
the same memory. If the weights change between them (a trainer stepping during
the save), a chunk id may not match its bytes. Pause weight updates during a
save; the pipeline may also re-hash fetched bytes on the host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import xxhash

from .. import dtypes
from ..manifest import SourceInfo
from .base import BlockRequest, Source, SourceTensor, by_unique_name

log = logging.getLogger(__name__)

#: Size of each of the two pinned buffers that ``fetch`` streams through.
DEFAULT_BUFFER_BYTES = 256 << 20
#: CUDA streams a per-tensor ``kernel`` of :func:`device_block_digests` is spread over
#: (the default one-launch path uses none).
DEFAULT_STREAMS = 16
#: XXH3 inputs of this length or less take the short paths (hashed on the host).
SHORT_INPUT_MAX = 240
#: Upper bound of one host gather of small tensors / short tails (device and pinned).
_GATHER_BYTES = 64 << 20

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_STREAMS",
    "DeviceSource",
    "DeviceTensor",
    "byte_view",
    "device_block_digests",
    "host_block_digests",
    "open_tensors",
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


class DeviceTensor(SourceTensor):
    """One tensor of a :class:`DeviceSource`: its byte view plus the original tensor."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self.dtype = dtypes.from_torch(tensor.dtype, f"tensor {name}")
        self.shape = tuple(int(s) for s in tensor.shape)
        self.tensor = tensor
        self.bytes = byte_view(tensor)
        self.nbytes = int(self.bytes.numel())
        self.on_device = self.bytes.device.type != "cpu"
        # CPU tensors: one zero-copy memoryview for every read.
        self._host = None if self.on_device else self.bytes.numpy().data

    def read(self, offset: int, length: int) -> memoryview:
        """Host bytes ``[offset, offset+length)``. Off the hot path for device tensors:
        each call allocates a pinned buffer and synchronises (use ``fetch`` in bulk)."""
        if self._host is not None:
            return self._host[offset : offset + length]
        out = torch.empty(length, dtype=torch.uint8, pin_memory=True)
        out.copy_(self.bytes[offset : offset + length])
        return out.numpy().data


# ----------------------------------------------------------------------------- hashing


def _kernel_module() -> ModuleType | None:
    """The Triton kernel module when it can run here, else None (host hashing)."""
    if not torch.cuda.is_available():
        return None  # and do not import triton on a CPU-only machine
    try:
        from ..gpu import xxh3_kernel
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


# ------------------------------------------------------------------------------ source


class DeviceSource(Source):
    """Tensors on one or more CUDA devices (or on the CPU, for tests and fallback).

    ``tensors`` maps names to tensors; they are kept alive (and, for a handles
    file, the IPC mappings stay open) until :meth:`close`. ``buffer_bytes`` bounds
    the host memory ``fetch`` uses: two pinned buffers of at most that size
    (smaller when the request is smaller). ``streams`` is kept for callers of
    the older per-tensor hashing; the default path hashes each device's tensors in
    one launch and needs no side streams. ``stage_host`` (tests only) sends
    CPU tensors through the buffers too, so CI exercises the batching and the
    view-validity rules of the device path.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        info: SourceInfo | None = None,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        streams: int = DEFAULT_STREAMS,
        keepalive: Any = None,
        stage_host: bool = False,
    ) -> None:
        if buffer_bytes <= 0:
            raise ValueError("buffer_bytes must be positive")
        self.info = info or SourceInfo(kind="mapping")
        self._tensors = [
            DeviceTensor(k, t) for k, t in by_unique_name(tensors.items(), "the tensors given")
        ]
        self.buffer_bytes = int(buffer_bytes)
        self.streams = int(streams)
        self._keepalive = keepalive
        self._stage_host = stage_host
        self._buffers: list[torch.Tensor] = []
        self._copy_streams: dict[int, Any] = {}
        self._fetch_lock = threading.Lock()
        #: Bytes that crossed from the device to the host: fetched blocks plus the
        #: small pieces hashed on the host. Digests themselves are not counted.
        self.device_to_host_bytes = 0
        #: Seconds the last ``block_digests`` call took (None before the first).
        self.hash_seconds: float | None = None

    # -- interface -------------------------------------------------------------------

    def tensors(self) -> Sequence[DeviceTensor]:
        return self._tensors

    @property
    def on_device(self) -> bool:
        """True if any tensor lives on a CUDA device."""
        return any(t.on_device for t in self._tensors)

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Name -> the original tensors (for hot restore into the same memory)."""
        return {t.name: t.tensor for t in self._tensors}

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        """Per tensor, per block XXH3-128 ids, computed on the GPU.

        ``None`` when no tensor is on a device, or when the kernel cannot run here
        (no Triton, or a block size it does not take: a multiple of 64, at least
        256): the pipeline then fetches and hashes every block on the host.
        """
        import time

        if not self.on_device or not kernel_accepts(block_size):
            return None
        t0 = time.perf_counter()
        out: list[list[bytes]] = [[] for _ in self._tensors]
        by_device: dict[int, list[int]] = {}
        host_idx: list[int] = []
        for i, t in enumerate(self._tensors):
            if t.on_device:
                by_device.setdefault(_device_index(t.bytes.device), []).append(i)
            else:
                host_idx.append(i)
        stats: dict[str, int] = {}
        for dev, idx in by_device.items():
            with torch.cuda.device(dev):
                ds = device_block_digests(
                    [self._tensors[i].bytes for i in idx],
                    block_size,
                    streams=self.streams,
                    stats=stats,
                )
            for i, d in zip(idx, ds, strict=True):
                out[i] = d
        if host_idx:
            hs = host_block_digests([_host_view(self._tensors[i]) for i in host_idx], block_size)
            for i, d in zip(host_idx, hs, strict=True):
                out[i] = d
        self.device_to_host_bytes += stats.get("gathered_bytes", 0)
        self.hash_seconds = time.perf_counter() - t0
        return out

    def fetch(self, requests: Sequence[BlockRequest]) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(i, bytes)`` for ``requests[i]``, in order.

        Device blocks are copied in batches of up to ``buffer_bytes`` into two
        pinned buffers: batch k+1 is copied (on a side stream) while the consumer
        works on batch k. Every view of batch k stays valid until the consumer asks
        for the item after the first item of batch k+1 — at least the "next item
        plus one" the :class:`Source` contract promises, and a whole batch at once.
        CPU tensors yield zero-copy views. Adjacent blocks of one tensor are copied
        with one ``cudaMemcpyAsync``.
        """
        if not requests:
            return
        with self._fetch_lock:  # the buffers are shared: one fetch at a time
            yield from self._fetch(requests)

    def close(self) -> None:
        """Drop the buffers and the tensors (closing a handles file's IPC mappings)."""
        self._buffers = []
        self._copy_streams = {}
        self._tensors = []
        self._keepalive = None

    # -- fetch internals ---------------------------------------------------------------

    def _fetch(self, requests: Sequence[BlockRequest]) -> Iterator[tuple[int, memoryview]]:
        ts = self._tensors
        dev_total = 0
        biggest = 0
        for r in requests:
            t = ts[r.tensor]
            if r.offset < 0 or r.length < 0 or r.offset + r.length > t.nbytes:
                raise ValueError(f"block request out of range for {t.name}: {r}")
            if t.on_device or self._stage_host:
                dev_total += r.length
                biggest = max(biggest, r.length)
        # Buffers no bigger than needed: an incremental save fetching 80 MB should not
        # pay for pinning 512 MiB (pinning costs ~20 ms per GiB).
        cap = max(biggest, min(self.buffer_bytes, -(-dev_total // 2)), 1)
        batches = _batches(requests, ts, cap, self._stage_host)
        if dev_total:
            self._ensure_buffers(cap)
        events: list[list[Any]] = [[] for _ in batches]
        issued = 0

        def issue(k: int) -> None:
            if not batches[k].copies:
                return  # host views only
            buf = self._buffers[k % 2]
            used: dict[int, Any] = {}
            for ti, src_off, length, dst in batches[k].copies:
                dev_bytes = ts[ti].bytes
                if not ts[ti].on_device:  # stage_host (tests): same path, no CUDA
                    buf[dst : dst + length].copy_(dev_bytes[src_off : src_off + length])
                    continue
                dev = _device_index(dev_bytes.device)
                stream = self._copy_stream(dev, used)
                with torch.cuda.stream(stream):
                    buf[dst : dst + length].copy_(
                        dev_bytes[src_off : src_off + length], non_blocking=True
                    )
            for stream in used.values():
                ev = torch.cuda.Event()
                ev.record(stream)
                events[k].append(ev)

        try:
            while issued < min(2, len(batches)):
                issue(issued)
                issued += 1
            for k, batch in enumerate(batches):
                for ev in events[k]:
                    ev.synchronize()
                host = self._buffers[k % 2].numpy().data if batch.copies else None
                for j, (i, ti, off, length, dst) in enumerate(batch.items):
                    if dst < 0:
                        view = _host_view(ts[ti])[off : off + length]
                    elif length == 0:
                        view = memoryview(b"")
                    else:
                        assert host is not None
                        view = host[dst : dst + length]
                        self.device_to_host_bytes += length
                    yield i, view
                    if j == 0 and k >= 1 and issued < len(batches):
                        # The consumer asked for the item after batch k's first: no view
                        # of batch k-1 is live any more, so its buffer takes batch k+1.
                        issue(issued)
                        issued += 1
                while issued < len(batches) and issued <= k + 1:
                    issue(issued)
                    issued += 1
        finally:
            # A consumer that stops early leaves copies in flight into buffers the
            # next fetch reuses: wait for them.
            for evs in events:
                for ev in evs:
                    ev.synchronize()

    def _ensure_buffers(self, cap: int) -> None:
        if len(self._buffers) == 2 and self._buffers[0].numel() >= cap:
            return
        pin = torch.cuda.is_available()  # False only in stage_host tests on CPU machines
        self._buffers = [torch.empty(cap, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]

    def _copy_stream(self, dev: int, used: dict[int, Any]) -> Any:
        s = used.get(dev)
        if s is None:
            s = self._copy_streams.get(dev)
            if s is None:
                s = torch.cuda.Stream(device=dev)
                self._copy_streams[dev] = s
            # Copies see every write queued on the device's current stream first.
            s.wait_stream(torch.cuda.current_stream(dev))
            used[dev] = s
        return s


@dataclass
class _Batch:
    #: (request index, tensor index, offset, length, offset in buffer or -1 for host)
    items: list[tuple[int, int, int, int, int]]
    #: coalesced copies: (tensor index, offset in tensor, length, offset in buffer)
    copies: list[tuple[int, int, int, int]]


def _batches(
    requests: Sequence[BlockRequest], ts: Sequence[DeviceTensor], cap: int, stage_host: bool = False
) -> list[_Batch]:
    """Group requests, in order, into batches of at most ``cap`` device bytes."""
    batches: list[_Batch] = []
    cur = _Batch([], [])
    used = 0
    for i, r in enumerate(requests):
        t = ts[r.tensor]
        if not (t.on_device or stage_host):
            cur.items.append((i, r.tensor, r.offset, r.length, -1))
            continue
        if used + r.length > cap and cur.items:
            batches.append(cur)
            cur, used = _Batch([], []), 0
        cur.items.append((i, r.tensor, r.offset, r.length, used))
        last = cur.copies[-1] if cur.copies else None
        if (
            last is not None
            and last[0] == r.tensor
            and last[1] + last[2] == r.offset
            and last[3] + last[2] == used
        ):
            cur.copies[-1] = (last[0], last[1], last[2] + r.length, last[3])
        elif r.length:
            cur.copies.append((r.tensor, r.offset, r.length, used))
        used += r.length
    if cur.items:
        batches.append(cur)
    return batches


def _host_view(t: DeviceTensor) -> memoryview:
    assert t._host is not None
    return t._host


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def open_tensors(
    mapping: Mapping[str, Any], info: SourceInfo | None = None, **options: Any
) -> Source:
    """A source over in-process tensors: :class:`DeviceSource` if any is on CUDA.

    CPU tensors and numpy arrays alone give a
    :class:`~apollo_cas.sources.mapping.MappingSource` (zero-copy host views).
    ``options`` go to :class:`DeviceSource` (``buffer_bytes``, ``streams``).
    """
    info = info or SourceInfo(kind="mapping")
    on_cuda = any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in mapping.values())
    if on_cuda:
        bad = [k for k, v in mapping.items() if not isinstance(v, torch.Tensor)]
        if bad:
            # numpy arrays next to CUDA tensors: wrap them as CPU tensors (zero-copy).
            mapping = {
                k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
                for k, v in mapping.items()
            }
        return DeviceSource(mapping, info, **options)
    from .mapping import MappingSource

    return MappingSource(mapping, info)
