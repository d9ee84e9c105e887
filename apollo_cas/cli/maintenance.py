"""Maintenance commands: ``unlock``, ``gc``, ``verify`` and ``forget``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .. import settings
from ..errors import DamageFound
from ..store import Store
from .common import (
    F,
    emit_json,
    human_bytes,
    human_time,
    json_option,
    need_store,
    note,
    series_option,
    store_option,
    table,
)


@click.command()
@store_option
@click.option(
    "--force",
    is_flag=True,
    help="Also remove locks of live processes and other hosts (make sure none runs).",
)
@json_option
def unlock(store: str | None, force: bool, as_json: bool) -> None:
    """Remove stale locks (of dead processes of this host and container, or expired); --force removes all."""
    with Store.open(need_store(store)) as st:
        removed = st.locks.break_all() if force else st.locks.clear_stale()
        left = st.locks.all()
    if as_json:
        emit_json({"removed": removed, "remaining": [lk.describe() for lk in left]})
        return
    click.echo(f"removed {removed} lock(s)")
    for lk in left:
        note(f"still held: {lk.describe()} (use --force if that process is gone)")


class _StageBar:
    """A progress callback ``(stage, done, total)`` drawing one bar per stage on a
    terminal's stderr; silent when stderr is not a terminal (cron, pipes)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty() and not settings.no_progress()
        self.stage = ""
        self.bar: Any = None
        self.done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self.bar = click.progressbar(
                length=total, label=stage, file=sys.stderr, show_pos=True, show_eta=True
            )
            self.bar.__enter__()
        if self.bar is not None and done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@contextmanager
def _stage_bar(enabled: bool) -> Iterator[_StageBar]:
    bar = _StageBar(enabled)
    try:
        yield bar
    finally:
        bar.close()


def keep_count(name: str, help: str) -> Callable[[F], F]:
    """A retention option that keeps N checkpoints (gc's --keep-last/-hourly/-daily)."""
    return click.option(name, type=click.IntRange(min=0), metavar="N", help=help)


