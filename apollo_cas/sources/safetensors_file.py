"""safetensors files, single or sharded, read without torch.

The format's rules (header, index, shard names) are in
:mod:`apollo_cas.formats.safetensors`; this module opens the files, reads them
with ``pread`` (:class:`SourceFile`) and turns their entries into tensors.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import dtypes
from ..errors import SourceError, UnsupportedSource
from ..formats import safetensors as st_format
from ..manifest import SourceInfo
from .base import Source, SourceTensor

if TYPE_CHECKING:
    from ..filesets import FileSet


class SourceFile:
    """An open source file, read with ``pread``, never through a mapping.

    A trainer may truncate or rewrite the file while it is saved. A read of an
    mmap'd page past the new end of file is a SIGBUS that kills the process with
    no message (exit 135); ``pread`` returns short instead, which is reported as
    one error. The price is a copy per block: reading and hashing a cached file
    ran at 1.9 GiB/s against 5.0 GiB/s through mmap on the 2-core dev VM
    (benchmarks/bench_source_read.py); a crash with no message is worse than a
    slower unchanged-block scan, and compressing new blocks costs far more than
    either. :meth:`check_unchanged` catches an in-place rewrite of the same
    length (its mtime moves) before the checkpoint is committed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # O_NONBLOCK: a FIFO given as a source must not hang the open.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise UnsupportedSource(f"{path} is not a regular file", "pass a file of weights")
        self.size = st.st_size
        if hasattr(os, "posix_fadvise"):  # a save reads front to back: read ahead
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def read(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset+length)``; a short file is a :class:`SourceError`."""
        parts: list[bytes] = []
        got = 0
        while got < length:
            try:
                part = os.pread(self.fd, length - got, offset + got)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path}: {exc.strerror}") from exc
            if not part:
                raise self._changed(f"it ended at byte {offset + got}")
            parts.append(part)
            got += len(part)
        return memoryview(parts[0] if len(parts) == 1 else b"".join(parts))

    def check_unchanged(self) -> None:
        """Raise :class:`SourceError` if the open file was resized or rewritten
        since it was opened (its bytes may then be a torn mix)."""
        st = os.fstat(self.fd)
        # The open file, not the path: a file replaced by rename (the safe way
        # to rewrite one) leaves these bytes whole and consistent.
        if (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) != self._identity:
            raise self._changed("its size or modification time changed")

    def _changed(self, how: str) -> SourceError:
        return SourceError(
            f"{self.path} changed while it was being saved ({how}); nothing was committed",
            "save it again once the program writing it has finished",
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileTensor(SourceTensor):
    """One tensor stored at ``[start, start+nbytes)`` of a :class:`SourceFile`."""

    def __init__(
        self,
        name: str,
        dtype: dtypes.DType,
        shape: tuple[int, ...],
        file: SourceFile,
        start: int,
        nbytes: int,
    ) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape
        self._file, self._start = file, start
        self.nbytes = nbytes

    def read(self, offset: int, length: int) -> memoryview:
        length = max(0, min(length, self.nbytes - offset))
        if length == 0:
            return memoryview(b"")
        return self._file.read(self._start + offset, length)


class OneFileSource(Source):
    """A source whose tensors are read from one open :class:`SourceFile` (a ``.pt``
    file, the original tool's ``weights.bin``): the file's change check and
    closing, shared."""

    _file: SourceFile | None
    _tensors: list[SourceTensor]

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors

    def check_unchanged(self) -> None:
        if self._file is not None:
            self._file.check_unchanged()

    def close(self) -> None:
        self._tensors = []
        if self._file is not None:
            self._file.close()
            self._file = None


class SafetensorsSource(Source):
    """One or more safetensors files seen as one set of tensors.

    ``weight_map`` (an index's tensor -> shard name) is checked against the
    headers: a tensor the index lists must be in the shard it names.
    """

    #: The files and index it was opened from (set by :func:`open_safetensors`);
    #: without them there is no record for an exact restore.
    origin: tuple[tuple[Path, ...], Path | None] | None = None

    def __init__(
        self,
        files: Sequence[Path],
        info: SourceInfo,
        weight_map: Mapping[str, str] | None = None,
    ) -> None:
        self.info = info
        self._files: list[SourceFile] = []
        tensors: dict[str, SourceTensor] = {}
        found_in: dict[str, Path] = {}
        try:
            for path in files:
                sf = SourceFile(path)
                self._files.append(sf)
                # The header from the same open file as the tensors' bytes, even
                # if the path is replaced meanwhile.
                header, data_start = st_format.read_header(path, sf.size, sf.read)
                for e in st_format.parse_entries(path, header, sf.size - data_start):
                    if e.name in tensors:
                        raise SourceError(
                            f"tensor {e.name!r} appears twice ({found_in[e.name]} and {path})",
                            "remove the duplicate shard",
                        )
                    found_in[e.name] = path
                    tensors[e.name] = FileTensor(
                        e.name, e.dtype, e.shape, sf, data_start + e.begin, e.end - e.begin
                    )
            for name, shard in (weight_map or {}).items():
                if name not in found_in or found_in[name].name != shard:
                    where = f"in {found_in[name]}" if name in found_in else "in no shard"
                    raise SourceError(
                        f"the index lists tensor {name!r} in {shard}, but it is {where}",
                        "fix the index or copy the missing shard",
                    )
        except BaseException:
            self.close()
            raise
        self._tensors = [tensors[k] for k in sorted(tensors)]

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors

    def saved_files(self) -> FileSet | None:
        """The files (and index) as they are, for exact restores."""
        from ..filesets import safetensors_record

        if self.origin is None:
            return None
        files, index = self.origin
        return safetensors_record(files, index, {t.name: t.nbytes for t in self._tensors})

    def check_unchanged(self) -> None:
        for f in self._files:
            f.check_unchanged()

    def close(self) -> None:
        self._tensors = []
        for f in self._files:
            f.close()
        self._files = []


def index_weight_map(path: Path) -> dict[str, str] | None:
    """The tensor -> shard map of the index ``path`` stands for, if it has one."""
    index = path if path.is_file() and path.name.endswith(".json") else path / st_format.INDEX
    if not index.is_file():
        return None
    return _weight_map(index)


def safetensors_files(path: Path) -> list[Path]:
    """The files a safetensors path stands for: itself, the shards an index lists,
    or every ``*.safetensors`` in a directory."""
    if path.is_file():
        if path.name.endswith(".json"):
            return _from_index(path)
        return [path]
    index = path / st_format.INDEX
    if index.is_file():
        return _from_index(index)
    files = sorted(p for p in path.glob("*" + st_format.SUFFIX) if not p.name.startswith("."))
    if not files:
        raise UnsupportedSource(
            f"no .safetensors files in {path}",
            "pass a directory with model.safetensors or shards and an index",
        )
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        text = index.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read {index}: {exc.strerror}") from exc
    return st_format.parse_index(text, index)


def _from_index(index: Path) -> list[Path]:
    files = []
    for n in sorted(set(_weight_map(index).values())):
        p = index.parent / st_format.check_shard_name(index, n)
        if not p.is_file():
            raise SourceError(
                f"{index} lists {n}, which does not exist",
                "copy the missing shard or fix the index",
            )
        files.append(p)
    return files


def safetensors_index(path: Path) -> Path | None:
    """The index a safetensors path is read through, if any (see :func:`safetensors_files`)."""
    if path.is_file():
        return path if path.name.endswith(".json") else None
    index = path / st_format.INDEX
    return index if index.is_file() else None


def open_safetensors(path: Path, info: SourceInfo) -> SafetensorsSource:
    """The source for a safetensors path, remembering its files for exact restores."""
    files = safetensors_files(path)
    src = SafetensorsSource(files, info, index_weight_map(path))
    src.origin = (tuple(files), safetensors_index(path))
    return src
