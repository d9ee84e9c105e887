"""Codec-3 chunks (XOR delta, inner planes or zstd) from XOR byte planes already split.

The GPU delta save (:mod:`apollo_cas.gpu.delta_save`) XORs a live block against its
parent's block and splits the XOR into byte planes on the device; only the planes
that are not all zero cross PCIe. This module turns one block's planes into exactly
the stored chunk :func:`apollo_cas.codecs.encode` would write for the same XOR (same
envelope, delta parameters, plane kinds, zstd parameters), so today's decoder reads it
unchanged (docs/CODECS.md, codec 3 with inner codec 2 or 1).

Where the release has the sparse delta (codec 4, positions and values of the changed
elements) and the policy tries it, the same XOR is also encoded that way and the smaller
kept, as ``codecs.encode`` does.

An all-zero plane never reaches the host: its zstd frame depends only on its length
and level, so it is compressed once and reused (:func:`zero_frame`).

The choice between the delta and a full chunk follows ``codecs.encode``: a delta of
at most :data:`~apollo_cas.codecs.DELTA_ACCEPT_FRACTION` of the raw size is kept as
it is; a larger one is kept only if it is below ``policy.delta_max_ratio`` times the
full encoding, which needs the live block on the host (:func:`choose`).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import codecs
from ..codecs import delta, envelope, planes, zstd_frames
from ..codecs.envelope import Blob
from ..codecs.sparse import byte_planes


@functools.lru_cache(maxsize=64)
def zero_frame(m: int, level: int, plane: bool = True) -> bytes:
    """The zstd frame of ``m`` zero bytes (the same bytes the compressor gives)."""
    zeros = bytes(m)
    return zstd_frames.compress_plane(zeros, level) if plane else zstd_frames.compress(zeros, level)


@dataclass(frozen=True)
class DeltaBlob:
    """An encoded delta chunk, or the verdict that its XOR does not compress."""

    blob: Blob | None  # None: the XOR does not compress (a full chunk will win)
    size: int  # params + payload, as codecs.encode compares them (0 when blob is None)
    raw_size: int

    @property
    def accepted(self) -> bool:
        """Small enough to keep without computing the full encoding."""
        return self.blob is not None and self.size <= codecs.DELTA_ACCEPT_FRACTION * self.raw_size


def sparse_codec() -> Any:
    """The sparse delta codec module (codec 4) when this release has it, else None."""
    return getattr(codecs, "sparse", None) if hasattr(codecs, "SPARSE") else None


def sparse_wanted(policy: codecs.CodecPolicy) -> bool:
    """Whether ``policy`` tries the sparse delta too (as ``codecs.encode`` does)."""
    return sparse_codec() is not None and bool(getattr(policy, "sparse", False))


# Codec 4's parameters (readpath's docs/CODECS.md): base id, depth, w, n, gaps frame length.
_SPARSE_HEAD = struct.Struct("<16sBBII")
#: Codec 4 is not tried above this fraction of changed elements (as codecs.sparse).
SPARSE_MAX_FRACTION = 0.25


@dataclass(frozen=True)
class SparsePlanes:
    """A block's changed elements as codec 4 compresses them: ``n`` elements, the byte
    planes of their gaps (``4*n`` bytes, plane 0 first) and of their XOR values
    (``w*n`` bytes). The GPU delta save builds these on the device
    (:func:`apollo_cas.gpu.delta_ops.sparse_planes`), so the host only compresses."""

    n: int
    gaps: Any
    values: Any


def sparse_planes_of(idx: np.ndarray, values: Any, ws: int) -> SparsePlanes:
    """:class:`SparsePlanes` from the changed elements' indices (increasing) and their
    ``ws``-byte XOR values, on the host."""
    n = len(idx)
    gaps = np.diff(idx.astype(np.int64), prepend=-1) - 1 if n else np.empty(0, dtype=np.int64)
    vals = np.frombuffer(values, dtype=np.uint8)
    return SparsePlanes(n, byte_planes(gaps.astype("<u4"), 4).data, byte_planes(vals, ws).data)


def encode_sparse_planes(
    sp: SparsePlanes, ws: int, level: int, base_id: bytes, depth: int
) -> tuple[bytes, list[bytes]]:
    """Codec 4's (params, payload pieces) of these planes: what ``codecs.sparse.encode``
    writes for the same XOR (two zstd frames; the GIL is released while they run)."""
    gframe = zstd_frames.compress_plane(sp.gaps, level)
    vframe = zstd_frames.compress_plane(sp.values, level)
    return _SPARSE_HEAD.pack(base_id, depth, ws, sp.n, len(gframe)), [gframe, vframe]


def encode_sparse(
    idx: np.ndarray, values: Any, ws: int, level: int, base_id: bytes, depth: int
) -> tuple[bytes, list[bytes]]:
    """Codec 4's (params, payload pieces) from the changed elements' indices (increasing)
    and their ``ws``-byte XOR values: what ``codecs.sparse.encode`` writes for that XOR,
    with the positions found on the device instead of by a host scan of the block."""
    return encode_sparse_planes(sparse_planes_of(idx, values, ws), ws, level, base_id, depth)


def interleave(planes_: Sequence[Any], w: int, m: int) -> np.ndarray:
    """The XOR block (``m`` elements of ``w`` bytes) from its planes (None: all zero)."""
    if w == 2 and all(p is not None for p in planes_):
        out = np.empty(m * 2, dtype=np.uint8)
        lanes = out.view("<u2")
        lanes[:] = np.frombuffer(planes_[1], dtype=np.uint8)
        lanes <<= 8
        lanes |= np.frombuffer(planes_[0], dtype=np.uint8)
        return out
    out = np.zeros(m * w, dtype=np.uint8)
    body = out.reshape(m, w)
    for k in range(w):
        if planes_[k] is not None:
            body[:, k] = np.frombuffer(planes_[k], dtype=np.uint8)
    return out


def sparse_outright(raw_size: int, ws: int, changed: int) -> bool:
    """Whether ``codecs.encode`` keeps codec 4 for this block without computing codec 3
    (readpath's rule: at most ``ALWAYS_FRACTION`` of the elements changed, in blocks of
    at least ``ALWAYS_MIN_BYTES``); False where the release has no such rule."""
    sp = sparse_codec()
    min_bytes = getattr(sp, "ALWAYS_MIN_BYTES", None)
    fraction = getattr(sp, "ALWAYS_FRACTION", None)
    if sp is None or min_bytes is None or fraction is None or not sp.usable(raw_size, ws):
        return False
    return raw_size >= min_bytes and changed <= fraction * (raw_size // ws)


def _blob(codec: int, raw_size: int, params: bytes, pieces: Sequence[Any], size: int) -> DeltaBlob:
    return DeltaBlob(envelope.pack(codec, raw_size, params, *pieces), size, raw_size)


def outright_many(
    items: Sequence[tuple[SparsePlanes, int, bytes, int]], raw_size: int, level: int
) -> list[DeltaBlob | None]:
    """:func:`encode_delta` of blocks whose planes stayed on the device (codec 4 taken
    outright), byte for byte, with every zstd frame of the group made in one call.

    ``items``: per block its changed elements' planes, ``itemsize``, base id and
    depth. Block by block, each of a dense step's 8 encoding threads made two short
    zstd calls and re-took the GIL after each (33,000 times for 17.1 GB), and py-spy
    found them waiting there for most of the step while the device thread waited for
    their slots (1.3 s of a 3.9 s step; H200, 2026-12-04 session 2, run 1). None where
    the rule of :func:`sparse_outright` does not hold: the caller encodes that block
    with :func:`encode_delta`.
    """
    sp = sparse_codec()
    out: list[DeltaBlob | None] = [None] * len(items)
    todo: list[int] = []
    inputs: list[Any] = []
    for i, (changes, itemsize, _, _) in enumerate(items):
        ws = sp.width_for(itemsize) if sp is not None else 0
        if (
            sp is None
            or not sp.usable(raw_size, ws)
            or not sparse_outright(raw_size, ws, changes.n)
        ):
            continue
        todo.append(i)
        inputs += [changes.gaps, changes.values]
    frames = zstd_frames.compress_planes(inputs, level)
    spid = getattr(codecs, "SPARSE", 4)
    for j, i in enumerate(todo):
        changes, itemsize, base_id, depth = items[i]
        ws = sp.width_for(itemsize) if sp is not None else 0
        gframe, vframe = frames[2 * j], frames[2 * j + 1]
        params = _SPARSE_HEAD.pack(base_id, depth, ws, changes.n, len(gframe))
        size = len(params) + len(gframe) + len(vframe)
        out[i] = _blob(spid, raw_size, params, [gframe, vframe], size)
    return out


def encode_delta(
    planes_: Sequence[memoryview | None],
    w: int,
    raw_size: int,
    base_id: bytes,
    depth: int,
    level: int,
    itemsize: int = 1,
    sparse: bool = False,
    changes: SparsePlanes | tuple[np.ndarray, Any] | None = None,
    changed: int | None = None,
    planes_dropped: bool = False,
) -> DeltaBlob:
    """The delta chunk of a block whose XOR against ``base_id`` has these planes.

    ``planes_[k]`` is plane k of the XOR (``raw_size // w`` bytes), or None when it is
    all zero; ``w`` is 1 for an inner zstd codec (the one "plane" is the XOR itself),
    else 2, 4 or 8 for inner planes (``raw_size`` a multiple of ``w``: no tail).
    ``depth`` is the new chunk's depth (1 + the base's). With ``sparse`` (a release
    with codec 4 and a policy that tries it) the sparse delta of the same XOR is also
    encoded, and kept as ``codecs.encode`` chooses (outright when few elements changed,
    see :func:`sparse_outright`: then ``planes_`` is not read; else if smaller): from
    ``changes`` (the changed elements' planes, or their indices and value bytes,
    found on the device) when given, else by the codec's own scan of the XOR; ``changed`` (the count, when
    known) skips the scan of a block with too many changes. ``planes_dropped``: the
    caller left the planes on the device because codec 4 is taken outright; anything
    else is an error (never a codec-3 chunk of planes that were not there).
    """
    if raw_size % w:
        raise ValueError(f"raw size {raw_size} is not a multiple of {w}")
    m = raw_size // w
    spid = getattr(codecs, "SPARSE", 4)
    sp = sparse_codec() if sparse else None
    got: tuple[bytes, list[Any], int | None] | None = None
    if sp is not None:
        ws = sp.width_for(itemsize)
        max_fraction = getattr(sp, "MAX_FRACTION", SPARSE_MAX_FRACTION)
        if not sp.usable(raw_size, ws):
            pass
        elif changes is not None:
            if not isinstance(changes, SparsePlanes):
                changes = sparse_planes_of(changes[0], changes[1], ws)
            sparams, spieces = encode_sparse_planes(changes, ws, level, base_id, depth)
            got = (sparams, spieces, changes.n)
        elif changed is None or changed <= max_fraction * (raw_size // ws):
            r = sp.encode(interleave(planes_, w, m), ws, level, base_id, depth)
            if r is not None:
                got = (r[0], list(r[1]), r[2] if len(r) > 2 else None)
        if got is not None and got[2] is not None and sparse_outright(raw_size, ws, got[2]):
            ssize = len(got[0]) + sum(len(x) for x in got[1])
            return _blob(spid, raw_size, got[0], got[1], ssize)
    if planes_dropped:
        raise RuntimeError("a block's planes stayed on the device but codec 4 was not taken")
    if w == 1:
        p = planes_[0]
        frame = zero_frame(m, level, plane=False) if p is None else zstd_frames.compress(p, level)
        pieces: list[bytes | memoryview] = [frame]
        inner, iparams = codecs.ZSTD, b""
    else:
        frames = [
            zero_frame(m, level) if p is None else zstd_frames.compress_plane(p, level)
            for p in planes_[:w]
        ]
        iparams, pieces = planes.assemble(planes_[:w], b"", frames, m)
        inner = codecs.PLANES
    isize = len(iparams) + sum(len(x) for x in pieces)
    # codecs.encode stores an XOR that does not compress raw; such a codec-3 delta never
    # beats the block's full encoding (at most raw_size) by the 0.8 factor.
    raw_inner = isize > raw_size * (1 - codecs.MIN_SAVING)
    dsize = delta.HEAD_SIZE + (raw_size if raw_inner else isize)
    best: tuple[int, bytes, list[Any]] | None = None
    if not raw_inner:
        best = (codecs.DELTA, delta.pack_params(base_id, depth, inner, iparams), pieces)
    if got is not None:
        ssize = len(got[0]) + sum(len(x) for x in got[1])
        if ssize < dsize:
            best, dsize = (spid, got[0], got[1]), ssize
    if best is None:
        return DeltaBlob(None, 0, raw_size)
    return _blob(best[0], raw_size, best[1], best[2], dsize)


def choose(d: DeltaBlob, raw: memoryview, policy: codecs.CodecPolicy, itemsize: int) -> Blob:
    """The chunk to store for a delta that was not accepted outright: the delta if it is
    below ``policy.delta_max_ratio`` of the full encoding of ``raw``, else the full one."""
    full = codecs.encode(raw, policy, itemsize)
    full_size = len(full) - envelope.HEADER_SIZE
    if d.blob is not None and d.size < policy.delta_max_ratio * full_size:
        return d.blob
    return full
