"""torch ``.pt`` state_dicts, loaded with ``weights_only=True``.

A checkpoint file must never run code: torch's restricted unpickler accepts
tensors, containers and primitive types only. Nested dicts are flattened with
dots; names that collide are an error. A common wrapper (``{"state_dict": ...}``,
``{"model": ...}``) is unwrapped when it holds every tensor of the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SourceError, UnsafePickle, UnsupportedSource
from ..manifest import SourceInfo
from .base import Source, SourceTensor, by_unique_name
from .mapping import tensor_from_object

_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


def _tensor_items(obj: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor under ``obj`` with its dotted name. Names are not made unique
    here: :func:`~apollo_cas.sources.base.by_unique_name` refuses collisions."""
    import torch

    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _tensor_items(v, name + ".")
        elif isinstance(v, torch.Tensor):
            yield name, v


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


class PtSource(Source):
    """A state_dict saved with ``torch.save``."""

    def __init__(self, path: Path, info: SourceInfo | None = None) -> None:
        import pickle
        import re
        import zipfile

        import torch

        self.info = info or SourceInfo(kind="pt", location=str(path))
        self.path = path
        self._identity = _identity(path)
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
        self._tensors = [tensor_from_object(k, v) for k, v in flat]

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors

    def check_unchanged(self) -> None:
        # torch maps the file: a truncation while it is read can still end the
        # process (SIGBUS); a rewrite in place is at least caught before commit.
        if _identity(self.path) != self._identity:
            raise SourceError(
                f"{self.path} changed while it was being saved; nothing was committed",
                "save it again once the program writing it has finished",
            )


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
