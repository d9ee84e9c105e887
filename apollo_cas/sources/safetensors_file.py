"""safetensors files, single or sharded, read without torch.

The format is an 8-byte little-endian header length, a JSON header
(``dtype``, ``shape``, ``data_offsets`` per tensor, optional ``__metadata__``)
and the bytes. Parsing it here (rather than through the library) gives
the raw bytes of every dtype, bf16 and fp8 included, with no torch import, and
checks as strict as the format's reference parser.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import SourceError, UnsupportedSource
from ..layout import check_tensor_name
from ..manifest import SourceInfo
from . import strict_json
from .base import Source, SourceTensor

if TYPE_CHECKING:
    from ..filesets import FileSet

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


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


_NOT_SAFETENSORS = "pass a .safetensors file, a .pt state_dict or a checkpoint directory"


def read_header(
    path: Path, file: SourceFile | None = None
) -> tuple[dict[str, dict[str, object]], int]:
    """The JSON header of a safetensors file and the offset where data starts.

    With ``file`` (the open :class:`SourceFile` of ``path``) the header comes
    from the same open file as the tensors' bytes, even if ``path`` is replaced
    meanwhile.
    """
    if file is None:
        f = SourceFile(path)
        try:
            return read_header(path, f)
        finally:
            f.close()
    if file.size < 8:
        raise UnsupportedSource(f"{path} is not a safetensors file (too short)", _NOT_SAFETENSORS)
    (n,) = struct.unpack("<Q", file.read(0, 8))
    if n > _MAX_HEADER or n > file.size - 8:
        raise UnsupportedSource(
            f"{path} is not a safetensors file (bad header length)", _NOT_SAFETENSORS
        )
    raw = bytes(file.read(8, n))
    header = strict_json.loads(raw, str(path), "safetensors header", _NOT_SAFETENSORS)
    if not isinstance(header, dict):
        raise UnsupportedSource(f"{path}: safetensors header is not an object")
    return header, 8 + n


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: bytes ``[begin, end)`` after the header."""

    name: str
    dtype: dtypes.DType
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_entries(path: Path, header: dict[str, Any], data_size: int) -> list[HeaderEntry]:
    """The tensors of a header, checked as strictly as the reference parser does.

    Known dtypes in their safetensors spelling; shapes of integers ``>= 0``;
    ``data_offsets`` a pair of integers; the ranges, sorted, contiguous from 0
    with no gap or overlap and ending exactly at the end of the file;
    ``__metadata__`` a map of strings. The reserved name is never a tensor.
    """
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise UnsupportedSource(
            f"{path}: __metadata__ is not a map of strings", "re-export the file"
        )
    entries: list[HeaderEntry] = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        check_tensor_name(name)
        where = f"{path}:{name}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise UnsupportedSource(f"{path}: malformed entry for {name!r}")
        dt = dtypes.lookup(e["dtype"], where, exact=True)
        shape = dtypes.check_shape(e["shape"], dt, None, where)
        offsets = e["data_offsets"]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(dtypes.is_int(x) for x in offsets)
        ):
            raise UnsupportedSource(
                f"{path}: malformed entry for {name!r} (data_offsets {offsets!r} is not "
                "a pair of integers)"
            )
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * dt.itemsize:
            raise SourceError(
                f"{path}: tensor {name!r} has inconsistent offsets ({begin}..{end} for "
                f"shape {list(shape)} of {dt.name})",
                "re-export the file",
            )
        entries.append(HeaderEntry(name, dt, shape, begin, end))
    at = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != at:
            how = "overlaps the tensor before it" if e.begin < at else f"leaves a gap at {at}"
            raise SourceError(
                f"{path}: tensor {e.name!r} has inconsistent offsets (it {how})",
                "re-export the file",
            )
        at = e.end
    if at != data_size:
        raise SourceError(
            f"{path}: inconsistent offsets: the tensors end at byte {at} of the data but the "
            f"file holds {data_size} (file truncated, or trailing bytes)",
            "re-export the file",
        )
    return entries


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
                header, data_start = read_header(path, sf)
                for e in parse_entries(path, header, sf.size - data_start):
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
    index = path if path.is_file() and path.name.endswith(".json") else path / INDEX_NAME
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
    index = path / INDEX_NAME
    if index.is_file():
        return _from_index(index)
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
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
    d = strict_json.loads(text, str(index), "safetensors index")
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise UnsupportedSource(f"{index} is not a safetensors index (no weight_map)")
    return wm


def _from_index(index: Path) -> list[Path]:
    names = sorted(set(_weight_map(index).values()))
    files = []
    for n in names:
        if "/" in n or "\\" in n or n.startswith("."):
            raise UnsupportedSource(f"{index}: shard name {n!r} escapes the directory")
        p = index.parent / n
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
    index = path / INDEX_NAME
    return index if index.is_file() else None


def open_safetensors(path: Path, info: SourceInfo) -> SafetensorsSource:
    """The source for a safetensors path, remembering its files for exact restores."""
    files = safetensors_files(path)
    src = SafetensorsSource(files, info, index_weight_map(path))
    src.origin = (tuple(files), safetensors_index(path))
    return src
