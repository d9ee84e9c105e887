"""The GPU restore pipeline: stored chunks into tensors, decoded and verified on the device.

For every *place* (a block of a destination tensor and the chunk id it must hold) the
pipeline runs, in batches of at most ``batch_bytes`` of raw output:

1. **read** (host threads): the stored bytes of the batch's chunks, through a
   :data:`BlobReader` (today one backend object per chunk; later ranged pack reads),
   plus, for XOR deltas, the chain of bases they need. Each envelope is parsed on the
   host and its raw size checked against the size its place needs *before* any decode
   (a mismatch is :class:`~apollo_cas.errors.CorruptChunk` naming the chunk);
2. **stage** (host threads): the pieces are copied into one of two reusable pinned
   buffers (:class:`~apollo_cas.gpu.staging.Stager`), laid out plane-major so that
   every byte plane of a group of like chunks is one strided tensor: raw planes in
   place, zstd frames packed 16-byte aligned. Without nvCOMP the frames are decoded
   here, on the host, straight into their plane slots;
3. **copy** the used ranges host-to-device, still compressed;
4. **decode** every zstd frame of the batch in one nvCOMP call into buffers the
   pipeline owns (:mod:`apollo_cas.gpu.zstd`);
5. **interleave** byte planes back into elements (one strided copy per plane per
   group) and resolve XOR-delta chains depth by depth (torch ops on the device);
6. **verify** every decoded block's XXH3-128 on the device (the Triton kernel,
   :mod:`apollo_cas.gpu.xxh3_kernel`) against its chunk id; a mismatch is
   :class:`~apollo_cas.errors.CorruptChunk` naming the chunk, and nothing of that
   batch reaches a destination;
7. **place**: only then are the verified blocks copied into the destinations.

Steps 1-2 of batch k+1 run on a host thread while the device runs steps 3-7 of
batch k. Memory is bounded by ``batch_bytes``, never by the model: pinned host
memory is two staging slots and device scratch two staging mirrors plus two
decode buffers (see :func:`memory_bound`).

Chunks of codecs this pipeline does not know (any id but raw, zstd, planes and
delta: e.g. a future sparse codec 4) are decoded on the CPU by ``read_raw`` (the
store's verified reader) and staged as raw bytes: a per-chunk fallback.

The same code runs on CPU tensors (``device="cpu"``): staging buffers are then
the device buffers, zstd frames are decoded by python-zstandard and blocks are
hashed with xxhash, so CI tests the layout, the interleave, the XOR chains, the
verification order and the bounded buffers without a GPU.

Imports torch; nvCOMP and triton only when a GPU is there.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..codecs import DELTA, PLANES, RAW, ZSTD, delta, envelope, planes
from ..errors import CorruptChunk, FormatVersionError
from ..parallel import bounded_map, default_workers
from .blocks import host_block_digests, kernel_module
from .staging import Stager
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
    "places_of",
]

#: Raw bytes decoded per batch. 256 MiB is ~256 1 MiB blocks (a few hundred zstd frames
#: per nvCOMP call) and keeps pinned memory at ~1 GiB at most.
DEFAULT_BATCH_BYTES = 256 << 20

#: Stored bytes of chunks, in the order asked: ``reader(ids, arena) -> [buffer, ...]``. A
#: reader may read into ``arena`` (:class:`Arena`, reusable host memory; None: don't)
#: and return views of it, or return bytes of its own.
BlobReader = Callable[[Sequence[bytes], "Arena | None"], Sequence[Any]]
#: The CPU decoder: a chunk's verified raw bytes (``ChunkStore.read``).
RawReader = Callable[[bytes], bytes]

_HINT = "run 'apollo-cas verify --read-data' to see which checkpoints it breaks"
_COPY, _FRAME = 0, 1
_ALIGN = 16  # nvCOMP wants 16-byte aligned frames and outputs; the kernel 16-byte views


def _up(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Place:
    """One block of a destination: ``size`` bytes at ``offset`` of destination ``dest``."""

    chunk_id: bytes
    size: int
    dest: int
    offset: int


def memory_bound(batch_bytes: int, block_size: int) -> dict[str, int]:
    """Upper bounds of the memory the pipeline holds, in bytes.

    A batch holds at most ``batch_bytes`` of places plus as much again of delta bases,
    so each staging slot needs at most twice that (plus alignment per chunk); the
    device holds two staging mirrors and two decode buffers of the same size.
    """
    rows = 2 * (batch_bytes // block_size + 1)
    slot = 2 * batch_bytes + rows * (block_size // 8 + 4 * _ALIGN)
    return {"pinned_host": 2 * slot, "device_scratch": 2 * slot + 2 * rows * block_size}


@dataclass
class RestoreStats:
    """Phase times of one run (seconds; device phases from CUDA events, summed)."""

    places: int = 0
    chunks_decoded: int = 0
    bases_decoded: int = 0
    cpu_fallback_chunks: int = 0
    raw_bytes: int = 0
    stored_bytes_read: int = 0
    h2d_bytes: int = 0
    batches: int = 0
    frames: int = 0
    gpu_frames: bool = False
    read_s: float = 0.0
    stage_s: float = 0.0
    wait_s: float = 0.0
    copy_s: float = 0.0
    decode_s: float = 0.0
    interleave_s: float = 0.0
    verify_s: float = 0.0
    place_s: float = 0.0
    seconds: float = 0.0
    pinned_bytes: int = 0
    device_scratch_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in vars(self).items()}


# ------------------------------------------------------------------------- parsing


@dataclass
class _Chunk:
    """One chunk of a batch, parsed on the host."""

    cid: bytes
    size: int
    w: int = 1
    kinds: tuple[int, ...] = (_COPY,)
    #: per plane (offset in blob, length) of its stored piece
    pieces: list[tuple[int, int]] = field(default_factory=list)
    tail: tuple[int, int] = (0, 0)
    base: bytes | None = None
    depth: int = 0
    blob: Any = None
    #: raw bytes decoded on the CPU (codec unknown here), or None
    fallback: bytes | None = None
    #: a live destination block that already holds these bytes: (dest, offset)
    live: tuple[int, int] | None = None
    row: int = -1


def _corrupt(cid: bytes, what: str) -> CorruptChunk:
    return CorruptChunk(f"chunk {cid.hex()}: {what}", _HINT)


def _frame_size_ok(blob: memoryview, cid: bytes, off: int, n: int, size: int) -> None:
    from ..codecs import _zstd

    frame = blob[off : off + n]
    try:
        import zstandard

        declared = zstandard.frame_content_size(frame)
    except Exception as exc:
        raise _corrupt(cid, f"bad zstd frame header ({exc})") from exc
    if declared != size:
        raise _corrupt(cid, f"zstd frame declares {declared} bytes, expected {size}")
    try:
        length = _zstd.frame_size(frame)
    except _zstd.FrameError as exc:
        raise _corrupt(cid, str(exc)) from exc
    if length != n:
        raise _corrupt(cid, "zstd frame is truncated or followed by stray bytes")


def parse_chunk(blob: Any, cid: bytes, size: int) -> _Chunk | None:
    """The decode plan of one stored chunk, or None when its codec is not handled here.

    Checks the envelope's raw size against ``size`` (the size the chunk's place
    needs) before anything is decoded, and every piece's length against the payload.
    """
    view = memoryview(blob)
    env = envelope.unpack(view, f"chunk {cid.hex()}")
    if env.raw_size != size:
        raise _corrupt(cid, f"its header says {env.raw_size} raw bytes, its place needs {size}")
    codec, params = env.codec, env.params
    c = _Chunk(cid, size, blob=view)
    if codec == DELTA:
        try:
            base, depth, codec, params = delta.parse_params(params)
        except ValueError as exc:
            raise _corrupt(cid, str(exc)) from exc
        if codec not in (RAW, ZSTD, PLANES):
            raise _corrupt(cid, f"codec id {codec} cannot be nested in a delta")
        c.base, c.depth = base, depth
    elif codec not in (RAW, ZSTD, PLANES):
        return None
    start = len(view) - len(env.payload)
    n = len(env.payload)
    if codec in (RAW, ZSTD) and len(params):
        raise _corrupt(cid, f"codec {codec} has {len(params)} parameter bytes, expected none")
    if codec == RAW:
        if n != size:
            raise _corrupt(cid, f"raw payload is {n} bytes, header says {size}")
        c.kinds, c.pieces = (_COPY,), [(start, n)]
    elif codec == ZSTD:
        _frame_size_ok(view, cid, start, n, size)
        c.kinds, c.pieces = (_FRAME,), [(start, n)]
    else:
        try:
            w, layout = planes.parse_params(params)
        except ValueError as exc:
            raise _corrupt(cid, str(exc)) from exc
        m, tail = divmod(size, w)
        if m == 0:
            raise _corrupt(cid, f"raw size {size} is smaller than one {w}-byte element")
        stored = sum(length for _k, length in layout)
        if stored + tail != n:
            raise _corrupt(cid, f"planes need {stored} + {tail} tail bytes, payload has {n}")
        pos = start
        kinds = []
        for k, (kind, length) in enumerate(layout):
            if kind == planes.PLANE_RAW:
                if length != m:
                    raise _corrupt(cid, f"raw plane {k} is {length} bytes, expected {m}")
                kinds.append(_COPY)
            else:
                _frame_size_ok(view, cid, pos, length, m)
                kinds.append(_FRAME)
            c.pieces.append((pos, length))
            pos += length
        c.w, c.kinds, c.tail = w, tuple(kinds), (pos, tail)
    return c


# ------------------------------------------------------------------------- batches


@dataclass
class _Group:
    """Chunks decoded alike: same element width, plane length and plane kinds."""

    w: int
    m: int
    kinds: tuple[int, ...]
    chunks: list[_Chunk]
    start: int = 0  # offset of plane 0 of member 0 in the staging layout
    first_row: int = 0

    @property
    def mp(self) -> int:
        return _up(self.m)

    def slot(self, k: int, j: int) -> int:
        return self.start + (k * len(self.chunks) + j) * self.mp


@dataclass
class _Batch:
    k: int
    places: list[Place]
    chunks: dict[bytes, _Chunk]
    groups: list[_Group]
    rows: list[_Chunk]
    row_bytes: int
    host: Any = None  # the pinned slot
    used: int = 0
    copy_ranges: list[tuple[int, int]] = field(default_factory=list)
    frames: list[tuple[int, int, int, int]] = field(default_factory=list)  # src, n, out, m
    tails: list[tuple[int, int, int]] = field(default_factory=list)  # row, host offset, n
    read_s: float = 0.0
    stage_s: float = 0.0


class RestorePipeline:
    """Runs batches of places through read, stage, copy, decode, interleave, verify, place.

    ``reader`` gives stored bytes (:data:`BlobReader`); ``read_raw`` is the CPU
    decoder used for chunks of codecs not handled here. ``device`` is where the
    destinations live ("cuda", "cuda:1" or "cpu"). ``frames`` overrides the zstd
    decoder (None: nvCOMP when it runs on ``device``, else decode while staging).
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
    ) -> None:
        self.reader = reader
        self.read_raw = read_raw
        self.block_size = int(block_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.workers = workers or default_workers()
        self.batch_bytes = max(int(batch_bytes), self.block_size)
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        if frames == "auto":
            self.frames: FrameDecoder | None = open_frames(self.device, self.stream, self.workers)
        else:
            self.frames = frames  # type: ignore[assignment]
        self.stager = Stager(slots=2, pin=self.cuda)
        # One device mirror of the staging layout and one buffer of decoded rows: every
        # device step runs on one stream, so batch k+1 reuses them in stream order.
        self._dev: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._events: list[_Events] = []
        self._live: dict[bytes, tuple[int, int, int]] = {}
        self._batch_of: list[int] = []
        # Reusable host memory the reader may read stored bytes into (two: batch k+1 is
        # read while batch k is staged); a reader without room returns its own bytes.
        self._arena_bytes = (
            2 * self.batch_bytes + (2 * self.batch_bytes // self.block_size + 2) * 256
        )
        self._arenas = [Arena(), Arena()]
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
        batches = list(self._split(places))
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

        def gather() -> None:
            # Batch k+1's chunks are read while batch k is staged and batch k-1 decoded.
            try:
                for k, ps in enumerate(batches):
                    self._acquire(arena_free)
                    arena = self._arenas[k % len(self._arenas)]
                    arena.reset(self._arena_bytes)
                    self._put(gathered, (k, ps, self._gather(k, ps, arena)))
                self._put(gathered, None)
            except _Stopped:
                return
            except BaseException as exc:
                with contextlib.suppress(_Stopped):
                    self._put(gathered, exc)

        def stage() -> None:
            try:
                while True:
                    item = self._get(gathered)
                    if item is None or isinstance(item, BaseException):
                        self._put(staged, item)
                        return
                    k, ps, (chunks, order) = item
                    batch = self._stage(k, ps, chunks, order)
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
        try:
            while True:
                tw = time.perf_counter()
                item = staged.get()
                self.stats.wait_s += time.perf_counter() - tw
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                self._device_stage(item, dests)
                if on_batch is not None:
                    on_batch(item.k, item.places)
                if progress:
                    progress(sum(p.size for p in item.places))
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
        self.stats.pinned_bytes = max(self.stats.pinned_bytes, self.stager.host_bytes)
        self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def close(self) -> None:
        """Release the staging buffers and device scratch."""
        self.stager.close()
        self._dev = None
        self._rows = None

    # -- batching and host staging (producer thread) -----------------------------------

    def _split(self, places: Sequence[Place]) -> Iterator[list[Place]]:
        cur: list[Place] = []
        used = 0
        for p in places:
            if cur and used + p.size > self.batch_bytes:
                yield cur
                cur, used = [], 0
            cur.append(p)
            used += p.size
        if cur:
            yield cur

    def _read(self, want: list[tuple[bytes, int]], arena: Arena | None) -> list[_Chunk]:
        blobs = self.reader([cid for cid, _ in want], arena)
        if len(blobs) != len(want):
            raise RuntimeError(f"blob reader returned {len(blobs)} chunks for {len(want)} ids")

        self.stats.stored_bytes_read += sum(len(b) for b in blobs)

        def parse(i: int) -> _Chunk:
            cid, size = want[i]
            blob = blobs[i]
            try:
                c = parse_chunk(blob, cid, size)
            except FormatVersionError:
                c = None  # a newer envelope: the CPU decoder says what to do
            if c is None:
                c = self._fallback(cid, size)
            return c

        return list(bounded_map(parse, range(len(want)), self.workers))

    def _fallback(self, cid: bytes, size: int) -> _Chunk:
        raw = self.read_raw(cid)
        if len(raw) != size:
            raise _corrupt(cid, f"decoded to {len(raw)} bytes, its place needs {size}")
        self.stats.cpu_fallback_chunks += 1
        c = _Chunk(cid, size, fallback=raw)
        c.pieces = [(0, size)]
        return c

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

    def _gather(
        self, k: int, ps: list[Place], arena: Arena
    ) -> tuple[dict[bytes, _Chunk], list[bytes]]:
        """Read and parse the batch's chunks and, round by round, their delta bases."""
        t0 = time.perf_counter()
        chunks: dict[bytes, _Chunk] = {}
        want: list[tuple[bytes, int]] = []
        asked: set[bytes] = set()
        for p in ps:
            if p.chunk_id not in asked:
                asked.add(p.chunk_id)
                want.append((p.chunk_id, p.size))
        order: list[bytes] = []
        n_places = len(want)
        while want:
            for c in self._read(want, arena):
                chunks[c.cid] = c
                order.append(c.cid)
            want = []
            seen: set[bytes] = set()
            for cid in order:
                c = chunks[cid]
                b = c.base
                if b is None or b in chunks or b in seen:
                    continue
                lv = self._live.get(b)
                if lv is not None and (lv[2] < 0 or self._batch_of[lv[2]] >= k):
                    # Not overwritten before this batch places its blocks.
                    chunks[b] = _Chunk(b, c.size, live=(lv[0], lv[1]))
                    order.append(b)
                    continue
                seen.add(b)
                want.append((b, c.size))
        self.stats.chunks_decoded += n_places
        self.stats.bases_decoded += len(order) - n_places
        self.stats.read_s += time.perf_counter() - t0
        return chunks, order

    def _stage(
        self, k: int, ps: list[Place], chunks: dict[bytes, _Chunk], order: list[bytes]
    ) -> _Batch:
        """Lay the batch out and copy it into pinned slot ``k % 2``."""
        t1 = time.perf_counter()
        batch = self._layout(k, ps, chunks, order)
        self._acquire(self._free)  # released by the device stage
        batch.host = self.stager.acquire(k)  # and the copy out of it (batch k-2) has finished
        self._fill(batch)
        batch.stage_s = time.perf_counter() - t1
        self.stats.stage_s += batch.stage_s
        return batch

    def _layout(
        self, k: int, ps: list[Place], chunks: dict[bytes, _Chunk], order: list[bytes]
    ) -> _Batch:
        """Rows and the plane-major staging layout of one batch."""
        host_frames = self.frames is None
        groups: dict[tuple[int, int, tuple[int, ...]], _Group] = {}
        lives: list[_Chunk] = []
        for cid in order:
            c = chunks[cid]
            if c.live is not None:
                lives.append(c)
                continue
            kinds = tuple(_COPY for _ in c.kinds) if host_frames else c.kinds
            key = (c.w, c.size // c.w, kinds)
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group(c.w, c.size // c.w, kinds, [])
            g.chunks.append(c)
        pos = 0
        rows: list[_Chunk] = []
        for g in groups.values():
            g.start = pos
            pos += g.w * len(g.chunks) * g.mp
            g.first_row = len(rows)
            for c in g.chunks:
                c.row = len(rows)
                rows.append(c)
        for c in lives:
            c.row = len(rows)
            rows.append(c)
        batch = _Batch(k, ps, chunks, list(groups.values()), rows, _up(self.block_size, 64))
        # Copy ranges: plane runs that arrive as bytes; frames and tails packed after.
        for g in batch.groups:
            for kk, kind in enumerate(g.kinds):
                if kind == _COPY:
                    a = g.slot(kk, 0)
                    _add_range(batch.copy_ranges, a, len(g.chunks) * g.mp)
        fpos = pos
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                for kk, kind in enumerate(g.kinds):
                    if kind == _FRAME:
                        n = c.pieces[kk][1]
                        batch.frames.append((fpos, n, g.slot(kk, j), g.m))
                        fpos = _up(fpos + n)
                if c.tail[1]:
                    batch.tails.append((c.row, fpos, c.tail[1]))
                    fpos = _up(fpos + c.tail[1])
        if fpos > pos:
            _add_range(batch.copy_ranges, pos, fpos - pos)
        batch.used = fpos
        self.stager.ensure(fpos)
        return batch

    def _fill(self, batch: _Batch) -> None:
        """Copy every piece into the pinned slot (host-decoding frames when no nvCOMP)."""
        from ..codecs import _zstd

        h = batch.host.numpy()
        frames = iter(batch.frames)
        tails = iter(batch.tails)
        jobs: list[tuple[Any, int, int, int, bytes]] = []  # (piece, dst, n, decode-to m or -1, id)
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                src = memoryview(c.fallback) if c.fallback is not None else c.blob
                for kk, kind in enumerate(c.kinds):
                    off, n = c.pieces[kk]
                    piece = src[off : off + n]
                    if kind == _FRAME and self.frames is not None:
                        fsrc, fn, _out, _m = next(frames)
                        jobs.append((piece, fsrc, fn, -1, c.cid))
                    elif kind == _FRAME:
                        jobs.append((piece, g.slot(kk, j), g.m, g.m, c.cid))
                    else:
                        jobs.append((piece, g.slot(kk, j), n, -1, c.cid))
                if c.tail[1]:
                    _row, tdst, tn = next(tails)
                    jobs.append((src[c.tail[0] : c.tail[0] + tn], tdst, tn, -1, c.cid))

        def one(job: tuple[Any, int, int, int, bytes]) -> None:
            piece, dst, n, m, cid = job
            if m >= 0:
                try:
                    raw = _zstd.decompress_exact(piece, m)
                except _zstd.FrameError as exc:
                    raise _corrupt(cid, str(exc)) from exc
                h[dst : dst + m] = np.frombuffer(raw, np.uint8)
            else:
                h[dst : dst + n] = np.frombuffer(piece, np.uint8)

        for _ in bounded_map(one, jobs, self.workers):
            pass
        self.stats.frames += len(batch.frames)

    # -- device work (caller's thread) -------------------------------------------------

    def _buffers(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            dev = batch.host
        else:
            if self._dev is None or self._dev.numel() < batch.used:
                self._dev = torch.empty(max(1, batch.used), dtype=torch.uint8, device=self.device)
            dev = self._dev
        need = max(1, len(batch.rows)) * batch.row_bytes
        if self._rows is None or self._rows.numel() < need:
            self._rows = torch.empty(need, dtype=torch.uint8, device=self.device)
        scratch = int(self._rows.numel()) + (int(dev.numel()) if self.cuda else 0)
        self.stats.device_scratch_bytes = max(self.stats.device_scratch_bytes, scratch)
        return dev, self._rows

    def _device_stage(self, batch: _Batch, dests: Sequence[torch.Tensor]) -> None:
        ctx = torch.cuda.stream(self.stream) if self.cuda else _nullcontext()
        with ctx:
            ev = _Events(self.cuda)
            dev, rows = self._buffers(batch)
            ev.mark("start")
            if self.cuda:
                for a, n in batch.copy_ranges:
                    dev[a : a + n].copy_(batch.host[a : a + n], non_blocking=True)
                    self.stats.h2d_bytes += n
            if self.cuda:
                self.stager.release(batch.k, [self.stream])
                self._free.release()  # the producer may fill this slot once the copy ran
            ev.mark("copied")
            if batch.frames and self.frames is not None:
                try:
                    keep = self.frames.decode(
                        dev,
                        [f[0] for f in batch.frames],
                        [f[1] for f in batch.frames],
                        dev,
                        [f[2] for f in batch.frames],
                        [f[3] for f in batch.frames],
                    )
                    ev.keep(keep)
                except CorruptChunk:
                    raise
                except Exception:
                    # nvCOMP refused the batch (a damaged frame, most likely): decode its
                    # frames on the host, which names the chunk or gets them right.
                    self._host_frames(batch, dev)
            ev.mark("decoded")
            r2 = rows[: len(batch.rows) * batch.row_bytes].view(len(batch.rows), batch.row_bytes)
            self._interleave(batch, dev, r2, dests)
            ev.mark("interleaved")
            self._verify(batch, r2)
            ev.mark("verified")
            self._place(batch, r2, dests)
            ev.mark("placed")
        if not self.cuda:
            self._free.release()  # on the CPU the slot itself was the device buffer
        self._events.append(ev)
        self.stats.batches += 1
        self.stats.raw_bytes += sum(p.size for p in batch.places)

    def _host_frames(self, batch: _Batch, dev: torch.Tensor) -> None:
        """Every frame of ``batch`` decoded by python-zstandard from its blob, then copied."""
        from ..codecs import _zstd

        # The arena the blobs were read into may hold the next batch by now: read again.
        ids = [c.cid for g in batch.groups for c in g.chunks if _FRAME in g.kinds]
        blobs = dict(zip(ids, self.reader(ids, None), strict=True))
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                for kk, kind in enumerate(g.kinds):
                    if kind != _FRAME:
                        continue
                    off, n = c.pieces[kk]
                    try:
                        raw = _zstd.decompress_exact(memoryview(blobs[c.cid])[off : off + n], g.m)
                    except _zstd.FrameError as exc:
                        raise _corrupt(c.cid, str(exc)) from exc
                    a = g.slot(kk, j)
                    dev[a : a + g.m].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def _interleave(
        self, batch: _Batch, dev: torch.Tensor, r2: torch.Tensor, dests: Sequence[torch.Tensor]
    ) -> None:
        for g in batch.groups:
            n = len(g.chunks)
            block = r2[g.first_row : g.first_row + n, : g.m * g.w]
            planes_t = dev[g.start : g.start + g.w * n * g.mp].view(g.w, n, g.mp)[:, :, : g.m]
            if g.w == 1:
                block.copy_(planes_t[0])
            else:
                out = block.view(n, g.m, g.w)
                for kk in range(g.w):
                    out[:, :, kk].copy_(planes_t[kk])
        for row, off, n in batch.tails:
            c = batch.rows[row]
            m = c.size // c.w * c.w
            r2[row, m : m + n].copy_(dev[off : off + n])
        for c in batch.rows:
            if c.live is not None:
                d, o = c.live
                r2[c.row, : c.size].copy_(dests[d][o : o + c.size])
        # XOR chains, shallowest first: a base's row is final before its deltas use it.
        by_depth: dict[int, list[_Chunk]] = {}
        for c in batch.rows:
            if c.base is not None:
                by_depth.setdefault(c.depth, []).append(c)
        if not by_depth:
            return
        wide = r2.view(torch.int64) if batch.row_bytes % 8 == 0 else r2
        for d in sorted(by_depth):
            cs = by_depth[d]
            idx = [c.row for c in cs]
            bidx = [batch.chunks[c.base].row for c in cs if c.base is not None]
            bases = wide.index_select(0, torch.tensor(bidx, device=r2.device))
            lo, hi = idx[0], idx[-1] + 1
            if idx == list(range(lo, hi)):
                wide[lo:hi].bitwise_xor_(bases)
            else:
                it = torch.tensor(idx, device=r2.device)
                wide.index_copy_(0, it, wide.index_select(0, it).bitwise_xor_(bases))

    def _verify(self, batch: _Batch, r2: torch.Tensor) -> None:
        """Hash every row; raise CorruptChunk for the shallowest bad one (bases first)."""
        if self._kernel is not None and self._kernel_ok():
            n = len(batch.rows)
            if all(c.size == batch.row_bytes for c in batch.rows):
                # Every row a whole block: one buffer, one launch, no view per row.
                got = self._kernel.block_digests(
                    r2.reshape(-1)[: n * batch.row_bytes], batch.row_bytes
                )
            else:
                views = [r2[c.row, : c.size] for c in batch.rows]
                got = self._kernel.block_digests_many(views, self.block_size)
            want = torch.frombuffer(
                bytearray(b"".join(c.cid for c in batch.rows)), dtype=torch.uint8
            ).view(-1, 16)
            bad_t = (got != want.to(self.device, non_blocking=False)).any(dim=1).nonzero()
            bad = [int(i) for i in bad_t.flatten().tolist()]
        else:
            views = [r2[c.row, : c.size] for c in batch.rows]
            if self.cuda:
                host = [v.cpu().numpy().data for v in views]
            else:
                host = [v.numpy().data for v in views]
            ds = host_block_digests(host, self.block_size, self.workers)
            bad = [i for i, c in enumerate(batch.rows) if ds[i] != [c.cid]]
        if bad:
            worst = min((batch.rows[i] for i in bad), key=lambda c: (c.depth, c.row))
            more = f" ({len(bad)} chunks of this batch failed)" if len(bad) > 1 else ""
            raise CorruptChunk(
                f"chunk {worst.cid.hex()} is corrupt: its decoded content does not hash to "
                f"its name{more}",
                _HINT,
            )

    def _kernel_ok(self) -> bool:
        try:
            assert self._kernel is not None
            self._kernel.check_block_size(self.block_size)
        except ValueError:
            return False
        return True

    def _place(self, batch: _Batch, r2: torch.Tensor, dests: Sequence[torch.Tensor]) -> None:
        flat = r2.view(-1)
        rb = batch.row_bytes
        run: list[int] | None = None  # [dest, dest offset, flat offset, length]
        for p in batch.places:
            c = batch.chunks[p.chunk_id]
            src = c.row * rb
            if (
                run is not None
                and run[0] == p.dest
                and run[1] + run[3] == p.offset
                and run[2] + run[3] == src
            ):
                run[3] += p.size
                continue
            if run is not None:
                _copy(dests, flat, run)
            run = [p.dest, p.offset, src, p.size]
            if p.size != rb:
                _copy(dests, flat, run)
                run = None
        if run is not None:
            _copy(dests, flat, run)

    def _sum_events(self) -> None:
        for ev in self._events:
            t = ev.elapsed()
            self.stats.copy_s += t.get("copied", 0.0)
            self.stats.decode_s += t.get("decoded", 0.0)
            self.stats.interleave_s += t.get("interleaved", 0.0)
            self.stats.verify_s += t.get("verified", 0.0)
            self.stats.place_s += t.get("placed", 0.0)
        self._events = []


class _Stopped(Exception):
    """The consumer gave up (an error): the producer stops quietly."""


def _copy(dests: Sequence[torch.Tensor], flat: torch.Tensor, run: list[int]) -> None:
    d, o, s, n = run
    dests[d][o : o + n].copy_(flat[s : s + n], non_blocking=True)


def _add_range(ranges: list[tuple[int, int]], a: int, n: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == a:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
    else:
        ranges.append((a, n))


class _Events:
    """CUDA events between phases (host clock on the CPU), read once the work is done."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, Any]] = []
        self._keep: list[Any] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def keep(self, obj: Any) -> None:
        self._keep.append(obj)

    def elapsed(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_a, ea), (b, eb) in zip(self.marks, self.marks[1:], strict=False):
            out[b] = ea.elapsed_time(eb) / 1e3 if self.cuda else eb - ea
        self._keep = []
        return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class Arena:
    """Reusable host memory that readers claim pieces of, from several threads."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None
        self._pos = 0
        self._lock = threading.Lock()

    def reset(self, capacity: int) -> None:
        """Forget every claim (their views must be dead) and hold at least ``capacity``."""
        if self._buf is None or len(self._buf) < capacity:
            self._buf = np.empty(capacity, dtype=np.uint8)
        self._pos = 0

    def claim(self, n: int) -> memoryview | None:
        """A writable view of ``n`` bytes, or None when the arena is full."""
        with self._lock:
            if self._buf is None or self._pos + n > len(self._buf):
                return None
            a = self._pos
            self._pos = _up(a + n, 64)
        return self._buf.data[a : a + n]


def object_reader(get_blob: Callable[[bytes], Any], workers: int) -> BlobReader:
    """One backend object per chunk (store format 1, any backend), on ``workers`` threads.

    ``get_blob`` is ``ChunkStore.get_blob`` (stored bytes, CorruptChunk when missing).
    It ignores the arena: each chunk arrives as new bytes (measured 3.55 GB/s for the
    16,417 objects of a 17 GB checkpoint in /dev/shm, 16 threads). A pack-file store
    (format 2) passes a reader that groups the ids by pack and reads ranges.
    """

    def read(ids: Sequence[bytes], arena: Arena | None = None) -> list[Any]:
        return list(bounded_map(get_blob, ids, workers))

    return read


def file_reader(root: Any, workers: int) -> BlobReader:
    """Chunk files of a local store read straight into the arena (no new bytes per chunk).

    ``root`` is the store directory (``LocalBackend.root``); paths come from
    :func:`apollo_cas.layout.chunk_key`. A chunk the arena has no room for, and every
    chunk when there is no arena, is read into bytes of its own.
    """
    from pathlib import Path

    from ..layout import chunk_key

    base = Path(root)

    def one(cid: bytes, arena: Arena | None) -> Any:
        key = chunk_key(cid.hex())
        path = base / key
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptChunk(
                f"chunk {cid.hex()} is missing from {base}",
                "run 'apollo-cas verify' to see which checkpoints it breaks; restore another one",
            ) from None
        try:
            size = os.fstat(fd).st_size
            view = arena.claim(size) if arena is not None else None
            if view is None:
                view = memoryview(bytearray(size))
            got = os.preadv(fd, [view], 0) if size else 0
            if got != size:
                raise _corrupt(cid, f"read {got} of its {size} stored bytes (changed while read?)")
            return view
        finally:
            os.close(fd)

    def read(ids: Sequence[bytes], arena: Arena | None = None) -> list[Any]:
        return list(bounded_map(lambda c: one(c, arena), ids, workers))

    return read


def places_of(
    entries: Sequence[Any], block_size: int, skip: set[tuple[int, int]] | None = None
) -> list[Place]:
    """One place per block of ``entries`` (manifest TensorEntry records), dest = entry index.

    ``skip`` holds (entry index, block index) pairs to leave out (blocks that already match).
    """
    out: list[Place] = []
    for ti, e in enumerate(entries):
        for bi, cid in enumerate(e.chunks):
            if skip and (ti, bi) in skip:
                continue
            off = bi * block_size
            out.append(Place(cid, min(block_size, e.nbytes - off), ti, off))
    return out
