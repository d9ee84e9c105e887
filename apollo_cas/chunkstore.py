"""Chunks in a backend: write once under their id, read back verified.

This is the only module that turns blocks into stored chunks and back; it
applies the codec policy on the way in and checks every read against the id
on the way out (promise 1: a mismatch is an error naming the chunk, never
wrong weights).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import codecs
from .backends.base import Backend
from .errors import CorruptChunk, ObjectNotFound
from .hashing import digest
from .layout import chunk_key

#: Enough of a chunk to parse its envelope and codec parameters.
HEADER_PEEK = 512


@dataclass(frozen=True)
class PutResult:
    """What storing one block did."""

    chunk_id: bytes
    written: bool  # False: the chunk was already in the store
    stored_size: int  # bytes written (0 when not written)
    base: bytes | None  # the chunk it is a delta against, if any


class ChunkStore:
    """Content-addressed chunks on top of a backend."""

    def __init__(self, backend: Backend, policy: codecs.CodecPolicy) -> None:
        self.backend = backend
        self.policy = policy
        # Ids known to exist (written or seen in a manifest this process trusts);
        # spares one existence check per unchanged block.
        self.known: set[bytes] = set()
        self._claimed: set[bytes] = set()
        self._lock = threading.Lock()

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

    def exists(self, chunk_id: bytes) -> bool:
        if chunk_id in self.known:
            return True
        return self.backend.exists(chunk_key(chunk_id.hex()))

    def _claim(self, chunk_id: bytes) -> bool:
        """True if this thread should write ``chunk_id`` (no other thread is)."""
        with self._lock:
            if chunk_id in self._claimed or chunk_id in self.known:
                return False
            self._claimed.add(chunk_id)
            return True

    def put_block(
        self,
        data: bytes | memoryview,
        itemsize: int = 1,
        chunk_id: bytes | None = None,
        base: codecs.Base | None = None,
    ) -> PutResult:
        """Store one block unless it is already there.

        ``chunk_id``, when given (computed on the GPU), is checked against the
        bytes, so a device/host disagreement can never name a chunk wrongly.
        """
        actual = digest(data)
        if chunk_id is not None and actual != chunk_id:
            raise CorruptChunk(
                f"block hashed to {actual.hex()} on the host but {chunk_id.hex()} on the device",
                "the weights changed during the save (pause training) or the GPU hash is wrong; retry",
            )
        if not self._claim(actual) or self.exists(actual):
            return PutResult(actual, False, 0, None)
        blob = (
            codecs.encode(data, self.policy, itemsize, base=base)
            if base is not None
            else codecs.encode(data, self.policy, itemsize)
        )
        written = self.backend.put_if_absent(chunk_key(actual.hex()), blob, durable=False)
        with self._lock:
            self.known.add(actual)
        base_hex = codecs.base_of(blob) if written else None
        return PutResult(
            actual,
            written,
            len(blob) if written else 0,
            bytes.fromhex(base_hex) if base_hex else None,
        )

    def put_encoded(
        self, chunk_id: bytes, blob: bytes, base: bytes | None, raw_size: int
    ) -> PutResult:
        """Store a chunk encoded elsewhere (the GPU delta save) unless it is already there.

        The caller vouches that ``blob`` (``raw_size`` bytes once decoded, a delta against
        ``base`` or a full chunk when None) decodes to bytes hashing to ``chunk_id`` (the
        GPU delta save checks the live block's hash on the device).
        """
        if not self._claim(chunk_id) or self.exists(chunk_id):
            return PutResult(chunk_id, False, 0, None)
        written = self.backend.put_if_absent(chunk_key(chunk_id.hex()), blob, durable=False)
        with self._lock:
            self.known.add(chunk_id)
        return PutResult(chunk_id, written, len(blob) if written else 0, base if written else None)

    def get_blob(self, chunk_id: bytes) -> bytes:
        hex_id = chunk_id.hex()
        try:
            return self.backend.get(chunk_key(hex_id))
        except ObjectNotFound:
            raise CorruptChunk(
                f"chunk {hex_id} is missing from {self.backend.location}",
                "run 'apollo-cas verify' to see which checkpoints it breaks; restore another one",
            ) from None

    def read(self, chunk_id: bytes) -> bytes:
        """The raw bytes of a chunk, decoded (delta bases resolved) and verified."""
        hex_id = chunk_id.hex()
        blob = self.get_blob(chunk_id)
        raw = codecs.decode(
            blob, f"chunk {hex_id}", load_base=lambda h: self.read(bytes.fromhex(h))
        )
        if digest(raw) != chunk_id:
            raise CorruptChunk(
                f"chunk {hex_id} is corrupt: its content does not hash to its name",
                "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
            )
        return raw

    def base_of(self, chunk_id: bytes) -> bytes | None:
        """The base a stored chunk is a delta against (reads only its header)."""
        hex_id = chunk_id.hex()
        try:
            head = self.backend.get_range(chunk_key(hex_id), 0, HEADER_PEEK)
        except ObjectNotFound:
            return None
        b = codecs.base_of(head, f"chunk {hex_id}")
        return bytes.fromhex(b) if b else None
