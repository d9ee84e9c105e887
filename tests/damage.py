"""Damaging one stored chunk in place, in either store format."""

from __future__ import annotations

import os
from pathlib import Path

from apollo_cas import layout, packs
from apollo_cas.hashing import digest_hex
from apollo_cas.inventory import PackIndex
from apollo_cas.store import Store


def chunk_file_range(st: Store, cid: bytes) -> tuple[Path, int, int]:
    """(file, offset, length) of a chunk's envelope in a local store: its own
    object (format 1) or its range in a pack (format 2)."""
    loc = st.chunks.locate(cid)
    path = Path(st.location) / loc.key
    length = loc.length if loc.length >= 0 else path.stat().st_size
    return path, loc.offset, length


def flip_last_byte(st: Store, cid: bytes) -> None:
    """Flip the last byte of a chunk's envelope (its payload: the hash check finds it)."""
    path, offset, length = chunk_file_range(st, cid)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset + length - 1)
        b = f.read(1)
        f.seek(offset + length - 1)
        f.write(bytes([b[0] ^ 0xFF]))


def point_outside_its_pack(st: Store, cid: bytes) -> None:
    """Rewrite the index naming ``cid`` (format 2, local store) so that its entry
    points 10 bytes past the end of its pack."""
    root = Path(st.location)
    idx = PackIndex.load(st.backend)
    pack_id, _entry = idx.chunks[cid]
    for iid, pids in idx.indexes.items():
        if pack_id not in pids:
            continue
        infos = []
        for pid in pids:
            info = idx.packs[pid]
            entries = tuple(
                packs.PackEntry(e.chunk_id, info.size + 10, e.length, e.raw_size, e.base)
                if e.chunk_id == cid
                else e
                for e in info.entries
            )
            infos.append(packs.PackInfo(pid, info.size, entries))
        (root / layout.index_key(iid)).unlink()
        data = packs.encode_index(infos)
        (root / layout.index_key(digest_hex(data))).write_bytes(data)
