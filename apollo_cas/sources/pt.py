"""torch ``.pt`` state_dicts, loaded with ``weights_only=True``.

A checkpoint file must never run code: torch's restricted unpickler accepts
tensors, containers and primitive types only. Nested dicts are flattened with
dots; names that collide are an error. A common wrapper (``{"state_dict": ...}``,
``{"model": ...}``) is unwrapped when it holds every tensor of the file.
Tensor bytes are read from the file with ``pread`` where their place in it is
proven (see :func:`_file_offsets`), so a file truncated during the save is an
error, not a SIGBUS.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import SourceError, UnsafePickle, UnsupportedSource
from ..manifest import SourceInfo
from .base import by_unique_name
from .mapping import tensor_from_object
from .safetensors_file import FileTensor, OneFileSource, SourceFile

_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


class _KeyPath(tuple[Any, ...]):
    """The keys leading to a tensor: ``str`` is its dotted name, ``repr`` the
    keys themselves (so a collision names both: ``['a']['b']`` and ``['a.b']``)."""

    def __str__(self) -> str:
        return ".".join(str(k) for k in self)

    def __repr__(self) -> str:
        return "".join(f"[{k!r}]" for k in self)


def _tensor_items(
    obj: Mapping[Any, Any], prefix: tuple[Any, ...] = ()
) -> Iterator[tuple[_KeyPath, Any]]:
    """Every tensor under ``obj`` with its key path (dotted name). Names are not
    made unique here: :func:`~apollo_cas.sources.base.by_unique_name` refuses
    collisions."""
    import torch

    for k, v in obj.items():
        path = (*prefix, k)
        if isinstance(v, Mapping):
            yield from _tensor_items(v, path)
        elif isinstance(v, torch.Tensor):
            yield _KeyPath(path), v


def _unwrap(obj: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """The state_dict inside a common wrapper (``{"state_dict": {...}, "epoch": 3}``),
    only when the wrapper holds every tensor: a sibling tensor
    (``{"model": {...}, "lm_head.weight": t}``) keeps the whole content, named
    with prefixes, rather than being dropped."""
    for w in _WRAPPERS:
        inner = obj.get(w)
        if isinstance(inner, Mapping):
            others = any(True for k, v in obj.items() if k != w for _ in _tensor_items({k: v}))
            return obj if others else inner
    return obj


class PtSource(OneFileSource):
    """A state_dict saved with ``torch.save``."""

    def __init__(self, path: Path, info: SourceInfo | None = None) -> None:
        self.info = info or SourceInfo(kind="pt", location=str(path))
        self.path = path
        # Opened before torch maps the file, so both see the same file.
        self._file: SourceFile | None = SourceFile(path)
        try:
            self._load(path)
        except BaseException:
            self.close()
            raise

    def _load(self, path: Path) -> None:
        import pickle
        import re
        import zipfile

        import torch

        try:
            # mmap needs the zip format; legacy (pre-1.6) files load without it.
            obj = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as exc:
            # torch's first lines advise weights_only=False: report the line that
            # names what was refused instead.
            text = str(exc)
            named = re.search(r"GLOBAL ([\w.]+)", text)
            if named or "Can only create" in text or "Can only build" in text:
                what = f"it names {named.group(1)}" if named else "it builds non-tensor objects"
                raise UnsafePickle(
                    f"{path} is a pickle that needs code to load ({what}); it was not run",
                    "save plain tensors: torch.save(model.state_dict(), path)",
                ) from exc
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            detail = next(
                (ln for ln in lines if ln.startswith("Unsupported operand")),
                lines[0] if lines else "unreadable pickle",
            )
            raise UnsupportedSource(
                f"{path} is not a torch checkpoint ({detail[:200]})",
                "pass a .pt state_dict, a .safetensors file or a checkpoint directory",
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:
            # weights_only loading runs no code, so whatever else it raises
            # (KeyError, IndexError, struct.error from a text file or a torn zip)
            # means the file is not a checkpoint it can read.
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise UnsupportedSource(
                f"{path} is not a readable torch checkpoint ({first})",
                "pass a .pt state_dict, a .safetensors file or a checkpoint directory",
            ) from exc
        if not isinstance(obj, Mapping):
            raise UnsupportedSource(
                f"{path} holds a {type(obj).__name__}, not a state_dict",
                "save model.state_dict() instead of the model",
            )
        try:
            flat = by_unique_name(_tensor_items(_unwrap(obj)), str(path))
        except RecursionError:
            raise UnsupportedSource(
                f"{path} holds dicts nested too deeply to be a state_dict",
                "save model.state_dict() instead",
            ) from None
        if not flat:
            raise SourceError(f"{path} contains no tensors")
        tensors = [tensor_from_object(k, v) for k, v in flat]
        assert self._file is not None
        self._file.check_unchanged()  # the file torch mapped is the one open here
        where = _file_offsets(path, flat) if zipfile.is_zipfile(path) else None
        if where is not None:
            # Read the bytes with pread, not through torch's mapping of the file:
            # a read of a mapped page past a truncated end is a SIGBUS.
            tensors = [
                FileTensor(t.name, t.dtype, t.shape, self._file, where[t.name], t.nbytes)
                if t.name in where
                else t
                for t in tensors
            ]
        self._tensors = tensors
        self.left_out = _left_out(obj, _unwrap(obj))


def _file_offsets(path: Path, flat: list[tuple[str, Any]]) -> dict[str, int] | None:
    """Where in the file each contiguous, non-empty tensor's bytes lie, or None
    when that cannot be proven (then the tensors are read from torch's mapping).

    torch.load(mmap=True) maps the whole file and slices every storage at the
    data offset of its zip record, so ``storage.data_ptr() - record offset`` is
    one constant, the mapping's base. The storages, sorted by address, and the
    records, sorted by offset, must pair up with that one constant.
    """
    import struct
    import zipfile

    records: list[int] = []
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for i in z.infolist():
                parts = i.filename.split("/")
                if parts[-1] == "byteorder" and z.read(i.filename).strip() not in (b"", b"little"):
                    return None
                if len(parts) < 3 or parts[-2] != "data" or i.file_size == 0:
                    continue
                if i.compress_type != zipfile.ZIP_STORED:
                    return None
                f.seek(i.header_offset)
                head = f.read(30)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                records.append(i.header_offset + 30 + name_len + extra_len)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None
    storages = sorted(
        {t.untyped_storage().data_ptr() for _, t in flat if t.untyped_storage().nbytes() > 0}
    )
    records.sort()
    if len(storages) != len(records) or not storages:
        return None
    bases = {p - r for p, r in zip(storages, records, strict=True)}
    if len(bases) != 1:
        return None
    (base,) = bases
    return {
        name: t.data_ptr() - base
        for name, t in flat
        if t.is_contiguous() and t.numel() > 0 and t.untyped_storage().nbytes() > 0
    }


def _left_out(loaded: Any, kept: Any) -> tuple[str, ...]:
    """The top-level entries of a loaded ``.pt`` that no saved tensor came from:
    the siblings of an unwrapped ``model`` (``optimizer``, ``epoch``) and
    entries holding no tensor."""
    import torch

    if not isinstance(loaded, Mapping):
        return ()

    def has_tensor(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return True
        return isinstance(v, Mapping) and any(has_tensor(x) for x in v.values())

    out = []
    for k, v in loaded.items():
        if v is kept:
            continue
        if kept is loaded and has_tensor(v):
            continue  # its tensors are saved
        out.append(f"{k!s} ({type(v).__name__})")
    return tuple(out)
