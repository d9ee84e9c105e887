"""apollo_cas.fsio: atomic writes, exclusive creates, temporary names, OS error mapping.

Failures (a full disk, a filesystem without hard links) come through the ``fs``
seam, a :class:`~apollo_cas.fsio.FileSystem` subclass, not by patching.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from apollo_cas import fsio, procinfo
from apollo_cas.errors import BackendError, DiskFull, PermissionDenied


class FullDisk(fsio.FileSystem):
    """A disk with ``room`` bytes left: a write past it fails with ``err``."""

    def __init__(self, room: int, err: int = errno.ENOSPC) -> None:
        self.room, self.err = room, err

    def writev(self, fd: int, pieces: Sequence[memoryview]) -> int:
        if sum(len(p) for p in pieces) > self.room:
            # Like the kernel: what fits is written, then the next write fails.
            if self.room == 0:
                raise OSError(self.err, os.strerror(self.err))
            fits, left = [], self.room
            for p in pieces:
                fits.append(p[:left])
                left -= len(fits[-1])
            pieces = [p for p in fits if len(p)]
        n = super().writev(fd, pieces)
        self.room -= n
        return n


class Trickle(fsio.FileSystem):
    """Writes at most ``most`` bytes per call (a pipe, a signal mid-write)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.calls = 0

    def writev(self, fd: int, pieces: Sequence[memoryview]) -> int:
        self.calls += 1
        fits, left = [], self.most
        for p in pieces:
            if left == 0:
                break
            fits.append(p[:left])
            left -= len(fits[-1])
        return super().writev(fd, fits)


