"""A dense-step save of device tensors: parent blocks decoded on the GPU, only XOR planes cross PCIe.

After a dense optimizer step every block changed, and the CPU delta path
(``codecs.encode`` with a base loader) reads and decodes every parent chunk on the
host to XOR against (24.9 s for 17.1 GB on the H200, benchmarks/results/gpu.md).
Here, per batch of at most ``batch_bytes`` of changed blocks:

1. the parent's blocks at the same places (the bases ``delta_bases.base_finder`` offers,
   with the same depth and root rules as ``codecs.encode``) are decoded **on the
   device** by the restore pipeline (:class:`~apollo_cas.gpu.restore.RestorePipeline`)
   into a scratch buffer; the pipeline checks each decoded block's XXH3-128 against
   its id before anything uses it;
2. the live blocks are gathered into rows and re-hashed on the device against the ids
   the save recorded (weights changing mid-save are an error, not a wrong chunk);
3. XOR, byte-plane split and zero-plane detection run on the device
   (:mod:`apollo_cas.gpu.delta_ops`); only planes that hold a non-zero byte are packed
   and copied to a pinned host slot;
4. host threads zstd-compress those planes (an all-zero plane's frame is a constant)
   and write codec-3 chunks (:mod:`apollo_cas.gpu.delta_encode`) that today's decoder
   reads unchanged, while the device works on the next batch
   (:mod:`apollo_cas.gpu.delta_writer`).

Fallbacks to the CPU path (``write_source``'s ordinary device branch), per block: a
block shorter than ``block_size`` (tensor tails), a block without a usable base (new
tensor, chain too deep with no root), and every block of a batch whose parent chunks
the pipeline could not decode or verify (a damaged parent: the CPU path then stores
full chunks, as ``codecs.encode`` does for a base it cannot load). A delta larger than
``DELTA_ACCEPT_FRACTION`` of the block is compared against the block's full encoding
on the host (the live block is fetched for it), as ``codecs.encode`` does.

Memory, independent of model size, with ``batch_bytes = B`` per piece (default 256 MiB)
and ``P`` per batch of the restore pipeline (``Store.device_delta_parent_batch_bytes``,
at least B; default B): device scratch 3 B + 2 P (live rows, planes, packed planes; parent
rows in two halves) plus the pipeline's (measured 0.58-1.13 GB at 256 MiB,
docs/GPU_RESTORE.md); pinned host 2 B (two slots) plus the pipeline's (0.63-1.17 GB at
256 MiB); deltas waiting for a comparison with their full encoding hold at most about B
more.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..chunkstore import ChunkStore
from ..errors import CorruptChunk
from ..sources.base import BlockRequest
from .blocks import kernel_module
from .delta_encode import (
    SPARSE_MAX_FRACTION,
    SparsePlanes,
    sparse_outright,
    sparse_wanted,
)
from .delta_jobs import DEFAULT_BATCH_BYTES, DeltaJob, DeltaSaveStats, TallyFn
from .delta_writer import DeltaWriter, collect
from .device_steps import Events
from .piece_steps import Buffers, KernelSteps, PieceSteps, TorchSteps
from .restore import Place, memory_bound
from .staging import Uploads

log = logging.getLogger(__name__)

__all__ = ["GpuDeltaSaver"]


class GpuDeltaSaver:
    """Stores delta jobs through the device; see the module doc for the steps.

    ``pipeline`` is a :class:`~apollo_cas.gpu.restore.RestorePipeline` on ``device``
    (``Store.restore_pipeline``); the saver runs it one batch at a time into its own
    scratch. ``live`` are the source tensors' 1-D uint8 views on ``device``.
    """

    def __init__(
        self,
        chunks: ChunkStore,
        pipeline: Any,
        live: Sequence[torch.Tensor],
        block_size: int,
        device: torch.device,
        *,
        workers: int,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        fetch: Callable[[Sequence[BlockRequest]], Any] | None = None,
        sparse: bool | None = None,
        device_timing: bool = False,
        kernel_steps: bool = True,
    ) -> None:
        self.chunks = chunks
        self.policy = chunks.policy
        self.pipe = pipeline
        self.live = live
        self.block_size = int(block_size)
        self.device = device
        self.cuda = device.type == "cuda"
        self.workers = max(1, workers)
        self.rows = max(1, int(batch_bytes) // self.block_size)
        self.fetch = fetch
        # CUDA events between the steps (else the host clock alone; on the CPU that is both).
        self.device_timing = bool(device_timing) or not self.cuda
        self.kernel = kernel_module() if self.cuda else None
        #: The piece's steps as two Triton kernels where they can run (else torch ops).
        self.kernel_steps = bool(kernel_steps)
        self.stats = DeltaSaveStats()
        #: Also try codec 4 (a release with it and a policy that tries it).
        self._sparse = sparse_wanted(self.policy) if sparse is None else sparse

    def run(self, jobs: Sequence[DeltaJob], tally: TallyFn) -> list[int]:
        """Store every job; returns the wanted-indices the CPU path must still store.

        One pipeline run decodes every parent block into one of two halves of the
        parent scratch, batch k into half k % 2. Its ``on_batch`` callback hands batch k
        to one device thread (XOR, planes, copies to the host) and returns, so the
        pipeline's thread goes on reading, staging and queueing batch k+2 while batch k
        is used; it first waits for batch k-1, whose half batch k+1 is placed into.
        With the batch used on the pipeline's thread, that thread spent half a 17 GB
        dense step in the callback (H200, 256 MiB batches: 1.54 of 3.18 s).
        A batch whose parent chunks fail to decode or verify goes to the CPU path: the
        remaining jobs are retried one pipeline batch first, then all together again.
        """
        fallback: list[int] = []
        if not jobs:
            return fallback
        jobs = sorted(jobs, key=lambda j: (j.w, j.itemsize))  # one width per piece of a batch
        bs = self.block_size
        # Parent rows per pipeline batch, and live rows per piece: a pipeline batch may
        # be larger than a piece (Store.device_delta_parent_batch_bytes), then it is
        # used as several pieces one after the other.
        rows = max(1, self.pipe.batch_bytes // bs)
        piece = self._piece_rows = min(self.rows, rows)
        nbytes = min(piece, len(jobs)) * bs
        halves = 2 if len(jobs) > rows else 1
        dev = self.device
        parent_bytes = halves * min(rows, len(jobs)) * bs
        self._parent = torch.empty(parent_bytes, dtype=torch.uint8, device=dev)
        # Codec 4 (when the release and policy try it): positions and values of the
        # changed elements, found on the device, for at most `cap` elements per batch
        # (1/32 of its bytes; the benchmark's step changes ~1.2% of bf16 elements).
        self._cap = max(1, nbytes // 32) if self._sparse else 0
        cap = self._cap
        bufs = Buffers(
            live=torch.empty(nbytes, dtype=torch.uint8, device=dev),
            planes=torch.empty(nbytes, dtype=torch.uint8, device=dev),
            packed=torch.empty(nbytes, dtype=torch.uint8, device=dev),
            sidx=torch.empty(cap, dtype=torch.int32, device=dev),
            sval=torch.empty(cap * 8, dtype=torch.uint8, device=dev),
            splanes=torch.empty(cap * 12, dtype=torch.uint8, device=dev),
        )
        self._slots = [
            torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)
        ]
        self._sslots = [
            torch.empty(cap * 12, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)
        ]
        self._uploads = Uploads()
        self._torch_steps = TorchSteps(self.live, bs, self.kernel, self._uploads, bufs)
        # Whole rows, viewed once: a piece's rows are a slice of it (no torch call).
        self._parent_rows = self._parent.view(-1, bs)
        self._kernel_steps = (
            KernelSteps(self.live, bs, self.kernel, piece, dev, bufs, self._parent_rows)
            if self.kernel is not None and self.kernel_steps
            else None
        )
        self._in_slot: list[list[Future[Any]]] = [[], []]
        self._k = 0
        self._stream = torch.cuda.Stream(device=dev) if self.cuda else None
        self.stats.pinned_bytes = 2 * nbytes + 2 * 12 * cap
        # + the planes' 12 bytes per element and sparse_planes' index temporaries
        self.stats.device_scratch_bytes = 3 * nbytes + parent_bytes + 12 * cap + 12 * cap + 48 * cap
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="apollo-delta") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="apollo-delta-device") as device_thread,
            ThreadPoolExecutor(1, thread_name_prefix="apollo-delta-store") as store_thread,
        ):
            self._writer = DeltaWriter(
                self.chunks,
                self.block_size,
                self.stats,
                tally,
                pool,
                self.workers,
                store_thread,
                sparse=self._sparse,
                fetch=self.fetch,
                compare_every=self.rows,
            )
            inflight: list[Future[None]] = []

            def drain() -> None:
                # Every batch handed to the device thread is used, or its error raised
                # as the callback's (a live block that changed is not a damaged parent).
                while inflight:
                    try:
                        inflight.pop(0).result()
                    except Exception as exc:
                        raise _CallbackError(exc) from exc

            i, probe = 0, False
            while i < len(jobs):
                seg = jobs[i : i + rows] if probe else jobs[i:]
                done = [0]

                def on_batch(
                    _k: int,
                    places: Sequence[Place],
                    seg: Sequence[DeltaJob] = seg,
                    done: list[int] = done,
                ) -> None:
                    n = len(places)
                    ready = torch.cuda.Event() if self.cuda else None
                    if ready is not None:
                        ready.record(self.pipe.stream)  # batch k's rows are placed
                    drain()  # batch k-1: batch k+1 is placed into its half next
                    inflight.append(
                        device_thread.submit(
                            self._use_batch,
                            seg[done[0] : done[0] + n],
                            [p.offset // bs for p in places],
                            ready,
                        )
                    )
                    done[0] += n

                t0 = time.perf_counter()
                places = [
                    Place(j.base, bs, 0, (r % (halves * rows)) * bs) for r, j in enumerate(seg)
                ]
                try:
                    try:
                        self.pipe.run(places, [self._parent], on_batch=on_batch)
                    finally:
                        drain()  # before the next run places anything, and before raising
                except _CallbackError as exc:
                    raise exc.error from None
                except CorruptChunk:
                    # A damaged or missing parent chunk in the next batch: nothing of that
                    # batch was stored; the CPU path stores it (in full where the base
                    # cannot be read, as codecs.encode does).
                    i += done[0]
                    if probe:
                        self.stats.damaged_batches += 1
                        fallback.extend(j.i for j in seg[done[0] :])
                        i += len(seg) - done[0]
                    probe = not probe
                    continue
                finally:
                    self.stats.decode_s += time.perf_counter() - t0
                i += len(seg)
                probe = False
            for slot in self._in_slot:
                collect(slot)
            self._writer.finish()
        self.stats.fallback_blocks = len(fallback)
        self.stats.pipeline = self.pipe.stats.to_dict()
        bound = memory_bound(self.pipe.batch_bytes, bs)
        self.stats.pinned_bytes += min(bound["pinned_host"], self.pipe.stats.pinned_bytes)
        self.stats.device_scratch_bytes += self.pipe.stats.device_scratch_bytes
        self._parent = self._parent_rows = None  # type: ignore[assignment]
        self._torch_steps = self._kernel_steps = None  # type: ignore[assignment]
        self._slots = []
        self._sslots = []
        return fallback

    def _use_batch(self, batch: Sequence[DeltaJob], rows: Sequence[int], ready: Any) -> None:
        """Split one decoded pipeline batch into contiguous pieces of one element width
        and at most a piece's rows (on the device thread; ``ready``: the CUDA event after
        its rows were placed)."""
        if self._stream is not None:
            self._stream.wait_event(ready)
        start = 0
        for r in range(1, len(batch) + 1):
            b = batch[start]
            if (
                r == len(batch)
                or r - start == self._piece_rows
                or rows[r] != rows[r - 1] + 1
                or (batch[r].w, batch[r].itemsize) != (b.w, b.itemsize)
            ):
                self._piece(batch[start:r], rows[start])
                start = r

    def _piece(self, batch: Sequence[DeltaJob], r0: int) -> None:
        """XOR, planes and zero planes of parent rows ``r0..`` on the device; encode on the host."""
        t1 = time.perf_counter()
        bs = self.block_size
        n = len(batch)
        k = self._k
        self._k += 1
        p2 = self._parent_rows[r0 : r0 + n]
        stream = self._stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        ev = Events(self.cuda and self.device_timing)
        w = batch[0].w
        ws = batch[0].itemsize if batch[0].itemsize in (1, 2, 4, 8) else 1
        sparse_ok = self._sparse and bs % ws == 0
        fused = self._kernel_steps
        steps: PieceSteps = self._torch_steps
        if fused is not None and fused.usable(batch, w, ws):
            steps = fused
            self.stats.kernel_pieces += 1
        with ctx:
            ev.mark("start")
            scan = steps.scan(batch, p2, w, ws, sparse_ok, ev.mark)
            nz_host, counts = scan.nonzero, scan.counts
            taken: list[int] = []
            dropped: set[int] = set()
            if counts is not None:
                limit = SPARSE_MAX_FRACTION * (bs // ws)
                room = self._cap
                for r, c in enumerate(counts):
                    if c <= limit and c <= room:
                        taken.append(r)
                        room -= c
                # Rows stored as codec 4 outright never need their planes on the host.
                dropped = {r for r in taken if sparse_outright(bs, ws, counts[r])}
                for r in dropped:
                    for kk in range(w):
                        nz_host[kk * n + r] = 0
            keep = [i for i, f in enumerate(nz_host) if f]
            packed_q, planes_d = steps.extract(p2, w, ws, taken, counts or [], keep, ev.mark)
            nsparse = sum(counts[r] for r in taken) if counts is not None else 0
            m = bs // w
            kept = len(packed_q) * m
            # Slot k % 2 is free once piece k-2's planes are encoded.
            tw = time.perf_counter()
            collect(self._in_slot[k % 2])
            self.stats.wait_s += time.perf_counter() - tw
            host = self._slots[k % 2]
            ev.mark("slot_wait")
            if kept:  # none in the benchmark's dense step: every block is codec 4
                host[:kept].copy_(packed_q.reshape(-1), non_blocking=self.cuda)
            splanes_h = self._sslots[k % 2] if self._sslots else None
            if nsparse:
                assert splanes_h is not None
                splanes_h[: len(planes_d)].copy_(planes_d, non_blocking=self.cuda)
            ev.mark("to_host")
            if stream is not None:
                stream.synchronize()  # the pipeline may place another batch in these rows now
        scan.verdict()  # before anything of this piece is stored
        t2 = time.perf_counter()
        self.stats.device_s += t2 - t1
        if self.device_timing:
            for name, sec in ev.elapsed().items():
                self.stats.steps[name] = self.stats.steps.get(name, 0.0) + sec
        host_steps = self.stats.steps_host
        for name, sec in ev.host_elapsed().items():
            host_steps[name] = host_steps.get(name, 0.0) + sec
        host_steps["setup"] = host_steps.get("setup", 0.0) + ev.host[0] - t1
        host_steps["sync"] = host_steps.get("sync", 0.0) + t2 - ev.host[-1]
        self.stats.d2h_bytes += kept + nsparse * (4 + ws)
        self.stats.planes_total += w * n
        self.stats.planes_nonzero += len(packed_q)
        hv = host.numpy().data
        pos = 0
        per_row: list[list[Any]] = [[None] * w for _ in range(n)]
        for kk in range(w):
            for r in range(n):
                if nz_host[kk * n + r]:
                    per_row[r][kk] = hv[pos : pos + m]
                    pos += m
        changes: list[SparsePlanes | None] = [None] * n
        if nsparse:
            assert splanes_h is not None and counts is not None
            pv = splanes_h.numpy().data
            pos = 0
            for r in taken:
                c = counts[r]
                g = pos + 4 * c
                changes[r] = SparsePlanes(c, pv[pos:g], pv[g : g + ws * c])
                pos = g + ws * c
        items = [
            (job, per_row[r], changes[r], counts[r] if counts else None, r in dropped)
            for r, job in enumerate(batch)
        ]
        t3 = time.perf_counter()
        host_steps["assemble"] = host_steps.get("assemble", 0.0) + t3 - t2
        self._in_slot[k % 2] = self._writer.piece(items)
        self.stats.batches += 1
        self.stats.blocks += n
        host_steps["submit"] = host_steps.get("submit", 0.0) + time.perf_counter() - t3


class _CallbackError(Exception):
    """An error of the saver's own step inside the pipeline's callback (not a parent's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
