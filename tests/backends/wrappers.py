"""Wrapper backends for tests: fault injection and latency around a real backend.

As restic wraps its backends (``ErrorBackend``, ``RetryBackend``) instead of
patching them, tests that need a backend which is slow, dies or misbehaves at
one step subclass :class:`ForwardingBackend` and override only that step; the
store, the locks and gc above see an ordinary :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from apollo_cas.backends import Backend, Capabilities
from apollo_cas.backends.base import ObjectInfo


class ForwardingBackend(Backend):
    """Hands every call to ``inner``. Subclasses override what they change.

    The capabilities are the inner backend's, except ``files_root``: a reader
    that opened the files directly would go around the wrapper.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        return replace(self.inner.capabilities, files_root=None)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.inner.put(key, data, durable=durable)

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        return self.inner.put_if_absent(key, data, durable=durable)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def info(self, key: str) -> ObjectInfo:
        return self.inner.info(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        return self.inner.compare_and_swap(key, expected, data)

    def sync(self) -> None:
        self.inner.sync()

    def remove_if_empty(self) -> None:
        self.inner.remove_if_empty()

    def remove_temporaries(self, older_than: float) -> int:
        return self.inner.remove_temporaries(older_than)

    def close(self) -> None:
        self.inner.close()
