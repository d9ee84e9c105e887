"""The original tool's CUDA IPC handles file, read without running its pickle.

The file is ``torch.save`` of ``{name: {"handle": (rebuild_func, args)}}`` where
the pair is ``torch.multiprocessing.reductions.reduce_tensor(tensor)`` of a CUDA
tensor. The original tool loaded it with ``weights_only=False``: whoever could
write the file ran code as the checkpointing user. Here it is loaded with
``weights_only=True`` plus an allowlist of exactly two names (docs/HANDLES.md):

* ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` resolves to an inert
  *marker*, not the function: the pickle can name it but not call it (a file
  that tries to call it while unpickling is refused as unsafe). After loading,
  every argument is type- and range-checked and apollo_cas calls the real
  function itself, with its own tensor class, no autograd, and the device index
  remapped for this process.
* ``builtins.bytes`` resolves to a wrapper that only builds ``b""`` (protocol 2
  pickles an empty ``bytes`` as a call) and refuses anything else.

Everything else a handle holds (``torch.Tensor`` / ``torch.nn.Parameter`` and
the storage classes as values, ``torch.Size``, dtypes, ``_codecs.encode`` for
bytes) is already on torch's default ``weights_only`` allowlist. Any other
global — ``os.system``, ``builtins.eval``, a class of some package — stops the
load before anything runs, as :class:`~apollo_cas.errors.UnsafePickle` naming the
file and the global.

Handles go stale (the server exited, restarted, or reallocated its weights);
:func:`open_handle_tensors` checks what can be checked before opening anything
(owner process alive and not younger than the file, file age, GPU identity) and
maps CUDA errors while opening to :class:`~apollo_cas.errors.StaleHandles`;
:func:`check_against` compares names, dtypes and shapes with the previous
checkpoint of the series. docs/HANDLES.md lists what cannot be detected.

Optional metadata (an extension; the original format has none): a top-level
``"__meta__"`` dict written by :func:`write_handles` (owner pid and start time,
rank, world size, GPU UUIDs, ``CUDA_VISIBLE_DEVICES``). Other top-level keys of
the form ``__name__`` are reserved and ignored; any other key must hold a
``{"handle": ...}`` dict, so a foreign file is refused rather than half-read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import dtypes, frontend, procinfo
from ..errors import (
    InvalidName,
    SourceError,
    SourceNotFound,
    StaleHandles,
    UnsafePickle,
    UnsupportedSource,
    UsageError,
)
from ..layout import check_tensor_name
from ..manifest import Manifest, SourceInfo
from .base import Source
from .device import DEFAULT_BUFFER_BYTES, DEFAULT_STREAMS, DeviceSource

log = logging.getLogger(__name__)

META_KEY = "__meta__"
META_FORMAT = 1
#: A handles file of 700 tensors is ~200 KB; anything this big is a state_dict.
MAX_FILE_BYTES = 64 << 20
REBUILD_NAME = "torch.multiprocessing.reductions.rebuild_cuda_tensor"
BYTES_NAME = "builtins.bytes"
_N_ARGS = 15  # rebuild_cuda_tensor's parameters (torch 1.x .. 2.13)

__all__ = [
    "META_KEY",
    "HandleEntry",
    "HandlesFile",
    "allowlist",
    "check_against",
    "differences",
    "export_meta",
    "open_handle_tensors",
    "open_handles",
    "parse_device_map",
    "read_handles",
    "write_handles",
]


# ------------------------------------------------------------------------ the allowlist


class _Refused(Exception):
    """Raised by the allowlist stand-ins when a pickle tries to *call* them."""


def _rebuild_marker(*args: object) -> None:
    """Stands for ``rebuild_cuda_tensor`` inside a loaded handles file. Never runs it."""
    raise _Refused(f"{REBUILD_NAME} is called while unpickling")


def _safe_bytes(*args: object) -> bytes:
    """``bytes()`` as protocol-2 pickles spell ``b""``; no sizes, no iterables."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes):
        return args[0]
    raise _Refused(f"{BYTES_NAME} is called with {type(args[0]).__name__} arguments")


def allowlist() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The globals added to torch's ``weights_only`` defaults, as ``(stand-in, name)``."""
    return [(_rebuild_marker, REBUILD_NAME), (_safe_bytes, BYTES_NAME)]


# torch.serialization.safe_globals edits a process-wide set: one load at a time.
_LOAD_LOCK = threading.Lock()