class NoLinks(fsio.FileSystem):
    """A filesystem without hard links (vfat, some FUSE mounts)."""

    def link(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


class Recorder(fsio.FileSystem):
    """Records which paths were opened as directories and fsynced."""

    def __init__(self) -> None:
        self.dirs: dict[int, Path] = {}
        self.synced_dirs: list[Path] = []
        self.writes: list[int] = []

    def open(self, path: Path, flags: int, mode: int) -> int:
        fd = super().open(path, flags, mode)
        if flags & os.O_DIRECTORY:
            self.dirs[fd] = Path(path)
        return fd

    def writev(self, fd: int, pieces: Sequence[memoryview]) -> int:
        self.writes.append(sum(len(p) for p in pieces))
        return super().writev(fd, pieces)

    def fsync(self, fd: int) -> None:
        if fd in self.dirs:
            self.synced_dirs.append(self.dirs[fd])
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self.dirs.pop(fd, None)  # the number is reused by the next open
        super().close(fd)


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -- atomic_write ------------------------------------------------------------


def test_atomic_write_bytes_pieces_and_callback(tmp_path: Path) -> None:
    fsio.atomic_write(tmp_path / "a", b"one")
    fsio.atomic_write(tmp_path / "b", [b"tw", memoryview(b"o"), bytearray(b"!")])
    fsio.atomic_write(tmp_path / "c", lambda f: f.write(b"three"))
    fsio.atomic_write(tmp_path / "d", bytearray(b"four"))  # bytes-like: one piece
    assert (tmp_path / "a").read_bytes() == b"one"
    assert (tmp_path / "b").read_bytes() == b"two!"
    assert (tmp_path / "c").read_bytes() == b"three"
    assert (tmp_path / "d").read_bytes() == b"four"
    assert names(tmp_path) == ["a", "b", "c", "d"]  # no temporaries left


def test_atomic_write_replaces_and_keeps_mode(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    p.write_bytes(b"old")
    fsio.atomic_write(p, b"new", mode=0o600)
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_atomic_write_writes_large_pieces_whole(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    rec = Recorder()
    fsio.atomic_write(tmp_path / "big", [data, memoryview(data)[:5]], fs=rec)
    assert (tmp_path / "big").read_bytes() == data + data[:5]
    assert sum(rec.writes) == len(data) + 5


@pytest.mark.parametrize("most", [1 << 30, 7, 1000])
def test_atomic_write_of_many_pieces_survives_short_writes(tmp_path: Path, most: int) -> None:
    """More pieces than one writev takes (IOV_MAX), empty ones among them, each
    call cut short at any byte: the file is still the pieces back to back."""
    rng = np.random.default_rng(most)
    pieces = [
        rng.integers(0, 256, int(rng.integers(0, 40)), np.uint8).tobytes() for _ in range(3000)
    ]
    fs = Trickle(most)
    fsio.atomic_write(tmp_path / "f", pieces, fs=fs)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)
    if most > sum(map(len, pieces)):
        assert fs.calls == 3  # 3000 pieces, 1024 per writev: one call per group


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path: Path, err: int) -> None:
    p = tmp_path / "config"
    p.write_bytes(b"v1")
    with pytest.raises(OSError) as info:
        fsio.atomic_write(p, [b"a" * 100, b"b" * 100], fs=FullDisk(150, err))
    assert info.value.errno == err
    assert p.read_bytes() == b"v1"
    assert names(tmp_path) == ["config"]
    mapped = fsio.os_error(info.value, p, "writing")
    assert isinstance(mapped, DiskFull)
    msg = str(mapped)
    assert msg.startswith(f"no space left while writing {p}") and "gc" in msg
    assert "\n" not in msg


def test_failed_callback_leaves_no_temporary(tmp_path: Path) -> None:
    def boom(f: IO[bytes]) -> None:
        f.write(b"half")
        raise RuntimeError("serialiser failed")

    with pytest.raises(RuntimeError):
        fsio.atomic_write(tmp_path / "x", boom)
    assert names(tmp_path) == []


def test_directory_fsync_can_be_deferred(tmp_path: Path) -> None:
    rec = Recorder()
    fsio.atomic_write(tmp_path / "a", b"x", fs=rec)
    assert rec.synced_dirs == [tmp_path]
    rec.synced_dirs.clear()
    fsio.atomic_write(tmp_path / "b", b"x", sync_dir=False, fs=rec)
    assert rec.synced_dirs == []
    fsio.fsync_dir(tmp_path, rec)
    assert rec.synced_dirs == [tmp_path]


# -- temporary names ---------------------------------------------------------


def test_temporary_names_carry_the_writer(tmp_path: Path) -> None:
    t = fsio.temp_path(tmp_path / "weights.bin")
    assert t.parent == tmp_path
    assert t.name.startswith(fsio.TMP_PREFIX + procinfo.tag() + "-")
    assert t.name.endswith("-weights.bin")
    token = fsio.temp_writer(t.name)
    assert token == procinfo.tag()
    assert procinfo.judge_tag(token) == procinfo.ALIVE
    other = fsio.temp_path(tmp_path / "w", prefix=".tmp-apollo-")
    assert fsio.temp_writer(other.name, ".tmp-apollo-") == procinfo.tag()
    assert fsio.temp_writer("weights.bin") is None
    assert fsio.temp_path(tmp_path / "w") != fsio.temp_path(tmp_path / "w")  # two threads


def test_temporary_commit_and_discard(tmp_path: Path) -> None:
    t = fsio.Temporary(tmp_path / "out", path=fsio.temp_path(tmp_path / "out", ".tmp-apollo-"))
    os.pwrite(t.fd, b"data", 0)  # what restore decoders do
    t.sync()
    t.commit()
    assert names(tmp_path) == ["out"] and (tmp_path / "out").read_bytes() == b"data"
    d = fsio.Temporary(tmp_path / "gone")
    d.discard()
    d.discard()  # twice is harmless
    assert names(tmp_path) == ["out"]


# -- create_exclusive --------------------------------------------------------


@pytest.mark.parametrize("fs", [fsio.REAL, NoLinks()], ids=["links", "no-links"])
def test_create_exclusive_creates_once(tmp_path: Path, fs: fsio.FileSystem) -> None:
    p = tmp_path / "config"
    assert fsio.create_exclusive(p, b"first", fs=fs) is True
    assert fsio.create_exclusive(p, b"second", fs=fs) is False
    assert p.read_bytes() == b"first"
    assert names(tmp_path) == ["config"]


def test_create_exclusive_full_disk_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        fsio.create_exclusive(tmp_path / "config", b"x" * 10, fs=FullDisk(4))
    assert info.value.errno == errno.ENOSPC
    assert names(tmp_path) == []


def racing_winners(writers: int, attempt: Callable[[int], bool]) -> list[int]:
    """Run ``attempt(i)`` on ``writers`` threads released at once; who got True.
    (Also used by tests/backends/test_local.py.)"""
    start = threading.Barrier(writers)
    won: list[int] = []

    def run(i: int) -> None:
        start.wait()
        if attempt(i):
            won.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_racing_exclusive_creates_have_one_winner(tmp_path: Path) -> None:
    for round_ in range(20):
        p = tmp_path / f"config{round_}"
        won = racing_winners(16, lambda i, p=p: fsio.create_exclusive(p, f"writer {i}".encode()))
        assert len(won) == 1
        assert p.read_bytes() == f"writer {won[0]}".encode()
    assert all(not n.startswith(fsio.TMP_PREFIX) for n in names(tmp_path))


# -- error mapping -----------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "kind", "cls"),
    [
        (errno.ENOSPC, fsio.ErrorKind.FULL, DiskFull),
        (errno.EDQUOT, fsio.ErrorKind.FULL, DiskFull),
        (errno.EROFS, fsio.ErrorKind.READ_ONLY, PermissionDenied),
        (errno.EACCES, fsio.ErrorKind.DENIED, PermissionDenied),
        (errno.EPERM, fsio.ErrorKind.DENIED, PermissionDenied),
    ],
)
def test_os_errors_map_to_the_package_errors(
    tmp_path: Path, err: int, kind: fsio.ErrorKind, cls: type[BackendError]
) -> None:
    exc = OSError(err, os.strerror(err))
    assert fsio.error_kind(exc) is kind
    mapped = fsio.os_error(exc, tmp_path / "chunks", "creating")
    assert type(mapped) is cls
    assert str(tmp_path / "chunks") in str(mapped) and "creating" in str(mapped)
    assert mapped.hint


def test_other_os_errors_keep_their_text(tmp_path: Path) -> None:
    exc = OSError(errno.EIO, os.strerror(errno.EIO))
    assert fsio.error_kind(exc) is fsio.ErrorKind.OTHER
    mapped = fsio.os_error(exc, "refs/series/default", "updating")
    assert type(mapped) is BackendError
    assert str(mapped) == "Input/output error while updating refs/series/default"
