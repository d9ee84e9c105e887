"""Importing the original tool's checkpoint history into a store.

The original tool's ``--checkpoint-dir`` is a directory of ``%Y-%m-%d-%H%M``
checkpoint directories (:mod:`apollo_cas.sources.seed` reads one, and scans a
root). :func:`import_history` saves them oldest first with their own times;
:func:`resume_history` is the rule for such a directory used as the store
itself: its history is imported on first use and again on every later one, so
an interrupted import resumes. The command line (``save``, ``apollo-checkpoint``)
only renders what happens, through :class:`ImportEvents`; a Python caller gets
the same imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .manifest import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from .saving import SaveResult
    from .store import Store

__all__ = ["ImportEvents", "import_history", "resume_history", "series_block_size"]


class ImportEvents:
    """What an import reports as it goes (an import of a long history takes a
    while, so each step is told when it happens, not at the end). Every method
    does nothing here: a caller overrides what it shows."""

    def started(self, root: Path) -> None:
        """:func:`resume_history` begins the first import of ``root``."""

    def skipped(self, path: Path, reason: str) -> None:
        """``path`` is not imported: half-written, not a checkpoint, already imported."""

    def saved(self, path: Path, result: SaveResult, stays_latest: bool) -> None:
        """``path`` was saved; ``stays_latest``: it is older than the series'
        latest checkpoint, which stays latest (a save never moves it back in time)."""


class _Quiet(ImportEvents):
    """Forwards saves only: the directories skipped were reported on first use."""

    def __init__(self, inner: ImportEvents) -> None:
        self.inner = inner

    def saved(self, path: Path, result: SaveResult, stays_latest: bool) -> None:
        self.inner.saved(path, result, stays_latest)


def import_history(
    store: Store,
    root: Path,
    *,
    series: str = layout.DEFAULT_SERIES,
    block_size: int | None = None,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
    tag: str | None = None,
    events: ImportEvents | None = None,
) -> list[SaveResult]:
    """Import the original tool's checkpoints under ``root``, oldest first, keeping
    their times; half-written ones are reported, ones already imported skipped,
    and ``tag`` names the newest.

    Idempotent, so an interrupted import resumes where it stopped: a checkpoint
    is recognised as imported by its directory and its time, both recorded in
    its manifest. One older than the series' latest is recorded beside it and
    ``latest`` stays (Store.save never moves it back in time)."""
    from .sources.seed import SeedSource, checkpoint_time, scan_root

    events = events or ImportEvents()
    good, skipped = scan_root(root)
    for s in skipped:
        events.skipped(s.path, s.reason)
    done: dict[Path, set[float]] = {}
    for c in store.checkpoints():
        if c.manifest.source.kind == "seed" and c.manifest.series == series:
            loc = Path(c.manifest.source.location).resolve()
            done.setdefault(loc, set()).add(c.manifest.created)
    todo = []
    for cp in good:
        when = checkpoint_time(cp)
        times = done.get(cp.resolve())
        if times is not None and (when is None or when in times):
            events.skipped(cp, "already imported")
            continue
        todo.append(cp)
    results = []
    for j, cp in enumerate(todo):
        with SeedSource(cp) as src:
            r = store.save(
                src,
                series=series,
                block_size=block_size,
                force=force,
                metadata=metadata,
                tag=tag if j == len(todo) - 1 else None,
            )
        results.append(r)
        stays = not r.unchanged and store.latest(r.series) != r.checkpoint_id
        events.saved(cp, r, stays)
    return results


def resume_history(
    store: Store,
    root: Path,
    *,
    series: str = layout.DEFAULT_SERIES,
    events: ImportEvents | None = None,
) -> list[SaveResult]:
    """An original-tool checkpoint dir used as a store: import its history, on
    first use and again on every later one, so an interrupted import resumes
    (only checkpoints not imported yet are saved). Nothing for a directory that
    holds none of the tool's checkpoints. The blocks keep the series' size."""
    from .sources.seed import is_checkpoint_root

    if not root.is_dir() or not is_checkpoint_root(root):
        return []
    events = events or ImportEvents()
    first = store.latest(series) is None
    if first:
        events.started(root)
    return import_history(
        store,
        root,
        series=series,
        block_size=series_block_size(store, series),
        events=events if first else _Quiet(events),
    )


def series_block_size(store: Store, series: str) -> int:
    """The block size of the series' latest checkpoint, else the default."""
    latest = store.latest(series)
    return store.manifest(latest).block_size if latest else DEFAULT_BLOCK_SIZE
