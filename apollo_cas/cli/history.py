"""The history import as the command line shows it (``save``, ``apollo-checkpoint``).

What is imported, in which order, and what counts as already imported is the
library's (:mod:`apollo_cas.history`); this renders its events: a note on
stderr for each directory skipped, and for each imported checkpoint the line
``save`` prints for its sources (:func:`print_result`, which lives here for both).
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import codecs, history
from ..errors import UsageError
from ..history import series_block_size as store_block_size
from ..store import SaveResult, Store
from .common import emit_json, human_bytes, note
from .opening import announce_created, open_for_save

__all__ = [
    "import_history",
    "import_only",
    "import_seed_history",
    "print_result",
    "store_block_size",
]


def print_result(r: SaveResult, label: str, as_json: bool) -> None:
    if as_json:
        return
    if r.unchanged:
        click.echo(
            f"{label}: no changes since {(r.checkpoint_id or '')[:12]}; no checkpoint added "
            "(--force adds one anyway)"
        )
        return
    st = r.stats
    click.echo(
        f"{label}: saved {(r.checkpoint_id or '')[:12]} ({r.series}) "
        f"{human_bytes(st.logical_bytes)} in {r.seconds:.2f}s: "
        f"{st.new_chunks}/{st.chunks} blocks new, {human_bytes(st.new_stored_bytes)} written"
    )


class Shown(history.ImportEvents):
    """The import's events as lines: notes on stderr, results on stdout."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def started(self, root: Path) -> None:
        note(
            f"importing the original tool's checkpoints from {root} "
            f"(their directories are left in place; delete them after 'apollo-cas verify')"
        )

    def skipped(self, path: Path, reason: str) -> None:
        note(f"skipped {path}: {reason}")

    def saved(self, path: Path, result: SaveResult, stays_latest: bool) -> None:
        print_result(result, f"import {path.name}", self.as_json)
        if stays_latest:
            note(
                f"import {path.name}: older than the series' latest checkpoint, which stays latest"
            )


def import_only(
    root: Path, location: str, policy: codecs.CodecPolicy, series: str, as_json: bool
) -> None:
    """``save --checkpoint-dir DIR`` with no SOURCE: import the original tool's
    checkpoints in DIR into the store DIR (and nothing else)."""
    from ..sources.seed import is_checkpoint_root

    if not is_checkpoint_root(root):
        raise UsageError(
            f"nothing to save: {root} holds no checkpoints of the original tool",
            "name a SOURCE (or --handles FILE) to save into it",
        )
    st, created = open_for_save(location, policy)
    with st:
        try:
            results = import_history(
                st, root, series=series, block_size=store_block_size(st, series), as_json=as_json
            )
        finally:
            announce_created(st, created)
    if as_json:
        emit_json([r.to_json() for r in results])
    elif not results:
        click.echo(f"{root}: nothing new to import (its checkpoints are already in the store)")


def import_history(
    store: Store,
    root: Path,
    *,
    series: str,
    block_size: int | None,
    force: bool = False,
    meta: dict[str, str] | None = None,
    tag: str | None = None,
    as_json: bool = False,
) -> list[SaveResult]:
    """:func:`apollo_cas.history.import_history`, its progress shown."""
    return history.import_history(
        store,
        root,
        series=series,
        block_size=block_size,
        force=force,
        metadata=meta,
        tag=tag,
        events=Shown(as_json),
    )


def import_seed_history(store: Store, root: Path, series: str, as_json: bool) -> list[SaveResult]:
    """:func:`apollo_cas.history.resume_history`, its progress shown."""
    return history.resume_history(store, root, series=series, events=Shown(as_json))
