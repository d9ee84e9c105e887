"""Chunk codecs: how a block's raw bytes become a stored chunk and back.

A codec is chosen per chunk and recorded in its envelope, so stores may mix
codecs freely and old chunks stay readable when defaults change. The chunk id
is always the hash of the *raw* block, never of the stored bytes, so changing
the codec never breaks dedup. Payload pieces are standard zstd frames or raw
bytes, so a GPU decoder (nvCOMP) can read them later.

Codec ids (stable; part of the store format, byte layouts in docs/CODECS.md):

====  ======  ==============================================================
id    name    payload
====  ======  ==============================================================
0     raw     the raw bytes (incompressible blocks)
1     zstd    one zstd frame of the raw bytes
2     planes  byte planes of w-byte elements, each a zstd frame or raw
3     delta   (planes or zstd of) the block XOR a base block, named by id
4     sparse  the elements that differ from a base block: positions, values
====  ======  ==============================================================

Thread safety: :func:`encode` and :func:`decode` may run in many threads at
once; zstd contexts are per thread, and the heavy work (numpy transposes and
XORs, zstd) releases the GIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptChunk, CorruptObject, ObjectNotFound, UsageError
from . import delta, envelope, planes, sparse, zstd_frames
from .envelope import Blob

RAW = 0
ZSTD = 1
PLANES = 2
DELTA = 3
SPARSE = 4
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", PLANES: "planes", DELTA: "delta", SPARSE: "sparse"}
#: Codecs whose chunk is a delta against a base chunk named in its parameters.
DELTA_CODECS = (DELTA, SPARSE)
CODEC_IDS = {v: k for k, v in CODEC_NAMES.items()}
#: Codecs a policy may name ("delta" is not one: it is switched on by
#: ``CodecPolicy.delta`` and used per block when a base makes it pay).
POLICY_CODECS = ("auto", "raw", "zstd", "planes")

#: Store a compressed payload only if it saves at least this fraction.
MIN_SAVING = 0.02

#: A delta is kept only if it is smaller than this fraction of the best full
#: encoding of the same block. A delta costs a second chunk read and decode on
#: every restore and pins its base against gc, so a marginal win is not worth
#: it; on measured dense steps deltas land far below this (0.05-0.5) and on
#: unrelated blocks far above it (~1.0), so the exact value rarely matters.
DELTA_MAX_RATIO = 0.8

#: A delta at most this fraction of the raw size is kept without computing the
#: full encoding to compare (halves the CPU cost of a dense-step save). The
#: full encoding could only win the comparison if it were below 1/0.8 of this,
#: i.e. a block compressing 8x or better on its own, which weights do not
#: (1.2-1.5x); the worst case is a delta kept where a full chunk would have
#: been a few percent of raw smaller.
DELTA_ACCEPT_FRACTION = 0.10

#: Default bound on delta chains. A chunk at depth d costs d+1 chunk reads and
#: decodes to restore; see docs/CODECS.md for the measurement behind it.
DEFAULT_MAX_DELTA_DEPTH = 4

_HINT = "run apollo-cas verify --read-data to list what it breaks"

#: Anything with contiguous bytes that callers hand us.
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class CodecPolicy:
    """How new chunks are encoded. Reading never depends on it.

    ``codec``: "auto" (byte planes for 2/4/8-byte elements, zstd for 1-byte
    ones), "planes", "zstd" or "raw". ``level``: the zstd level. ``delta``:
    store a block as an XOR delta against the base the caller offers when that
    is clearly smaller (see :data:`DELTA_MAX_RATIO`); ``max_delta_depth``: the
    longest chain allowed (0 disables deltas too). ``sparse``: also try the
    sparse delta (codec 4: positions and values of the changed elements) and
    keep whichever delta is smaller.
    """

    codec: str = "auto"
    level: int = 1
    delta: bool = True
    max_delta_depth: int = DEFAULT_MAX_DELTA_DEPTH
    delta_max_ratio: float = DELTA_MAX_RATIO
    sparse: bool = True

    def __post_init__(self) -> None:
        if self.codec not in POLICY_CODECS:
            raise UsageError(
                f"unknown codec {self.codec!r}", "choose one of: " + ", ".join(POLICY_CODECS)
            )
        if not -7 <= self.level <= 22:
            raise UsageError(f"zstd level {self.level} out of range", "use -7..22")
        if not 0 <= self.max_delta_depth <= delta.MAX_DEPTH:
            raise UsageError(
                f"delta chain depth {self.max_delta_depth} out of range",
                f"use 0..{delta.MAX_DEPTH}",
            )
        if not 0.0 < self.delta_max_ratio <= 1.0:
            raise UsageError(f"delta ratio {self.delta_max_ratio} out of range", "use (0, 1]")


@dataclass(frozen=True)
class Base:
    """A candidate delta base: the parent checkpoint's block at the same place.

    ``raw`` is the base's raw bytes, or a zero-argument callable returning them,
    so the base is read only if a delta will actually be tried. ``depth`` is the
    base's own chain depth (0 for a full chunk).
    """

    chunk_id: bytes
    raw: Buffer | Callable[[], Buffer]
    depth: int = 0
    #: Optional second choice, tried instead when this base is too deep for
    #: ``policy.max_delta_depth``: normally the root (depth 0) of this base's
    #: chain. A delta against a block a few steps back is larger than against
    #: the parent but usually far smaller than a full chunk (measured: bf16
    #: dense steps 5.6% against the parent, 8.8% against the block 5 steps
    #: back, 67% in full), and it restarts the chain at depth 1.
    root: Base | None = None

    def __post_init__(self) -> None:
        if len(self.chunk_id) != delta.BASE_ID_SIZE:
            raise ValueError(f"base chunk id must be 16 bytes, got {len(self.chunk_id)}")
        if self.depth < 0:
            raise ValueError(f"base depth {self.depth} < 0")

    def load(self) -> memoryview:
        """The base's raw bytes (calls the loader if one was given)."""
        data = self.raw() if callable(self.raw) else self.raw
        return _bytes_view(data)


