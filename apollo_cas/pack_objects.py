"""Pack objects in a backend: writing them (:class:`PackWriter`), writing the index
objects that name them, listing them, and reading a pack's own trailer.

The bytes of a pack, its trailer and an index are :mod:`apollo_cas.packs`'s; which
chunk lives in which pack is :mod:`apollo_cas.inventory`'s. This module is the part
between: the objects themselves, as a save, a repack and a migration write them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from . import layout, packs
from .backends.base import Backend
from .codecs.envelope import Blob
from .hashing import digest_hex

__all__ = ["PackWriter", "iter_pack_keys", "pack_writers", "read_trailer", "write_index"]


def write_index(backend: Backend, infos: list[packs.PackInfo]) -> str:
    """Write one durable index object naming ``infos``; returns its id."""
    data = packs.encode_index(infos)
    iid = digest_hex(data)
    backend.put_if_absent(layout.index_key(iid), data, durable=True)
    return iid


def pack_writers(workers: int) -> int:
    """How many packs a save writes at once: a few streams keep a disk's queue
    full (and overlap one pack's fsync with the next's write); more only add
    buffers."""
    return max(1, min(4, workers // 2))


class PackWriter:
    """Envelopes appended in order become packs of about ``pack_size`` bytes.

    One caller thread appends; sealed packs are written by ``writers``
    background threads while the caller fills the next. A save's packs are
    independent objects (the index names them all, after every one is
    durable), so several can be written and fsynced at once: with one writer,
    the save waited on it (H200, docs/BENCHMARKS.md). A pack is written as its
    pieces (``Backend.put_by_digest``), never assembled, so memory is the
    envelopes of at most ``2 * writers + 1`` packs (the open one, ``writers``
    sealed and queued, ``writers`` being written), which the encoders made.
    """

    def __init__(self, backend: Backend, pack_size: int, writers: int = 1) -> None:
        self.backend = backend
        self.pack_size = pack_size
        self.pending: dict[bytes, bytes | None] = {}  # id -> base, for everything appended
        self._open: list[tuple[bytes, bytes | memoryview, int, bytes | None]] = []
        self._open_bytes = 0
        self._writers = max(1, writers)
        self._pool = ThreadPoolExecutor(max_workers=self._writers, thread_name_prefix="apollo-pack")
        #: (seal order, pack) of each write, waiting and done: writes end in any order.
        self._waiting: list[Future[tuple[int, packs.PackInfo]]] = []
        self._done: list[tuple[int, packs.PackInfo]] = []
        self._sealed = 0

    def append(self, chunk_id: bytes, blob: Blob, raw_size: int, base: bytes | None) -> bool:
        if chunk_id in self.pending:
            return False
        self.pending[chunk_id] = base
        self._open.append((chunk_id, blob, raw_size, base))
        self._open_bytes += len(blob)
        if self._open_bytes >= self.pack_size:
            self._seal()
        return True

    def _seal(self) -> None:
        if not self._open:
            return
        items, self._open, self._open_bytes = self._open, [], 0
        if len(self._waiting) >= 2 * self._writers:
            # As many sealed packs queued as being written: a local disk finishes
            # concurrent fsyncs together (one journal commit), so writes end in
            # waves, and with one pack queued the next wave waited ~55 ms each time
            # for the encoders to fill it (27% of a full save with no write in
            # flight, h200_2026-12-04/run2). Wait for whichever write ends first,
            # not the oldest: waiting on the oldest left finished writers idle.
            wait(self._waiting, return_when=FIRST_COMPLETED)
            self._collect(lambda f: f.done())
        self._waiting.append(self._pool.submit(self._write, self._sealed, items))
        self._sealed += 1

    def _collect(self, take: Callable[[Future[tuple[int, packs.PackInfo]]], bool]) -> None:
        """Move the writes ``take`` picks from waiting to done (their errors raise)."""
        keep = []
        for f in self._waiting:
            if take(f):
                self._done.append(f.result())
            else:
                keep.append(f)
        self._waiting = keep

    def _write(
        self, order: int, items: list[tuple[bytes, bytes | memoryview, int, bytes | None]]
    ) -> tuple[int, packs.PackInfo]:
        pieces, entries = packs.seal(items)
        # A create-only write: temp + fsync + rename locally (directory fsync at
        # the store's sync()), a PUT with Content-MD5 on S3.
        pack_id = self.backend.put_by_digest(layout.pack_key, pieces, durable=False)
        return order, packs.PackInfo(pack_id, sum(memoryview(p).nbytes for p in pieces), entries)

    def close(self) -> list[packs.PackInfo]:
        """Seal the open pack, wait for every write; the packs written, in order."""
        try:
            self._seal()
            self._collect(lambda f: True)
        finally:
            self._pool.shutdown(wait=True)
        return [info for _, info in sorted(self._done, key=lambda d: d[0])]

    def abandon(self) -> None:
        for f in self._waiting:
            f.cancel()
        self._pool.shutdown(wait=True)


def iter_pack_keys(backend: Backend) -> Iterator[tuple[str, str]]:
    """(pack id, key) of every pack object present."""
    for key in backend.list(layout.PACKS_PREFIX):
        pid = layout.pack_id_from_key(key)
        if pid is not None:
            yield pid, key


def read_trailer(backend: Backend, pack_id: str) -> packs.PackInfo:
    """A pack's entries from its own trailer (to rebuild a lost index)."""
    key = layout.pack_key(pack_id)
    size = backend.info(key).size
    tail = backend.get_range(key, max(0, size - packs.FOOTER_SIZE), packs.FOOTER_SIZE)
    count = packs.parse_footer(tail, size, key)
    need = packs.trailer_size(count)
    entries = packs.parse_trailer(backend.get_range(key, size - need, need), size, key)
    return packs.PackInfo(pack_id, size, entries)
