"""Damaging one stored chunk in place, in either store format."""

from __future__ import annotations

import os
from pathlib import Path

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