def _bytes_view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


# ---------------------------------------------------------------- encoding


def _method(policy: CodecPolicy, itemsize: int, n: int) -> int:
    """The full (non-delta) codec for a block: the per-dtype default lives here.

    "auto" = planes for 2-, 4- and 8-byte elements (floats and ints alike; the
    measurement in docs/CODECS.md shows planes beat plain zstd on every such
    dtype at level 1), zstd for 1-byte elements (nothing to split).
    """
    if policy.codec == "raw":
        return RAW
    if policy.codec in ("planes", "auto") and planes.usable(n, itemsize):
        return PLANES
    return ZSTD


Pieces = list[bytes | memoryview]


def _encode_as(
    method: int, data: memoryview, level: int, itemsize: int
) -> tuple[int, bytes, Pieces, int]:
    """(codec id, params, payload pieces, params+payload size); RAW if nothing pays."""
    if method == PLANES:
        params, pieces = planes.encode(data, itemsize, level)
    elif method == ZSTD:
        params, pieces = b"", [zstd_frames.compress(data, level)]
    else:
        return RAW, b"", [data], len(data)
    return keep_or_raw(method, params, pieces, data)


def keep_or_raw(
    method: int, params: bytes, pieces: Pieces, data: memoryview
) -> tuple[int, bytes, Pieces, int]:
    """The encoding ``method`` made of ``data``, or RAW if it saves too little
    (:data:`MIN_SAVING`): (codec id, params, payload pieces, params+payload size)."""
    size = len(params) + sum(len(p) for p in pieces)
    if size > len(data) * (1 - MIN_SAVING):
        return RAW, b"", [data], len(data)
    return method, params, pieces, size


def _load_base(base: Base) -> memoryview | None:
    try:
        return base.load()
    except (ObjectNotFound, FileNotFoundError, CorruptObject):
        # A base we cannot read is no reason to fail the save: store the block
        # in full (the damage itself is verify's business).
        return None