def _unpickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the allowlist, errors made one-line."""
    with _LOAD_LOCK:
        try:
            with torch.serialization.safe_globals(allowlist()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except _Refused as exc:
            raise UnsafePickle(
                f"{path}: refused to load: {exc}; a handles file only names it",
                "regenerate the handles file with torch.multiprocessing.reductions.reduce_tensor "
                "(or apollo_cas.sources.handles.write_handles); nothing in it was executed",
            ) from None
        except pickle.UnpicklingError as exc:
            raise _unpickling_error(path, str(exc)) from None
        except OSError as exc:
            raise SourceError(
                f"cannot read handles file {path}: {exc.strerror or exc}",
                "check the path and its permissions",
            ) from None
        except Exception as exc:  # zip/magic-number errors of torch.load, truncated files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedSource(
                f"{path} is not a handles file ({first[:200]})",
                "pass the file written by torch.save({name: {'handle': reduce_tensor(t)}})"
                + _other_kind(),
            ) from None


def _other_kind() -> str:
    """The tail of a not-a-handles-file hint: another kind, where the front end can."""
    return frontend.offer(
        "--source-kind", "; use --source-kind to read it as another kind", otherwise=""
    )


#: What torch.save writes: a zip archive, or (legacy format) a pickle, whose
#: first opcode is PROTO (0x80). Anything else is not a handles file at all and
#: must not reach the unpickler, whose refusal of stray bytes reads like a
#: hostile pickle ("Unsupported operand 215").
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise SourceError(f"cannot read handles file {path}: {exc.strerror or exc}") from None
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == _PICKLE_PROTO):
        return
    if not head:
        what = "it is empty"
    elif len(head) >= 9 and head[8:9] == b"{":
        what = "it is a safetensors file"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "it is text"
    else:
        what = "it is not a file torch.save writes"
    raise UnsupportedSource(
        f"{path} is not a handles file ({what})",
        "pass the file the server wrote with torch.save({name: {'handle': reduce_tensor(t)}})"
        + _other_kind(),
    )


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Phrases of torch's weights_only refusals (a global or call outside the allowlist),
# as opposed to a file that is simply not a pickle.
_REFUSAL_WORDS = (
    "unrecognized function",
    "Can only",
    "blocked",
    "Unsupported operand",
    "allowlist",
    "allowed global",
)
_BOILERPLATE = (
    "Weights only load failed",
    "Check the documentation",
    "(1)",
    "(2)",
    "In PyTorch 2.6",
    "Please file an issue",
)


def _unpickling_error(path: Path, text: str) -> Exception:
    """Map torch's multi-paragraph weights_only error to one line."""
    hint = (
        "a handles file only names torch's rebuild_cuda_tensor, tensor and storage classes "
        "and dtypes; nothing in it was executed. Regenerate it with reduce_tensor; never "
        "load it with weights_only=False"
    )
    m = _GLOBAL_RE.search(text)
    if m:
        return UnsafePickle(
            f"{path}: refused to load: it names the global {m.group(1)}, which is not allowlisted",
            hint,
        )
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
    detail = next((p for p in paragraphs if not p.startswith(_BOILERPLATE)), "")
    detail = detail.removeprefix("WeightsUnpickler error:").strip()
    if any(w in text for w in _REFUSAL_WORDS):
        return UnsafePickle(f"{path}: refused to load: {detail[:200]}", hint)
    return UnsupportedSource(
        f"{path} is not a handles file ({(detail or 'unreadable pickle')[:200]})",
        "pass the handles file written by the server" + _other_kind(),
    )


# ------------------------------------------------------------------------------ parsing


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
    if func is not _rebuild_marker:
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
    _check_magic(p)
    obj = _unpickle(p)
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


# ---------------------------------------------------------------------- stale handles


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (/proc/<pid>/stat field 22)."""
    ticks = procinfo.proc_start(pid)
    return int(ticks) if ticks.isdigit() else None


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_start_epoch(pid: int) -> float | None:
    ticks, boot = _proc_start_ticks(pid), _boot_time()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _owner_alloc_conf(pid: int) -> str | None:
    """The owner's PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF, when readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        for key in (b"PYTORCH_CUDA_ALLOC_CONF=", b"PYTORCH_ALLOC_CONF="):
            if item.startswith(key):
                return item[len(key) :].decode(errors="replace")
    return None


def _expandable(conf: str | None) -> bool:
    return bool(conf) and re.search(r"expandable_segments\s*:\s*true", conf or "", re.I) is not None


