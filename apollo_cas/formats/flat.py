"""The original tool's flat checkpoint: ``weights.bin`` + ``weights.json``.

``weights.json`` maps each tensor name to ``{"offset", "size", "shape",
"dtype"}``, the dtype spelled as ``str(tensor.dtype)`` (``"torch.bfloat16"``);
``weights.bin`` holds the tensors back to back in sorted-name order from byte
0 (/work/shared/seed/apollo-checkpoint.rs, docs/FORMAT.md). Next to them the
tool wrote ``checkpoint-meta.json`` (``timestamp``, ``n_params``,
``total_bytes``) and named the directory by :data:`TIME_FORMAT`.

Reading is strict: a damaged or hand-edited index is refused with one
:class:`~apollo_cas.errors.SourceError`, never half imported. Writing gives
the tool's bytes: the same entry order and key order, the same spellings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .. import dtypes
from ..errors import SourceError, UnsupportedSource
from ..layout import check_tensor_name
from . import TensorLike, strict_json

WEIGHTS = "weights.bin"
INDEX = "weights.json"
META = "checkpoint-meta.json"
#: The tool's directory names (UTC, minute resolution).
TIME_FORMAT = "%Y-%m-%d-%H%M"
#: ``serde_json::to_string_pretty``, as the tool wrote its final index and meta file.
TOOL_INDENT = 2
#: What apollo_cas's flat restore has always written; kept so restored
#: directories keep their bytes from one version to the next.
RESTORE_INDENT = 1
_FIELDS = frozenset({"offset", "size", "shape", "dtype"})

T = TypeVar("T", bound=TensorLike)
V = TypeVar("V")


@dataclass(frozen=True)
class Entry:
    """One tensor of ``weights.json``: bytes ``[offset, offset+size)`` of ``weights.bin``."""

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]
    dtype: dtypes.DType

    def to_json(self) -> dict[str, object]:
        """The entry as the tool wrote it (key order included: it is in the bytes)."""
        return {
            "offset": self.offset,
            "size": self.size,
            "shape": list(self.shape),
            "dtype": self.dtype.torch_str,
        }


# ---------------------------------------------------------------------------
# writing


def layout(tensors: Iterable[T]) -> list[tuple[T, Entry]]:
    """Where each tensor goes in ``weights.bin``: sorted names, back to back from 0."""
    out, offset = [], 0
    for t in sorted(tensors, key=lambda t: t.name):
        out.append((t, Entry(t.name, offset, t.nbytes, tuple(t.shape), dtypes.lookup(t.dtype))))
        offset += t.nbytes
    return out


#: A tensor's dtype, shape and raw little-endian bytes.
Raw = tuple[dtypes.DType, Sequence[int], bytes]


def write_weights(f: BinaryIO, tensors: Mapping[str, V], raw: Callable[[V], Raw]) -> list[Entry]:
    """Write ``tensors`` to an open ``weights.bin`` as :func:`layout` places them;
    returns the index entries.

    ``raw`` is called once per tensor, in file order, just before its bytes are
    written, so a caller copying tensors off a device holds one at a time.
    """
    entries, offset = [], 0
    for name in sorted(tensors):
        dt, shape, data = raw(tensors[name])
        f.write(data)
        entries.append(Entry(name, offset, len(data), tuple(int(d) for d in shape), dt))
        offset += len(data)
    return entries


def dumps_index(entries: Iterable[Entry], indent: int | None = RESTORE_INDENT) -> bytes:
    """``weights.json``'s bytes: ``indent=None`` is the tool's first, compact
    dump, :data:`TOOL_INDENT` its final one, :data:`RESTORE_INDENT` apollo_cas's."""
    return json.dumps({e.name: e.to_json() for e in entries}, indent=indent).encode()


def dumps_meta(timestamp: str, entries: Sequence[Entry]) -> bytes:
    """``checkpoint-meta.json``'s bytes, as the tool wrote them."""
    meta = {
        "timestamp": timestamp,
        "n_params": len(entries),
        "total_bytes": sum(e.size for e in entries),
    }
    return json.dumps(meta, indent=TOOL_INDENT).encode()


# ---------------------------------------------------------------------------
# reading


def loads_index(data: bytes, index_path: Path) -> dict[str, Any]:
    """The parsed ``weights.json`` at ``index_path``: strict JSON, a map."""
    index = strict_json.loads(data, str(index_path), "index", "skip it; it is damaged")
    if not isinstance(index, dict):
        raise UnsupportedSource(f"{index_path} is not a name -> entry map")
    return index


def parse_index(
    index: Mapping[str, Any], index_path: Path, weights_path: Path, weights_size: int
) -> list[Entry]:
    """The entries of a parsed index, each checked against a ``weights.bin`` of
    ``weights_size`` bytes; in the index's own order (a saved-file record keeps
    it), checked in name order.

    Names must be valid tensor names; every entry has the four fields, integer
    ``offset`` and ``size`` ``>= 0``, a known dtype, a shape that fits the size,
    and lies inside the file (a short file is a half-written checkpoint).
    """
    checked: dict[str, Entry] = {}
    for name in sorted(index):
        e = index[name]
        check_tensor_name(name)
        where = f"{index_path}:{name}"
        if not isinstance(e, dict) or not e.keys() >= _FIELDS:
            raise UnsupportedSource(f"{index_path}: malformed entry for {name!r}")
        off, n = e["offset"], e["size"]
        if not (dtypes.is_int(off) and dtypes.is_int(n)) or off < 0 or n < 0:
            raise UnsupportedSource(
                f"{index_path}: malformed entry for {name!r} (offset {off!r} and size {n!r} "
                "must be integers >= 0)",
                "skip it; the index is damaged",
            )
        dt = dtypes.lookup(e["dtype"], where)
        shape = dtypes.check_shape(e["shape"], dt, n, where)
        if off + n > weights_size:
            raise SourceError(
                f"{weights_path} is shorter than {INDEX} says ({name!r} ends at {off + n}, "
                f"file has {weights_size} bytes): half-written checkpoint",
                "skip it; the newest complete checkpoint is older",
            )
        checked[name] = Entry(name, off, n, shape, dt)
    return [checked[name] for name in index]


def meta_timestamp(data: bytes, where: str) -> str | None:
    """The ``timestamp`` a ``checkpoint-meta.json`` records, or None if it records none."""
    d = strict_json.loads(data, where, "meta file")
    v = d.get("timestamp") if isinstance(d, dict) else None
    return str(v) if v else None
