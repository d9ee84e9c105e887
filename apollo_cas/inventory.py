"""The chunk inventory: which chunk envelopes a store holds, where, and how to add some.

Two implementations of one small interface, chosen by ``config.format``
(docs/FORMAT.md):

* :class:`LooseInventory`, format 1: one object per chunk under ``chunks/``;
* :class:`PackInventory`, format 2: envelopes in pack objects under ``packs/``,
  found through index objects under ``index/``.

Everything that asks "is this chunk here", "how big is it", "what is it a
delta against", "where do I read it" or "store this envelope" goes through
here: the chunk store, gc, verify, stats. Codecs and hashing stay in
:mod:`apollo_cas.chunkstore`; this module only moves envelopes.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from . import codecs, layout, packs
from .backends.base import Backend
from .codecs.envelope import Blob
from .errors import CorruptChunk, MissingChunk, ObjectNotFound
from .pack_objects import PackWriter, iter_pack_keys, pack_writers, write_index
from .parallel import bounded_map

#: Enough of a chunk to parse its envelope and codec parameters.
HEADER_PEEK = 512

_MISSING_HINT = "run 'apollo-cas verify' to see which checkpoints it breaks; restore another one"


class Location(NamedTuple):
    """Where one envelope lies: an object key and a byte range (``length`` -1: all of it).

    A tuple: a GPU restore locates every chunk of a checkpoint (~16k per 17 GB) on
    threads that share the GIL, and a frozen dataclass is 5x slower to build."""

    key: str
    offset: int
    length: int
    raw_size: int | None = None  # known from the index in format 2


class ChunkInventory(abc.ABC):
    """The chunks a store holds (see the module docstring)."""

    format: int
    #: Whether :meth:`add` must be called in tensor order from one thread
    #: (format 2 writes a save's chunks into packs in tensor order).
    ordered_writes: bool = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def refresh(self, reread: bool = False) -> None:  # noqa: B027 - format 1 caches nothing
        """Forget what is cached: another process (gc) may have changed the store
        (``reread``: also what a cheaper refresh would keep, as verify and gc need)."""

    @abc.abstractmethod
    def exists(self, chunk_id: bytes) -> bool:
        """Whether the store holds ``chunk_id``."""

    @abc.abstractmethod
    def ids(self) -> set[bytes]:
        """Every chunk id present."""

    @abc.abstractmethod
    def stored_sizes(self, ids: Iterable[bytes], workers: int) -> dict[bytes, int]:
        """Stored (envelope) size of each id present (missing ids are left out)."""

    @abc.abstractmethod
    def stored_bytes(self, workers: int) -> tuple[int, int]:
        """(bytes of every object holding chunks, chunks present): what the chunks cost."""

    @abc.abstractmethod
    def locate(self, chunk_id: bytes) -> Location:
        """Where ``chunk_id`` is; CorruptChunk if the store lacks it."""

    def locate_many(self, ids: Sequence[bytes]) -> list[Location]:
        """:meth:`locate` of each id, in order."""
        return [self.locate(c) for c in ids]

    @abc.abstractmethod
    def add(self, chunk_id: bytes, blob: Blob, raw_size: int, base: bytes | None) -> bool:
        """Store one envelope unless present; True if written (durable after :meth:`flush`)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every :meth:`add` so far durable and findable (before a manifest names them)."""

    def discard(self) -> None:  # noqa: B027 - format 1 holds nothing open
        """Drop writes not yet flushed (a failed save); what was written is garbage for gc."""

    def read_envelope(self, chunk_id: bytes) -> bytes:
        """The stored envelope of ``chunk_id``."""
        return self.read_range(self.locate(chunk_id), chunk_id)

    def read_range(self, loc: Location, chunk_id: bytes) -> bytes:
        try:
            if loc.length < 0:
                return self.backend.get(loc.key)
            data = self.backend.get_range(loc.key, loc.offset, loc.length)
        except ObjectNotFound:
            raise MissingChunk(
                f"chunk {chunk_id.hex()} is missing from {self.backend.location} ({loc.key})",
                _MISSING_HINT,
            ) from None
        if len(data) != loc.length and loc.length >= 0:
            raise CorruptChunk(
                f"chunk {chunk_id.hex()}: {loc.key} ends before its range "
                f"{loc.offset}-{loc.offset + loc.length} (truncated pack)",
                "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
            )
        return data

    def base_of(self, chunk_id: bytes) -> bytes | None:
        """The chunk ``chunk_id`` is a delta against (None if full, or absent)."""
        try:
            loc = self.locate(chunk_id)
        except CorruptChunk:
            return None
        peek = Location(loc.key, loc.offset, HEADER_PEEK if loc.length < 0 else loc.length)
        try:
            head = self.backend.get_range(peek.key, peek.offset, min(peek.length, HEADER_PEEK))
        except ObjectNotFound:
            return None
        b = codecs.base_of(head, f"chunk {chunk_id.hex()}")
        return bytes.fromhex(b) if b else None


class LooseInventory(ChunkInventory):
    """Format 1: ``chunks/<ab>/<id>``, one object per chunk."""

    format = 1

    def exists(self, chunk_id: bytes) -> bool:
        return self.backend.exists(layout.chunk_key(chunk_id.hex()))

    def ids(self) -> set[bytes]:
        out = set()
        for key in self.backend.list(layout.CHUNKS_PREFIX):
            hex_id = layout.chunk_id_from_key(key)
            if hex_id is not None:
                out.add(bytes.fromhex(hex_id))
        return out

    def stored_sizes(self, ids: Iterable[bytes], workers: int) -> dict[bytes, int]:
        ids = list(ids)

        def size(cid: bytes) -> int:
            try:
                return self.backend.info(layout.chunk_key(cid.hex())).size
            except ObjectNotFound:
                return -1

        sizes = bounded_map(size, ids, workers)
        return {c: n for c, n in zip(ids, sizes, strict=True) if n >= 0}

    def locate(self, chunk_id: bytes) -> Location:
        return Location(layout.chunk_key(chunk_id.hex()), 0, -1)

    def stored_bytes(self, workers: int) -> tuple[int, int]:
        sizes = self.stored_sizes(self.ids(), workers)
        return sum(sizes.values()), len(sizes)

    def add(self, chunk_id: bytes, blob: Blob, raw_size: int, base: bytes | None) -> bool:
        return self.backend.put_if_absent(layout.chunk_key(chunk_id.hex()), blob, durable=False)

    def flush(self) -> None:
        self.backend.sync()

    def delete(self, ids: list[bytes], workers: int) -> None:
        keys = [layout.chunk_key(c.hex()) for c in ids]
        for _ in bounded_map(self.backend.delete, keys, workers):
            pass


class PackIndex:
    """Every index object of a format-2 store, loaded: chunk id -> (pack id, entry)."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, tuple[str, packs.PackEntry]] = {}
        self.packs: dict[str, packs.PackInfo] = {}
        self.indexes: dict[str, list[str]] = {}  # index id -> pack ids

    def add_pack(self, info: packs.PackInfo) -> None:
        self.packs[info.pack_id] = info
        for e in info.entries:
            self.chunks.setdefault(e.chunk_id, (info.pack_id, e))

    def infos_of(self, index_id: str) -> list[packs.PackInfo]:
        """The packs an index object already loaded names."""
        return [self.packs[p] for p in self.indexes[index_id]]

    @classmethod
    def load(cls, backend: Backend, workers: int = 8, known: PackIndex | None = None) -> PackIndex:
        """Every index object the store lists now. Objects ``known`` already decoded
        are taken from it instead of read again: an index object's name is the hash
        of its bytes, so a name listed again is the same content. Reading and decoding
        all of them at every save was ~0.3 s of a 17.1 GB dense step (py-spy, H200,
        2026-12-04 session 2), for a store of two checkpoints, growing with the store."""
        keys = {}
        for k in backend.list(layout.INDEX_PREFIX):
            iid = layout.index_id_from_key(k)
            if iid:
                keys[iid] = k
        idx = cls()
        if known is not None and all(i in keys for i in known.indexes):
            # Nothing known was removed: start from its maps (copies: readers of the
            # old object go on reading it unchanged).
            idx.chunks, idx.packs = dict(known.chunks), dict(known.packs)
            idx.indexes = dict(known.indexes)
        elif known is not None:
            for iid in known.indexes:
                if iid in keys:  # gc removed the others: rebuild without them
                    idx.add_index(iid, known.infos_of(iid))

        def one(key: str) -> tuple[str, list[packs.PackInfo]] | None:
            iid = layout.index_id_from_key(key) or ""
            try:
                return iid, packs.decode_index(backend.get(key), key, iid)
            except ObjectNotFound:  # replaced by gc while we listed
                return None

        todo = [k for i, k in keys.items() if i not in idx.indexes]
        for got in bounded_map(one, todo, workers):
            if got is not None:
                idx.add_index(*got)
        return idx

    def add_index(self, index_id: str, infos: list[packs.PackInfo]) -> None:
        """Add one index object's packs."""
        self.indexes[index_id] = [p.pack_id for p in infos]
        for info in infos:
            self.add_pack(info)