def _foreign_owner(hf: HandlesFile) -> bool:
    """Whether the exporter recorded a host, boot or pid namespace other than ours:
    its pid means nothing here (files without these fields are judged by pid)."""
    m = hf.meta
    boot, ns, pid = m.get("boot_id"), m.get("pid_ns"), m.get("pid")
    if not (isinstance(boot, str) and isinstance(ns, str) and isinstance(pid, int)):
        return False
    start = m.get("pid_start")
    holder = procinfo.Holder(str(m.get("hostname", "")), boot, ns, pid, str(start or ""))
    return procinfo.judge(holder) == procinfo.FOREIGN


_CLOCK_SLACK = 2.0  # seconds: mtime and /proc start times have different resolutions


def check_owner(
    hf: HandlesFile,
    *,
    max_age: float | None = None,
    check_pid: bool = True,
    now: float | None = None,
) -> dict[str, str]:
    """Refuse a handles file whose owner is gone, whose pid was reused, or that is too old.

    Returns notes for the source's metadata. With ``check_pid=False`` (the server
    runs in another pid namespace, e.g. another container) only the age is checked.
    """
    now = time.time() if now is None else now
    notes: dict[str, str] = {
        "handles_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hf.mtime))
    }
    if max_age is not None and now - hf.mtime > max_age:
        raise StaleHandles(
            f"{hf.path} was written {now - hf.mtime:.0f} s ago, more than the allowed {max_age:.0f} s",
            frontend.offer(
                "--max-handles-age",
                "the server may have reloaded its weights since; re-export the handles, "
                "or raise --max-handles-age",
            ),
        )
    pids = hf.owner_pids
    if pids:
        notes["owner_pid"] = ",".join(str(p) for p in pids)
    if not check_pid or not os.path.isdir("/proc/self") or _foreign_owner(hf):
        return notes
    for pid in pids:
        if not procinfo.pid_alive(pid):
            raise StaleHandles(
                f"{hf.path}: the process that exported these handles (pid {pid}) is gone, "
                "and its GPU memory with it",
                frontend.offer(
                    "--no-owner-check",
                    "restart the export from the running server; if the server runs in another "
                    "container (pid namespace), pass --no-owner-check",
                ),
            )
        start = _proc_start_epoch(pid)
        recorded = hf.meta.get("pid_start")
        ticks = _proc_start_ticks(pid)
        if isinstance(recorded, int) and ticks is not None and recorded != ticks:
            raise StaleHandles(
                f"{hf.path}: pid {pid} now belongs to another process than the one that "
                "exported the handles",
                "the server restarted: re-export the handles from the running server",
            )
        if start is not None and start > hf.mtime + _CLOCK_SLACK:
            raise StaleHandles(
                f"{hf.path} is older than its owner process (pid {pid} started "
                f"{start - hf.mtime:.0f} s after the file was written): the pid was reused",
                "the server restarted: re-export the handles from the running server",
            )
        conf = _owner_alloc_conf(pid)
        if _expandable(conf):
            notes["owner_alloc_conf"] = conf or ""
    return notes


# ---------------------------------------------------------------------- device mapping


def parse_device_map(text: str) -> dict[int, int]:
    """``"0:2,1:3"`` -> ``{0: 2, 1: 3}``: the owner's device index -> this process's."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, sep, b = part.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise UsageError(
                f"invalid device map entry {part!r}",
                "write OWNER:LOCAL pairs of device indices, e.g. 0:2,1:3",
            )
        out[int(a)] = int(b)
    return out


def _env_text(env: str | None) -> str:
    """How this process's CUDA_VISIBLE_DEVICES reads in a message ("unset", not None)."""
    return "CUDA_VISIBLE_DEVICES unset" if env is None else f"CUDA_VISIBLE_DEVICES={env!r}"


