"""Chunks and batches of the GPU restore pipeline, as the host plans them.

A *place* is a block of a destination and the chunk id it must hold. Each stored chunk
is parsed on the host into a :class:`ChunkPlan` (its codec pieces, plane kinds, delta
base), and the chunks of a batch into :class:`PlaneGroup` s laid out plane-major in
one staging buffer (:class:`Batch`). A sparse delta (codec 4) is no plane group: its
two zstd frames (gaps, values) decode into slots of their own and the device scatters
them (:mod:`apollo_cas.gpu.sparse_steps`). The byte layouts parsed here are
docs/CODECS.md's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import zstandard

from ..codecs import DELTA, PLANES, RAW, SPARSE, ZSTD, delta, envelope, planes, sparse
from ..codecs.envelope import Blob
from ..errors import CorruptChunk

__all__ = ["Batch", "ChunkPlan", "Place", "PlaneGroup", "parse_chunk", "places_of"]

T = TypeVar("T")
HINT = "run 'apollo-cas verify --read-data' to see which checkpoints it breaks"
COPY, FRAME = 0, 1
ALIGN = 16  # nvCOMP wants 16-byte aligned frames and outputs; the kernel 16-byte views


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


class Place(NamedTuple):
    """One block of a destination: ``size`` bytes at ``offset`` of destination ``dest``.

    A tuple, as :class:`~apollo_cas.codecs.envelope.Envelope` is: a load builds one per
    block (16,400 per 17 GB) on the thread that feeds the device, and a frozen
    dataclass costs about five times as much to build."""

    chunk_id: bytes
    size: int
    dest: int
    offset: int


@dataclass
class ChunkPlan:
    """One chunk of a batch, parsed on the host."""

    cid: bytes
    size: int
    w: int = 1
    kinds: tuple[int, ...] = (COPY,)
    #: per plane (offset in blob, length) of its stored piece
    pieces: list[tuple[int, int]] = field(default_factory=list)
    tail: tuple[int, int] = (0, 0)
    base: bytes | None = None
    depth: int = 0
    blob: Any = None
    #: raw bytes decoded on the CPU (codec unknown here), or None
    fallback: Blob | None = None
    #: a live destination block that already holds these bytes: (dest, offset)
    live: tuple[int, int] | None = None
    #: where ``blob`` starts in the arena it was read into (None: unknown)
    at: int | None = None
    row: int = -1
    #: codec 4: number of changed elements (``w`` is their width), else -1; its
    #: pieces are the gaps frame and the values frame (none when it is 0)
    nchanged: int = -1
    #: codec 4: staging offsets the gaps (``4*n`` bytes) and values (``w*n``) decode to
    slots: tuple[int, int] = (0, 0)

    @property
    def is_sparse(self) -> bool:
        return self.nchanged >= 0


def corrupt(cid: bytes, what: str) -> CorruptChunk:
    return CorruptChunk(f"chunk {cid.hex()}: {what}", HINT)


def _declares_size(blob: memoryview, cid: bytes, off: int, n: int, size: int) -> None:
    """The frame at ``off`` declares ``size`` bytes of content.

    Its length is left to the decoder that reads it, which is cheaper than walking its
    block headers here under the GIL (a tenth of the read threads' samples of a load,
    benchmarks/results/h200_2026-12-03f/run2_threads.json): on the host,
    ``zstd_frames.decompress_exact`` refuses a short frame and bytes after one; on the
    GPU, a frame nvCOMP cannot decode into exactly its slot leaves a block that does
    not hash to its name, and nothing of its batch is placed."""
    try:
        declared = zstandard.frame_content_size(blob[off : off + n])
    except Exception as exc:
        raise corrupt(cid, f"bad zstd frame header ({exc})") from exc
    if declared != size:
        raise corrupt(cid, f"zstd frame declares {declared} bytes, expected {size}")


def parse_chunk(blob: Any, cid: bytes, size: int) -> ChunkPlan | None:
    """The decode plan of one stored chunk, or None when its codec is not handled here.

    Checks the envelope's raw size against ``size`` (the size the chunk's place
    needs) before anything is decoded, and every piece's length against the payload.
    """
    view = memoryview(blob)
    env = envelope.unpack(view, cid)
    if env.raw_size != size:
        raise corrupt(cid, f"its header says {env.raw_size} raw bytes, its place needs {size}")
    codec, params = env.codec, env.params
    c = ChunkPlan(cid, size, blob=view)
    if codec == SPARSE:
        return _parse_sparse(c, view, params, len(view) - len(env.payload))
    if codec == DELTA:
        try:
            base, depth, codec, params = delta.parse_params(params)
        except ValueError as exc:
            raise corrupt(cid, str(exc)) from exc
        if codec not in (RAW, ZSTD, PLANES):
            raise corrupt(cid, f"codec id {codec} cannot be nested in a delta")
        c.base, c.depth = base, depth
    elif codec not in (RAW, ZSTD, PLANES):
        return None
    start = len(view) - len(env.payload)
    n = len(env.payload)
    if codec in (RAW, ZSTD) and len(params):
        raise corrupt(cid, f"codec {codec} has {len(params)} parameter bytes, expected none")
    if codec == RAW:
        if n != size:
            raise corrupt(cid, f"raw payload is {n} bytes, header says {size}")
        c.kinds, c.pieces = (COPY,), [(start, n)]
    elif codec == ZSTD:
        _declares_size(view, cid, start, n, size)
        c.kinds, c.pieces = (FRAME,), [(start, n)]
    else:
        try:
            w, layout = planes.parse_params(params)
        except ValueError as exc:
            raise corrupt(cid, str(exc)) from exc
        m, tail = divmod(size, w)
        if m == 0:
            raise corrupt(cid, f"raw size {size} is smaller than one {w}-byte element")
        stored = sum(length for _k, length in layout)
        if stored + tail != n:
            raise corrupt(cid, f"planes need {stored} + {tail} tail bytes, payload has {n}")
        pos = start
        kinds = []
        for k, (kind, length) in enumerate(layout):
            if kind == planes.PLANE_RAW:
                if length != m:
                    raise corrupt(cid, f"raw plane {k} is {length} bytes, expected {m}")
                kinds.append(COPY)
            else:
                _declares_size(view, cid, pos, length, m)
                kinds.append(FRAME)
            c.pieces.append((pos, length))
            pos += length
        c.w, c.kinds, c.tail = w, tuple(kinds), (pos, tail)
    return c


def _parse_sparse(c: ChunkPlan, view: memoryview, params: Any, start: int) -> ChunkPlan | None:
    """Codec 4's plan: base, depth, and its two frames checked against their sizes."""
    cid, size = c.cid, c.size
    try:
        base, depth, w, n, glen = sparse.parse_params(params)
    except ValueError as exc:
        raise corrupt(cid, str(exc)) from exc
    if size % w:
        raise corrupt(cid, f"raw size {size} is not a multiple of the element width {w}")
    if n > size // w:
        raise corrupt(cid, f"{n} changed elements in a block of {size // w}")
    payload = len(view) - start
    if glen > payload:
        raise corrupt(cid, f"gaps frame of {glen} bytes runs past the payload ({payload})")
    if (4 + w) * n > size:
        # Decoded gaps and values would outgrow the block's own size in the staging
        # layout (memory_bound counts raw size per chunk): the CPU decodes it. The
        # writer keeps codec 4 only up to 25% changed, so only w=1 can get here.
        return None
    _declares_size(view, cid, start, glen, 4 * n)
    _declares_size(view, cid, start + glen, payload - glen, w * n)
    c.base, c.depth, c.w, c.nchanged = base, depth, w, n
    if n:
        c.kinds = (FRAME, FRAME)
        c.pieces = [(start, glen), (start + glen, payload - glen)]
    else:
        c.kinds, c.pieces = (), []
    return c


