"""Output files that appear only when complete (promise 5).

Each output is written under a temporary name in the destination directory,
fsynced, then renamed. Files that *name* other files (weights.json, the
safetensors index) are removed first and written last, so a failed restore
never leaves a set of files that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .. import fsio, procinfo
from ..decoding import Output
from ..errors import TargetError

# Under a name of this module: the fault suite replaces it to kill a restore
# before its index is written.
from ..fsio import atomic_write as write_file_atomic
from ..fsio import destination_error

#: The prefix of a restore's temporaries (docs/CONCURRENCY.md), named by the
#: rule of :func:`fsio.temp_path`; apart from the store's ``.tmp-`` so that a
#: restore only ever removes its own kind.
TMP_PREFIX = ".tmp-apollo-"
#: Extended attribute on every file a restore writes (docs/FORMAT.md, "Restore
#: outputs"): the mark that lets a later restore remove it as a stale output. A
#: file without it is the user's, whatever its name; where the filesystem has no
#: user xattrs nothing is marked, and stale outputs stay (with a warning).
OUTPUT_XATTR = "user.apollo_cas.output"

log = logging.getLogger(__name__)


def prepare_dir(path: Path) -> None:
    """Create the output directory and drop what killed restores left in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TargetError(
            f"{path} exists and is not a directory", "pass a directory for --to"
        ) from None
    except OSError as exc:
        raise destination_error(exc, "creating", path) from exc
    remove_dead_temporaries(path)


def remove_dead_temporaries(path: Path) -> int:
    """Delete ``.tmp-apollo-<writer>-...`` files of processes that no longer run.

    A killed restore leaves its preallocated temporary (as large as the output)
    behind; the next restore into the same directory reclaims it. Files of a
    live process (a concurrent restore) are left alone, and so are those whose
    writer cannot be judged here (another host, container or boot sharing the
    directory, or a name of an older version): see :mod:`apollo_cas.procinfo`.
    """
    removed = 0
    for p in path.glob(TMP_PREFIX + "*"):
        if procinfo.judge_tag(fsio.temp_writer(p.name, TMP_PREFIX) or "") != procinfo.DEAD:
            continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def _on_tmpfs(directory: Path) -> bool:
    """Whether ``directory`` lives on tmpfs (by the longest matching mount point)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    target = str(directory.resolve())
    best, fstype = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"):
            best, fstype = parts[1], parts[2]
    return fstype == "tmpfs"


def reserve(fd: int, directory: Path, size: int) -> None:
    """Reserve ``size`` bytes up front, so a full disk fails before hours of work.

    On tmpfs, fallocate zeroes every page on one thread (0.87 s for 4.3 GB,
    measured), work the decoders then repeat; there a free-space check and a
    sparse file give the same early failure for free.
    """
    if _on_tmpfs(directory):
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.ftruncate(fd, size)
    else:
        os.posix_fallocate(fd, 0, size)


def _check_room(directory: Path, total: int) -> None:
    """A read-only destination fails here; on tmpfs, the outputs of one restore must
    fit together.

    ``reserve`` checks each file alone there (its file is sparse), so two shards
    that each fit but not both failed half-way with ENOSPC.
    """
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise destination_error(exc, "checking", directory) from exc
    if st.f_flag & os.ST_RDONLY:
        raise destination_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), "", directory)
    if total and _on_tmpfs(directory) and st.f_bavail * st.f_frsize < total:
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise destination_error(err, f"reserving {total} bytes in", directory)


class PendingFile(fsio.Temporary):
    """A temporary output of a known size, committed by :meth:`commit`."""

    def __init__(self, final: Path, size: int) -> None:
        tmp = fsio.temp_path(final, TMP_PREFIX)
        try:
            super().__init__(final, path=tmp, mode=0o644)
        except OSError as exc:
            raise destination_error(exc, "creating", tmp) from exc
        try:
            if size:
                reserve(self.fd, self.path.parent, size)
        except OSError as exc:
            self.discard()
            raise destination_error(exc, "creating", self.path) from exc

    @property
    def output(self) -> Output:
        """Where decoders write: the open descriptor and the temporary path."""
        return Output(self.fd, str(self.path))

    def sync(self) -> None:
        try:
            super().sync()
        except OSError as exc:
            raise destination_error(exc, "writing", self.path) from exc

    def commit(self) -> None:
        mark_output(self.fd)
        super().commit()


@contextmanager
def pending_files(specs: list[tuple[Path, int]]) -> Iterator[list[PendingFile]]:
    """Temporary outputs that are discarded if the block raises."""
    files: list[PendingFile] = []
    if specs:
        _check_room(specs[0][0].parent, sum(size for _final, size in specs))
    try:
        for final, size in specs:
            files.append(PendingFile(final, size))
        yield files
    except BaseException:
        for f in files:
            f.discard()
        raise


def mark_output(target: int | Path) -> None:
    """Mark a file (descriptor or path) as written by a restore; best effort."""
    with contextlib.suppress(OSError):  # no user xattrs here: the file stays unmarked
        os.setxattr(target, OUTPUT_XATTR, b"1")


def is_output(path: Path) -> bool:
    """Whether ``path`` carries the mark of a restore (see :data:`OUTPUT_XATTR`)."""
    try:
        return os.getxattr(path, OUTPUT_XATTR, follow_symlinks=False) == b"1"
    except OSError:
        return False


def stale_outputs(directory: Path, pattern: re.Pattern[str], written: Sequence[str]) -> list[Path]:
    """Files matching ``pattern`` that this restore does not write and an earlier one
    marked as its own: those may go. Others are the user's: kept, with a warning."""
    stale: list[Path] = []
    foreign: list[Path] = []
    for p in sorted(directory.iterdir()):
        if pattern.match(p.name) and p.name not in written:
            (stale if is_output(p) else foreign).append(p)
    if foreign:
        names = ", ".join(p.name for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        log.warning(
            "warning: left %s in %s: no restore wrote it, so it is not removed "
            "(a loader that reads every *.safetensors file there would pick it up)",
            names,
            directory,
        )
    return stale


def commit_all(
    files: list[PendingFile],
    remove_first: Sequence[Path],
    index: tuple[Path, bytes] | None,
    remove_after: Sequence[Path] = (),
) -> None:
    """fsync everything, drop stale naming files, rename data files in, write the index last."""
    for f in files:
        f.sync()
    try:
        for p in remove_first:
            p.unlink(missing_ok=True)
        for f in files:
            f.commit()
        for p in remove_after:
            p.unlink(missing_ok=True)
        if index is not None:
            write_file_atomic(index[0], [index[1]])
            mark_output(index[0])
        elif files:
            fsio.fsync_dir(files[0].final.parent)
    except OSError as exc:
        where = files[0].final.parent if files else Path(".")
        raise destination_error(exc, "finishing the files in", where) from exc