def _norm_uuid(u: str) -> str:
    u = str(u).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _local_gpus() -> list[str]:
    """UUIDs (normalised) of the GPUs this process sees, by local index."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            out.append(_norm_uuid(str(torch.cuda.get_device_properties(i).uuid)))
        except Exception:
            out.append("")
    return out


def _visible(env: str | None) -> list[str] | None:
    if env is None or env.strip() == "":
        return None
    return [t.strip() for t in env.split(",") if t.strip()]


def map_devices(
    owner_indices: Sequence[int],
    meta: Mapping[str, Any],
    device_map: Mapping[int, int] | None,
    local_uuids: Sequence[str],
    local_env: str | None,
) -> tuple[dict[int, int], str]:
    """Owner device index -> local index, and the rule used (for the metadata).

    Rules, first that applies: an explicit ``device_map``; the GPU UUIDs the
    exporter recorded (``__meta__["device_uuids"]``); the exporter's
    ``CUDA_VISIBLE_DEVICES`` against ours; else the same index (the original
    format records nothing: run with the server's ``CUDA_VISIBLE_DEVICES``).
    """
    want = sorted(set(owner_indices))
    n = len(local_uuids)

    def check_local(mapping: dict[int, int], rule: str) -> tuple[dict[int, int], str]:
        for o, loc in mapping.items():
            if loc >= n:
                seen = f"{n} GPU(s)" if n else "no GPU"
                raise StaleHandles(
                    f"handles name GPU {o} of the server, mapped to local GPU {loc}, but this "
                    f"process sees {seen} ({_env_text(local_env)}, rule: {rule})",
                    "run on the server's machine with its GPUs visible, or pass a device map",
                )
        return mapping, rule

    if device_map:
        missing = [o for o in want if o not in device_map]
        if missing:
            raise UsageError(
                f"device map has no entry for the server's GPU(s) {missing}",
                "map every device index the handles use",
            )
        return check_local({o: int(device_map[o]) for o in want}, "explicit map")
    uuids = meta.get("device_uuids")
    if isinstance(uuids, dict) and all(str(o) in uuids for o in want):
        mapping = {}
        for o in want:
            u = _norm_uuid(str(uuids[str(o)]))
            if u not in local_uuids:
                raise StaleHandles(
                    f"the server's GPU {o} (GPU-{u}) is not visible to this process "
                    f"({_env_text(local_env)})",
                    "CUDA IPC needs the same physical GPU: run on the server's machine with that "
                    "GPU visible",
                )
            mapping[o] = local_uuids.index(u)
        return check_local(mapping, "GPU UUID")
    if "cuda_visible_devices" in meta:
        owner_list = _visible(meta.get("cuda_visible_devices"))
        local_list = _visible(local_env)
        if owner_list == local_list:
            return check_local({o: o for o in want}, "same CUDA_VISIBLE_DEVICES")
        mapping = {}
        for o in want:
            token = owner_list[o] if owner_list and o < len(owner_list) else str(o)
            if owner_list is not None and o >= len(owner_list):
                raise StaleHandles(
                    f"handles name GPU {o}, but the server saw only "
                    f"{len(owner_list)} (CUDA_VISIBLE_DEVICES={owner_list})"
                )
            if local_list is not None and token in local_list:
                mapping[o] = local_list.index(token)
            elif local_list is None and token.isdigit():
                mapping[o] = int(token)
            elif _norm_uuid(token) in local_uuids:
                mapping[o] = local_uuids.index(_norm_uuid(token))
            else:
                raise StaleHandles(
                    f"the server's GPU {o} ({token!r} in its CUDA_VISIBLE_DEVICES) is not "
                    f"visible to this process ({_env_text(local_env)})",
                    "run with the server's CUDA_VISIBLE_DEVICES, or pass a device map",
                )
        return check_local(mapping, "CUDA_VISIBLE_DEVICES")
    return check_local({o: o for o in want}, "same index (no metadata)")


# ------------------------------------------------------------------------------ opening


def _rebuild(e: HandleEntry, device: int) -> torch.Tensor:
    """Open one handle on local ``device``. Tests replace this to return CPU tensors."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    # Our own tensor class and requires_grad=False: a plain tensor over the shared
    # memory, whatever class the exporter had.
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(e.size),
        e.stride,
        e.tensor_offset,
        e.storage_cls,
        e.dtype,
        device,
        e.storage_handle,
        e.storage_size_bytes,
        e.storage_offset_bytes,
        False,
        e.ref_counter_handle,
        e.ref_counter_offset,
        e.event_handle,
        e.event_sync_required,
    )


def _open_error(
    hf: HandlesFile, e: HandleEntry, device: int, exc: Exception, notes: Mapping[str, str]
) -> StaleHandles:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    causes = [
        "the exporting process exited or freed the tensors",
        "this process runs on another machine, container or IPC namespace",
        "the GPU differs (check CUDA_VISIBLE_DEVICES or pass a device map)",
        "this process is the exporter itself (pass its state_dict in-process instead)",
    ]
    if e.handle_kind == "expandable_segment" or _expandable(notes.get("owner_alloc_conf")):
        causes.insert(
            0,
            "the server allocates with expandable_segments:True in "
            "PYTORCH_CUDA_ALLOC_CONF, whose memory CUDA IPC can only share "
            "with pidfd_getfd rights (same user, ptrace allowed); restart it "
            "without expandable_segments",
        )
    return StaleHandles(
        f"{hf.path}: cannot open the handle of {e.name!r} on GPU {device}: {first}",
        "likely causes: " + "; ".join(causes),
    )