@click.command()
@store_option
@keep_count("--keep-last", "Keep the N newest checkpoints of each series.")
@keep_count(
    "--keep-hourly", "Keep the newest checkpoint of each of the last N hours that have one."
)
@keep_count("--keep-daily", "Keep the newest checkpoint of each of the last N days that have one.")
@click.option(
    "--keep-within",
    metavar="DURATION",
    help="Keep every checkpoint younger than DURATION (30m, 12h, 2d, 1w).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show what would be forgotten and how many bytes it frees; delete nothing.",
)
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="Leave leftovers of interrupted writes younger than this.",
)
@click.option(
    "--max-unused",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    metavar="FRACTION",
    help="Format-2 stores: repack a pack once more than this fraction of it is unused "
    "(0: reclaim every unused byte).",
)
@json_option
def gc(
    store: str | None,
    keep_last: int | None,
    keep_hourly: int | None,
    keep_daily: int | None,
    keep_within: str | None,
    dry_run: bool,
    grace: str,
    max_unused: float,
    as_json: bool,
) -> None:
    """Forget checkpoints outside the retention policy, then delete unreferenced chunks.

    Tagged checkpoints and every series' latest are always kept. Without any
    --keep-* option no checkpoint is forgotten: only chunks no checkpoint uses
    (and leftovers of interrupted saves) are removed. Saves keep running during
    the mark phase; they wait only for the short sweep.
    """
    from ..gc import gc as run_gc
    from ..retention import RetentionPolicy, parse_duration

    policy = RetentionPolicy(
        keep_last=keep_last,
        keep_hourly=keep_hourly,
        keep_daily=keep_daily,
        keep_within=parse_duration(keep_within) if keep_within is not None else None,
    )
    grace_s = parse_duration(grace)
    with Store.open(need_store(store)) as st, _stage_bar(not as_json) as bar:
        checkpoints = {c.checkpoint_id: c for c in st.checkpoints()}
        r = run_gc(st, policy, dry_run=dry_run, grace=grace_s, progress=bar, max_unused=max_unused)
        held = _held_as_bases(st, checkpoints, r.kept, r.forgotten)
    if as_json:
        emit_json(
            {
                **r.to_json(),
                "held_as_delta_bases": {"chunks": held[0], "stored_bytes": held[1]},
            }
        )
        return
    verb = "would forget" if dry_run else "forgot"

    def row(cid: str) -> list[str]:
        cp = checkpoints.get(cid)
        created = human_time(cp.manifest.created) if cp else "-"
        return [cid[:12], created, cp.manifest.series if cp else "-"]

    if r.forgotten:
        click.echo(f"{verb} {len(r.forgotten)} checkpoint(s):")
        click.echo(table([row(cid) for cid in r.forgotten], ["ID", "TIME", "SERIES"]))
    if dry_run and r.kept:
        rows = [[*row(cid), "; ".join(r.reasons.get(cid) or ["-"])] for cid in r.kept]
        click.echo(f"would keep {len(r.kept)} checkpoint(s):")
        click.echo(table(rows, ["ID", "TIME", "SERIES", "KEPT BY"]))
    if held[0]:
        note(
            f"{held[0]} chunk(s) ({human_bytes(held[1])}) of the forgotten checkpoints "
            f"{'would stay' if dry_run else 'stay'}: kept checkpoints store blocks as XOR deltas "
            "of them (see the delta bases line of 'apollo-cas stats'; saves with --no-delta "
            "store whole blocks)"
        )
    if r.packs:
        p = r.packs
        click.echo(
            f"packs: {'would delete' if dry_run else 'deleted'} {p['packs_deleted']}, "
            f"{'would repack' if dry_run else 'repacked'} {p['packs_repacked']} "
            f"({p['chunks_repacked']} live chunk(s) copied), re-indexed {p['packs_reindexed']}"
        )
    if dry_run:
        click.echo(
            f"dry run ({r.policy}): would keep {len(r.kept)} checkpoint(s), delete "
            f"{r.manifests_deleted} manifest(s) and {r.chunks_deleted} chunk(s), "
            f"freeing {human_bytes(r.bytes_freed)}; nothing was deleted"
        )
        return
    click.echo(
        f"gc ({r.policy}): kept {len(r.kept)} checkpoint(s), deleted {r.manifests_deleted} "
        f"manifest(s) and {r.chunks_deleted} chunk(s), freed {human_bytes(r.bytes_freed)}, "
        f"removed {r.temporaries_removed} leftover(s) in {r.seconds:.2f}s"
    )


def _held_as_bases(
    st: Store, checkpoints: dict[str, Any], kept: list[str], forgotten: list[str]
) -> tuple[int, int]:
    """Chunks the forgotten checkpoints used that stay as delta bases of kept ones,
    and their stored bytes (what makes a gc free less than expected)."""
    from .. import layout
    from ..errors import ApolloError
    from ..reports import base_only

    if not forgotten:
        return 0, 0
    kept_m = [checkpoints[c].manifest for c in kept if c in checkpoints]
    gone = {
        ch
        for c in forgotten
        if c in checkpoints
        for t in checkpoints[c].manifest.tensors
        for ch in t.chunks
    }
    held = base_only(kept_m) & gone
    size = 0
    for ch in held:
        # A store layout without one object per chunk: count them only.
        with contextlib.suppress(ApolloError):
            size += st.backend.info(layout.chunk_key(ch.hex())).size
    return len(held), size


