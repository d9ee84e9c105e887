"""Chunks in a backend: write once under their id, read back verified.

This is the only module that turns blocks into stored chunks and back; it
applies the codec policy on the way in and checks every read against the id
on the way out (promise 1: a mismatch is an error naming the chunk, never
wrong weights).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from . import codecs
from .backends.base import Backend
from .codecs import chain
from .codecs.batch import encode_many
from .codecs.envelope import Blob
from .errors import CorruptChunk
from .hashing import digest
from .inventory import HEADER_PEEK, ChunkInventory, Location, LooseInventory

__all__ = ["HEADER_PEEK", "ChunkStore", "Prepared", "PutResult"]


@dataclass(frozen=True)
class PutResult:
    """What storing one block did."""

    chunk_id: bytes
    written: bool  # False: the chunk was already in the store
    stored_size: int  # bytes written (0 when not written)
    base: bytes | None  # the chunk it is a delta against, if any


@dataclass(frozen=True)
class Prepared:
    """A block hashed and, unless the store has it, encoded: ready to be stored."""

    chunk_id: bytes
    blob: Blob | None  # None: already present (or being written by another task)
    raw_size: int
    base: bytes | None


class ChunkStore:
    """Content-addressed chunks on top of a chunk inventory (format 1 or 2)."""

    def __init__(
        self,
        backend: Backend,
        policy: codecs.CodecPolicy,
        inventory: ChunkInventory | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.inventory: ChunkInventory = inventory or LooseInventory(backend)
        # Ids known to exist (written or seen in a manifest this process trusts);
        # spares one existence check per unchanged block.
        self.known: set[bytes] = set()
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()

    @property
    def ordered_writes(self) -> bool:
        """Whether :meth:`commit` must be called in tensor order from one thread."""
        return self.inventory.ordered_writes

    def forget_known(self) -> None:
        """Drop the cache of chunks believed to exist.

        Called at the start of every save, under its shared lock: between two
        saves of a long-lived process, gc may have deleted chunks this process
        wrote or saw earlier, and trusting the cache would then record a
        manifest that names missing chunks.
        """
        with self._lock:
            self.known.clear()
            self._claimed.clear()
        self.inventory.refresh()

    def exists(self, chunk_id: bytes) -> bool:
        if chunk_id in self.known:
            return True
        return self.inventory.exists(chunk_id)

    def _claim(self, chunk_id: bytes) -> bool:
        """True if this thread should write ``chunk_id`` (no other thread is)."""
        with self._lock:
            if chunk_id in self._claimed or chunk_id in self.known:
                return False
            self._claimed.add(chunk_id)
            return True

    def prepare(
        self,
        data: bytes | memoryview,
        itemsize: int = 1,
        chunk_id: bytes | None = None,
        base: codecs.Base | None = None,
    ) -> Prepared:
        """Hash ``data`` and, if the store lacks it, encode it (any thread).

        ``chunk_id``, when given (computed on the GPU), is checked against the
        bytes, so a device/host disagreement can never name a chunk wrongly.
        """
        return self.prepare_many([(data, itemsize, chunk_id, base)])[0]

    def prepare_many(
        self,
        items: Sequence[tuple[bytes | memoryview, int, bytes | None, codecs.Base | None]],
    ) -> list[Prepared]:
        """:meth:`prepare` of each ``(data, itemsize, chunk_id, base)``, in order.

        The full encodings (no base) are made together (``codecs.batch``: one zstd
        call for all their planes), the same bytes block by block as one at a time.
        """
        out: list[Prepared] = []
        full: list[tuple[int, bytes | memoryview, int]] = []
        for data, itemsize, chunk_id, base in items:
            actual = self._checked_id(data, chunk_id)
            n = memoryview(data).nbytes
            if not self._claim(actual) or self.exists(actual):
                out.append(Prepared(actual, None, n, None))
            elif base is None:
                full.append((len(out), data, itemsize))
                out.append(Prepared(actual, None, n, None))  # its blob comes below
            else:
                blob = codecs.encode(data, self.policy, itemsize, base=base)
                base_hex = codecs.base_of(blob)
                out.append(Prepared(actual, blob, n, bytes.fromhex(base_hex) if base_hex else None))
        if full:
            blobs = encode_many([(d, w) for _, d, w in full], self.policy)
            for (i, _, _), blob in zip(full, blobs, strict=True):
                out[i] = replace(out[i], blob=blob)
        return out

    @staticmethod
    def _checked_id(data: bytes | memoryview, chunk_id: bytes | None) -> bytes:
        actual = digest(data)
        if chunk_id is not None and actual != chunk_id:
            raise CorruptChunk(
                f"block hashed to {actual.hex()} on the host but {chunk_id.hex()} on the device",
                "the weights changed during the save (pause training) or the GPU hash is wrong; retry",
            )
        return actual

    def commit(self, p: Prepared) -> PutResult:
        """Store a prepared block (in tensor order when :attr:`ordered_writes`)."""
        if p.blob is None:
            return PutResult(p.chunk_id, False, 0, None)
        written = self.inventory.add(p.chunk_id, p.blob, p.raw_size, p.base)
        with self._lock:
            self.known.add(p.chunk_id)
        return PutResult(
            p.chunk_id, written, len(p.blob) if written else 0, p.base if written else None
        )

    def put_block(
        self,
        data: bytes | memoryview,
        itemsize: int = 1,
        chunk_id: bytes | None = None,
        base: codecs.Base | None = None,
    ) -> PutResult:
        """Store one block unless it is already there (format 2: flushed by :meth:`flush`)."""
        return self.commit(self.prepare(data, itemsize, chunk_id, base))

    def flush(self) -> None:
        """Make every block stored so far durable and findable (before a manifest)."""
        self.inventory.flush()

    def discard(self) -> None:
        """A save failed: drop its unflushed writes."""
        self.inventory.discard()

    def put_encoded(
        self, chunk_id: bytes, blob: Blob, base: bytes | None, raw_size: int
    ) -> PutResult:
        """Store a chunk encoded elsewhere (the GPU delta save) unless it is already there.

        The caller vouches that ``blob`` (``raw_size`` bytes once decoded, a delta against
        ``base`` or a full chunk when None) decodes to bytes hashing to ``chunk_id`` (the
        GPU delta save checks the live block's hash on the device). Format 2: called in
        tensor order from one thread, like :meth:`commit`.
        """
        if not self._claim(chunk_id) or self.exists(chunk_id):
            return PutResult(chunk_id, False, 0, None)
        return self.commit(Prepared(chunk_id, blob, raw_size, base))

    def get_blob(self, chunk_id: bytes) -> bytes:
        return self.inventory.read_envelope(chunk_id)

    def locate(self, chunk_id: bytes) -> Location:
        return self.inventory.locate(chunk_id)

    def locate_many(self, ids: Sequence[bytes]) -> list[Location]:
        return self.inventory.locate_many(ids)

    def read(self, chunk_id: bytes, size: int | None = None) -> Blob:
        """The raw bytes of a chunk, decoded (delta bases resolved) and verified.

        ``size`` is the length the caller's place needs (its block of a tensor):
        the chunk's claimed size is checked against it before decompressing and
        the decoded length after. Delta chains are bounded and loop-checked
        (see :mod:`apollo_cas.codecs.chain`).
        """
        return chain.read_verified(chunk_id, size, self.get_blob, self.backend.location)

    def decode(self, chunk_id: bytes, blob: bytes | memoryview, size: int | None = None) -> Blob:
        """Decode and verify one envelope read elsewhere (a range of a pack), with
        the same checks as :meth:`read`; its delta bases are read from the store.
        The result shares no memory with ``blob`` (``codecs.decode``), so ``blob`` is
        read where it lies, not copied first."""

        def get(cid: bytes) -> Blob:
            return blob if cid == chunk_id else self.get_blob(cid)

        return chain.read_verified(chunk_id, size, get, self.backend.location)

    def read_span(
        self, key: str, offset: int, items: list[tuple[bytes, int, int, int | None]]
    ) -> list[Blob]:
        """Several chunks that lie back to back in one object, in one ranged read.

        ``items`` are ``(chunk id, offset, length, size)`` with absolute offsets
        inside ``key``, ascending from ``offset``; each is decoded and verified.
        """
        end = max(o + n for _, o, n, _s in items)
        loc = Location(key, offset, end - offset)
        data = memoryview(self.inventory.read_range(loc, items[0][0]))
        return [self.decode(cid, data[o - offset : o - offset + n], s) for cid, o, n, s in items]

    def base_of(self, chunk_id: bytes) -> bytes | None:
        """The base a stored chunk is a delta against (reads only its header)."""
        return self.inventory.base_of(chunk_id)
