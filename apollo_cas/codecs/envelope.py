"""The chunk envelope: a fixed header in front of every stored chunk.

::

    offset  size  field
    0       4     magic b"APCK"
    4       1     envelope version (1)
    5       1     codec id (see apollo_cas.codecs.CODEC_IDS)
    6       2     reserved, zero
    8       8     raw size: length of the decoded block (u64 little-endian)
    16      4     P: length of the codec parameters (u32 little-endian)
    20      P     codec parameters (codec-specific)
    20+P    ...   payload

The chunk's *name* is the XXH3-128 of the decoded bytes, so a reader always
decodes, then hashes, then compares: the header can be checked against the
name, and the codec can change without breaking dedup.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from ..errors import CorruptChunk, FormatVersionError

MAGIC = b"APCK"
ENVELOPE_VERSION = 1
_HEAD = struct.Struct("<4sBBHQI")
HEADER_SIZE = _HEAD.size  # 20

#: A stored chunk as :func:`pack` returns it: bytes when small, else a read-only-by-
#: convention view of a numpy buffer (see :func:`pack`). Both have ``len`` and the
#: buffer protocol, which is all a backend, a pack writer or a hash needs.
Blob = bytes | memoryview

#: Chunks at least this large are assembled with numpy's copies, which release the
#: GIL; smaller ones with ``bytes.join`` (microseconds under the GIL).
_GIL_FREE_MIN = 64 << 10


class Envelope(NamedTuple):
    """A parsed chunk header plus views of its parameters and payload.

    A tuple, not a frozen dataclass: a GPU restore parses ~16k envelopes per 17 GB on
    its read threads under the GIL, and a frozen dataclass took 1.6 us to build
    against 0.33 us (CPython 3.11, the CI machine)."""

    codec: int
    raw_size: int
    params: memoryview
    payload: memoryview


def pack(
    codec: int,
    raw_size: int,
    params: bytes,
    *payload: bytes | bytearray | memoryview,
) -> Blob:
    """Build a stored chunk from its parts: the payload is the pieces ``payload`` (a
    codec's planes or frames) back to back, in the one copy that builds the chunk.

    Why not ``bytes.join``: CPython holds the GIL through a join under 1 MiB (a 1 MiB
    bf16 block's chunk is ~0.7 MB), and the copy page-faults a fresh allocation, so
    16 encoding threads queued behind each other's joins: ``codecs.encode`` ran 3.8x
    one thread's rate on 16 cores of the H200 host, where its parts (plane split,
    zstd) scaled 9-11x (benchmarks/results/h200_2026-12-02_packsave/encode_scaling.json).
    numpy's copy into ``np.empty`` releases the GIL; on the 2-core CI machine two
    threads encode 2.02 GB/s this way against 1.83 GB/s with the join.
    """
    head = _HEAD.pack(MAGIC, ENVELOPE_VERSION, codec, 0, raw_size, len(params))
    sizes = [memoryview(p).nbytes for p in payload]
    total = len(head) + len(params) + sum(sizes)
    if total < _GIL_FREE_MIN:
        return b"".join((head, params, *payload))
    out = np.empty(total, np.uint8)
    pos = len(head) + len(params)
    out[: len(head)] = np.frombuffer(head, np.uint8)
    out[len(head) : pos] = np.frombuffer(params, np.uint8)
    for piece, n in zip(payload, sizes, strict=True):
        out[pos : pos + n] = np.frombuffer(piece, np.uint8)
        pos += n
    return out.data


def unpack(blob: bytes | bytearray | memoryview, name: str | bytes = "chunk") -> Envelope:
    """Parse a stored chunk; raises CorruptChunk naming ``name`` on any inconsistency
    (a chunk id as bytes is named ``chunk <hex>``, formatted only for an error)."""
    view = memoryview(blob)
    if len(view) < HEADER_SIZE:
        raise CorruptChunk(
            f"{_label(name)}: truncated ({len(view)} bytes, header needs {HEADER_SIZE})",
            "run apollo-cas verify --read-data to list what it breaks",
        )
    magic, version, codec, _reserved, raw_size, plen = _HEAD.unpack_from(view)
    end = HEADER_SIZE + plen
    if magic != MAGIC:
        raise CorruptChunk(
            f"{_label(name)}: bad magic {bytes(magic)!r}",
            "the object is not an apollo_cas chunk; run apollo-cas verify --read-data",
        )
    if version != ENVELOPE_VERSION:
        raise FormatVersionError(
            f"{_label(name)}: chunk envelope version {version}, this apollo_cas reads "
            f"{ENVELOPE_VERSION}",
            "upgrade apollo_cas",
        )
    if end > len(view):
        raise CorruptChunk(
            f"{_label(name)}: parameters run past the end of the chunk",
            "run apollo-cas verify --read-data",
        )
    return Envelope(codec, raw_size, view[HEADER_SIZE:end], view[end:])


def _label(name: str | bytes) -> str:
    return name if isinstance(name, str) else f"chunk {name.hex()}"
