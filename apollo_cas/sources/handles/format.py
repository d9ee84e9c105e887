"""The handles file's format: each handle's 15 arguments checked, the file parsed.

The file is ``torch.save`` of ``{name: {"handle": (rebuild_func, args)}}`` where
the pair is ``torch.multiprocessing.reductions.reduce_tensor(tensor)`` of a CUDA
tensor (docs/HANDLES.md has the table of arguments). :func:`read_handles` loads it
through :mod:`.unpickling` and type- and range-checks every argument, so that
what :mod:`.ipc` later opens is a view inside its shared storage. Nothing here
touches CUDA.

Optional metadata (an extension; the original format has none): a top-level
``"__meta__"`` dict written by :func:`~.export.write_handles` (owner pid and start
time, rank, world size, GPU UUIDs, ``CUDA_VISIBLE_DEVICES``). Other top-level keys
of the form ``__name__`` are reserved and ignored; any other key must hold a
``{"handle": ...}`` dict, so a foreign file is refused rather than half-read.
"""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ... import dtypes
from ...errors import InvalidName, SourceError, SourceNotFound, UnsupportedSource
from ...layout import check_tensor_name
from .unpickling import check_magic, is_rebuild, unpickle

log = logging.getLogger(__name__)

META_KEY = "__meta__"
META_FORMAT = 1
#: A handles file of 700 tensors is ~200 KB; anything this big is a state_dict.
MAX_FILE_BYTES = 64 << 20
_N_ARGS = 15  # rebuild_cuda_tensor's parameters (torch 1.x .. 2.13)

__all__ = [
    "MAX_FILE_BYTES",
    "META_FORMAT",
    "META_KEY",
    "HandleEntry",
    "HandlesFile",
    "read_handles",
]


@dataclass(frozen=True)
class HandleEntry:
    """One tensor's handle, validated. Nothing here touches CUDA."""

    name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    tensor_offset: int
    storage_cls: type
    dtype: torch.dtype
    device: int
    storage_handle: bytes | None
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n * self.dtype.itemsize

    @property
    def owner_pid(self) -> int | None:
        """The exporting process, from its ref-counter file name ``/torch_<pid>_<rand>_<n>``."""
        m = re.match(rb"^/?torch_(\d+)_", self.ref_counter_handle)
        return int(m.group(1)) if m else None

    @property
    def handle_kind(self) -> str:
        """``cudaMalloc``, ``expandable_segment`` or ``legacy`` (a raw 64-byte cudaIpcMemHandle)."""
        h = self.storage_handle or b""
        # torch's allocator prefixes a version byte and a type byte ('c' / 'e').
        if len(h) >= 2 and h[0] < 16 and h[1:2] == b"e":
            return "expandable_segment"
        if len(h) >= 2 and h[0] < 16 and h[1:2] == b"c":
            return "cudaMalloc"
        return "legacy"


@dataclass(frozen=True)
class HandlesFile:
    """A parsed handles file: its entries (sorted by name) and optional metadata."""

    path: Path
    entries: tuple[HandleEntry, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def owner_pids(self) -> list[int]:
        """Exporting processes: ``__meta__`` pid, else from the ref-counter names."""
        pid = self.meta.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool):
            return [pid]
        return sorted({p for e in self.entries if (p := e.owner_pid) is not None})


def _int(v: object, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what} is {v!r}, expected an integer >= {lo}")
    return v


def _ints(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)):  # torch.Size is a tuple
        raise ValueError(f"{what} is a {type(v).__name__}, expected a tuple of integers")
    return tuple(_int(x, what) for x in v)