def open_handle_tensors(
    path: str | Path,
    *,
    device_map: Mapping[int, int] | str | None = None,
    max_age: float | None = None,
    check_owner_pid: bool = True,
) -> tuple[dict[str, torch.Tensor], HandlesFile, dict[str, str]]:
    """The live tensors behind a handles file, opened on this process's GPUs.

    Returns ``(tensors, parsed file, notes)``. The tensors share the server's
    memory: writing them (hot restore) changes the served weights. They stay
    valid while they are referenced and the server keeps the memory.
    """
    hf = read_handles(path)
    notes = check_owner(hf, max_age=max_age, check_pid=check_owner_pid)
    if isinstance(device_map, str):
        device_map = parse_device_map(device_map)
    kinds = sorted({e.handle_kind for e in hf.entries})
    notes["handle_kind"] = ",".join(kinds)
    mapping, rule = map_devices(
        [e.device for e in hf.entries],
        hf.meta,
        device_map,
        _local_gpus(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    notes["device_map"] = ",".join(f"{o}:{loc}" for o, loc in sorted(mapping.items()))
    notes["device_rule"] = rule
    out: dict[str, torch.Tensor] = {}
    for e in hf.entries:
        dev = mapping[e.device]
        try:
            t = _rebuild(e, dev)
        except Exception as exc:  # CUDA errors surface as RuntimeError / torch.AcceleratorError
            raise _open_error(hf, e, dev, exc, notes) from None
        if tuple(t.shape) != e.size or t.dtype != e.dtype:
            raise StaleHandles(
                f"{hf.path}: handle of {e.name!r} opened as {tuple(t.shape)} "
                f"{t.dtype}, expected {e.size} {e.dtype}",
                "re-export the handles from the running server",
            )
        out[e.name] = t
    return out, hf, notes


def _meta_int(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def open_handles(
    path: str | Path,
    info: SourceInfo | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device_map: Mapping[int, int] | str | None = None,
    max_age: float | None = None,
    check_owner_pid: bool = True,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    streams: int = DEFAULT_STREAMS,
) -> DeviceSource:
    """A :class:`DeviceSource` over the live tensors of a handles file.

    ``rank`` / ``world_size`` (the CLI's ``--rank`` / ``--world-size``) override
    the file's metadata and are recorded in the manifest: handles of vLLM's own
    parameters carry its internal, tensor-parallel-sharded names, which only make
    sense with them. See :func:`open_handle_tensors` for the other options.
    """
    tensors, hf, notes = open_handle_tensors(
        path, device_map=device_map, max_age=max_age, check_owner_pid=check_owner_pid
    )
    meta_rank, meta_ws = _meta_int(hf.meta, "rank"), _meta_int(hf.meta, "world_size")
    for what, given, recorded in (("rank", rank, meta_rank), ("world size", world_size, meta_ws)):
        if given is not None and recorded is not None and given != recorded:
            raise UsageError(
                f"{hf.path} was exported by {what} {recorded}, not {given}",
                f"drop the {what} option or pass the right handles file",
            )
    rank = rank if rank is not None else meta_rank
    world_size = world_size if world_size is not None else meta_ws
    if rank is not None and (rank < 0 or (world_size is not None and rank >= world_size)):
        raise UsageError(
            f"rank {rank} is outside world size {world_size}", "pass 0 <= --rank < --world-size"
        )
    base = info or SourceInfo(kind="handles", location=str(hf.path))
    info = replace(
        base,
        location=base.location or str(hf.path),
        rank=rank,
        world_size=world_size,
        metadata={**base.metadata, **notes},
    )
    return DeviceSource(tensors, info, buffer_bytes=buffer_bytes, streams=streams)


# ------------------------------------------------------------------------------ writing


def _self_gpu_uuids(devices: Sequence[int]) -> dict[str, str]:
    out = {}
    for d in devices:
        with contextlib.suppress(Exception):  # metadata is best effort
            out[str(d)] = "GPU-" + _norm_uuid(str(torch.cuda.get_device_properties(d).uuid))
    return out


def export_meta(
    devices: Sequence[int], *, rank: int | None = None, world_size: int | None = None
) -> dict[str, Any]:
    """The ``__meta__`` dict of this process. Plain str/int/float/None values only:
    anything else (``torch.__version__`` is a ``TorchVersion``) would be a global
    that the reader's allowlist refuses."""
    return {
        "format": META_FORMAT,
        "pid": os.getpid(),
        "pid_start": _proc_start_ticks(os.getpid()),
        "created": time.time(),
        "hostname": socket.gethostname(),
        "boot_id": procinfo.current().boot_id,
        "pid_ns": procinfo.current().pid_ns,
        "rank": None if rank is None else int(rank),
        "world_size": None if world_size is None else int(world_size),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_uuids": _self_gpu_uuids(devices),
        "torch": str(torch.__version__),
    }


def write_handles(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    include_meta: bool = True,
) -> None:
    """Export CUDA tensors as a handles file (what the server side runs).

    The file is written under a temporary name, fsynced and renamed, mode 0600:
    whoever can open it can read and overwrite the weights. With
    ``include_meta`` it carries ``__meta__`` (pid and start time, rank, world
    size, GPU UUIDs, CUDA_VISIBLE_DEVICES), which lets readers detect a restarted
    server and remap devices; the original Rust tool cannot read such a file
    (it expects every key to hold a handle): pass ``include_meta=False`` while it
    still runs beside apollo_cas. The calling process must keep the tensors alive.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    obj: dict[str, Any] = {}
    devices = set()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            raise SourceError(
                f"tensor {name!r} is not a CUDA tensor",
                "handles share GPU memory; save CPU tensors directly",
            )
        check_tensor_name(name)
        obj[name] = {"handle": reduce_tensor(t.detach())}
        devices.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if include_meta:
        obj[META_KEY] = export_meta(sorted(devices), rank=rank, world_size=world_size)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ------------------------------------------------------------------ previous checkpoint


def differences(manifest: Manifest, source: Source) -> list[str]:
    """How ``source`` differs from ``manifest`` in names, dtypes, shapes, sizes, rank."""
    out: list[str] = []
    old = {t.name: t for t in manifest.tensors}
    new = {t.name: t for t in source.tensors()}
    for name in sorted(old.keys() - new.keys()):
        out.append(f"{name!r} is gone")
    for name in sorted(new.keys() - old.keys()):
        out.append(f"{name!r} is new")
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        same_dtype = dtypes.lookup(a.dtype).name == b.dtype.name
        if not same_dtype:
            out.append(f"{name!r} dtype {a.dtype} -> {b.dtype.name}")
        if tuple(a.shape) != tuple(b.shape):
            out.append(f"{name!r} shape {tuple(a.shape)} -> {tuple(b.shape)}")
        elif same_dtype and a.nbytes != b.nbytes:
            out.append(f"{name!r} size {a.nbytes} -> {b.nbytes} bytes")
    for what, x, y in (
        ("rank", manifest.source.rank, source.info.rank),
        ("world size", manifest.source.world_size, source.info.world_size),
    ):
        if x is not None and y is not None and x != y:
            out.append(f"{what} {x} -> {y}")
    return out


def check_against(manifest: Manifest | None, source: Source, *, force: bool = False) -> None:
    """Refuse ``source`` if it does not match the series' previous checkpoint.

    For a handles file a mismatch usually means stale handles (the server
    reloaded or reallocated its weights) and the bytes behind them are not the
    model: :class:`StaleHandles`. For other sources, :class:`SourceError`. With
    ``force`` the differences are only logged (the model really changed). Fits
    the store's ``save(check=...)`` hook; no previous manifest passes.
    """
    if manifest is None:
        return
    diffs = differences(manifest, source)
    if not diffs:
        return
    where = source.info.location or source.info.kind
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    msg = f"{where}: {len(diffs)} difference(s) from the previous checkpoint of the series: {shown}"
    if force:
        log.warning("%s (forced)", msg)
        return
    if source.info.kind == "handles":
        raise StaleHandles(
            msg,
            "the handles may be stale (the server reloaded or reallocated its "
            "weights): re-export them; "
            + frontend.offer(
                "--force", "if the model really changed, pass --force or save into a new --series"
            ),
        )
    raise SourceError(
        msg,
        frontend.offer(
            "--force", "if the model really changed, pass --force or save into a new --series"
        ),
    )
