"""Sparse deltas: the positions and values of the elements that changed.

After a small optimizer step most bf16 elements keep their exact value (TRL and
Fireworks measure 98-99%; PULSE stores an RL step as positions and values).
``block XOR base`` is then zero but for a few elements, and storing those
elements' indices and XOR values beats byte planes of the whole XOR, whose
every plane still costs zstd at least a few bits per element.

Parameters (codec 4; all integers little-endian)::

    offset  size  field
    0       16    base chunk id (as in codec 3)
    16      1     depth: 1 + the base's depth, 1..255 (as in codec 3)
    17      1     w: element width in bytes, 1, 2, 4 or 8
    18      4     n: number of changed elements (u32)
    22      4     G: stored length of the gaps frame (u32)

Payload: one zstd frame of the gaps (``4*n`` bytes: byte planes of ``n``
u32 values, plane 0 first), then one zstd frame of the values (``w*n`` bytes:
byte planes of the ``n`` w-byte XOR values), to the end of the chunk. Gap
``k`` is ``index[k] - index[k-1] - 1`` (``index[0]`` for ``k = 0``), so the
indices of the elements strictly increase and the last is below
``raw_size / w``; ``raw_size`` is a multiple of ``w``. To decode: copy the
base, XOR each value into its element.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from . import zstd_frames

WIDTHS = (1, 2, 4, 8)
_HEAD = struct.Struct("<16sBBII")
PARAMS_SIZE = _HEAD.size  # 26
_UINT: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}
#: Above this fraction of changed elements a sparse encoding cannot beat planes
#: of the XOR (each change costs 4 index bytes before zstd, ~1-2 after, plus
#: its value), so it is not even tried.
MAX_FRACTION = 0.25
#: At or below this fraction of changed elements the sparse encoding is kept
#: without computing the planes XOR to compare: measured on bf16 it is 40-45%
#: smaller there (1%: 0.80 vs 1.33% of raw; 5%: 2.96 vs 4.99%), and computing
#: both cost ~40% more CPU per dense step (MiniLM, lr 1e-6: 0.20 vs 0.14 s).
ALWAYS_FRACTION = 0.05
#: ... in blocks of at least this size (below it the 26 parameter bytes and two
#: frame headers can cost more than they save, and encoding both is cheap).
ALWAYS_MIN_BYTES = 64 << 10


def usable(n: int, w: int) -> bool:
    """Whether a block of ``n`` bytes can be sparse-coded with width ``w``."""
    return w in WIDTHS and n >= w and n % w == 0 and n // w <= 0xFFFFFFFF


def width_for(itemsize: int) -> int:
    return itemsize if itemsize in WIDTHS else 1


def byte_planes(a: np.ndarray, w: int) -> np.ndarray:
    """Byte planes of ``a`` (little-endian w-byte values): plane 0 first."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, w).T)


def from_byte_planes(planes: bytes, w: int, n: int) -> np.ndarray:
    """The ``n`` w-byte values whose byte planes are ``planes`` (:func:`byte_planes`'s inverse)."""
    p = np.frombuffer(planes, dtype=np.uint8).reshape(w, n)
    return np.ascontiguousarray(p.T).view(_UINT[w]).reshape(n)


def encode(
    x: np.ndarray, w: int, level: int, base_id: bytes, depth: int
) -> tuple[bytes, list[bytes], int] | None:
    """(params, payload pieces, elements changed) for the XOR ``x`` (uint8), or None if
    more than :data:`MAX_FRACTION` of the elements changed."""
    xv = x.view(_UINT[w])
    idx = np.flatnonzero(xv)
    n = len(idx)
    if n > MAX_FRACTION * len(xv):
        return None
    gaps = np.diff(idx, prepend=-1) - 1 if n else np.empty(0, dtype=np.int64)
    gframe = zstd_frames.compress_plane(byte_planes(gaps.astype("<u4"), 4).data, level)
    vframe = zstd_frames.compress_plane(byte_planes(np.ascontiguousarray(xv[idx]), w).data, level)
    params = _HEAD.pack(base_id, depth, w, n, len(gframe))
    return params, [gframe, vframe], n


def parse_params(params: memoryview | bytes) -> tuple[bytes, int, int, int, int]:
    """(base id, depth, w, n, gaps frame length); ValueError if malformed."""
    if len(params) != PARAMS_SIZE:
        raise ValueError(f"sparse parameters are {len(params)} bytes, expected {PARAMS_SIZE}")
    base_id, depth, w, n, glen = _HEAD.unpack_from(params)
    if depth < 1:
        raise ValueError("sparse delta depth 0")
    if w not in WIDTHS:
        raise ValueError(f"sparse element width {w} (expected 1, 2, 4 or 8)")
    return bytes(base_id), depth, w, n, glen


def decode(params: memoryview | bytes, payload: memoryview, base: memoryview) -> bytes:
    """``base`` with the stored changes XORed in; ValueError on any inconsistency.

    ``base`` is the verified base block (its length is the chunk's raw size).
    Nothing is allocated beyond ``n`` entries, bounded by the raw size.
    """
    return decode_array(params, payload, base).tobytes()


def decode_array(params: memoryview | bytes, payload: memoryview, base: memoryview) -> np.ndarray:
    """:func:`decode` into a new uint8 array (no copy into ``bytes``)."""
    _base_id, _depth, w, n, glen = parse_params(params)
    size = len(base)
    if size % w:
        raise ValueError(f"raw size {size} is not a multiple of the element width {w}")
    m = size // w
    if n > m:
        raise ValueError(f"{n} changed elements in a block of {m}")
    if glen > len(payload):
        raise ValueError(f"gaps frame of {glen} bytes runs past the payload ({len(payload)})")
    gaps = from_byte_planes(zstd_frames.decompress_exact(payload[:glen], 4 * n), 4, n)
    values = from_byte_planes(zstd_frames.decompress_exact(payload[glen:], w * n), w, n)
    idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if n and idx[-1] >= m:
        raise ValueError(f"changed element {int(idx[-1])} is past the block's {m} elements")
    out = np.frombuffer(base, dtype=np.uint8).copy()
    ov = out.view(_UINT[w])
    ov[idx] ^= values
    return out
