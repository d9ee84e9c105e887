"""torch ``.pt`` state_dicts, loaded with ``weights_only=True``.

A checkpoint file must never run code: torch's restricted unpickler accepts
tensors, containers and primitive types only. Common wrappers
(``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SourceError, UnsafePickle, UnsupportedSource
from ..manifest import SourceInfo
from .base import Source, SourceTensor
from .mapping import tensor_from_object

_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


class PtSource(Source):
    """A state_dict saved with ``torch.save``."""

    def __init__(self, path: Path, info: SourceInfo | None = None) -> None:
        import pickle
        import re
        import zipfile

        import torch

        self.info = info or SourceInfo(kind="pt", location=str(path))
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
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise UnsupportedSource(
                f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0][:200]})",
                "pass a .pt state_dict, a .safetensors file or a checkpoint directory",
            ) from exc
        loaded = obj
        if isinstance(obj, Mapping):
            for w in _WRAPPERS:
                if isinstance(obj.get(w), Mapping):
                    obj = obj[w]
                    break
        if not isinstance(obj, Mapping):
            raise UnsupportedSource(
                f"{path} holds a {type(obj).__name__}, not a state_dict",
                "save model.state_dict() instead of the model",
            )
        flat = {k: v for k, v in _flatten(obj).items() if isinstance(v, torch.Tensor)}
        if not flat:
            raise SourceError(f"{path} contains no tensors")
        self._tensors = [tensor_from_object(k, flat[k]) for k in sorted(flat)]
        self.left_out = _left_out(loaded, obj)

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors


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
