"""Filesystem writes in one place: temporary names, atomic writes, exclusive creates, errors.

Every file apollo_cas writes (a store object, a restore output, a handles file)
goes temp file -> write -> fsync -> rename -> fsync directory, the sequence
restic and git use, so a crash leaves either the old file or the whole new one
plus, at worst, a temporary. Temporaries follow one naming rule,
``<prefix><writer>-<8 hex>-<name>`` in the directory of ``<name>``, ``<writer>``
being :func:`procinfo.tag`: whoever cleans leftovers up (gc in a store, the next
restore in an output directory) reads the writer back with :func:`temp_writer`
and never removes the temporary of a writer that still runs.

OS errors stay :class:`OSError` here; callers map them once, where they know
what the path is: :func:`os_error` for a store, :func:`destination_error`
for a restore's destination, both by :func:`error_kind`.

Tests inject failures (a full disk, a filesystem without hard links) through
the ``fs`` argument, a :class:`FileSystem` whose calls can fail, instead of
patching module internals.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

from . import procinfo
from .errors import ApolloError, BackendError, DiskFull, PermissionDenied, TargetError
from .hashing import digest_hex

__all__ = [
    "REAL",
    "TMP_PREFIX",
    "Bytes",
    "Data",
    "ErrorKind",
    "FileSystem",
    "Temporary",
    "atomic_write",
    "create_exclusive",
    "destination_error",
    "error_kind",
    "fsync_dir",
    "os_error",
    "temp_path",
    "temp_writer",
]

#: The prefix of a store's temporaries (docs/FORMAT.md): the leading dot keeps
#: them out of every listing.
TMP_PREFIX = ".tmp-"

#: One piece of a file's contents.
Bytes = bytes | bytearray | memoryview
#: What a write puts in a file: bytes, pieces of bytes written in order, or a
#: callback that writes into the open file (``torch.save``).
Data = Bytes | Iterable[Bytes] | Callable[[IO[bytes]], object]

#: Pieces per writev (the kernel's limit, 1024 on Linux).
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16

# errno values that say "this filesystem makes no hard links" (vfat, some FUSE
# and network filesystems), for which an exclusive create falls back to rename.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class FileSystem:
    """The os calls this module makes, looked up on :mod:`os` at call time.

    The seam for tests: a subclass whose ``writev`` raises ENOSPC is a full disk,
    one whose ``link`` raises EPERM a filesystem without hard links.
    """

    def open(self, path: Path, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def writev(self, fd: int, pieces: Sequence[memoryview]) -> int:
        """Write ``pieces`` in order with one call; returns the bytes written
        (possibly fewer than all, as ``write`` may)."""
        return os.writev(fd, pieces)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


#: The real filesystem.
REAL = FileSystem()


# -- temporary names ------------------------------------------------------


def temp_path(path: Path, prefix: str = TMP_PREFIX) -> Path:
    """The temporary a write of ``path`` goes through: ``<prefix><writer>-<rand>-<name>``
    beside it, ``<writer>`` being :func:`procinfo.tag` (pid, host/boot/namespace
    digest, start); the random part keeps two threads of one writer apart."""
    return path.with_name(f"{prefix}{procinfo.tag()}-{uuid.uuid4().hex[:8]}-{path.name}")


def temp_writer(name: str, prefix: str = TMP_PREFIX) -> str | None:
    """The writer token of the temporary ``name`` (for :func:`procinfo.judge_tag`),
    or None if ``name`` is not a temporary of that prefix."""
    if not name.startswith(prefix):
        return None
    return name[len(prefix) :].split("-", 1)[0]


class Temporary:
    """A file being written under a temporary name beside ``final`` (created here:
    if the open fails, there is nothing to discard).

    :meth:`commit` renames it onto ``final``, :meth:`publish` links it there
    unless ``final`` exists; :meth:`discard` drops it. The descriptor is open
    read-write (restore decoders ``pwrite`` into it and preallocate it).
    """

    def __init__(
        self,
        final: Path,
        *,
        path: Path | None = None,
        mode: int = 0o666,
        fs: FileSystem = REAL,
    ) -> None:
        self.final = final
        self.fs = fs
        #: The temporary: ``path``, or by default :func:`temp_path` of ``final``.
        self.path = path or temp_path(final)
        # O_EXCL: the name is unique, and a link planted under it is not followed.
        self.fd = fs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)

    def write(self, data: Data) -> None:
        """Write all of ``data`` at the current position."""
        if callable(data):
            with os.fdopen(self.fd, "wb", closefd=False) as f:
                data(f)
            return
        # A bytes-like object is one piece, not an iterable of ints.
        pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        views = [v for v in (memoryview(p).cast("B") for p in pieces) if v.nbytes]
        # One writev per IOV_MAX pieces, not a write per piece: a pack is ~100
        # envelopes, and its writer thread re-took the GIL after every write
        # while 16 encoding threads held it (a full save's pack writes took
        # 235 ms each against 175 ms alone, h200_2026-12-04/run1).
        i = 0
        while i < len(views):
            n = self.fs.writev(self.fd, views[i : i + _IOV_MAX])
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress", str(self.path))
            while n:
                k = views[i].nbytes
                if n < k:
                    views[i] = views[i][n:]
                    break
                n -= k
                i += 1

    def sync(self) -> None:
        self.fs.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.fs.close(fd)

    def commit(self) -> None:
        """Close and rename onto ``final`` (replacing what is there)."""
        self.close()
        self.fs.rename(self.path, self.final)

    def publish(self) -> bool:
        """Close and link onto ``final`` unless it exists; False if it did.

        ``link`` fails with EEXIST where ``rename`` would replace, so of two
        racing writers exactly one is told it created the file, and the file
        never appears half-written (as an ``O_EXCL`` create of ``final`` would).
        On a filesystem without hard links this falls back to rename, which
        keeps the file whole but lets a racing writer replace it.
        """
        self.close()
        try:
            self.fs.link(self.path, self.final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if self.final.exists():
                return False
            self.fs.rename(self.path, self.final)
            return True
        with suppress(OSError):  # a leftover link is a temporary gc removes
            self.fs.unlink(self.path)
        return True

    def discard(self) -> None:
        """Drop the temporary; never raises (it runs while another error propagates)."""
        with suppress(OSError):
            self.close()
        with suppress(OSError):
            self.fs.unlink(self.path)


def _write_temporary(path: Path, data: Data, fsync: bool, mode: int, fs: FileSystem) -> Temporary:
    tmp = Temporary(path, mode=mode, fs=fs)
    try:
        tmp.write(data)
        if fsync:
            tmp.sync()
    except BaseException:
        tmp.discard()
        raise
    return tmp


def atomic_write(
    path: Path,
    data: Data,
    *,
    fsync: bool = True,
    sync_dir: bool = True,
    mode: int = 0o666,
    fs: FileSystem = REAL,
) -> None:
    """Write ``path`` atomically: temporary, write, fsync, rename, fsync the directory.

    ``sync_dir=False`` leaves the directory fsync to the caller (the local
    backend batches it for chunks: one per directory, not one per chunk).
    ``mode`` is masked by the umask, as ``open`` does.
    """
    tmp = _write_temporary(path, data, fsync, mode, fs)
    try:
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    if sync_dir:
        fsync_dir(path.parent, fs)


def atomic_write_by_digest(
    directory: Path,
    path_for: Callable[[str], Path],
    data: Data,
    *,
    sync_dir: bool = True,
    fs: FileSystem = REAL,
) -> Path:
    """Write ``data`` to ``path_for(its XXH3-128 hex)`` atomically; returns that path.

    The temporary is written in ``directory`` (on the final's filesystem), then
    hashed where it lies, in the page cache, by one call that releases the GIL,
    then fsynced and renamed into place. Hashing the pieces before writing them
    took a call per piece: a pack writer re-took the GIL ~100 times per 64 MiB
    pack while 16 encoding threads held it, ~50 ms per pack, in the gap between
    one wave of pack writes and the next (h200_2026-12-04/run3).
    """
    tmp = Temporary(directory / "by-digest", fs=fs)
    try:
        tmp.write(data)
        tmp.final = path_for(_file_digest(tmp.fd))
        tmp.sync()
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    if sync_dir:
        fsync_dir(tmp.final.parent, fs)
    return tmp.final


def _file_digest(fd: int) -> str:
    size = os.fstat(fd).st_size
    if size == 0:
        return digest_hex(b"")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ) as m, memoryview(m) as view:
        return digest_hex(view)


def create_exclusive(
    path: Path,
    data: Data,
    *,
    sync_dir: bool = True,
    mode: int = 0o666,
    fs: FileSystem = REAL,
) -> bool:
    """Create ``path`` with ``data`` unless it exists; True if this call created it.

    For files whose racing writers write different bytes (the store's config):
    the whole file is written and fsynced under a temporary name, then linked
    into place (see :meth:`Temporary.publish`).
    """
    tmp = _write_temporary(path, data, True, mode, fs)
    try:
        created = tmp.publish()
    finally:
        tmp.discard()
    if created and sync_dir:
        fsync_dir(path.parent, fs)
    return created


def fsync_dir(path: Path, fs: FileSystem = REAL) -> None:
    """fsync the directory ``path``, which makes the names created in it durable."""
    fd = fs.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


# -- errors ---------------------------------------------------------------


class ErrorKind(enum.Enum):
    """What an OSError means for the user."""

    FULL = "full"  # no space or quota left
    READ_ONLY = "read-only"  # a read-only filesystem
    DENIED = "denied"  # the owner or mode forbids it
    OTHER = "other"


def error_kind(exc: OSError) -> ErrorKind:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ErrorKind.FULL
    if exc.errno == errno.EROFS:
        return ErrorKind.READ_ONLY
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ErrorKind.DENIED
    return ErrorKind.OTHER


def os_error(exc: OSError, path: str | os.PathLike[str], action: str) -> BackendError:
    """An OSError on the store's filesystem as the package's error, one line that
    names the path, with what to do (``action``: "writing", "reading", ...)."""
    kind = error_kind(exc)
    if kind is ErrorKind.FULL:
        return DiskFull(
            f"no space left while {action} {os.fspath(path)}",
            "free disk space (apollo-cas gc reclaims unreferenced chunks) and run the command again",
        )
    if kind is not ErrorKind.OTHER:
        return PermissionDenied(
            f"permission denied while {action} {os.fspath(path)}",
            "check the owner and mode of the directory, or use a store you can write",
        )
    return BackendError(f"{exc.strerror or exc} while {action} {os.fspath(path)}")


def destination_error(exc: OSError, what: str, path: str | Path) -> ApolloError:
    """An OSError on a restore's destination, as one line that names the destination.

    Not :func:`os_error`: that one speaks of the store (its hint for a full
    disk is ``apollo-cas gc``, which frees space only in the store); both read
    the errno by :func:`error_kind`.
    """
    where = Path(path)
    directory = where if where.is_dir() else where.parent
    kind = error_kind(exc)
    if kind is ErrorKind.FULL:
        return DiskFull(
            f"no space left on the restore destination while {what} {where}",
            f"free space on the filesystem of {directory}, or restore somewhere else with --to",
        )
    if kind is ErrorKind.READ_ONLY:
        return PermissionDenied(
            f"the restore destination {directory} is on a read-only filesystem",
            "restore into a writable directory with --to",
        )
    if kind is ErrorKind.DENIED:
        return PermissionDenied(
            f"permission denied on the restore destination while {what} {where}",
            f"check the owner and mode of {directory}, or restore somewhere else with --to",
        )
    return TargetError(
        f"{exc.strerror or exc} on the restore destination while {what} {where}",
        "check the destination directory and run the restore again",
    )
