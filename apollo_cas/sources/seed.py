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

from .. import dtypes
from ..errors import InvalidName, SourceError, UnsupportedSource
from ..layout import check_tensor_name
from ..manifest import SourceInfo
from . import strict_json
from .base import SourceTensor
from .safetensors_file import FileTensor, OneFileSource, SourceFile

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
        d = strict_json.loads((path / META).read_bytes(), str(path / META), "meta file")
    except (OSError, SourceError):
        return None
    v = d.get("timestamp") if isinstance(d, dict) else None
    return str(v) if v else None


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
        index = strict_json.loads(text, str(index_path), "index", "skip it; it is damaged")
        if not isinstance(index, dict):
            raise UnsupportedSource(f"{index_path} is not a name -> entry map")
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
    size, weights_path = f.size, f.path
    tensors: list[SourceTensor] = []
    for name in sorted(index):
        e = index[name]
        check_tensor_name(name)
        where = f"{index_path}:{name}"
        if not isinstance(e, dict) or not {"offset", "size", "shape", "dtype"} <= e.keys():
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
        if off + n > size:
            raise SourceError(
                f"{weights_path} is shorter than {INDEX} says ({name!r} ends at {off + n}, "
                f"file has {size} bytes): half-written checkpoint",
                "skip it; the newest complete checkpoint is older",
            )
        tensors.append(FileTensor(name, dt, shape, f, off, n))
    return tensors


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
