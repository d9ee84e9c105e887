"""A chunk reader that fails part-way, for restores interrupted in the middle."""

from __future__ import annotations

import threading

from apollo_cas.decoding import ChunkReader
from apollo_cas.inventory import Location
from apollo_cas.store import Store


class Boom(RuntimeError):
    """The injected failure."""


class FailingReader:
    """The store's chunk reader, raising :class:`Boom` once ``n`` chunks were read."""

    def __init__(self, real: ChunkReader, n: int) -> None:
        self.real = real
        self.n = n
        self.count = 0
        self.lock = threading.Lock()

    def _tick(self, k: int = 1) -> None:
        with self.lock:
            self.count += k
            if self.count > self.n:
                raise Boom(f"read {self.n} chunks, then the disk went away")

    def read(self, chunk_id: bytes, size: int | None = None) -> bytes:
        self._tick()
        return self.real.read(chunk_id, size)

    def locate(self, chunk_id: bytes) -> Location:
        return self.real.locate(chunk_id)

    def read_span(
        self, key: str, offset: int, items: list[tuple[bytes, int, int, int | None]]
    ) -> list[bytes]:
        self._tick(len(items))
        return self.real.read_span(key, offset, items)


def failing_after(st: Store, n: int) -> FailingReader:
    """A reader for ``st.reader`` that raises :class:`Boom` once ``n`` chunks have been read."""
    return FailingReader(st.reader, n)
