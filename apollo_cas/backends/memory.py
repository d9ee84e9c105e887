"""An in-memory backend for tests and for the Python API's throwaway stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from ..errors import ObjectNotFound
from .base import CAS_MUTEX, Backend, Capabilities, ObjectInfo


class MemoryBackend(Backend):
    """A dict of key -> (bytes, mtime), guarded by one lock."""

    #: Lives in this process only: restores stay on threads.
    capabilities = Capabilities(shareable_across_processes=False, compare_and_swap=CAS_MUTEX)

    def __init__(self, location: str = "memory://") -> None:
        self.location = location
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key][0]
            except KeyError:
                raise ObjectNotFound(f"{key} is missing in {self.location}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset : offset + length]

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        with self._lock:
            self._objects[key] = (bytes(data), time.time())

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = (bytes(data), time.time())
            return True

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def info(self, key: str) -> ObjectInfo:
        with self._lock:
            try:
                data, mtime = self._objects[key]
            except KeyError:
                raise ObjectNotFound(f"{key} is missing in {self.location}") from None
            return ObjectInfo(size=len(data), mtime=mtime)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        yield from keys

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        with self._lock:
            current = self._objects.get(key)
            if (current[0] if current else None) != expected:
                return False
            if data is None:
                self._objects.pop(key, None)
            else:
                self._objects[key] = (bytes(data), time.time())
            return True
