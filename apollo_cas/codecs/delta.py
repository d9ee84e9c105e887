"""XOR deltas against a base block.

After a small dense optimizer step every block changes, so block dedup saves
nothing, yet most elements keep their exact value (in bf16 a few percent
change). ``block XOR base`` is then mostly zero bytes, and where an element
did change its sign and exponent usually did not: byte planes of the XOR
compress to a few percent of the raw size.

Parameters (all integers little-endian)::

    offset  size  field
    0       16    base chunk id: XXH3-128 digest of the base block's raw bytes
    16      1     depth: 1 + the base's depth (a full chunk has depth 0), 1..255
    17      1     inner codec id of the XOR: 0 raw, 1 zstd, 2 planes
    18      ...   inner codec parameters (none for raw and zstd; see planes)

The payload is the inner codec's payload of ``raw XOR base``; the base is
exactly ``raw_size`` bytes long.
"""

from __future__ import annotations

import struct

import numpy as np

BASE_ID_SIZE = 16
_HEAD = struct.Struct("<16sBB")
HEAD_SIZE = _HEAD.size  # 18
MAX_DEPTH = 255


def pack_params(base_id: bytes, depth: int, inner: int, inner_params: bytes) -> bytes:
    """The delta codec's parameters."""
    return _HEAD.pack(base_id, depth, inner) + inner_params


def parse_params(params: memoryview | bytes) -> tuple[bytes, int, int, memoryview]:
    """(base id, depth, inner codec id, inner params); ValueError if malformed."""
    if len(params) < HEAD_SIZE:
        raise ValueError(f"delta parameters truncated ({len(params)} bytes, need {HEAD_SIZE})")
    base_id, depth, inner = _HEAD.unpack_from(params)
    if depth < 1:
        raise ValueError("delta depth 0")
    return bytes(base_id), depth, inner, memoryview(params)[HEAD_SIZE:]


def xor(a: bytes | memoryview | np.ndarray, b: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A new uint8 array ``a ^ b`` (equal lengths). Vectorised, releases the GIL."""
    x = a if isinstance(a, np.ndarray) else np.frombuffer(a, dtype=np.uint8)
    y = b if isinstance(b, np.ndarray) else np.frombuffer(b, dtype=np.uint8)
    return np.bitwise_xor(x, y)


def xor_into(out: np.ndarray, b: bytes | memoryview | np.ndarray) -> np.ndarray:
    """``out ^= b`` in place (``out`` writable uint8); returns ``out``."""
    y = b if isinstance(b, np.ndarray) else np.frombuffer(b, dtype=np.uint8)
    np.bitwise_xor(out, y, out=out)
    return out
