"""The local backend's OS errors become the package's errors, and leave no trace.

CI runs as root, for whom a chmod denies nothing, so permission and space
errors are injected by patching the os functions the backend calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apollo_cas.backends.local import LocalBackend
from apollo_cas.errors import BackendError, DiskFull, ObjectNotFound, PermissionDenied

from .contract import HEX_A

CHUNK = f"chunks/ab/{HEX_A}"


def files_under(root: Path) -> list[str]:
    """Every file, temporaries included; not the lock file compare_and_swap flocks."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".refs.lock"
    )


@pytest.fixture
def store(tmp_path: Path) -> tuple[LocalBackend, Path]:
    root = tmp_path / "store"
    b = LocalBackend(root)
    b.put("config", b"config v1")
    b.put(CHUNK, b"old chunk")
    return b, root


def raise_on(err: int) -> Callable[..., Any]:
    def fn(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    return fn


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_writing(
    store: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    b, root = store
    before = files_under(root)
    monkeypatch.setattr(os, "fsync", raise_on(err))
    with pytest.raises(DiskFull) as info:
        b.put("config", b"config v2")
    msg = str(info.value)
    assert "no space left" in msg and str(root / "config") in msg and "gc" in msg
    assert "\n" not in msg
    with pytest.raises(DiskFull):
        b.put_if_absent(f"manifests/{HEX_A}", b"m")
    with pytest.raises(DiskFull):
        b.compare_and_swap("refs/series/default", None, b"m")
    monkeypatch.undo()
    # Nothing half-written, nothing replaced: the store is as it was.
    assert files_under(root) == before
    assert b.get("config") == b"config v1"
    assert sorted(b.list("")) == sorted(["config", CHUNK])


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_permission_denied_while_writing(
    store: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    b, root = store
    before = files_under(root)
    monkeypatch.setattr(os, "rename", raise_on(err))
    with pytest.raises(PermissionDenied) as info:
        b.put("config", b"config v2")
    msg = str(info.value)
    assert "permission denied" in msg and str(root / "config") in msg
    assert "check the owner" in msg
    monkeypatch.undo()
    assert files_under(root) == before  # the temporary file was removed
    assert b.get("config") == b"config v1"


def test_permission_denied_creating_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = LocalBackend(tmp_path / "store")
    monkeypatch.setattr(Path, "mkdir", raise_on(errno.EACCES))
    with pytest.raises(PermissionDenied, match="permission denied while creating"):
        b.put(CHUNK, b"x")


def test_permission_denied_while_reading(
    store: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, root = store
    monkeypatch.setattr(os, "open", raise_on(errno.EACCES))  # objects open with O_NOFOLLOW
    with pytest.raises(PermissionDenied) as info:
        b.get("config")
    assert str(root / "config") in str(info.value)
    # A missing key stays ObjectNotFound, not a permission problem.
    monkeypatch.undo()
    with pytest.raises(ObjectNotFound):
        b.get("refs/tags/none")


def test_permission_denied_while_deleting(
    store: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _root = store
    monkeypatch.setattr(Path, "unlink", raise_on(errno.EACCES))
    with pytest.raises(PermissionDenied, match="while deleting"):
        b.delete(CHUNK)
    monkeypatch.undo()
    assert b.get(CHUNK) == b"old chunk"


def test_other_os_errors_are_backend_errors(
    store: tuple[LocalBackend, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, _root = store
    monkeypatch.setattr(os, "fsync", raise_on(errno.EIO))
    with pytest.raises(BackendError) as info:
        b.put("config", b"x")
    assert not isinstance(info.value, (DiskFull, PermissionDenied))
    assert "Input/output error" in str(info.value)


@pytest.mark.parametrize(
    "key",
    ["../escape", "/etc/passwd", "a/../../escape", "chunks/../../escape", "a\0b"],
)
def test_keys_escaping_the_root_are_refused(tmp_path: Path, key: str) -> None:
    root = tmp_path / "store"
    b = LocalBackend(root)
    with pytest.raises(BackendError, match="refusing"):
        b.put(key, b"x")
    with pytest.raises(BackendError, match="refusing"):
        b.get(key)
    with pytest.raises(BackendError, match="refusing"):
        b.delete(key)
    assert not (tmp_path / "escape").exists()
    assert files_under(tmp_path) == []
