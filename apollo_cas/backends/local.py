"""A store in a local directory.

Every write goes through :mod:`apollo_cas.fsio`: temp file -> write -> fsync ->
rename -> fsync directory, so a crash leaves either the old object or the
whole new one plus, at worst, a ``.tmp-*`` leftover that gc removes. For chunk
writes (``durable=False``) the directory fsync is deferred to :meth:`sync`,
which the store calls once before it writes a manifest that names the chunks:
one fsync per directory instead of one per chunk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .. import fsio, layout, procinfo
from ..errors import BackendError, CorruptObject, ObjectNotFound

# write_file_atomic and write_file_by_digest (the backend's writes: objects under
# a known key, packs under their content's id) and temp_path are names of this
# module too: the fault suite (tests/faults) replaces the first two to kill a save
# half-way through a chunk, an index or a pack, and names its temporary with the
# last.
from ..fsio import atomic_write as write_file_atomic
from ..fsio import atomic_write_by_digest as write_file_by_digest
from ..fsio import fsync_dir, os_error
from ..fsio import temp_path as temp_path
from ..parallel import bounded_map
from .base import CAS_FLOCK, TEMPORARY_FLOOR, Backend, Capabilities, ObjectInfo

T = TypeVar("T")

_CAS_LOCK = ".refs.lock"


def removable_temporary(name: str, mtime: float, older_than: float, now: float) -> bool:
    """Whether gc may delete the leftover ``name`` (modified at ``mtime``).

    A temporary of a running writer is never removed (it is about to be
    renamed: a lock, a chunk, a manifest); one of a provably dead writer once
    it is older than ``older_than``; any other (another host or container, or
    a name of an older version) only once it is also older than
    :data:`TEMPORARY_FLOOR`.
    """
    verdict = procinfo.judge_tag(fsio.temp_writer(name) or "")
    if verdict == procinfo.ALIVE:
        return False
    if verdict == procinfo.DEAD:
        return mtime < older_than
    return mtime < min(older_than, now - TEMPORARY_FLOOR)


class LocalBackend(Backend):
    """Objects as files under ``root``; keys map to relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.capabilities = Capabilities(compare_and_swap=CAS_FLOCK, files_root=self.location)
        self._dirty: set[Path] = set()
        self._made: set[Path] = set()
        #: Directories under the root already seen to be real directories.
        self._real_dirs: set[Path] = set()
        self._lock = threading.Lock()
        #: Whether the root existed before this backend was made: a failed first
        #: save removes a root it created, never one the user made.
        self._root_existed = self.root.exists()

    # -- helpers ---------------------------------------------------------
    def _path(self, key: str) -> Path:
        # Keys come from apollo_cas.layout, which validates every component; this
        # is a second line of defence against a key escaping the root.
        if key.startswith("/") or ".." in key.split("/") or "\0" in key:
            raise BackendError(f"refusing key {key!r} outside the store {self.location}")
        return self.root / key

    def _ensure_parent(self, path: Path) -> None:
        parent = path.parent
        if parent in self._made:
            return
        self._check_parents(path)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, parent, "creating") from exc
        self._check_parents(path)  # a directory created meanwhile is checked too
        with self._lock:
            self._made.add(parent)

    # A store holds regular files and directories only. One copied from an
    # untrusted machine may hold symlinks instead (a ref linked to /etc/shadow):
    # following one would read, or write, outside the store. Every directory
    # between the root and an object is checked with lstat, and objects are
    # opened with O_NOFOLLOW, so a link anywhere under the root is refused.
    def _check_parents(self, path: Path) -> None:
        d = path.parent
        todo: list[Path] = []
        while d != self.root and d not in self._real_dirs:
            todo.append(d)
            if d.parent == d:  # not under the root (refused by _path already)
                break
            d = d.parent
        for d in reversed(todo):
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                return  # the object cannot exist; the caller reports it missing
            except OSError as exc:
                raise os_error(exc, d, "inspecting") from exc
            if not stat.S_ISDIR(st.st_mode):
                raise self._foreign(d, "symlink" if stat.S_ISLNK(st.st_mode) else "not a directory")
            with self._lock:
                self._real_dirs.add(d)

    def _foreign(self, path: Path, what: str) -> CorruptObject:
        rel = os.path.relpath(path, self.root)
        return CorruptObject(
            f"{rel} in the store {self.location} is a {what}, which apollo_cas never "
            "writes; refusing to follow it",
            "the store was tampered with or copied with links: remove that entry, "
            "then run 'apollo-cas verify'",
        )

    def _open(self, key: str) -> tuple[int, Path]:
        """A read-only descriptor of the regular file ``key``, never through a link."""
        path = self._path(key)
        self._check_parents(path)
        try:
            # O_NONBLOCK: a FIFO planted in the store must not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} is missing in {self.location}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._foreign(path, "symlink") from None
            raise os_error(exc, path, "reading") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._foreign(path, "special file")
        return fd, path

    # -- Backend ---------------------------------------------------------
    def get(self, key: str) -> bytes:
        fd, path = self._open(key)
        try:
            with open(fd, "rb", closefd=True) as f:
                return f.read()
        except OSError as exc:
            raise os_error(exc, path, "reading") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fd, path = self._open(key)
        try:
            with open(fd, "rb", closefd=True) as f:
                f.seek(offset)
                return f.read(length)
        except OSError as exc:
            raise os_error(exc, path, "reading") from exc

    def _write(self, key: str, write: Callable[[Path], T], durable: bool) -> T:
        """Run ``write`` on the path of ``key`` once its directory exists."""
        path = self._path(key)
        self._ensure_parent(path)
        try:
            try:
                done = write(path)
            except FileNotFoundError:
                # The directory went away since it was made (a failed first save
                # of another process removed its empty directories): make it again.
                with self._lock:
                    self._made.discard(path.parent)
                    self._real_dirs.discard(path.parent)
                self._ensure_parent(path)
                done = write(path)
        except OSError as exc:
            raise os_error(exc, path, "writing") from exc
        if not durable:
            with self._lock:
                self._dirty.add(path.parent)
        return done

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        # write_file_atomic is looked up at each call: see its import.
        self._write(key, lambda p: write_file_atomic(p, [data], sync_dir=durable), durable)

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        if self.exists(key):
            return False
        if layout.is_hex_id(key.rsplit("/", 1)[-1]):
            # Content-addressed keys: two writers of one key write the same bytes,
            # so a lost race is harmless; rename simply replaces equal content.
            self.put(key, data, durable=durable)
            return True
        # Any other key (the config): racing writers write different bytes, and
        # exactly one of them may be told it created the object.
        return self._write(key, lambda p: fsio.create_exclusive(p, data, sync_dir=durable), durable)

    def put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        def path_for(digest: str) -> Path:
            path = self._path(key_for(digest))
            self._ensure_parent(path)
            return path

        self._ensure_parent(self.root / "by-digest")  # the temporary's directory
        # write_file_by_digest is looked up at each call: see its import.
        try:
            final = write_file_by_digest(self.root, path_for, parts, sync_dir=durable)
        except OSError as exc:
            raise os_error(exc, self.root, "writing") from exc
        if not durable:
            with self._lock:
                self._dirty.add(final.parent)
        return final.name

    def exists(self, key: str) -> bool:
        try:
            self._lstat_object(key)
        except ObjectNotFound:
            return False
        return True

    def _lstat_object(self, key: str) -> os.stat_result:
        path = self._path(key)
        self._check_parents(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} is missing in {self.location}") from None
        except OSError as exc:
            raise os_error(exc, path, "inspecting") from exc
        if not stat.S_ISREG(st.st_mode):
            raise self._foreign(path, "symlink" if stat.S_ISLNK(st.st_mode) else "special file")
        return st

    def info(self, key: str) -> ObjectInfo:
        st = self._lstat_object(key)
        return ObjectInfo(size=st.st_size, mtime=st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._check_parents(path)  # unlink removes a link itself, never its target
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, path, "deleting") from exc
        with self._lock:
            self._dirty.add(path.parent)

    def list(self, prefix: str) -> Iterator[str]:
        # Walk from the deepest directory the prefix names, then filter by prefix.
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(base_dir) if base_dir else self.root
        if base_dir:
            self._check_parents(start / "-")  # never list a directory through a link
            if start.is_symlink():
                raise self._foreign(start, "symlink")
        if not start.is_dir():
            return
        try:
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, self.root)
                rel_dir = "" if rel_dir == "." else rel_dir + "/"
                for name in filenames:
                    if name.startswith("."):
                        continue
                    key = rel_dir + name
                    if key.startswith(prefix):
                        yield key
        except OSError as exc:
            raise os_error(exc, start, "listing") from exc

    @contextmanager
    def _cas_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _CAS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            # flock is released by the kernel if this process dies, so a crash
            # can never leave refs locked.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        try:
            with self._cas_lock():
                try:
                    current: bytes | None = self.get(key)
                except ObjectNotFound:
                    current = None
                if current != expected:
                    return False
                if data is None:
                    if current is None:
                        # "Delete if absent": already the requested state. Its
                        # directory may not exist (a tag never made), and
                        # there is nothing to make durable.
                        return True
                    self.delete(key)
                    fsync_dir(self._path(key).parent)
                else:
                    self.put(key, data, durable=True)
                return True
        except OSError as exc:
            raise os_error(exc, key, "updating") from exc

    def sync(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()

        def one(d: Path) -> None:
            try:
                fsync_dir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise os_error(exc, d, "syncing") from exc

        # An incremental save touches ~100 chunk directories; their fsyncs are
        # independent and each waits on the disk, so issue them concurrently.
        for _ in bounded_map(one, sorted(dirty), workers=min(32, len(dirty) or 1)):
            pass

    def remove_if_empty(self) -> None:
        """Remove empty directories under the root, and the root itself if this
        backend created it and nothing is left (a failed first save). ``rmdir``
        refuses a directory that holds anything, so another process's objects,
        or a user's files, are never touched."""
        if not self.root.is_dir():
            return
        for dirpath, _dirnames, _filenames in os.walk(self.root, topdown=False):
            if dirpath == str(self.root):
                continue
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        with self._lock:
            self._made.clear()
            self._real_dirs.clear()
        if not self._root_existed:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)

    def remove_temporaries(self, older_than: float) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if fsio.temp_writer(name) is None:
                    continue
                p = Path(dirpath) / name
                try:
                    if removable_temporary(name, p.stat().st_mtime, older_than, time.time()):
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed
