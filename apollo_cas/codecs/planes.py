"""Byte planes: split w-byte elements into w planes, compress each plane.

Floats keep their sign and exponent in the top byte(s) and near-random
mantissa bits below. Interleaved, zstd sees a byte stream of high entropy and
compresses bf16 weights about 1.28x; split into planes, the exponent plane
compresses about 2.9x and the mantissa plane is stored as it is, 1.46x overall
(measured on MiniLM, see docs/CODECS.md).

Parameters (``2 + 5*w`` bytes; all integers little-endian)::

    offset     size  field
    0          1     w: element width in bytes, 2, 4 or 8
    1          1     flags: 0 (reserved; a reader rejects anything else)
    2 + 5*k    1     plane k kind: 0 raw, 1 one zstd frame
    3 + 5*k    4     plane k stored length in bytes (u32)

Plane k holds byte k of every element (little-endian element order, so for
bf16 plane 1 is sign + 7 exponent bits). With ``m = raw_size // w``, every
plane decodes to ``m`` bytes. The payload is plane 0, plane 1, ..., plane w-1,
then the tail: the last ``raw_size % w`` bytes of the block, raw.

*Framed* planes (flags 1, docs/CODECS.md): a plane of kind 2 is several zstd
frames of ``F`` decoded bytes each (the last shorter), for GPU decoders that
want many short frames; ``F`` (u32) and every kind-2 plane's frame lengths (u32
each) follow the per-plane fields.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import zstd_frames

WIDTHS = (2, 4, 8)
PLANE_RAW = 0
PLANE_ZSTD = 1
#: Several zstd frames of ``F`` decoded bytes each (framed planes only).
PLANE_FRAMES = 2
#: The flags value of framed planes.
FRAMED = 1
#: ``F`` is a multiple of this (every frame's output 16-byte aligned, and more) ...
FRAME_ALIGN = 4096
#: ... and at least this: one frame, and its alignment padding, per 64 KiB of plane.
MIN_FRAME_BYTES = 64 << 10
_KINDS = frozenset((PLANE_RAW, PLANE_ZSTD))
_FRAMED_KINDS = frozenset((PLANE_RAW, PLANE_ZSTD, PLANE_FRAMES))
_HEAD = struct.Struct("<BB")
_PLANE = struct.Struct("<BI")
_U32 = struct.Struct("<I")
#: every plane's (kind, length) of a width, as one struct
_LAYOUTS = {w: struct.Struct("<" + "BI" * w) for w in WIDTHS}
#: A plane is stored compressed only if that saves at least this fraction:
#: decoding a raw plane is a copy, decoding a barely-compressed one is not.
PLANE_MIN_SAVING = 0.02
_MAX_PLANE = 0xFFFFFFFF


def params_size(w: int) -> int:
    """Length of the parameters for width ``w`` (unframed)."""
    return _HEAD.size + _PLANE.size * w


def check_frame_bytes(frame_bytes: int) -> None:
    """ValueError unless ``frame_bytes`` is 0 (one frame per plane) or a valid ``F``."""
    if frame_bytes and (frame_bytes < MIN_FRAME_BYTES or frame_bytes % FRAME_ALIGN):
        raise ValueError(
            f"plane frames of {frame_bytes} bytes: use 0 (one frame per plane) or a "
            f"multiple of {FRAME_ALIGN} of at least {MIN_FRAME_BYTES}"
        )


def frame_spans(m: int, frame_bytes: int) -> list[tuple[int, int]]:
    """(start, length) of the pieces of an ``m``-byte plane that are compressed into
    one frame each: the whole plane when ``frame_bytes`` is 0 or the plane is no
    longer, else ``frame_bytes`` each (the last: the rest)."""
    if not frame_bytes or m <= frame_bytes:
        return [(0, m)]
    return [(a, min(frame_bytes, m - a)) for a in range(0, m, frame_bytes)]


def cut(plane: Any, frame_bytes: int) -> list[memoryview]:
    """The pieces of ``plane`` of :func:`frame_spans`."""
    view = memoryview(plane).cast("B")
    return [view[a : a + n] for a, n in frame_spans(len(view), frame_bytes)]


def usable(n: int, w: int) -> bool:
    """Whether a block of ``n`` bytes can be plane-coded with width ``w``."""
    return w in WIDTHS and n >= w and n // w <= _MAX_PLANE


def split(raw: bytes | memoryview, w: int) -> tuple[np.ndarray, memoryview]:
    """The (w, m) array of planes (row k = byte k of each element) and the tail.

    One vectorised transposing copy (about 3 GB/s per core); no Python loop
    over elements.
    """
    a = np.frombuffer(raw, dtype=np.uint8)
    m = len(a) // w
    planes = np.ascontiguousarray(a[: m * w].reshape(m, w).T)
    return planes, a[m * w :].data


def encode(
    raw: bytes | memoryview, w: int, level: int, frame_bytes: int = 0
) -> tuple[bytes, list[bytes | memoryview]]:
    """Plane-code a block: (parameters, payload pieces). Requires ``usable(len, w)``.
    ``frame_bytes``: 0 for one zstd frame per plane, else framed planes of that ``F``."""
    planes, tail = split(raw, w)
    frames = [[zstd_frames.compress_plane(x, level) for x in cut(p, frame_bytes)] for p in planes]
    return assemble(planes, tail, frames, frame_bytes)


def assemble(
    planes: Sequence[Any] | np.ndarray,
    tail: memoryview | bytes,
    frames: Sequence[Sequence[bytes | memoryview]],
    frame_bytes: int = 0,
    m: int | None = None,
) -> tuple[bytes, list[bytes | memoryview]]:
    """(parameters, payload pieces) of a block from its planes (:func:`split`) and
    each plane's zstd frames (one, or its :func:`cut` pieces' one each): the frames
    are kept where together they save enough, else the plane is stored raw.
    :func:`encode`, the batched encoder and the GPU delta encoder share it; the last
    passes ``m`` and None for a plane it knows is all zero (whose frames always
    save enough)."""
    w = len(planes)
    if m is None:
        first = planes[0]
        assert first is not None
        m = len(memoryview(first).cast("B"))
    heads: list[bytes] = []
    pieces: list[bytes | memoryview] = []
    framed: list[Sequence[bytes | memoryview]] = []
    limit = m * (1 - PLANE_MIN_SAVING)
    for plane, fs in zip(planes, frames, strict=True):
        stored = sum(len(f) for f in fs)
        if stored < limit:
            heads.append(_PLANE.pack(PLANE_FRAMES if len(fs) > 1 else PLANE_ZSTD, stored))
            pieces.extend(fs)
            if len(fs) > 1:
                framed.append(fs)
        else:
            if plane is None:
                raise ValueError("an all-zero plane whose frames do not compress")
            heads.append(_PLANE.pack(PLANE_RAW, m))
            pieces.append(memoryview(plane).cast("B"))
    if len(tail):
        pieces.append(tail)
    if not framed:
        return _HEAD.pack(w, 0) + b"".join(heads), pieces
    lengths = [len(f) for fs in framed for f in fs]
    tables = struct.pack(f"<{len(lengths)}I", *lengths)
    return _HEAD.pack(w, FRAMED) + b"".join(heads) + _U32.pack(frame_bytes) + tables, pieces


def parse_params(
    params: memoryview | bytes, m: int | None = None
) -> tuple[int, list[tuple[int, int]], list[tuple[int, ...]]]:
    """(w, [(kind, stored length), ...], frames) from the parameters; ValueError if
    malformed. ``frames[k]`` is plane k's frames' stored lengths: one for kind 1, the
    table for kind 2, none for a raw plane. Framed parameters need ``m`` (the plane
    length) to check their tables."""
    if len(params) < _HEAD.size:
        raise ValueError("planes parameters truncated")
    w, flags = _HEAD.unpack_from(params)
    if w not in WIDTHS:
        raise ValueError(f"planes element width {w} (expected 2, 4 or 8)")
    if flags not in (0, FRAMED):
        raise ValueError(f"planes flags {flags:#x} unknown to this version")
    fixed = params_size(w)
    if len(params) < fixed or (not flags and len(params) != fixed):
        raise ValueError(f"planes parameters are {len(params)} bytes, expected {fixed}")
    # One unpack of every plane's (kind, length): a restore parses ~16k of these per
    # 17 GB under the GIL, and one struct call per plane was a third of the parse.
    flat = _LAYOUTS[w].unpack_from(params, _HEAD.size)
    kinds, lengths = flat[::2], flat[1::2]
    allowed = _FRAMED_KINDS if flags else _KINDS
    if not allowed.issuperset(kinds):
        k = next(k for k, kind in enumerate(kinds) if kind not in allowed)
        raise ValueError(f"plane {k} has unknown kind {kinds[k]}")
    layout = list(zip(kinds, lengths, strict=True))
    if not flags:
        return w, layout, [(n,) if kind else () for kind, n in layout]
    return w, layout, _frame_tables(params, fixed, layout, m)


def _frame_tables(
    params: memoryview | bytes, fixed: int, layout: list[tuple[int, int]], m: int | None
) -> list[tuple[int, ...]]:
    """Framed planes' per-plane frame lengths, every table checked against ``m``."""
    if m is None:
        raise ValueError("framed planes parameters need the plane length")
    if len(params) < fixed + _U32.size:
        raise ValueError("framed planes parameters lack the frame size")
    (f,) = _U32.unpack_from(params, fixed)
    try:
        check_frame_bytes(f)
    except ValueError as exc:
        raise ValueError(f"framed planes: {exc}") from None
    if not f:
        raise ValueError("framed planes with a frame size of 0")
    n = -(-m // f)
    framed = [k for k, (kind, _) in enumerate(layout) if kind == PLANE_FRAMES]
    if not framed:
        raise ValueError("framed planes parameters with no plane of kind 2")
    want = fixed + _U32.size + 4 * n * len(framed)
    if len(params) != want:
        raise ValueError(f"planes parameters are {len(params)} bytes, expected {want}")
    table = struct.unpack_from(f"<{n * len(framed)}I", params, fixed + _U32.size)
    out: list[tuple[int, ...]] = [(ln,) if kind else () for kind, ln in layout]
    for i, k in enumerate(framed):
        lengths = table[i * n : (i + 1) * n]
        if sum(lengths) != layout[k][1] or not all(lengths):
            raise ValueError(
                f"plane {k}'s {n} frame lengths sum to {sum(lengths)} (each above 0), "
                f"its stored length is {layout[k][1]}"
            )
        out[k] = lengths
    return out


def frame_size_of(params: memoryview | bytes) -> int:
    """``F`` of framed parameters (already checked by :func:`parse_params`), else 0."""
    if len(params) < _HEAD.size or params[1] != FRAMED:
        return 0
    return int(_U32.unpack_from(params, params_size(params[0]))[0])


def decode(params: memoryview | bytes, payload: memoryview, raw_size: int) -> np.ndarray:
    """Decode a plane-coded payload into a new uint8 array of ``raw_size`` bytes.

    Raises ValueError (or ``zstd_frames.FrameError``) on any inconsistency between
    the parameters, the payload and ``raw_size``.
    """
    w = params[0] if len(params) else 0
    m, tail = divmod(raw_size, w) if w in WIDTHS else (0, 0)
    w, layout, frames = parse_params(params, m)
    if m == 0:
        raise ValueError(f"raw size {raw_size} is smaller than one {w}-byte element")
    stored = sum(length for _kind, length in layout)
    if stored + tail != len(payload):
        raise ValueError(f"planes need {stored} + {tail} tail bytes, payload has {len(payload)}")
    f = frame_size_of(params)
    pos = 0
    decoded: list[np.ndarray] = []
    for k, (kind, length) in enumerate(layout):
        piece = payload[pos : pos + length]
        pos += length
        if kind == PLANE_RAW:
            if length != m:
                raise ValueError(f"raw plane {k} is {length} bytes, expected {m}")
            decoded.append(np.frombuffer(piece, dtype=np.uint8))
        elif kind == PLANE_ZSTD:
            decoded.append(np.frombuffer(zstd_frames.decompress_exact(piece, m), dtype=np.uint8))
        else:
            decoded.append(_decode_frames(piece, frames[k], f, m))
    # Allocate only now: every plane has proved it holds m bytes, so a damaged
    # raw size in the header cannot make us allocate what the chunk cannot fill.
    out = np.empty(raw_size, dtype=np.uint8)
    body = out[: m * w].reshape(m, w)
    if w == 2:
        # Shift-and-or on little-endian 16-bit lanes: ~3x faster than a strided
        # byte copy (and still byte-exact on a big-endian host, only slower).
        lanes = out[: m * w].view("<u2")
        lanes[:] = decoded[1]
        lanes <<= 8
        lanes |= decoded[0]
    else:
        for k in range(w):
            body[:, k] = decoded[k]
    if tail:
        out[m * w :] = np.frombuffer(payload[pos:], dtype=np.uint8)
    return out


def _decode_frames(piece: memoryview, lengths: Sequence[int], f: int, m: int) -> np.ndarray:
    """A kind-2 plane: its frames, each exactly its ``F`` bytes (the last: the rest)."""
    plane = np.empty(m, dtype=np.uint8)
    at = 0
    for j, n in enumerate(lengths):
        size = min(f, m - j * f)
        raw = zstd_frames.decompress_exact(piece[at : at + n], size)
        plane[j * f : j * f + size] = np.frombuffer(raw, dtype=np.uint8)
        at += n
    return plane
