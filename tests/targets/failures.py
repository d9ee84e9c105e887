"""A chunk reader that fails part-way, for restores interrupted in the middle."""

from __future__ import annotations

import threading
from collections.abc import Callable

from apollo_cas.store import Store


class Boom(RuntimeError):
    """The injected failure."""


def failing_after(st: Store, n: int) -> Callable[[bytes, int | None], bytes]:
    """``st.read_chunk`` that raises :class:`Boom` once ``n`` chunks have been read."""
    real = st.read_chunk
    count = [0]
    lock = threading.Lock()

    def read_chunk(cid: bytes, size: int | None = None) -> bytes:
        with lock:
            count[0] += 1
            if count[0] > n:
                raise Boom(f"read {n} chunks, then the disk went away")
        return real(cid, size)

    return read_chunk
