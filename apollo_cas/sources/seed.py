"""The original tool's checkpoints: ``weights.bin`` + ``weights.json`` directories.

A single checkpoint directory is one source. A checkpoint *root* (the tool's
``--checkpoint-dir``: timestamped subdirectories and a ``latest`` symlink) is
imported as a history, oldest first, keeping each checkpoint's timestamp.
Half-written directories (no index, a short weights.bin, unreadable JSON) and a
dangling ``latest`` are reported and skipped, never imported as checkpoints.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidName, SourceError, UnsupportedSource
from ..formats import flat
from ..formats.flat import INDEX, META, TIME_FORMAT, WEIGHTS
from ..manifest import SourceInfo
from .base import SourceTensor
from .safetensors_file import FileTensor, OneFileSource, SourceFile

if TYPE_CHECKING:
    from ..filesets import FileSet


def is_checkpoint_dir(path: Path) -> bool:
    return (path / WEIGHTS).exists() or (path / INDEX).exists()


def is_checkpoint_root(path: Path) -> bool:
    return path.is_dir() and any(
        p.is_dir() and not p.is_symlink() and is_checkpoint_dir(p)
        for p in path.iterdir()
        if not p.name.startswith(".")
    )


def checkpoint_time(path: Path) -> float | None:
    """The time the original tool recorded for a checkpoint (its meta file, else
    its directory name, UTC), or None if it recorded none."""
    for text in (_meta_timestamp(path), path.name):
        if not text:
            continue
        try:
            return float(calendar.timegm(time.strptime(text, TIME_FORMAT)))
        except ValueError:
            continue
    return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _meta_timestamp(path: Path) -> str | None:
    try:
        return flat.meta_timestamp((path / META).read_bytes(), str(path / META))
    except (OSError, SourceError):
        return None


class SeedSource(OneFileSource):
    """One checkpoint directory of the original tool."""

    def __init__(self, path: Path, info: SourceInfo | None = None) -> None:
        self.path = path
        self.info = info or SourceInfo(kind="seed", location=str(path))
        # Without a recorded time, the index's mtime (the tool wrote it last) is
        # closer to the truth than "now", which would make an old checkpoint
        # the newest one.
        self.created = checkpoint_time(path) or _mtime(path / INDEX)
        index_path, weights_path = path / INDEX, path / WEIGHTS
        try:
            text = index_path.read_bytes()
        except FileNotFoundError:
            raise UnsupportedSource(
                f"{path} has no {INDEX} (half-written checkpoint?)",
                "skip it; the original tool wrote the index last",
            ) from None
        except OSError as exc:
            raise UnsupportedSource(f"{index_path} is unreadable ({exc})") from exc
        index = flat.loads_index(text, index_path)
        try:
            self._file: SourceFile | None = SourceFile(weights_path)
        except SourceError:
            if not weights_path.exists():
                raise UnsupportedSource(f"{path} has no {WEIGHTS}") from None
            raise
        try:
            self._tensors = _index_tensors(index, index_path, self._file)
        except BaseException:
            self.close()
            raise

    def saved_files(self) -> FileSet:
        """weights.bin and weights.json as they are, for exact restores."""
        from ..filesets import seed_record

        return seed_record(self.path, {t.name: t.nbytes for t in self._tensors})


def _index_tensors(index: dict[str, object], index_path: Path, f: SourceFile) -> list[SourceTensor]:
    """The tensors a weights.json lists, each checked against weights.bin."""
    entries = flat.parse_index(index, index_path, f.path, f.size)
    return [
        FileTensor(e.name, e.dtype, e.shape, f, e.offset, e.size)
        for e in sorted(entries, key=lambda e: e.name)
    ]


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
        if p.name.startswith(".") or p.name == "latest":
            continue
        if p.is_symlink():
            # The tool writes real directories; a link may lead anywhere (out of
            # the root of a copied, untrusted tree).
            skipped.append(Skipped(p, "a symlink, not followed (checkpoints are directories)"))
            continue
        if not p.is_dir():
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
        ts = checkpoint_time(p)
        good.append((ts if ts is not None else (_mtime(p / INDEX) or p.stat().st_mtime), p.name, p))
    good.sort()
    return [p for _, _, p in good], skipped


def _not_whole(path: Path) -> str | None:
    """Why a checkpoint directory cannot be imported as it is, or None if it can."""
    try:
        SeedSource(path).close()
    except (SourceError, InvalidName) as exc:
        return exc.message
    return None
