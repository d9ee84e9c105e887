"""The GPU restore pipeline: stored chunks into tensors, decoded and verified on the device.

For every *place* (a block of a destination tensor and the chunk id it must hold) the
pipeline runs, in batches of at most ``batch_bytes`` of raw output:

1. **read** (host threads): the stored bytes of the batch's chunks, through a
   :data:`BlobReader` (format 2: :func:`pack_reader`, ranges of packs; format 1: one
   object per chunk), into a reused arena, plus, for XOR deltas, the chain of bases
   they need. Each envelope is parsed on the host and its raw size checked against
   the size its place needs *before* any decode (a mismatch is
   :class:`~apollo_cas.errors.CorruptChunk` naming the chunk);
2. **lay out** (host thread): the batch's chunks grouped plane-major so that every
   byte plane of a group of like chunks is one strided tensor: raw planes in place,
   zstd frames packed 16-byte aligned;
3. **copy** host-to-device, still compressed. *Direct mode* (the default when a frame
   decoder is there, i.e. nvCOMP on a GPU): the arena is pinned and copied as it is,
   and the layout is built on the device by torch ops from that verbatim copy: no
   host copy after the read. *Staged mode* (no frame decoder): host threads copy the
   pieces into one of two reusable pinned buffers (:class:`~apollo_cas.gpu.staging.
   Stager`), decoding zstd frames there, and the used ranges are copied;
4. **decode** every zstd frame of the batch in one nvCOMP call into buffers the
   pipeline owns (:mod:`apollo_cas.gpu.zstd`);
5. **interleave** byte planes back into elements (one strided copy per plane per
   group), scatter sparse deltas' changed elements into their rows
   (:mod:`apollo_cas.gpu.sparse_steps`) and resolve XOR-delta chains depth by depth
   (torch ops on the device);
6. **verify** every decoded block's XXH3-128 on the device (the Triton kernel,
   :mod:`apollo_cas.gpu.xxh3_kernel`) against its chunk id; a mismatch is
   :class:`~apollo_cas.errors.CorruptChunk` naming the chunk, and nothing of that
   batch reaches a destination;
7. **place**: only then are the verified blocks copied into the destinations.

Steps 1-2 of batch k+1 run on host threads while the device runs steps 3-7 of
batch k. Memory is bounded by ``batch_bytes``, never by the model: three arenas (pinned
in direct mode) or two staging slots, and on the device two mirrors of arenas (direct
mode), one layout and two buffers of decoded rows (see :func:`memory_bound`).

Chunks of codecs this pipeline does not know (any id but raw, zstd, planes, delta
and sparse), and sparse chunks whose decoded gaps and values would outgrow their
block, are decoded on the CPU by ``read_raw`` (the store's verified reader) and
staged as raw bytes: a per-chunk fallback.

The same code runs on CPU tensors (``device="cpu"``): zstd frames are decoded by
python-zstandard (``frames=HostFrames(n)`` runs direct mode, ``frames=None`` the staged
one) and blocks are hashed with xxhash, so CI tests both modes' layout, the
interleave, the XOR chains, the verification order and the bounded buffers without a
GPU.

Imports torch; nvCOMP and triton only when a GPU is there.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..parallel import default_workers
from .accounting import DEFAULT_ARENAS, DEFAULT_BATCH_BYTES, RestoreStats, memory_bound
from .blocks import kernel_module
from .chunkplan import (
    Batch,
    ChunkPlan,
    Place,
    parse_chunk,
    places_of,
    runs_within,
)
from .device_steps import DeviceSteps, Events, Pending
from .gather import READ_AHEAD, BaseOf, ChunkGather, Reading, read_threads, settle
from .host_steps import HostStaging
from .readers import (
    PAD,
    Arena,
    BlobReader,
    RawReader,
    file_reader,
    object_reader,
    pack_reader,
)
from .staging import Stager, Uploads
from .zstd import FrameDecoder, open_frames

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "Arena",
    "BlobReader",
    "Place",
    "RestorePipeline",
    "RestoreStats",
    "file_reader",
    "memory_bound",
    "object_reader",
    "pack_reader",
    "parse_chunk",
    "places_of",
]


#: Pinned upload buffers of a pipeline: enough for three batches' tables, so a buffer is
#: rewritten only after its batch's copies are long done (each holds at most a few
#: hundred KiB: 32 cost a few MiB of pinned memory).
UPLOAD_SLOTS = 32


class RestorePipeline(ChunkGather, HostStaging, DeviceSteps):
    """Runs batches of places through read, stage, copy, decode, interleave, verify, place.

    ``reader`` gives stored bytes (:data:`BlobReader`); ``read_raw`` is the CPU
    decoder used for chunks of codecs not handled here. ``device`` is where the
    destinations live ("cuda", "cuda:1" or "cpu"). ``frames`` overrides the zstd
    decoder (None: nvCOMP when it runs on ``device``, else decode while staging).
    ``read_workers``: threads that read and parse stored chunks (default ``workers``,
    at most :data:`~apollo_cas.gpu.gather.GPU_READ_THREADS` on a GPU). ``base_of``: a
    chunk's delta base from the store's index without reading it (format 2's
    ``ChunkStore.base_of``), so a batch's bases are read with its chunks.
    """

    def __init__(
        self,
        reader: BlobReader,
        read_raw: RawReader,
        block_size: int,
        *,
        device: str | torch.device = "cuda",
        workers: int | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        frames: FrameDecoder | str | None = "auto",
        direct: bool | None = None,
        arenas: int = DEFAULT_ARENAS,
        read_workers: int | None = None,
        base_of: BaseOf | None = None,
    ) -> None:
        self.reader = reader
        self.read_raw = read_raw
        self.base_of = base_of
        self.block_size = int(block_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.workers = workers or default_workers()
        self.read_workers = max(1, int(read_workers or read_threads(self.workers, self.cuda)))
        self.batch_bytes = max(int(batch_bytes), self.block_size)
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        if frames == "auto":
            self.frames: FrameDecoder | None = open_frames(self.device, self.stream, self.workers)
        else:
            self.frames = frames  # type: ignore[assignment]
        # Direct mode (the default when a frame decoder is there): stored bytes are read
        # into pinned arenas, copied to the device as they are, and rearranged there.
        # Without one, zstd frames are decoded on the host while staging (the old path).
        self.direct = self.frames is not None if direct is None else bool(direct)
        if self.direct and self.frames is None:
            raise ValueError("direct restore needs a frame decoder (frames=...)")
        self.stager = Stager(slots=2, pin=self.cuda)
        # A batch sends four to eight small tables (copy segments, short rows, chunk
        # ids, place runs, XOR rows); with the default four slots a batch's tables
        # could wait for the copies of the batch before it. Measured: no wait with 32
        # (upload_wait_s 0.0 in every 17.1 GB load, h200_2026-12-03f run 2); whether
        # four slots waited was not measured before the stat existed.
        self.uploads = Uploads(slots=UPLOAD_SLOTS)
        # One device buffer of the staging layout and two of decoded rows (by batch
        # parity): every device step but the arena's copy runs on one stream, so batches
        # reuse them in stream order. Two mirrors of arenas (by parity), written on
        # their own stream (see DeviceSteps._mirror_of).
        self._dev: torch.Tensor | None = None
        self._mirrors: list[torch.Tensor | None] = [None, None]
        self._mirror_read: list[Any] = [None, None]
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._rows: list[torch.Tensor | None] = [None, None]
        self._events: list[Events] = []
        self._live: dict[bytes, tuple[int, int, int]] = {}
        self._batch_of: list[int] = []
        # Reusable host memory the reader may read stored bytes into (at least two:
        # batch k+1 is read while batch k is staged; a third lets the reads run a batch
        # further ahead of the device); a reader without room returns its own bytes.
        self._arena_bytes = (
            2 * self.batch_bytes + (2 * self.batch_bytes // self.block_size + 2) * 256
        )
        pin = self.cuda and self.direct

        def alloc(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.uint8, pin_memory=pin)

        if int(arenas) < 2:
            raise ValueError(f"arenas={arenas}: the pipeline needs at least 2")
        #: Host arenas stored bytes are read into (pinned in direct mode).
        self.arenas = int(arenas)
        self._arenas = [Arena(alloc) for _ in range(self.arenas)]
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # Host slots handed to the producer and not yet released by the device stage.
        self._free = threading.Semaphore(2)
        self._stopping = threading.Event()
        self._kernel = kernel_module() if self.cuda else None
        self.stats = RestoreStats(
            gpu_frames=bool(self.frames is not None and self.frames.on_device)
        )

    # -- public ------------------------------------------------------------------------

    def run(
        self,
        places: Sequence[Place],
        dests: Sequence[torch.Tensor],
        live: dict[bytes, tuple[int, int, int]] | None = None,
        progress: Callable[[int], None] | None = None,
        on_batch: Callable[[int, Sequence[Place]], None] | None = None,
    ) -> RestoreStats:
        """Fill ``dests`` (1-D uint8 views on ``device``) at every place, verified.

        ``live`` maps chunk ids to destination blocks that already hold those bytes,
        as (dest, offset, index of the place that overwrites it or -1): a delta whose
        base is there copies it on the device instead of reading it, as long as that
        block has not been overwritten yet (a hot restore after a dense step finds
        every base in the live weights). Raises CorruptChunk (naming the chunk)
        before any block of a batch that fails is placed. ``on_batch(k, places)`` is
        called in this thread once batch k's blocks are placed (queued on ``self.stream``)
        and before batch k+1 is placed: a caller decoding into scratch uses them there.
        """
        t0 = time.perf_counter()
        self._live = live or {}
        batches = list(runs_within(places, lambda p: p.size, self.batch_bytes))
        self._batch_of = [k for k, ps in enumerate(batches) for _ in ps]
        if self.cuda:
            assert self.stream is not None
            # Our writes land after whatever the caller queued on the tensors.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.stats.places += len(places)
        gathered: queue.Queue[Any] = queue.Queue(maxsize=1)
        staged: queue.Queue[Any] = queue.Queue(maxsize=1)
        stop = self._stopping = threading.Event()
        self._free = threading.Semaphore(2)
        arena_free = threading.Semaphore(len(self._arenas))
        # Arenas as big as the largest batch needs (a small checkpoint pins little).
        most = max((sum(p.size for p in ps) for ps in batches), default=0)
        arena_bytes = min(self._arena_bytes, 2 * most + (2 * most // self.block_size + 2) * 256)
        if self.cuda and self.direct:
            # torch's pinned allocator rounds every block up to a power of two: 512 MiB
            # and a few KiB would pin 1 GiB. Round down instead (what does not fit in an
            # arena is copied over on its own).
            arena_bytes = (1 << ((arena_bytes + PAD).bit_length() - 1)) - PAD

        def gather() -> None:
            # Batch k+1's reads are on the pool while batch k's are collected (no idle
            # threads at a batch's end), while batch k-1 is staged and k-2 decoded.
            inflight: collections.deque[tuple[int, list[Place], Arena, Reading]] = (
                collections.deque()
            )

            def hand_on() -> None:
                k, ps, arena, reading = inflight.popleft()
                self._put(gathered, (k, ps, arena, self._gather_finish(reading)))

            try:
                for k, ps in enumerate(batches):
                    ta = time.perf_counter()
                    self._acquire(arena_free)
                    arena = self._arenas[k % len(self._arenas)]
                    arena.reset(arena_bytes)
                    self.stats.arena_wait_s += time.perf_counter() - ta
                    inflight.append((k, ps, arena, self._gather_start(k, ps, arena)))
                    if len(inflight) > READ_AHEAD:
                        hand_on()
                while inflight:
                    hand_on()
                self._put(gathered, None)
            except _Stopped:
                return
            except BaseException as exc:
                with contextlib.suppress(_Stopped):
                    self._put(gathered, exc)
            finally:
                for *_, reading in inflight:  # nothing may write into an arena after this
                    settle(reading.futures)

        def stage() -> None:
            try:
                while True:
                    item = self._get(gathered)
                    if item is None or isinstance(item, BaseException):
                        self._put(staged, item)
                        return
                    k, ps, arena, (chunks, order) = item
                    tc = time.thread_time()
                    batch = self._stage(k, ps, chunks, order, arena)
                    self.stats.stage_cpu_s += time.thread_time() - tc
                    if not self.direct:
                        arena_free.release()  # every piece is in the pinned slot now
                    self._put(staged, batch)
            except _Stopped:
                return
            except BaseException as exc:
                with contextlib.suppress(_Stopped):
                    self._put(staged, exc)

        threads = [
            threading.Thread(target=gather, name="apollo-restore-read", daemon=True),
            threading.Thread(target=stage, name="apollo-restore-stage", daemon=True),
        ]
        for th in threads:
            th.start()

        def finish(pending: Pending) -> None:
            self._finish(pending, dests)
            if on_batch is not None:
                on_batch(pending.batch.k, pending.batch.places)
            if progress:
                progress(sum(p.size for p in pending.batch.places))

        try:
            # Batch k's verdict is read (and its rows placed) once batch k+1 is queued
            # behind it, so the device always has the next batch's work.
            pending: Pending | None = None
            main_cpu = time.thread_time()
            waited = self._upload_waits()
            while True:
                tw = time.perf_counter()
                item = staged.get()
                self.stats.wait_s += time.perf_counter() - tw
                if item is None or isinstance(item, BaseException):
                    if pending is not None:
                        finish(pending)  # verified before the error: placed, as before
                        pending = None
                    if item is None:
                        break
                    raise item
                tq = time.perf_counter()
                try:
                    queued = self._device_stage(item, dests)
                except BaseException:
                    if pending is not None:
                        finish(pending)  # the batch before the damaged one is placed
                    raise
                if self.direct:
                    # The arena's copy is queued (an event on it: the reader waits for
                    # that before reusing it); on the CPU its bytes were used already.
                    arena_free.release()
                tf = time.perf_counter()
                self.stats.queue_s += tf - tq
                if pending is not None:
                    finish(pending)
                self.stats.finish_s += time.perf_counter() - tf
                pending = queued
            if pending is not None:
                finish(pending)
            self.stats.main_cpu_s += time.thread_time() - main_cpu
            self.stats.upload_wait_s += self._upload_waits() - waited
            if self.cuda:
                assert self.stream is not None
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                self.stream.synchronize()
            self._sum_events()
        finally:
            stop.set()
            for th in threads:
                th.join()
            self.stager.drain()
        pinned = self.stager.host_bytes
        if self.direct:  # the arenas are the pinned memory (on the CPU: would be)
            pinned += sum(a.nbytes for a in self._arenas)
        self.stats.pinned_bytes = max(self.stats.pinned_bytes, pinned)
        self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def close(self) -> None:
        """Release the staging buffers, device scratch and threads."""
        if self.cuda:
            # The mirrors are written on copy_stream and read on stream: both done
            # before the memory goes back to the allocator.
            self.copy_stream.synchronize()
            self.stream.synchronize()
        for pool in self._pools.values():
            pool.shutdown()
        self._pools = {}
        self.stager.close()
        self._dev = None
        self._mirrors = [None, None]
        self._mirror_read = [None, None]
        self._rows = [None, None]
        for a in self._arenas:
            a.wait()
        self._arenas = [Arena(a._alloc) for a in self._arenas]

    def _upload_waits(self) -> float:
        """Seconds this thread has waited for free pinned upload buffers: the pipeline's
        and, on CUDA, the verification plans' (imported only there: they need Triton)."""
        waited = self.uploads.waited_s
        if self._kernel is not None:
            from . import xxh3_plans

            waited += xxh3_plans.upload_wait_s()
        return waited

    # -- batching and host staging (producer thread) -----------------------------------

    def _acquire(self, sem: threading.Semaphore) -> None:
        while not sem.acquire(timeout=0.05):
            if self._stopping.is_set():
                raise _Stopped()

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                if self._stopping.is_set():
                    raise _Stopped() from None

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self._stopping.is_set():
                    raise _Stopped() from None

    def _stage(
        self,
        k: int,
        ps: list[Place],
        chunks: dict[bytes, ChunkPlan],
        order: list[bytes],
        arena: Arena | None = None,
    ) -> Batch:
        """Lay the batch out and copy it into pinned slot ``k % 2`` (direct mode: only
        the layout; the device builds it from the arena)."""
        t1 = time.perf_counter()
        batch = self._layout(k, ps, chunks, order)
        if self.direct:
            batch.arena = arena
            batch.stage_s = time.perf_counter() - t1
            self.stats.stage_s += batch.stage_s
            return batch
        self._acquire(self._free)  # released by the device stage
        batch.host = self.stager.acquire(k)  # and the copy out of it (batch k-2) has finished
        self._fill(batch)
        batch.stage_s = time.perf_counter() - t1
        self.stats.stage_s += batch.stage_s
        return batch


class _Stopped(Exception):
    """The consumer gave up (an error): the producer stops quietly."""
