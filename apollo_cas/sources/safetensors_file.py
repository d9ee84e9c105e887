"""safetensors files, single or sharded, read through mmap without torch.

The format is an 8-byte little-endian header length, a JSON header
(``dtype``, ``shape``, ``data_offsets`` per tensor, optional ``__metadata__``)
and the bytes. Parsing it here (rather than through the library) gives
zero-copy views of every dtype, bf16 and fp8 included, with no torch import.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import SourceError, UnsupportedSource
from ..layout import check_tensor_name
from ..manifest import SourceInfo
from .base import Source, SourceTensor

if TYPE_CHECKING:
    from ..filesets import FileSet

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


class MappedTensor(SourceTensor):
    def __init__(
        self, name: str, dtype: dtypes.DType, shape: tuple[int, ...], view: memoryview
    ) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape
        self._view = view
        self.nbytes = len(view)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


def read_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """The JSON header of a safetensors file and the offset where data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UnsupportedSource(
                    f"{path} is not a safetensors file (too short)",
                    "pass a .safetensors file, a .pt state_dict or a checkpoint directory",
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > os.fstat(f.fileno()).st_size - 8:
                raise UnsupportedSource(
                    f"{path} is not a safetensors file (bad header length)",
                    "pass a .safetensors file, a .pt state_dict or a checkpoint directory",
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedSource(
            f"{path} is not a safetensors file (header is not JSON)",
            "pass a .safetensors file, a .pt state_dict or a checkpoint directory",
        ) from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(header, dict):
        raise UnsupportedSource(f"{path}: safetensors header is not an object")
    return header, 8 + n


class SafetensorsSource(Source):
    """One or more safetensors files seen as one set of tensors."""

    #: The files and index it was opened from (set by :func:`open_safetensors`);
    #: without them there is no record for an exact restore.
    origin: tuple[tuple[Path, ...], Path | None] | None = None

    def __init__(self, files: Sequence[Path], info: SourceInfo) -> None:
        self.info = info
        self._maps: list[mmap.mmap] = []
        tensors: dict[str, SourceTensor] = {}
        for path in files:
            header, data_start = read_header(path)
            size = path.stat().st_size
            mm: mmap.mmap | None = None
            if size > data_start:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps.append(mm)
            view = memoryview(mm) if mm is not None else memoryview(b"")
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                check_tensor_name(name)
                if name in tensors:
                    raise SourceError(
                        f"tensor {name!r} appears twice ({path})", "remove the duplicate shard"
                    )
                try:
                    entry: Any = meta
                    dt = dtypes.lookup(str(entry["dtype"]), f"{path}:{name}")
                    shape = tuple(int(x) for x in entry["shape"])
                    begin, end = (int(x) for x in entry["data_offsets"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise UnsupportedSource(f"{path}: malformed entry for {name!r}") from exc
                count = 1
                for s in shape:
                    count *= s
                if (
                    end - begin != count * dt.itemsize
                    or data_start + end > size
                    or not 0 <= begin <= end
                ):
                    raise SourceError(
                        f"{path}: tensor {name!r} has inconsistent offsets (file truncated?)",
                        "re-export the file",
                    )
                tensors[name] = MappedTensor(
                    name, dt, shape, view[data_start + begin : data_start + end]
                )
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

    def close(self) -> None:
        # Views into the maps must be gone before the maps can close.
        self._tensors = []
        for m in self._maps:
            with contextlib.suppress(BufferError):  # still referenced: the GC closes it
                m.close()
        self._maps = []


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


def _from_index(index: Path) -> list[Path]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        names = sorted(set(wm.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnsupportedSource(f"{index} is not a safetensors index (no weight_map)") from exc
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
    src = SafetensorsSource(files, info)
    src.origin = (tuple(files), safetensors_index(path))
    return src
