"""Store format 2 on the wire: pack objects, their trailers, index objects.

A pack is chunk envelopes back to back, a trailer of fixed 48-byte entries
(chunk id, offset, length, raw size, delta base) and a 16-byte footer; an index
object lists the entries of some packs. docs/FORMAT.md ("Format 2") is the
specification; this module is its only encoder and decoder. Nothing here does
I/O: :mod:`apollo_cas.inventory` reads and writes these objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import CorruptChunk
from .hashing import digest_hex

PACK_MAGIC = b"APCKPAK2"
PACK_VERSION = 1
INDEX_MAGIC = b"APIX"
INDEX_VERSION = 1

_ENTRY = struct.Struct("<16sQII16s")  # id, offset, length, raw size, base
_FOOTER = struct.Struct("<IB3x8s")  # count, version, magic
_INDEX_HEAD = struct.Struct("<4sB3xI4x")  # magic, version, pack count
_PACK_HEAD = struct.Struct("<16sQI4x")  # pack id, size, entry count
ENTRY_SIZE = _ENTRY.size  # 48
FOOTER_SIZE = _FOOTER.size  # 16
_NO_BASE = bytes(16)

_HINT = "run 'apollo-cas verify --read-data' to see which checkpoints it breaks"


@dataclass(frozen=True)
class PackEntry:
    """Where one chunk's envelope lies in its pack."""

    chunk_id: bytes
    offset: int
    length: int
    raw_size: int
    base: bytes | None = None  # the chunk it is a delta against

    def encode(self) -> bytes:
        return _ENTRY.pack(
            self.chunk_id, self.offset, self.length, self.raw_size, self.base or _NO_BASE
        )


@dataclass(frozen=True)
class PackInfo:
    """One pack as an index lists it."""

    pack_id: str  # 32 hex
    size: int
    entries: tuple[PackEntry, ...]


def _entries(data: memoryview, count: int, where: str) -> tuple[PackEntry, ...]:
    out = []
    for i in range(count):
        cid, off, length, raw, base = _ENTRY.unpack_from(data, i * ENTRY_SIZE)
        out.append(
            PackEntry(bytes(cid), off, length, raw, None if base == _NO_BASE else bytes(base))
        )
    return tuple(out)


def check_entries(entries: Sequence[PackEntry], body_size: int, where: str) -> None:
    """Every entry must lie inside the pack's envelope area (before its trailer)."""
    for e in entries:
        if e.offset + e.length > body_size or e.length <= 0:
            raise CorruptChunk(
                f"chunk {e.chunk_id.hex()}: {where} names bytes {e.offset}-{e.offset + e.length} "
                f"outside the pack's {body_size} bytes of chunks",
                _HINT,
            )


def seal(
    envelopes: Sequence[tuple[bytes, bytes | memoryview, int, bytes | None]],
) -> tuple[list[bytes | memoryview], tuple[PackEntry, ...]]:
    """A pack of ``(chunk id, envelope, raw size, base)`` in order, as its pieces.

    Returns the pack's bytes as a list of pieces (the envelopes where they lie,
    then the trailer) and its entries. The pack is never assembled: the local
    backend writes the pieces one after the other and names the file by its
    hash (``Backend.put_by_digest``). Assembling it cost each pack a copy of
    all its bytes (a quarter to two thirds of the pack writer's samples in a
    full save, benchmarks/results/h200_2026-12-03b/run1_full_save_probe.json).
    """
    entries = []
    offset = 0
    pieces: list[bytes | memoryview] = []
    for cid, blob, raw, base in envelopes:
        n = memoryview(blob).nbytes
        entries.append(PackEntry(cid, offset, n, raw, base))
        offset += n
        pieces.append(blob)
    pieces.append(
        b"".join(e.encode() for e in entries) + _FOOTER.pack(len(entries), PACK_VERSION, PACK_MAGIC)
    )
    return pieces, tuple(entries)


def parse_footer(tail: bytes | memoryview, size: int, where: str) -> int:
    """The entry count from a pack's last 16 bytes; checks magic, version, size."""
    if len(tail) < FOOTER_SIZE or size < FOOTER_SIZE:
        raise CorruptChunk(f"{where} is truncated ({size} bytes)", _HINT)
    count, version, magic = _FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
    if magic != PACK_MAGIC:
        raise CorruptChunk(f"{where} has no pack footer (truncated or not a pack)", _HINT)
    if version != PACK_VERSION:
        raise CorruptChunk(f"{where}: pack version {version}, this apollo_cas reads 1", _HINT)
    if count * ENTRY_SIZE + FOOTER_SIZE > size:
        raise CorruptChunk(f"{where}: its trailer is longer than the pack", _HINT)
    return int(count)


def parse_trailer(tail: bytes | memoryview, size: int, where: str) -> tuple[PackEntry, ...]:
    """A pack's entries from its last ``48 n + 16`` bytes (or more), checked against ``size``."""
    count = parse_footer(tail, size, where)
    need = count * ENTRY_SIZE + FOOTER_SIZE
    view = memoryview(tail)[len(tail) - need :]
    entries = _entries(view, count, where)
    check_entries(entries, size - need, where)
    return entries


def trailer_size(count: int) -> int:
    return count * ENTRY_SIZE + FOOTER_SIZE


def index_size(entry_counts: Iterable[int]) -> int:
    """The byte size of an index object listing packs of these entry counts."""
    return _INDEX_HEAD.size + sum(_PACK_HEAD.size + ENTRY_SIZE * n for n in entry_counts)


def encode_index(packs: Iterable[PackInfo]) -> bytes:
    """An index object (its id is the XXH3-128 of these bytes)."""
    packs = list(packs)
    parts = [_INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, len(packs))]
    for p in packs:
        parts.append(_PACK_HEAD.pack(bytes.fromhex(p.pack_id), p.size, len(p.entries)))
        parts += [e.encode() for e in p.entries]
    return b"".join(parts)


def decode_index(data: bytes, where: str, index_id: str | None = None) -> list[PackInfo]:
    """Parse (and, given its id, check) an index object."""
    from .errors import StoreError

    def bad(why: str) -> StoreError:
        return StoreError(
            f"index {where} is damaged: {why}",
            "move that object out of the store: 'apollo-cas gc' then re-indexes its packs "
            "from their trailers (packs older than --grace)",
        )

    if index_id is not None and digest_hex(data) != index_id:
        raise bad("its content does not hash to its name")
    view = memoryview(data)
    if len(view) < _INDEX_HEAD.size:
        raise bad("truncated")
    magic, version, npacks = _INDEX_HEAD.unpack_from(view)
    if magic != INDEX_MAGIC or version != INDEX_VERSION:
        raise bad(f"magic {bytes(magic)!r} version {version}")
    pos = _INDEX_HEAD.size
    out = []
    for _ in range(npacks):
        if pos + _PACK_HEAD.size > len(view):
            raise bad("truncated")
        pid, size, count = _PACK_HEAD.unpack_from(view, pos)
        pos += _PACK_HEAD.size
        end = pos + count * ENTRY_SIZE
        if end > len(view):
            raise bad("truncated")
        entries = _entries(view[pos:end], count, where)
        pos = end
        out.append(PackInfo(bytes(pid).hex(), int(size), entries))
    if pos != len(view):
        raise bad("trailing bytes")
    return out
