"""Importing the original tool's checkpoint history (a ``--checkpoint-dir`` of
``%Y-%m-%d-%H%M`` directories) into a store, for ``save`` and ``apollo-checkpoint``.

The line each saved checkpoint prints lives here too: the history import prints
one per imported checkpoint, exactly as ``save`` does for its sources.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import codecs
from ..errors import UsageError
from ..manifest import DEFAULT_BLOCK_SIZE
from ..store import SaveResult, Store
from .common import emit_json, human_bytes, note
from .opening import announce_created, open_for_save


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
    quiet: bool = False,
) -> list[SaveResult]:
    """Import the original tool's checkpoints under ``root``, oldest first, keeping
    their times; half-written ones are reported, ones already imported skipped,
    and ``tag`` names the newest.

    Idempotent, so an interrupted import resumes where it stopped: a checkpoint
    is recognised as imported by its directory and its time, both recorded in
    its manifest. One older than the series' latest is recorded beside it and
    ``latest`` stays (Store.save never moves it back in time). ``quiet`` leaves
    out the notes about directories skipped again (a resumed import)."""
    from ..sources.seed import SeedSource, checkpoint_time, scan_root

    good, skipped = scan_root(root)
    if not quiet:
        for s in skipped:
            note(f"skipped {s.path}: {s.reason}")
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
            if not quiet:
                note(f"skipped {cp}: already imported")
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
                metadata=meta,
                tag=tag if j == len(todo) - 1 else None,
            )
        results.append(r)
        print_result(r, f"import {cp.name}", as_json)
        if not r.unchanged and store.latest(r.series) != r.checkpoint_id:
            note(f"import {cp.name}: older than the series' latest checkpoint, which stays latest")
    return results


def import_seed_history(store: Store, root: Path, series: str, as_json: bool) -> list[SaveResult]:
    """An original-tool checkpoint dir used as a store: import its history, on
    first use and again on every later one, so an interrupted import resumes
    (only checkpoints not imported yet are saved)."""
    from ..sources.seed import is_checkpoint_root

    if not root.is_dir() or not is_checkpoint_root(root):
        return []
    first = store.latest(series) is None
    if first:
        note(
            f"importing the original tool's checkpoints from {root} "
            f"(their directories are left in place; delete them after 'apollo-cas verify')"
        )
    return import_history(
        store,
        root,
        series=series,
        block_size=store_block_size(store, series),
        as_json=as_json,
        quiet=not first,
    )


def store_block_size(store: Store, series: str) -> int:
    latest = store.latest(series)
    return store.manifest(latest).block_size if latest else DEFAULT_BLOCK_SIZE
