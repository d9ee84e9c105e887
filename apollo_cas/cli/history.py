"""The save of sources and the history import as the command line shows them (``save``, ``apollo-checkpoint``).

What is saved and imported, in which order, and what counts as already
imported is the library's (:mod:`apollo_cas.save_paths`, :mod:`apollo_cas.history`);
this renders its events (:class:`Shown`): a note on stderr for each directory
skipped, each source that failed and what a source leaves out, a progress bar,
and for each saved or imported checkpoint the line of :func:`print_result`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from .. import codecs, history
from ..errors import ApolloError, UsageError
from ..history import series_block_size
from ..pipeline import ProgressFn
from ..save_paths import SaveEvents
from ..store import SaveResult
from .common import emit_json, human_bytes, note, progress
from .opening import announce_created, open_for_save

__all__ = ["Shown", "import_only", "print_result"]


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


class Shown(SaveEvents):
    """A save's and an import's events as lines: notes on stderr, results on
    stdout (none with ``--json``, whose document is printed at the end)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def left_out(self, path: Path, what: str) -> None:
        note(f"{path}: not saved: {what} (only tensors of the model are checkpointed)")

    def progress(
        self, path: Path, total: int
    ) -> contextlib.AbstractContextManager[ProgressFn | None]:
        return progress(total, f"save {path.name}", not self.as_json)

    def source_saved(self, path: Path, result: SaveResult) -> None:
        print_result(result, str(path), self.as_json)

    def failed(self, path: Path, error: ApolloError) -> None:
        note(f"failed: {error}")

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
            results = history.import_history(
                st,
                root,
                series=series,
                block_size=series_block_size(st, series),
                events=Shown(as_json),
            )
        finally:
            announce_created(st, created)
    if as_json:
        emit_json([r.to_json() for r in results])
    elif not results:
        click.echo(f"{root}: nothing new to import (its checkpoints are already in the store)")