def encode(
    raw: Buffer,
    policy: CodecPolicy,
    itemsize: int = 1,
    base: Base | None = None,
) -> Blob:
    """Encode one block into a stored chunk (envelope + params + payload).

    ``itemsize`` is the element width of the tensor the block comes from (it
    picks the byte-plane width). ``base`` offers a delta base; it is loaded
    only if deltas are enabled, the chain would stay within
    ``policy.max_delta_depth`` (else ``base.root``, if given, is tried
    instead), and the lengths match. The delta is kept if it is at most
    :data:`DELTA_ACCEPT_FRACTION` of the raw size, or smaller than
    ``policy.delta_max_ratio`` x the best full encoding.
    """
    view = _bytes_view(raw)
    n = len(view)
    if n == 0:
        return envelope.pack(RAW, 0, b"", b"")
    method = _method(policy, itemsize, n)
    if base is not None and base.depth + 1 > policy.max_delta_depth:
        base = base.root
    if (
        base is not None
        and policy.delta
        and method != RAW
        and base.depth + 1 <= policy.max_delta_depth
    ):
        base_raw = _load_base(base)
        if base_raw is not None and len(base_raw) == n:
            x = delta.xor(view, base_raw)
            w = sparse.width_for(itemsize)
            got = (
                sparse.encode(x, w, policy.level, base.chunk_id, base.depth + 1)
                if policy.sparse and sparse.usable(n, w)
                else None
            )
            if (
                got is not None
                and n >= sparse.ALWAYS_MIN_BYTES
                and got[2] <= sparse.ALWAYS_FRACTION * (n // w)
            ):
                # Few enough changes that the planes XOR cannot win (measured:
                # 0.80% vs 1.33% of raw at 1% changed): skip computing it.
                dcodec, dparams, ipieces = SPARSE, got[0], list[bytes | memoryview](got[1])
                dsize = len(dparams) + sum(len(p) for p in ipieces)
            else:
                inner, iparams, ipieces, isize = _encode_as(method, x.data, policy.level, itemsize)
                dcodec = DELTA
                dparams = delta.pack_params(base.chunk_id, base.depth + 1, inner, iparams)
                dsize = len(dparams) + isize - len(iparams)
                if got is not None:
                    ssize = len(got[0]) + sum(len(p) for p in got[1])
                    if ssize < dsize:
                        dcodec, dparams, ipieces, dsize = SPARSE, got[0], list(got[1]), ssize
            if dsize <= DELTA_ACCEPT_FRACTION * n:
                # Small enough to take without the full encoding (which would
                # cost as much again): see DELTA_ACCEPT_FRACTION.
                return _pack(dcodec, n, dparams, ipieces)
            codec, params, pieces, size = _encode_as(method, view, policy.level, itemsize)
            if dsize < policy.delta_max_ratio * size:
                return _pack(dcodec, n, dparams, ipieces)
            return _pack(codec, n, params, pieces)
    codec, params, pieces, size = _encode_as(method, view, policy.level, itemsize)
    return _pack(codec, n, params, pieces)


def _pack(codec: int, n: int, params: bytes, pieces: Sequence[bytes | memoryview]) -> Blob:
    return envelope.pack(codec, n, params, *pieces)


# ---------------------------------------------------------------- decoding


def _unpack(blob: Buffer, name: str) -> envelope.Envelope:
    env = envelope.unpack(blob, name)
    if env.codec not in CODEC_NAMES:
        raise CorruptChunk(
            f"{name}: unknown codec id {env.codec}",
            "the chunk was written by a newer apollo_cas; upgrade, or run apollo-cas verify",
        )
    return env


def _decode_plain(
    codec: int, params: memoryview, payload: memoryview, raw_size: int
) -> np.ndarray | bytes | memoryview:
    """Decode a non-delta payload (raises ValueError on inconsistency)."""
    if codec not in (RAW, ZSTD, PLANES):
        raise ValueError(f"codec id {codec} cannot be nested in a delta")
    if codec == PLANES:
        return planes.decode(params, payload, raw_size)
    if len(params):
        raise ValueError(
            f"{CODEC_NAMES.get(codec, codec)} chunk has {len(params)} parameter bytes, expected none"
        )
    if codec == RAW:
        if len(payload) != raw_size:
            raise ValueError(f"raw payload is {len(payload)} bytes, header says {raw_size}")
        return payload
    return zstd_frames.decompress_exact(payload, raw_size)


def decode(
    blob: Buffer,
    name: str = "chunk",
    load_base: Callable[[str], Buffer] | None = None,
) -> Blob:
    """Decode a stored chunk to its raw bytes (the caller verifies the hash).

    The result is ``bytes``, or a read-only memoryview of a new array (byte planes,
    deltas: the last copy into ``bytes`` cost 11% of a CPU restore's samples into
    /dev/shm, py-spy on a 2-core VM, 2026-12-03). It never shares memory with
    ``blob``, so the caller may reuse the blob's buffer.

    ``load_base(hex_id)`` returns a delta base's raw bytes (verified by the
    caller's store); it is called only for delta chunks. Raises
    :class:`CorruptChunk` naming ``name`` on any inconsistency: bad header or
    parameters, unknown codec, damaged or mis-sized zstd frames, wrong raw
    size, or a delta base that is missing, damaged or of the wrong length.
    Flips inside raw bytes cannot be seen here; the store's hash check does.
    """
    env = _unpack(blob, name)
    try:
        if env.codec == SPARSE:
            base_id, depth = sparse.parse_params(env.params)[:2]
            inner, iparams = SPARSE, env.params
        elif env.codec != DELTA:
            return _owned(_decode_plain(env.codec, env.params, env.payload, env.raw_size))
        else:
            base_id, depth, inner, iparams = delta.parse_params(env.params)
    except (ValueError, zstd_frames.FrameError) as exc:
        raise CorruptChunk(f"{name}: {exc}", _HINT) from exc
    base_hex = base_id.hex()
    base_raw = _resolve_base(name, base_hex, load_base)
    if len(base_raw) != env.raw_size:
        raise CorruptChunk(
            f"{name}: delta base {base_hex} is {len(base_raw)} bytes, the chunk needs {env.raw_size}",
            _HINT,
        )
    try:
        if inner == SPARSE:
            return _owned(sparse.decode_array(iparams, env.payload, base_raw))
        x = _decode_plain(inner, iparams, env.payload, env.raw_size)
    except (ValueError, zstd_frames.FrameError) as exc:
        raise CorruptChunk(
            f"{name}: delta (depth {depth}) against {base_hex}: {exc}", _HINT
        ) from exc
    if isinstance(x, np.ndarray):
        return _owned(delta.xor_into(x, base_raw))
    return _owned(delta.xor(x, base_raw))


def _owned(x: np.ndarray | bytes | memoryview) -> Blob:
    """``x`` as a result that shares no memory with the chunk it was decoded from: a
    new array (planes, deltas) as a read-only view of itself, bytes as they are, a
    view (a raw payload, part of the blob) copied."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, np.ndarray):
        x.flags.writeable = False
        return x.data.cast("B")
    return bytes(x)


def _resolve_base(
    name: str, base_hex: str, load_base: Callable[[str], Buffer] | None
) -> memoryview:
    if load_base is None:
        raise CorruptChunk(
            f"{name}: is a delta against chunk {base_hex}, and no base loader was given",
            "read it through the store, which resolves delta bases",
        )
    try:
        return _bytes_view(load_base(base_hex))
    except (ObjectNotFound, FileNotFoundError, KeyError) as exc:
        raise CorruptChunk(
            f"{name}: its delta base chunk {base_hex} is missing",
            "the chunk cannot be rebuilt; run apollo-cas verify to list the checkpoints it breaks",
        ) from exc
    except CorruptObject as exc:
        # The store reports a missing base as CorruptChunk too; keep its words.
        raise CorruptChunk(
            f"{name}: its delta base chunk {base_hex} cannot be read ({exc.message})",
            "the chunk cannot be rebuilt; run apollo-cas verify to list the checkpoints it breaks",
        ) from exc


# ---------------------------------------------------------------- headers


def base_of(blob: Buffer, name: str = "chunk") -> str | None:
    """The hex id of the chunk a delta-coded chunk depends on, or None.

    Needs only the envelope and parameters (the first 80 bytes are always
    enough), so a store can answer it from a ranged read.
    """
    env = _unpack(blob, name)
    if env.codec not in DELTA_CODECS:
        return None
    return _delta_head(env, name)[0].hex()


def delta_depth(blob: Buffer, name: str = "chunk") -> int:
    """The chain depth of a chunk: 0 for a full chunk, 1 + its base's for a delta."""
    env = _unpack(blob, name)
    if env.codec not in DELTA_CODECS:
        return 0
    return _delta_head(env, name)[1]


def _delta_head(env: envelope.Envelope, name: str) -> tuple[bytes, int]:
    """(base id, depth) of a delta-coded (codec 3 or 4) chunk."""
    try:
        if env.codec == SPARSE:
            return sparse.parse_params(env.params)[:2]
        return delta.parse_params(env.params)[:2]
    except ValueError as exc:
        raise CorruptChunk(f"{name}: {exc}", _HINT) from exc


def info(blob: Buffer, name: str = "chunk") -> tuple[str, int, int]:
    """(codec name, raw size, stored size) of a stored chunk, for stats and verify."""
    env = _unpack(blob, name)
    return CODEC_NAMES[env.codec], env.raw_size, len(memoryview(blob))


# ---------------------------------------------------------------- helpers


def zstd_compress(data: Buffer, level: int) -> bytes:
    """One zstd frame of ``data`` with this thread's compressor for ``level``."""
    return zstd_frames.compress(data, level)


def zstd_decompress(data: Buffer, size: int) -> bytes:
    """Decode one zstd frame that must give exactly ``size`` bytes."""
    return zstd_frames.decompress_exact(data, size)


__all__ = [
    "CODEC_IDS",
    "CODEC_NAMES",
    "DEFAULT_MAX_DELTA_DEPTH",
    "DELTA",
    "DELTA_ACCEPT_FRACTION",
    "DELTA_MAX_RATIO",
    "MIN_SAVING",
    "PLANES",
    "POLICY_CODECS",
    "RAW",
    "SPARSE",
    "ZSTD",
    "Base",
    "CodecPolicy",
    "base_of",
    "decode",
    "delta_depth",
    "encode",
    "info",
    "zstd_compress",
    "zstd_decompress",
]
