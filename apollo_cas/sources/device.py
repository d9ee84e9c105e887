"""Tensors on a CUDA device: hashed where they live, fetched through pinned buffers.

This is the hot path of a checkpoint of live weights (a handles file, or a
``state_dict()`` passed in-process). Two rules shape it:

* **Only changed blocks cross PCIe.** :meth:`DeviceSource.block_digests` computes
  every block's chunk id on the GPU with the Triton XXH3-128 kernel
  (:mod:`apollo_cas.gpu.xxh3_kernel`, bit-exact with ``xxhash``), and copies
  only the digests (16 bytes per block) to the host, once, at the end.
* **Host memory is bounded, never proportional to the model.**
  :meth:`DeviceSource.fetch_batches` copies the blocks the store lacks through
  three reusable pinned buffers (``buffer_bytes`` each, 256 MiB by default) on a
  side CUDA stream: the copy of batch k+2 is in flight while worker threads hash
  and compress batches k and k+1 straight out of their buffers (no host copy). No
  ``.cpu()`` of whole tensors, no pageable copies (pageable device-to-host runs at
  ~1.3 GB/s on an H100, pinned at ~54).

The hashing lives in :mod:`apollo_cas.gpu.blocks` and the pinned buffers in
:mod:`apollo_cas.gpu.staging` (shared with the restore side). Why all tensors go to one launch: XXH3 is sequential inside a block, so the
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

import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..gpu.blocks import (
    DEFAULT_STREAMS,
    SHORT_INPUT_MAX,
    byte_view,
    device_block_digests,
    host_block_digests,
    kernel_accepts,
    plan_hashing,
)
from ..gpu.staging import Stager, device_index
from ..manifest import SourceInfo
from .base import BlockRequest, FetchedBatch, Source, SourceTensor, by_unique_name

#: Size of each of the pinned buffers that ``fetch`` streams through.
DEFAULT_BUFFER_BYTES = 256 << 20
#: Pinned buffers a fetch cycles through: two batches being encoded on worker threads
#: while the third is copied. With two, the save's main thread copied every fetched
#: byte out of the buffers before the next refill, and that one thread (numpy copy,
#: ~1.5 GB/s) limited a full save of 17.1 GB on the H200 to 11.4 s (profile in
#: benchmarks/results/h200_2026-12-03/full_save_probe.json).
FETCH_SLOTS = 3

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_STREAMS",
    "FETCH_SLOTS",
    "SHORT_INPUT_MAX",
    "DeviceSource",
    "DeviceTensor",
    "byte_view",
    "device_block_digests",
    "host_block_digests",
    "kernel_accepts",
    "open_tensors",
    "plan_hashing",
]


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


# ------------------------------------------------------------------------------ source


class DeviceSource(Source):
    """Tensors on one or more CUDA devices (or on the CPU, for tests and fallback).

    ``tensors`` maps names to tensors; they are kept alive (and, for a handles
    file, the IPC mappings stay open) until :meth:`close`. ``buffer_bytes`` bounds
    the host memory ``fetch`` uses: three pinned buffers of at most that size
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
        # FETCH_SLOTS pinned slots (gpu/staging.py), allocated by the first fetch needing them.
        self._stager = Stager(slots=FETCH_SLOTS)
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
                by_device.setdefault(device_index(t.bytes.device), []).append(i)
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
        """Yield ``(i, bytes)`` for ``requests[i]``, in order, one block at a time.

        Built on :meth:`fetch_batches`: every view of batch k stays valid until the
        consumer asks for the item after the first item of batch k+1 — at least the
        "next item plus one" the :class:`Source` contract promises.
        """
        prev: FetchedBatch | None = None
        for batch in self.fetch_batches(requests):
            for j, item in enumerate(batch.items):
                yield item
                if j == 0 and prev is not None:
                    prev.release()
            prev = batch

    def fetch_batches(self, requests: Sequence[BlockRequest]) -> Iterator[FetchedBatch]:
        """Yield the requested blocks in batches of up to ``buffer_bytes`` device bytes.

        Each batch's views point into one of :data:`FETCH_SLOTS` pinned buffers and
        stay valid until :meth:`FetchedBatch.release`; releasing batch k queues the
        copy of batch k+3 into its buffer (on a side stream), so two batches can be
        encoded on worker threads while the third crosses PCIe. Asking for batch
        k+3 before batch k is released is an error. CPU tensors yield zero-copy
        views; adjacent blocks of one tensor are copied with one ``cudaMemcpyAsync``.
        """
        if not requests:
            return
        with self._fetch_lock:  # the buffers are shared: one fetch at a time
            yield from self._fetch_batches(requests)

    def close(self) -> None:
        """Drop the buffers and the tensors (closing a handles file's IPC mappings)."""
        self._stager.close()
        self._tensors = []
        self._keepalive = None

    # -- fetch internals ---------------------------------------------------------------

    def _fetch_batches(self, requests: Sequence[BlockRequest]) -> Iterator[FetchedBatch]:
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
        # pay for pinning 768 MiB (pinning costs ~20 ms per GiB).
        cap = max(biggest, min(self.buffer_bytes, -(-dev_total // FETCH_SLOTS)), 1)
        plans = plan_fetch(requests, ts, cap, self._stage_host)
        if dev_total:
            self._stager.ensure(cap)
        stager = self._stager
        issued = [False] * len(plans)

        def issue(k: int) -> None:
            issued[k] = True
            if not plans[k].copies:
                return  # host views only
            buf = stager.acquire(k)
            used: dict[int, Any] = {}
            for ti, src_off, length, dst in plans[k].copies:
                dev_bytes = ts[ti].bytes
                if not ts[ti].on_device:  # stage_host (tests): same path, no CUDA
                    buf[dst : dst + length].copy_(dev_bytes[src_off : src_off + length])
                    continue
                dev = device_index(dev_bytes.device)
                stream = used.get(dev)
                if stream is None:
                    # Copies see every write queued on the device's current stream first.
                    stream = used[dev] = stager.copy_stream(dev)
                with torch.cuda.stream(stream):
                    buf[dst : dst + length].copy_(
                        dev_bytes[src_off : src_off + length], non_blocking=True
                    )
            stager.release(k, used.values())

        def released(k: int) -> None:
            if k + FETCH_SLOTS < len(plans):
                issue(k + FETCH_SLOTS)

        try:
            for k in range(min(FETCH_SLOTS, len(plans))):
                issue(k)
            for k, plan in enumerate(plans):
                if not issued[k]:
                    raise RuntimeError(
                        f"fetch batch {k} asked for while batch {k - FETCH_SLOTS} still holds "
                        "its buffer: release a batch before asking for the third after it"
                    )
                host = stager.acquire(k).numpy().data if plan.copies else None
                items: list[tuple[int, memoryview]] = []
                for i, ti, off, length, dst in plan.items:
                    if dst < 0:
                        items.append((i, _host_view(ts[ti])[off : off + length]))
                    elif length == 0:
                        items.append((i, memoryview(b"")))
                    else:
                        assert host is not None
                        items.append((i, host[dst : dst + length]))
                        self.device_to_host_bytes += length
                yield FetchedBatch(items, functools.partial(released, k))
        finally:
            # A consumer that stops early leaves copies in flight into buffers the
            # next fetch reuses: wait for them.
            stager.drain()


@dataclass
class FetchPlan:
    """Requests fetched with one staging buffer: their places and coalesced copies."""

    #: (request index, tensor index, offset, length, offset in buffer or -1 for host)
    items: list[tuple[int, int, int, int, int]]
    #: coalesced copies: (tensor index, offset in tensor, length, offset in buffer)
    copies: list[tuple[int, int, int, int]]


def plan_fetch(
    requests: Sequence[BlockRequest], ts: Sequence[DeviceTensor], cap: int, stage_host: bool = False
) -> list[FetchPlan]:
    """Group requests, in order, into batches of at most ``cap`` device bytes."""
    batches: list[FetchPlan] = []
    cur = FetchPlan([], [])
    used = 0
    for i, r in enumerate(requests):
        t = ts[r.tensor]
        if not (t.on_device or stage_host):
            cur.items.append((i, r.tensor, r.offset, r.length, -1))
            continue
        if used + r.length > cap and cur.items:
            batches.append(cur)
            cur, used = FetchPlan([], []), 0
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