def _parse_entry(name: str, value: object) -> HandleEntry:
    if not isinstance(value, dict) or "handle" not in value:
        raise ValueError("expected {'handle': (rebuild_func, args)}")
    h = value["handle"]
    if not isinstance(h, tuple) or len(h) != 2:
        raise ValueError("'handle' is not a (rebuild_func, args) pair")
    func, args = h
    if not is_rebuild(func):
        # Real tensors, rebuild_tensor of CPU storage, meta tensors: not live CUDA memory.
        raise ValueError(
            f"'handle' names {getattr(func, '__qualname__', func)!r}, "
            "not rebuild_cuda_tensor (is it a CUDA tensor's handle?)"
        )
    if not isinstance(args, tuple) or len(args) != _N_ARGS:
        raise ValueError(
            f"rebuild_cuda_tensor arguments: expected {_N_ARGS}, "
            f"got {len(args) if isinstance(args, tuple) else type(args).__name__}"
        )
    (
        tensor_cls,
        size,
        stride,
        tensor_offset,
        storage_cls,
        dtype,
        device,
        storage_handle,
        storage_size,
        storage_offset,
        requires_grad,
        ref_handle,
        ref_offset,
        event_handle,
        event_sync,
    ) = args
    if tensor_cls not in (torch.Tensor, torch.nn.Parameter):
        raise ValueError(f"tensor class {tensor_cls!r} is not torch.Tensor or torch.nn.Parameter")
    if storage_cls not in (torch.storage.TypedStorage, torch.UntypedStorage):
        raise ValueError(f"storage class {storage_cls!r} is not a torch storage class")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype is {dtype!r}")
    dtypes.from_torch(dtype, f"handle of {name}")  # UnsupportedDtype, with its own hint
    size_t, stride_t = _ints(size, "size"), _ints(stride, "stride")
    if len(size_t) != len(stride_t):
        raise ValueError(f"size {size_t} and stride {stride_t} differ in rank")
    if storage_handle is not None and not isinstance(storage_handle, bytes):
        raise ValueError("storage handle is not bytes")
    if not isinstance(ref_handle, bytes) or not isinstance(event_handle, (bytes, type(None))):
        raise ValueError("ref-counter or event handle is not bytes")
    if not isinstance(requires_grad, bool) or not isinstance(event_sync, bool):
        raise ValueError("requires_grad / event_sync_required are not booleans")
    e = HandleEntry(
        name=name,
        size=size_t,
        stride=stride_t,
        tensor_offset=_int(tensor_offset, "tensor offset"),
        storage_cls=storage_cls,
        dtype=dtype,
        device=_int(device, "device index"),
        storage_handle=storage_handle,
        storage_size_bytes=_int(storage_size, "storage size"),
        storage_offset_bytes=_int(storage_offset, "storage offset"),
        ref_counter_handle=ref_handle,
        ref_counter_offset=_int(ref_offset, "ref-counter offset"),
        event_handle=event_handle,
        event_sync_required=event_sync,
    )
    # The view must lie inside the shared storage: a crafted handle must not make us
    # read (or, on hot restore, write) device memory beyond it.
    if e.nbytes:
        last = e.tensor_offset + sum((s - 1) * st for s, st in zip(size_t, stride_t, strict=True))
        if (last + 1) * dtype.itemsize > e.storage_size_bytes:
            raise ValueError(
                f"view of {e.nbytes} bytes at element {e.tensor_offset} overruns "
                f"its storage of {e.storage_size_bytes} bytes"
            )
        if storage_handle is None:
            raise ValueError("non-empty tensor without a storage handle")
    return e


def read_handles(path: str | Path) -> HandlesFile:
    """Load and validate a handles file. Opens no CUDA memory.

    Raises :class:`SourceNotFound`, :class:`UnsafePickle` (a non-allowlisted
    global, or a call of the rebuild function at load time),
    :class:`UnsupportedSource` (not a dict of handles, a malformed handle, a
    huge file) or :class:`UnsupportedDtype`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SourceNotFound(
            f"handles file {p} does not exist",
            "start the server's handle export first, or fix --handles",
        ) from None
    except OSError as exc:
        raise SourceError(f"cannot read handles file {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedSource(f"{p} is not a regular file", "pass the handles file itself")
    if st.st_size > MAX_FILE_BYTES:
        raise UnsupportedSource(
            f"{p} is {st.st_size >> 20} MiB, too big for a handles file",
            "a file holding tensor data is a state_dict: use --source-kind pt",
        )
    check_magic(p)
    obj = unpickle(p)
    if not isinstance(obj, dict):
        raise UnsupportedSource(
            f"{p} holds a {type(obj).__name__}, not a dict of handles",
            "pass the file written by torch.save({name: {'handle': ...}})",
        )
    meta: dict[str, Any] = {}
    entries: list[HandleEntry] = []
    for key in sorted(obj, key=str):
        value = obj[key]
        if not isinstance(key, str):
            raise UnsupportedSource(f"{p}: key {key!r} is not a tensor name")
        if key == META_KEY:
            if not isinstance(value, dict):
                raise UnsupportedSource(f"{p}: {META_KEY} is a {type(value).__name__}, not a dict")
            meta = dict(value)
            continue
        if key.startswith("__") and key.endswith("__"):
            log.debug("%s: ignoring reserved key %s", p, key)
            continue
        try:
            check_tensor_name(key)
            entries.append(_parse_entry(key, value))
        except (ValueError, InvalidName) as exc:
            raise UnsupportedSource(
                f"{p}: entry {key!r} is not a CUDA tensor handle ({exc})",
                "regenerate the handles file with reduce_tensor of CUDA tensors",
            ) from None
    if not entries:
        raise UnsupportedSource(
            f"{p} holds no tensor handles", "is the server exporting its weights?"
        )
    return HandlesFile(p, tuple(entries), meta, st.st_mtime)