class Damage(DamageFound):
    """What verify found, with its report for the ``--json`` error document (one
    JSON document on stdout: the report and the error together)."""

    def __init__(self, message: str, hint: str, done: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.done = done


@click.command()
@store_option
@click.option(
    "--read-data",
    is_flag=True,
    help="Also read, decompress and re-hash every chunk (reads the whole store).",
)
@click.option(
    "--read-data-subset",
    metavar="10%|N",
    help="Read a random subset: a percentage, a fraction or a number of chunks.",
)
@click.option(
    "--no-lock",
    is_flag=True,
    help="Take no lock (read-only stores); a gc running meanwhile may cause false alarms.",
)
@json_option
def verify(
    store: str | None, read_data: bool, read_data_subset: str | None, no_lock: bool, as_json: bool
) -> None:
    """Check that every ref, manifest and chunk is present and intact (exit 3 on damage).

    Without --read-data, checks that every manifest decodes and every chunk it
    needs exists. Each damaged chunk is listed with the checkpoints and tensors
    it breaks.
    """
    from ..verify import parse_subset
    from ..verify import verify as run_verify

    subset = parse_subset(read_data_subset) if read_data_subset is not None else None
    with Store.open(need_store(store)) as st, _stage_bar(not as_json) as bar:
        r = run_verify(st, read_data=read_data, subset=subset, progress=bar, lock=not no_lock)
    if as_json:
        if r.ok:
            emit_json(r.to_json())
    else:
        for d in r.damaged_refs:
            click.echo(f"damaged ref {d.ref} -> {d.target[:12] or '?'}: {d.reason}")
        for m in r.damaged_manifests:
            refs = f" (named by {', '.join(m.refs)})" if m.refs else ""
            click.echo(f"damaged manifest {m.checkpoint}{refs}: {m.reason}")
        for c in r.damaged_chunks:
            click.echo(f"damaged chunk {c.chunk}: {c.reason}")
            for cid, tensors in sorted(c.breaks.items()):
                named = ", ".join(r.broken_checkpoints.get(cid) or [])
                shown = ", ".join(sorted(tensors)[:5]) + (" ..." if len(tensors) > 5 else "")
                click.echo(f"  breaks {cid[:12]}{f' ({named})' if named else ''}: {shown}")
        if r.ok:
            click.echo(
                r.summary()
                + (
                    f" ({r.unreferenced_chunks} unreferenced chunk(s): "
                    "'apollo-cas gc' reclaims them)"
                    if r.unreferenced_chunks
                    else ""
                )
            )
    if not r.ok:
        raise Damage(
            r.summary(),
            "restore a checkpoint it does not break; see docs/CONCURRENCY.md for repairs",
            r.to_json(),
        )


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@store_option
@series_option
@json_option
def forget(refs: tuple[str, ...], store: str | None, series: str, as_json: bool) -> None:
    """Drop checkpoints REF...; their chunks are reclaimed by the next gc.

    A tagged checkpoint or a series' latest is refused: delete the tag first
    (apollo-cas tag --delete NAME) or save a newer checkpoint. With several
    REFs, one that fails does not stop the others; the summary says which
    were forgotten and which not (exit 1).
    """
    from ..batch import each
    from ..errors import AmbiguousRef, InvalidName, RefNotFound, Refused
    from ..gc import forget as run_forget

    with Store.open(need_store(store)) as st:

        def one(_: int, ref: str) -> str:
            cid = st.resolve(ref, series)
            run_forget(st, cid)
            if not as_json:
                click.echo(f"forgot {cid[:12]}")
            return cid

        batch = each(
            refs,
            one,
            # An error about one ref; any other is the store's, and so would the rest fail.
            recoverable=(RefNotFound, AmbiguousRef, Refused, InvalidName),
            failed=lambda _, exc: note(f"failed: {exc}"),
        )
    done = [cid for _, cid in batch.done]
    if done and not as_json:
        note("run 'apollo-cas gc' to reclaim the chunks only they used")
    batch.raise_if_failed("ref", [c[:12] for c in done], {"forgotten": done})
    if as_json:
        emit_json({"forgotten": done})


COMMANDS = [unlock, gc, verify, forget]
