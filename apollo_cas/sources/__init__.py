"""Sources: what ``save`` reads, and how a path's kind is detected.

Kinds: ``safetensors`` (file, index, or directory of shards), ``pt`` (a torch
state_dict), ``handles`` (the original tool's CUDA IPC handles file), ``seed``
(the original tool's checkpoint directory or directory of checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import SourceNotFound, UnsupportedSource, UsageError
from ..manifest import SourceInfo
from .base import BlockRequest, Source, SourceTensor

KINDS = ("safetensors", "pt", "handles", "seed")
_ZIP_MAGIC = b"PK\x03\x04"


def detect_kind(path: Path) -> str:
    """Guess a source's kind from its layout and first bytes."""
    from . import seed

    if not path.exists():
        raise SourceNotFound(f"{path} does not exist", "check the path of the source")
    if path.is_dir():
        if seed.is_checkpoint_dir(path) or seed.is_checkpoint_root(path):
            return "seed"
        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
            return "safetensors"
        raise UnsupportedSource(
            f"{path} holds no safetensors files and no original-tool checkpoints",
            "pass a .safetensors file or directory, a .pt state_dict, a handles file or a "
            "checkpoint directory",
        )
    if path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json"):
        return "safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise SourceNotFound(f"cannot read {path}: {exc.strerror}") from exc
    if head.startswith(_ZIP_MAGIC) or head[:2] == b"\x80\x02":
        # torch.save zip (or legacy pickle): a handles file or a state_dict.
        return "handles" if _looks_like_handles(path) else "pt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UnsupportedSource(
        f"{path} is not a safetensors file, torch checkpoint or handles file",
        "pass --source-kind if the detection is wrong",
    )


def _looks_like_handles(path: Path) -> bool:
    """A handles file's pickle names torch's CUDA rebuild function."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("data.pkl"):
                    return b"rebuild_cuda_tensor" in z.read(name)
    except (zipfile.BadZipFile, OSError):
        return False
    return False


def open_path(
    path: str | Path, kind: str | None = None, info: SourceInfo | None = None, **options: Any
) -> Source:
    """Open one source of a known or detected kind."""
    p = Path(path)
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown source kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if not p.exists():
        raise SourceNotFound(f"{p} does not exist", "check the path of the source")
    kind = kind or detect_kind(p)
    info = info or SourceInfo(kind=kind, location=str(p))
    if kind == "safetensors":
        from .safetensors_file import SafetensorsSource, index_weight_map, safetensors_files

        return SafetensorsSource(safetensors_files(p), info, index_weight_map(p))
    if kind == "pt":
        from .pt import PtSource

        return PtSource(p, info)
    if kind == "seed":
        from .seed import SeedSource

        return SeedSource(p, info)
    from .handles import open_handles

    return open_handles(p, info, **options)


def open_mapping(mapping: Mapping[str, Any], info: SourceInfo | None = None) -> Source:
    """A source over in-process tensors; CUDA tensors take the device path."""
    info = info or SourceInfo(kind="mapping")
    on_device = any(
        getattr(getattr(v, "device", None), "type", "cpu") not in ("cpu", None)
        for v in mapping.values()
    )
    if on_device:
        from .device import open_tensors

        return open_tensors(mapping, info)
    from .mapping import MappingSource

    return MappingSource(mapping, info)


__all__ = [
    "KINDS",
    "BlockRequest",
    "Source",
    "SourceTensor",
    "detect_kind",
    "open_mapping",
    "open_path",
]
