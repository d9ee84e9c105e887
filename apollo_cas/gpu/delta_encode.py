"""Codec-3 chunks (XOR delta, inner planes or zstd) from XOR byte planes already split.

The GPU delta save (:mod:`apollo_cas.gpu.delta_save`) XORs a live block against its
parent's block and splits the XOR into byte planes on the device; only the planes
that are not all zero cross PCIe. This module turns one block's planes into exactly
the stored chunk :func:`apollo_cas.codecs.encode` would write for the same XOR (same
envelope, delta parameters, plane kinds, zstd parameters), so today's decoder reads it
unchanged (docs/CODECS.md, codec 3 with inner codec 2 or 1).

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

from .. import codecs
from ..codecs import _zstd, delta, envelope, planes

# The planes parameter layout of docs/CODECS.md (codec 2): w, flags, then per plane
# (kind u8, stored length u32).
_PLANES_HEAD = struct.Struct("<BB")
_PLANE = struct.Struct("<BI")


@functools.lru_cache(maxsize=64)
def zero_frame(m: int, level: int, plane: bool = True) -> bytes:
    """The zstd frame of ``m`` zero bytes (the same bytes the compressor gives)."""
    zeros = bytes(m)
    return _zstd.compress_plane(zeros, level) if plane else _zstd.compress(zeros, level)


@dataclass(frozen=True)
class DeltaBlob:
    """An encoded delta chunk, or the verdict that its XOR does not compress."""

    blob: bytes | None  # None: the XOR does not compress (a full chunk will win)
    size: int  # params + payload, as codecs.encode compares them (0 when blob is None)
    raw_size: int

    @property
    def accepted(self) -> bool:
        """Small enough to keep without computing the full encoding."""
        return self.blob is not None and self.size <= codecs.DELTA_ACCEPT_FRACTION * self.raw_size


def encode_delta(
    planes_: Sequence[memoryview | None],
    w: int,
    raw_size: int,
    base_id: bytes,
    depth: int,
    level: int,
) -> DeltaBlob:
    """The codec-3 chunk of a block whose XOR against ``base_id`` has these planes.

    ``planes_[k]`` is plane k of the XOR (``raw_size // w`` bytes), or None when it is
    all zero; ``w`` is 1 for an inner zstd codec (the one "plane" is the XOR itself),
    else 2, 4 or 8 for inner planes (``raw_size`` a multiple of ``w``: no tail).
    ``depth`` is the new chunk's depth (1 + the base's).
    """
    if raw_size % w:
        raise ValueError(f"raw size {raw_size} is not a multiple of {w}")
    m = raw_size // w
    if w == 1:
        p = planes_[0]
        frame = zero_frame(m, level, plane=False) if p is None else _zstd.compress(p, level)
        inner, iparams, pieces = codecs.ZSTD, b"", [frame]
    else:
        heads = [_PLANES_HEAD.pack(w, 0)]
        pieces = []
        limit = m * (1 - planes.PLANE_MIN_SAVING)
        for k in range(w):
            p = planes_[k]
            frame = zero_frame(m, level) if p is None else _zstd.compress_plane(p, level)
            if len(frame) < limit:
                heads.append(_PLANE.pack(planes.PLANE_ZSTD, len(frame)))
                pieces.append(frame)
            else:
                assert p is not None  # a zero plane always compresses
                heads.append(_PLANE.pack(planes.PLANE_RAW, m))
                pieces.append(bytes(p))
        inner, iparams = codecs.PLANES, b"".join(heads)
    isize = len(iparams) + sum(len(x) for x in pieces)
    if isize > raw_size * (1 - codecs.MIN_SAVING):
        # codecs.encode would store the XOR raw, and such a delta never beats the
        # block's full encoding (at most raw_size) by the 0.8 factor: a full chunk.
        return DeltaBlob(None, 0, raw_size)
    dparams = delta.pack_params(base_id, depth, inner, iparams)
    blob = envelope.pack(codecs.DELTA, raw_size, dparams, b"".join(pieces))
    return DeltaBlob(blob, len(dparams) + isize - len(iparams), raw_size)


def choose(d: DeltaBlob, raw: memoryview, policy: codecs.CodecPolicy, itemsize: int) -> bytes:
    """The chunk to store for a delta that was not accepted outright: the delta if it is
    below ``policy.delta_max_ratio`` of the full encoding of ``raw``, else the full one."""
    full = codecs.encode(raw, policy, itemsize)
    full_size = len(full) - envelope.HEADER_SIZE
    if d.blob is not None and d.size < policy.delta_max_ratio * full_size:
        return d.blob
    return full
