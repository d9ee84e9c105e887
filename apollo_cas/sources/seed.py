"""The original tool's checkpoints: ``weights.bin`` + ``weights.json`` directories.

A single checkpoint directory is one source. A checkpoint *root* (the tool's
``--checkpoint-dir``: timestamped subdirectories and a ``latest`` symlink) is
imported as a history, oldest first, keeping each checkpoint's timestamp.
Half-written directories (no index, a short weights.bin, unreadable JSON) and a
dangling ``latest`` are reported and skipped, never imported as checkpoints.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import dtypes
from ..errors import InvalidName, SourceError, UnsupportedSource
from ..layout import check_tensor_name
from ..manifest import SourceInfo
from .base import Source, SourceTensor
from .safetensors_file import MappedTensor

if TYPE_CHECKING:
    from ..filesets import FileSet

WEIGHTS = "weights.bin"
INDEX = "weights.json"
META = "checkpoint-meta.json"
TIME_FORMAT = "%Y-%m-%d-%H%M"


def is_checkpoint_dir(path: Path) -> bool:
    return (path / WEIGHTS).exists() or (path / INDEX).exists()


def is_checkpoint_root(path: Path) -> bool:
    return path.is_dir() and any(
        p.is_dir() and is_checkpoint_dir(p) for p in path.iterdir() if not p.name.startswith(".")
    )


def _timestamp(path: Path) -> float | None:
    """The checkpoint's time: its meta file, else its directory name (UTC)."""
    for text in (_meta_timestamp(path), path.name):
        if not text:
            continue
        try:
            return float(calendar.timegm(time.strptime(text, TIME_FORMAT)))
        except ValueError:
            continue
    return None


def _meta_timestamp(path: Path) -> str | None:
    try:
        v = json.loads((path / META).read_text()).get("timestamp")
        return str(v) if v else None
    except (OSError, ValueError, AttributeError):
        return None


class SeedSource(Source):
    """One checkpoint directory of the original tool."""

    def __init__(self, path: Path, info: SourceInfo | None = None) -> None:
        self.path = path
        self.info = info or SourceInfo(kind="seed", location=str(path))
        self.created = _timestamp(path)
        index_path, weights_path = path / INDEX, path / WEIGHTS
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise UnsupportedSource(
                f"{path} has no {INDEX} (half-written checkpoint?)",
                "skip it; the original tool wrote the index last",
            ) from None
        except (OSError, ValueError) as exc:
            raise UnsupportedSource(f"{index_path} is unreadable ({exc})") from exc
        if not isinstance(index, dict):
            raise UnsupportedSource(f"{index_path} is not a name -> entry map")
        try:
            size = weights_path.stat().st_size
        except FileNotFoundError:
            raise UnsupportedSource(f"{path} has no {WEIGHTS}") from None
        self._map: mmap.mmap | None = None
        view = memoryview(b"")
        if size:
            with open(weights_path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(self._map)
        tensors: list[SourceTensor] = []
        for name in sorted(index):
            e = index[name]
            check_tensor_name(name)
            try:
                off, n = int(e["offset"]), int(e["size"])
                shape = tuple(int(x) for x in e["shape"])
                dt = dtypes.lookup(str(e["dtype"]), f"{index_path}:{name}")
            except (KeyError, TypeError, ValueError) as exc:
                raise UnsupportedSource(
                    f"{index_path}: malformed entry for {name!r} ({exc})"
                ) from exc
            count = 1
            for s in shape:
                count *= s
            if off < 0 or off + n > size:
                raise SourceError(
                    f"{weights_path} is shorter than {INDEX} says ({name!r} ends at {off + n}, "
                    f"file has {size} bytes): half-written checkpoint",
                    "skip it; the newest complete checkpoint is older",
                )
            if count * dt.itemsize != n:
                raise SourceError(
                    f"{index_path}: {name!r} has shape {shape} of {dt.name} but size {n}",
                    "the index is inconsistent; skip it",
                )
            tensors.append(MappedTensor(name, dt, shape, view[off : off + n]))
        self._tensors = tensors

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors

    def saved_files(self) -> FileSet:
        """weights.bin and weights.json as they are, for exact restores."""
        from ..filesets import seed_record

        return seed_record(self.path, {t.name: t.nbytes for t in self._tensors})

    def close(self) -> None:
        self._tensors = []
        if self._map is not None:
            with contextlib.suppress(BufferError):  # still referenced: the GC closes it
                self._map.close()


@dataclass(frozen=True)
class Skipped:
    """A directory the importer did not take, and why."""

    path: Path
    reason: str


def scan_root(root: Path) -> tuple[list[Path], list[Skipped]]:
    """Checkpoint directories under a root, oldest first, and the ones to skip."""
    good: list[tuple[float, str, Path]] = []
    skipped: list[Skipped] = []
    latest = root / "latest"
    if latest.is_symlink() and not latest.exists():
        skipped.append(Skipped(latest, "dangling 'latest' symlink (ignored)"))
    # A root that is also an apollo_cas store (its 'config' marks it) holds the
    # store's own directories (chunks, manifests, refs, locks, ...): those are
    # not checkpoints of the original tool, broken or otherwise.
    is_store = (root / "config").is_file()
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name == "latest" or not p.is_dir():
            continue
        if not is_checkpoint_dir(p):
            if not is_store:
                skipped.append(Skipped(p, "no weights.bin / weights.json"))
            continue
        if not (p / INDEX).exists():
            skipped.append(Skipped(p, f"no {INDEX}: half-written checkpoint"))
            continue
        reason = _not_whole(p)
        if reason:  # e.g. a short weights.bin or a torn weights.json
            skipped.append(Skipped(p, reason))
            continue
        ts = _timestamp(p)
        good.append((ts if ts is not None else p.stat().st_mtime, p.name, p))
    good.sort()
    return [p for _, _, p in good], skipped


def _not_whole(path: Path) -> str | None:
    """Why a checkpoint directory cannot be imported as it is, or None if it can."""
    try:
        SeedSource(path).close()
    except (SourceError, InvalidName) as exc:
        return exc.message
    return None
