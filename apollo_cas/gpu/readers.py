"""Where the GPU restore pipeline gets stored chunk bytes from (the reader seam).

The pipeline needs only "the stored bytes of these chunk ids, in order". A format-1
store is one object per chunk (:func:`file_reader`, :func:`object_reader`); a format-2
store keeps chunks back to back in pack files (:func:`pack_reader`: ids located
through the store's index, adjacent chunks of one pack read with one ranged read).
The pipeline calls a reader from its own threads, one contiguous group of ids per
call, so a reader need not parallelise.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..codecs.envelope import Blob
from ..errors import CorruptChunk, ObjectNotFound
from ..parallel import bounded_map
from .chunkplan import HINT, align_up, corrupt

__all__ = [
    "Arena",
    "ArenaViews",
    "BlobReader",
    "RawReader",
    "file_reader",
    "object_reader",
    "pack_reader",
]

#: The longest single ranged read of a pack: one call's group is a few MiB anyway
#: (a 256 MiB batch over 2 x 16 groups), this only caps a reader called with more.
MAX_READ = 64 << 20
#: Slack past an arena's capacity (see :class:`Arena`).
PAD = 64

#: Stored bytes of chunks, in the order asked: ``reader(ids, arena) -> [buffer, ...]``. A
#: reader may read into ``arena`` (:class:`Arena`, reusable host memory; None: don't)
#: and return views of it, or return bytes of its own.
BlobReader = Callable[[Sequence[bytes], "Arena | None"], Sequence[Any]]
#: The CPU decoder: a chunk's verified raw bytes (``ChunkStore.read``).
RawReader = Callable[[bytes], Blob]


class Arena:
    """Reusable host memory that readers claim pieces of, from several threads.

    ``alloc(n)`` makes its buffer (a 1-D uint8 torch tensor, e.g. pinned: the
    pipeline then copies what was read straight to the GPU); by default a numpy
    array. Every buffer has :data:`PAD` bytes past its capacity, so a reader of a
    piece may read up to 16 bytes beyond it (aligned copies on the device).
    """

    def __init__(self, alloc: Callable[[int], Any] | None = None) -> None:
        self._alloc = alloc
        self.tensor: Any = None
        self._buf: np.ndarray | None = None
        self._cap = 0
        self._pos = 0
        self._lock = threading.Lock()
        #: an event recorded after the last copy out of this arena (None: none queued)
        self.copied: Any = None

    def reset(self, capacity: int) -> None:
        """Forget every claim (their views must be dead) and hold at least ``capacity``."""
        self.wait()
        if self._buf is None or self._cap < capacity:
            self._buf = None
            if self._alloc is not None:
                self.tensor = self._alloc(capacity + PAD)
                self._buf = self.tensor.numpy()
            else:
                self._buf = np.empty(capacity + PAD, dtype=np.uint8)
            self._cap = capacity
        self._pos = 0

    def wait(self) -> None:
        """Wait for the copy out of this arena recorded in :attr:`copied`."""
        ev, self.copied = self.copied, None
        if ev is not None:
            ev.synchronize()

    @property
    def used(self) -> int:
        """Bytes claimed since the last reset (claims are 64-byte aligned)."""
        return self._pos

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def claim(self, n: int) -> memoryview | None:
        """A writable view of ``n`` bytes, or None when the arena is full."""
        got = self.claim_at(n)
        return None if got is None else got[0]

    def claim_at(self, n: int) -> tuple[memoryview, int] | None:
        """:meth:`claim`, with where the view starts in the arena."""
        with self._lock:
            if self._buf is None or self._pos + n > self._cap:
                return None
            a = self._pos
            self._pos = align_up(a + n, 64)
        return self._buf.data[a : a + n], a

    def offset_of(self, piece: Any) -> int | None:
        """Where ``piece`` (a view a reader returned) starts in the arena, or None."""
        if self._buf is None or piece is None or not len(piece):
            return None
        try:
            # 0.44 us against numpy's 2.4 us: ~16k calls per 17 GB restore, on the
            # thread that feeds the device (H200 profile, 2026-12-02).
            addr = ctypes.addressof(ctypes.c_char.from_buffer(piece))
        except TypeError:  # read-only bytes (not from a reader's arena)
            addr = np.frombuffer(piece, dtype=np.uint8).ctypes.data
        base = self._buf.ctypes.data
        return addr - base if base <= addr < base + self._cap else None


class ArenaViews(list[Any]):
    """What a reader returns when it knows where each buffer lies in the arena it
    was given: the buffers, and ``at[i]`` the offset of buffer i in it (None: not in
    it). The read stage then need not ask :meth:`Arena.offset_of` per chunk."""

    def __init__(self, views: list[Any], at: list[int | None]) -> None:
        super().__init__(views)
        self.at = at


def into_arena(arena: Arena, blob: Any) -> tuple[Any, int | None]:
    """``blob`` if it lies in ``arena``, else a copy in it (or ``blob`` when it is
    full), with where it starts in the arena (None: not in it)."""
    at = arena.offset_of(blob)
    if at is not None:
        return blob, at
    got = arena.claim_at(len(blob))
    if got is None:
        return blob, None
    view, at = got
    view[:] = memoryview(blob).cast("B")
    return view, at


def object_reader(get_blob: Callable[[bytes], Any], workers: int) -> BlobReader:
    """One backend object per chunk (store format 1, any backend), on ``workers`` threads.

    ``get_blob`` is ``ChunkStore.get_blob`` (stored bytes, CorruptChunk when missing).
    It ignores the arena: each chunk arrives as new bytes (measured 3.55 GB/s for the
    16,417 objects of a 17 GB checkpoint in /dev/shm, 16 threads). A pack-file store
    (format 2) passes a reader that groups the ids by pack and reads ranges.
    """

    def read(ids: Sequence[bytes], arena: Arena | None = None) -> list[Any]:
        return list(bounded_map(get_blob, ids, workers))

    return read


def file_reader(root: Any, workers: int) -> BlobReader:
    """Chunk files of a local store read straight into the arena (no new bytes per chunk).

    ``root`` is the store directory (``LocalBackend.root``); paths come from
    :func:`apollo_cas.layout.chunk_key`. A chunk the arena has no room for, and every
    chunk when there is no arena, is read into bytes of its own.
    """
    from pathlib import Path

    from ..layout import chunk_key

    base = Path(root)

    def one(cid: bytes, arena: Arena | None) -> Any:
        key = chunk_key(cid.hex())
        path = base / key
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptChunk(
                f"chunk {cid.hex()} is missing from {base}",
                "run 'apollo-cas verify' to see which checkpoints it breaks; restore another one",
            ) from None
        try:
            size = os.fstat(fd).st_size
            view = arena.claim(size) if arena is not None else None
            if view is None:
                view = memoryview(bytearray(size))
            got = os.preadv(fd, [view], 0) if size else 0
            if got != size:
                raise corrupt(cid, f"read {got} of its {size} stored bytes (changed while read?)")
            return view
        finally:
            os.close(fd)

    def read(ids: Sequence[bytes], arena: Arena | None = None) -> list[Any]:
        return list(bounded_map(lambda c: one(c, arena), ids, workers))

    return read


def pack_reader(
    locate_many: Callable[[Sequence[bytes]], Sequence[Any]],
    get_range: Callable[[str, int, int], bytes],
    root: Any | None = None,
    refresh: Callable[[], None] | None = None,
    max_read: int = MAX_READ,
) -> BlobReader:
    """Chunks of a format-2 store: located in packs, adjacent ones read as one range.

    ``locate_many`` is ``ChunkStore.locate_many`` (an
    :class:`~apollo_cas.inventory.Location` per id; CorruptChunk for an id no index
    names or a range outside its pack). The ids of
    one call are sorted by (pack, offset) and cut into runs of chunks that lie back to
    back in one pack (a restore of latest is mostly sequential: packs are written in
    tensor order), each run read with one ``os.preadv`` into the arena when ``root``
    (``LocalBackend.root``) is given, else with ``get_range`` (``Backend.get_range``)
    and copied into the arena. Chunks are handed out as views, in the order asked
    (an :class:`ArenaViews`: with their offsets in the arena). A
    pack shorter than the index says is CorruptChunk naming the first chunk it cuts
    off; a missing pack (gc repacked it since the index was loaded: restores take no
    lock) makes the reader ``refresh`` the index and locate once more.
    """
    from pathlib import Path

    base = Path(root) if root is not None else None

    def runs(ids: Sequence[bytes]) -> list[tuple[str, int, int, list[tuple[int, int, int]]]]:
        locs = locate_many(ids)
        order = sorted(range(len(ids)), key=lambda i: (locs[i].key, locs[i].offset))
        out: list[tuple[str, int, int, list[tuple[int, int, int]]]] = []
        for i in order:
            loc = locs[i]
            if loc.length < 0:
                raise corrupt(ids[i], f"{loc.key} is not a range of a pack (a format-1 chunk?)")
            if out:
                key, first, end, items = out[-1]
                if key == loc.key and loc.offset == end and end + loc.length - first <= max_read:
                    items.append((i, loc.offset - first, loc.length))
                    out[-1] = (key, first, end + loc.length, items)
                    continue
            out.append((loc.key, loc.offset, loc.offset + loc.length, [(i, 0, loc.length)]))
        return out

    def fill(key: str, first: int, view: memoryview) -> int:
        n = len(view)
        if base is None:
            try:
                data = get_range(key, first, n)
            except ObjectNotFound:
                raise FileNotFoundError(key) from None
            got = min(len(data), n)
            view[:got] = memoryview(data)[:got]
            return got
        fd = os.open(base / key, os.O_RDONLY)
        try:
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], first + got)
                if k <= 0:
                    break
                got += k
            return got
        finally:
            os.close(fd)

    def read_once(ids: Sequence[bytes], arena: Arena | None) -> ArenaViews:
        out: list[Any] = [None] * len(ids)
        at: list[int | None] = [None] * len(ids)
        for key, first, end, items in runs(ids):
            n = end - first
            got_at = arena.claim_at(n) if arena is not None else None
            if got_at is None:
                view, start = memoryview(bytearray(n)), None
            else:
                view, start = got_at
            try:
                got = fill(key, first, view)
            except FileNotFoundError:
                raise _PackMissing(ids[items[0][0]], key) from None
            for i, off, length in items:
                if off + length > got:
                    raise CorruptChunk(
                        f"chunk {ids[i].hex()}: {key} ends before its range "
                        f"{first + off}-{first + off + length} (truncated pack)",
                        HINT,
                    )
                out[i] = view[off : off + length]
                if start is not None:
                    at[i] = start + off
        return ArenaViews(out, at)

    def read(ids: Sequence[bytes], arena: Arena | None = None) -> list[Any]:
        try:
            return read_once(ids, arena)
        except _PackMissing as exc:
            if refresh is None:
                raise exc.error() from None
            refresh()
        try:
            return read_once(ids, arena)
        except _PackMissing as exc:
            raise exc.error() from None

    return read


class _PackMissing(Exception):
    def __init__(self, cid: bytes, key: str) -> None:
        self.cid, self.key = cid, key

    def error(self) -> CorruptChunk:
        return CorruptChunk(
            f"chunk {self.cid.hex()} is missing: its pack {self.key} is not in the store",
            "run 'apollo-cas verify' to see which checkpoints it breaks; restore another one",
        )
