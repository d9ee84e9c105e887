"""The safetensors format: header, file names, index.

A file is an 8-byte little-endian header length, a JSON header (``dtype``,
``shape``, ``data_offsets`` per tensor, optional ``__metadata__``, a map of
strings) and the tensors' bytes. Parsing it here, rather than through the
library, gives the raw bytes of every dtype, bf16 and fp8 included, with no
torch import, and checks as strict as the format's reference parser; building
it here lets a restore stream tensors into a file the library would have to
hold in memory whole.

A sharded checkpoint is ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map":
{tensor: shard}}``), as transformers writes it; vLLM's ShardedStateLoader
reads ``model-rank-{rank}-part-{part}.safetensors``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from ..errors import SourceError, UnsupportedSource
from ..layout import RESERVED_TENSOR_NAME, check_tensor_name
from . import TensorLike, strict_json

SUFFIX = ".safetensors"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: The header key that holds the file's metadata, never a tensor.
METADATA = RESERVED_TENSOR_NAME
#: Where a built header makes the data start: a multiple of 4 KiB.
ALIGN = 4096
#: A larger header is not a safetensors file (the reference parser's bound).
MAX_HEADER = 100 << 20
#: transformers' shard names, and those plus the single file: what a restore
#: of the hf layout writes, so what it may replace.
HF_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
HF_NAMES = re.compile(r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors)$")
#: The hint of every "this is not a safetensors file" error.
NOT_SAFETENSORS = "pass a .safetensors file, a .pt state_dict or a checkpoint directory"


def hf_shard_name(i: int, n: int) -> str:
    """The name of shard ``i`` (from 0) of ``n`` in transformers' layout."""
    return f"model-{i + 1:05d}-of-{n:05d}{SUFFIX}"


def vllm_shard_name(rank: int, part: int) -> str:
    """Part ``part`` of tensor-parallel rank ``rank`` in vLLM's sharded layout."""
    return f"model-rank-{rank}-part-{part}{SUFFIX}"


def vllm_shard_pattern(rank: int) -> re.Pattern[str]:
    """Every :func:`vllm_shard_name` of ``rank``."""
    return re.compile(rf"^model-rank-{rank}-part-\d+\.safetensors$")


# ---------------------------------------------------------------------------
# reading


def read_header(
    path: Path, size: int, read: Callable[[int, int], bytes | memoryview]
) -> tuple[dict[str, Any], int]:
    """The JSON header of the safetensors file ``path`` of ``size`` bytes, and the
    offset where its data starts; ``read(offset, length)`` gives its bytes (the
    caller decides how the file is read: see sources.safetensors_file)."""
    if size < 8:
        raise UnsupportedSource(f"{path} is not a safetensors file (too short)", NOT_SAFETENSORS)
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > MAX_HEADER or n > size - 8:
        raise UnsupportedSource(
            f"{path} is not a safetensors file (bad header length)", NOT_SAFETENSORS
        )
    header = strict_json.loads(bytes(read(8, n)), str(path), "safetensors header", NOT_SAFETENSORS)
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
    """The tensors of a header, in its order, checked as strictly as the reference
    parser does.

    Known dtypes in their safetensors spelling; shapes of integers ``>= 0``;
    ``data_offsets`` a pair of integers; the ranges, sorted, contiguous from 0
    with no gap or overlap and ending exactly at the end of the file;
    ``__metadata__`` a map of strings. The reserved name is never a tensor.
    """
    meta = header.get(METADATA)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise UnsupportedSource(
            f"{path}: __metadata__ is not a map of strings", "re-export the file"
        )
    entries: list[HeaderEntry] = []
    for name, e in header.items():
        if name == METADATA:
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


def parse_index(data: bytes, index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard name) of the index file ``index``."""
    d = strict_json.loads(data, str(index), "safetensors index")
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise UnsupportedSource(f"{index} is not a safetensors index (no weight_map)")
    return wm


def check_shard_name(index: Path, name: str) -> str:
    """``name`` if it is a plain file name beside the index ``index`` that lists it."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise UnsupportedSource(f"{index}: shard name {name!r} escapes the directory")
    return name


# ---------------------------------------------------------------------------
# writing


def header_bytes(
    tensors: Sequence[TensorLike], metadata: dict[str, str]
) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header, and each tensor's data offset (in order).

    ``dtype`` is written as given: the safetensors spelling (``"BF16"``).
    """
    header: dict[str, object] = {METADATA: metadata}
    offsets, pos = [], 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        offsets.append(pos)
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad so the data starts on a 4 KiB boundary: every block then lands on page
    # boundaries and the kernel never has to merge partial pages (2x faster
    # restores measured). Spaces are valid JSON padding; readers strip them.
    raw += b" " * (-(len(raw) + 8) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


def index_bytes(weight_map: Mapping[str, str], total_size: int, indent: int | None = 2) -> bytes:
    """``model.safetensors.index.json``'s bytes (a restore writes ``indent=2``)."""
    return json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}, indent=indent
    ).encode()