@dataclass
class PlaneGroup:
    """Chunks decoded alike: same element width, plane length and plane kinds."""

    w: int
    m: int
    kinds: tuple[int, ...]
    chunks: list[ChunkPlan]
    start: int = 0  # offset of plane 0 of member 0 in the staging layout
    first_row: int = 0

    @property
    def mp(self) -> int:
        return align_up(self.m)

    def slot(self, k: int, j: int) -> int:
        return self.start + (k * len(self.chunks) + j) * self.mp


@dataclass
class Batch:
    k: int
    places: list[Place]
    chunks: dict[bytes, ChunkPlan]
    groups: list[PlaneGroup]
    rows: list[ChunkPlan]
    row_bytes: int
    #: codec-4 chunks, in row order (their rows follow the plane groups' rows)
    sparse: list[ChunkPlan] = field(default_factory=list)
    host: Any = None  # the pinned slot
    used: int = 0
    copy_ranges: list[tuple[int, int]] = field(default_factory=list)
    frames: list[tuple[int, int, int, int]] = field(default_factory=list)  # src, n, out, m
    tails: list[tuple[int, int, int]] = field(default_factory=list)  # row, host offset, n
    #: where the packed frames and tails start (after the plane slots)
    packed_start: int = 0
    #: direct mode: the (pinned) arena the stored bytes were read into, copied as is
    arena: Any = None
    read_s: float = 0.0
    stage_s: float = 0.0


def slices(n: int, workers: int, per_worker: int = 2) -> list[slice]:
    """About ``per_worker`` contiguous slices of ``range(n)`` per worker (fewer for small n)."""
    parts = max(1, min(n, per_worker * workers))
    step = -(-n // parts) if n else 1
    return [slice(a, min(n, a + step)) for a in range(0, n, step)] or [slice(0, 0)]


def runs_within(items: Sequence[T], weight: Callable[[T], int], limit: int) -> Iterator[list[T]]:
    """``items`` in order, cut into runs whose weights sum to at most ``limit`` (a single
    item heavier than ``limit`` is a run of its own): batches of places, parts of a
    batch's sparse chunks."""
    cur: list[T] = []
    used = 0
    for it in items:
        w = weight(it)
        if cur and used + w > limit:
            yield cur
            cur, used = [], 0
        cur.append(it)
        used += w
    if cur:
        yield cur


def add_range(ranges: list[tuple[int, int]], a: int, n: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == a:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
    else:
        ranges.append((a, n))


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
