"""Chunk ids: XXH3-128, seed 0, of a block's raw bytes.

The digest is xxhash's canonical 16-byte form (``xxh3_128_digest``); text uses
its 32 lowercase hex characters. The GPU kernel in ``apollo_cas.gpu`` computes
the same function, so ids from either side are interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

DIGEST_SIZE = 16


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte chunk id of ``data``. Releases the GIL for large inputs."""
    return xxhash.xxh3_128_digest(data)


def digest_hex(data: bytes | bytearray | memoryview) -> str:
    """The chunk id of ``data`` as 32 lowercase hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def digest_hex_parts(parts: Iterable[bytes | bytearray | memoryview]) -> str:
    """:func:`digest_hex` of the concatenation of ``parts``, without making it."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    return h.hexdigest()