class PackInventory(ChunkInventory):
    """Format 2: chunks in packs, found through index objects (docs/FORMAT.md)."""

    format = 2
    ordered_writes = True

    def __init__(self, backend: Backend, pack_size: int, workers: int = 8) -> None:
        super().__init__(backend)
        self.pack_size = pack_size
        self.workers = workers
        self._index: PackIndex | None = None
        #: The last index loaded, whose objects a refresh need not read again.
        self._loaded: PackIndex | None = None
        self._lock = threading.Lock()
        self._writer: PackWriter | None = None

    # -- the index -----------------------------------------------------------
    def index(self) -> PackIndex:
        idx = self._index
        if idx is not None:
            # Every prepare and commit of a save asks: a loaded index is read
            # without the lock, which 16 encoding threads would queue on.
            return idx
        with self._lock:
            if self._index is None:
                self._index = PackIndex.load(self.backend, self.workers, self._loaded)
                self._loaded = self._index
            return self._index

    def refresh(self, reread: bool = False) -> None:
        """See the store as it is now at the next lookup: the index objects are listed
        again and the new ones read (``reread``: every one read and checked again, as
        verify and gc do)."""
        with self._lock:
            self._index = None
            if reread:
                self._loaded = None

    def exists(self, chunk_id: bytes) -> bool:
        w = self._writer
        return chunk_id in self.index().chunks or (w is not None and chunk_id in w.pending)

    def ids(self) -> set[bytes]:
        return set(self.index().chunks)

    def stored_sizes(self, ids: Iterable[bytes], workers: int) -> dict[bytes, int]:
        where = self.index().chunks
        return {c: where[c][1].length for c in ids if c in where}

    def stored_bytes(self, workers: int) -> tuple[int, int]:
        idx = self.index()
        return sum(p.size for p in idx.packs.values()), len(idx.chunks)

    def locate(self, chunk_id: bytes) -> Location:
        hit = self.index().chunks.get(chunk_id)
        if hit is None:
            # Another process may have saved it since this one loaded the index.
            self.refresh()
            hit = self.index().chunks.get(chunk_id)
        if hit is None:
            raise MissingChunk(
                f"chunk {chunk_id.hex()} is missing from {self.backend.location} (no index names it)",
                _MISSING_HINT,
            )
        pack_id, e = hit
        info = self.index().packs[pack_id]
        body = info.size - packs.trailer_size(len(info.entries))
        if e.offset + e.length > body:
            raise CorruptChunk(
                f"chunk {chunk_id.hex()}: the index names bytes {e.offset}-{e.offset + e.length} "
                f"of pack {pack_id}, outside its {body} bytes of chunks",
                "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
            )
        return Location(layout.pack_key(pack_id), e.offset, e.length, e.raw_size)

    def locate_many(self, ids: Sequence[bytes]) -> list[Location]:
        """:meth:`locate` of each id with the index looked up once and each pack's key
        and bounds once per call (the restore's read threads locate a few hundred ids
        per call under the GIL). Any id it cannot place goes through :meth:`locate`,
        which refreshes the index or raises the error naming it."""
        idx = self.index()
        where, infos = idx.chunks, idx.packs
        seen: dict[str, tuple[str, int]] = {}
        out: list[Location] = []
        for cid in ids:
            hit = where.get(cid)
            if hit is None:
                return [self.locate(c) for c in ids]
            pack_id, e = hit
            known = seen.get(pack_id)
            if known is None:
                info = infos[pack_id]
                known = seen[pack_id] = (
                    layout.pack_key(pack_id),
                    info.size - packs.trailer_size(len(info.entries)),
                )
            if e.offset + e.length > known[1]:
                return [self.locate(c) for c in ids]
            out.append(Location(known[0], e.offset, e.length, e.raw_size))
        return out

    def read_envelope(self, chunk_id: bytes) -> bytes:
        try:
            return self.read_range(self.locate(chunk_id), chunk_id)
        except CorruptChunk:
            # gc may have repacked this chunk since we loaded the index (restores
            # take no lock): look again once before calling it missing.
            self.refresh()
            return self.read_range(self.locate(chunk_id), chunk_id)

    def base_of(self, chunk_id: bytes) -> bytes | None:
        hit = self.index().chunks.get(chunk_id)
        if hit is None:
            w = self._writer
            return w.pending.get(chunk_id) if w is not None else None
        return hit[1].base

    # -- writing -------------------------------------------------------------
    def add(self, chunk_id: bytes, blob: Blob, raw_size: int, base: bytes | None) -> bool:
        if chunk_id in self.index().chunks:
            return False
        if self._writer is None:
            self._writer = PackWriter(self.backend, self.pack_size, pack_writers(self.workers))
        return self._writer.append(chunk_id, blob, raw_size, base)

    def flush(self) -> None:
        w, self._writer = self._writer, None
        if w is None:
            self.backend.sync()
            return
        infos = w.close()
        self.backend.sync()  # every pack durable (directory fsyncs) before its index
        if infos:
            iid = write_index(self.backend, infos)
            self.index().add_index(iid, infos)

    def discard(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.abandon()

    def damaged(self, workers: int) -> dict[bytes, str]:
        """Chunks whose every copy is in a missing or wrong-sized pack, or lies
        outside its pack: what ``verify`` reports without reading data."""
        idx = self.index()
        present = dict(iter_pack_keys(self.backend))

        def problem(pid: str) -> str | None:
            info = idx.packs[pid]
            if pid not in present:
                return f"its pack {pid} is missing"
            try:
                size = self.backend.info(present[pid]).size
            except ObjectNotFound:
                return f"its pack {pid} is missing"
            if size != info.size:
                return f"its pack {pid} is {size} bytes, its index says {info.size} (truncated?)"
            return None

        pids = sorted(idx.packs)
        bad = {
            p: why for p, why in zip(pids, bounded_map(problem, pids, workers), strict=True) if why
        }
        out: dict[bytes, str] = {}
        healthy: set[bytes] = set()
        for pid in pids:
            info = idx.packs[pid]
            body = info.size - packs.trailer_size(len(info.entries))
            for e in info.entries:
                if pid in bad:
                    out.setdefault(e.chunk_id, bad[pid])
                elif e.offset + e.length > body:
                    out.setdefault(
                        e.chunk_id, f"the index names bytes outside its pack {pid} (damaged index)"
                    )
                else:
                    healthy.add(e.chunk_id)
        return {c: why for c, why in out.items() if c not in healthy}


def open_inventory(backend: Backend, fmt: int, pack_size: int, workers: int) -> ChunkInventory:
    """The inventory for a store of format ``fmt``."""
    if fmt == 1:
        return LooseInventory(backend)
    return PackInventory(backend, pack_size, workers)
