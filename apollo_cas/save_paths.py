"""Saving sources named by path, with the guarantees of ``apollo-cas save SOURCE...``.

What the command line does for its sources is done here, so a Python caller
gets the same guarantees (the CLI only parses its options and renders
:class:`SaveEvents`):

* :func:`check_sources` refuses a missing source, a store named as a source and
  a handles file that does not parse, before the store is touched, so a failed
  save leaves the store (and a history import) as it was; only its result,
  :class:`CheckedSources`, saves;
* a path that is the original tool's checkpoint root imports its whole history
  (:func:`apollo_cas.history.import_history`);
* ``history=``: the original tool's checkpoint directory used as the store; its
  history is imported first, on first use and again on every later one so an
  interrupted import resumes (:func:`apollo_cas.history.resume_history`);
* a tag is checked before the first of several sources is saved, and names
  the last one's checkpoint;
* each source is its own checkpoint: one that cannot be read does not stop
  the others (:mod:`apollo_cas.batch`), and the call ends with a
  :class:`~apollo_cas.batch.PartialFailure` that lists what was saved and what
  was not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from . import layout
from .batch import each
from .errors import ApolloError, InvalidName, SourceError, SourceNotFound, UsageError
from .history import ImportEvents, import_history, resume_history
from .manifest import SourceInfo
from .pipeline import ProgressFn

if TYPE_CHECKING:
    from .saving import SaveResult
    from .store import Store

__all__ = [
    "CheckedSources",
    "SaveEvents",
    "SaveOptions",
    "check_sources",
    "save_path",
    "save_paths",
]


class SaveEvents(ImportEvents):
    """What a save of paths reports as it goes (and, from
    :class:`~apollo_cas.history.ImportEvents`, what a history import does).
    Every method does nothing here: a caller overrides what it shows."""

    def left_out(self, path: Path, what: str) -> None:
        """Something in ``path`` is not saved (only a model's tensors are)."""

    def progress(
        self, path: Path, total: int
    ) -> contextlib.AbstractContextManager[ProgressFn | None]:
        """A progress callback for the ``total`` bytes of ``path`` (None: none)."""
        return contextlib.nullcontext()

    def source_saved(self, path: Path, result: SaveResult) -> None:
        """``path`` was saved (or was unchanged: ``result.unchanged``)."""

    def failed(self, path: Path, error: ApolloError) -> None:
        """``path`` failed and the next source is tried (several sources only)."""


@dataclass(frozen=True)
class SaveOptions:
    """The options of a save of paths, as ``Store.save`` takes them; ``rank`` and
    ``world_size`` are recorded in the manifest, ``handle_options`` go to
    :func:`~apollo_cas.sources.handles.open_handles` for a handles file."""

    series: str = layout.DEFAULT_SERIES
    tag: str | None = None
    block_size: int | None = None
    force: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    rank: int | None = None
    world_size: int | None = None
    handle_options: Mapping[str, Any] = field(default_factory=dict)
    group: str | None = None

    def save_args(self) -> SaveArgs:
        """What ``Store.save`` and a history import both take of these options."""
        return SaveArgs(
            series=self.series,
            tag=self.tag,
            block_size=self.block_size,
            force=self.force,
            metadata=self.metadata,
        )


class SaveArgs(TypedDict):
    """The keyword arguments of :meth:`SaveOptions.save_args`."""

    series: str
    tag: str | None
    block_size: int | None
    force: bool
    metadata: Mapping[str, str]


def check_sources(paths: Sequence[Path], kind: str | None = None) -> CheckedSources:
    """Refuse a missing or foreign source before the store is touched, so a
    failed save leaves the store (and the history import) as it was: a store
    named as a source, a path that does not exist, a handles file that does
    not parse (read and checked; no CUDA memory is opened)."""
    from .sources import detect_kind
    from .sources.seed import is_checkpoint_root

    for path in paths:
        if path.is_dir() and (path / "config").is_file() and not is_checkpoint_root(path):
            raise UsageError(
                f"{path} is an apollo_cas store, not weights to save",
                "name it with --store; to copy a checkpoint out of it, "
                f"run 'apollo-cas restore --store {path} --to DIR'",
            )
        if (kind or detect_kind(path)) == "handles":
            from .sources.handles import read_handles

            read_handles(path)
        elif not path.exists():
            raise SourceNotFound(f"{path} does not exist", "check the path of the source")
    return CheckedSources(tuple(paths), kind)


@dataclass(frozen=True)
class CheckedSources:
    """Source paths that passed :func:`check_sources` (of ``kind``, else detected)."""

    paths: tuple[Path, ...]
    kind: str | None = None

    def save(
        self,
        store: Store,
        options: SaveOptions | None = None,
        *,
        history: Path | None = None,
        events: SaveEvents | None = None,
    ) -> list[SaveResult]:
        """Save each path in order into ``store`` (see the module docstring); the
        tag names the last one's checkpoint. ``history``: the original tool's
        checkpoint directory that is ``store``, whose history is imported first.

        A source that fails while being read does not stop the others (an error
        of the store itself does): each failure goes to ``events.failed`` as it
        happens, and if any failed the call ends with a
        :class:`~apollo_cas.batch.PartialFailure` listing what was saved and
        what was not. A single source's error is raised as it is.
        """
        options = options or SaveOptions()
        events = events or SaveEvents()
        if options.tag is not None and options.rank is None:
            store.check_tag(options.tag, options.series)  # before the first source is saved
        results = (
            resume_history(store, history, series=options.series, events=events)
            if history is not None
            else []
        )
        last = len(self.paths) - 1

        def one(i: int, path: Path) -> list[SaveResult]:
            opts = options if i == last else replace(options, tag=None)
            return save_path(store, path, self.kind, opts, events)

        done = each(self.paths, one, recoverable=(SourceError, InvalidName), failed=events.failed)
        saved = [r for _, rs in done.done for r in rs]
        done.raise_if_failed(
            "source", [str(p) for p, _ in done.done], {"results": [r.to_json() for r in saved]}
        )
        return results + saved


def save_paths(
    store: Store,
    paths: Sequence[Path],
    options: SaveOptions | None = None,
    *,
    kind: str | None = None,
    history: Path | None = None,
    events: SaveEvents | None = None,
) -> list[SaveResult]:
    """:func:`check_sources`, then :meth:`CheckedSources.save`."""
    return check_sources(paths, kind).save(store, options, history=history, events=events)


def save_path(
    store: Store,
    path: Path,
    kind: str | None = None,
    options: SaveOptions | None = None,
    events: SaveEvents | None = None,
) -> list[SaveResult]:
    """Save one source path; the original tool's checkpoint root imports its whole
    history (one result per checkpoint imported)."""
    from .sources import detect_kind, open_path
    from .sources.seed import is_checkpoint_root

    options = options or SaveOptions()
    events = events or SaveEvents()
    k = kind or detect_kind(path)
    if k == "seed" and is_checkpoint_root(path):
        return import_history(store, path, events=events, **options.save_args())
    info = SourceInfo(kind=k, location=str(path), rank=options.rank, world_size=options.world_size)
    handle_options = dict(options.handle_options) if k == "handles" else {}
    with open_path(path, k, info, **handle_options) as src:
        for what in src.left_out:
            events.left_out(path, what)
        # A handles source is checked against the series' previous checkpoint
        # by Store.save itself (HandlesSource.check_previous), as for any caller.
        total = sum(t.nbytes for t in src.tensors())
        with events.progress(path, total) as bar:
            r = store.save(src, progress=bar, group=options.group, **options.save_args())
    events.source_saved(path, r)
    return [r]
