"""The backend contract on the local-directory backend, plus its temporaries."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from apollo_cas import fsio, layout
from apollo_cas.backends import Backend, open_backend
from apollo_cas.backends.local import LocalBackend
from apollo_cas.hashing import digest_hex
from tests.test_fsio import racing_winners

from .contract import HEX_A, BackendContract


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def location(self, tmp_path: Path) -> str:
        return str(tmp_path / "store")

    @pytest.fixture
    def make_backend(self, location: str) -> Callable[[], Backend]:
        return lambda: LocalBackend(location)


def test_open_backend_local(tmp_path: Path) -> None:
    assert isinstance(open_backend(str(tmp_path / "s")), LocalBackend)


def test_leftover_temporaries_are_hidden_and_reaped(tmp_path: Path) -> None:
    """A write killed before its rename leaves a .tmp-* file: never listed, gc removes it."""
    b = LocalBackend(tmp_path / "store")
    b.put(f"chunks/ab/{HEX_A}", b"x")
    leftover = tmp_path / "store" / "chunks" / "ab" / f".tmp-123-deadbeef-{HEX_A}"
    leftover.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    fresh = tmp_path / "store" / "chunks" / "ab" / ".tmp-456-cafef00d-other"
    fresh.write_bytes(b"in progress")
    assert list(b.list("")) == [f"chunks/ab/{HEX_A}"]
    # Only leftovers older than the cut-off: a write in progress is kept.
    assert b.remove_temporaries(time.time() - 3600) == 1
    assert not leftover.exists()
    assert fresh.exists()
    assert b.get(f"chunks/ab/{HEX_A}") == b"x"


def test_racing_creates_of_the_config_have_one_winner(tmp_path: Path) -> None:
    """The config is not content-addressed: racing first saves write different
    bytes, and exactly one of them may be told it created the store."""
    for round_ in range(20):
        root = tmp_path / f"store{round_}"
        backends = [LocalBackend(root) for _ in range(8)]  # one each, as processes have

        def create(i: int, backends: list[LocalBackend] = backends) -> bool:
            return backends[i].put_if_absent("config", f"config of writer {i}".encode())

        won = racing_winners(len(backends), create)
        assert len(won) == 1, f"round {round_}: writers {won} were all told they won"
        b = LocalBackend(root)
        assert b.get("config") == f"config of writer {won[0]}".encode()
        assert b.put_if_absent("config", b"late") is False
        assert sorted(p.name for p in root.iterdir()) == ["config"]  # no temporaries left


def test_a_write_by_digest_names_the_file_by_its_bytes_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    """The pack path: written under a temporary in the root, hashed where it lies,
    renamed to its id. A write that fails half-way leaves only a reapable
    temporary, never an object under a name its bytes do not hash to."""
    root = tmp_path / "store"
    b = LocalBackend(root)
    b.put(f"chunks/ab/{HEX_A}", b"x")  # the root exists, as in an open store
    data = [os.urandom(5000), memoryview(os.urandom(70_000))[3:], b"trailer"]
    pid = b.put_by_digest(layout.pack_key, data)
    whole = b"".join(bytes(p) for p in data)
    assert (root / layout.pack_key(pid)).read_bytes() == whole
    assert pid == digest_hex(whole)
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []

    class Dies(fsio.FileSystem):
        def fsync(self, fd: int) -> None:
            raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        fsio.atomic_write_by_digest(
            root, lambda d: root / layout.pack_key(d), [b"y" * 10], fs=Dies()
        )
    assert list(b.list("packs/")) == [layout.pack_key(pid)]
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []
