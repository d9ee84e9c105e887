"""The backend contract on the in-memory backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from apollo_cas.backends import Backend, open_backend
from apollo_cas.backends.memory import MemoryBackend

from .contract import BackendContract


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Callable[[], Backend]:
        # One dict per MemoryBackend object: "another backend on the same store"
        # is the same object here.
        shared = MemoryBackend()
        return lambda: shared


def test_open_backend_memory() -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
