"""``apollo-cas save``: checkpoint one or more sources."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import codecs
from ..errors import ApolloError, InvalidName, SourceError, SourceNotFound, UsageError
from ..manifest import DEFAULT_BLOCK_SIZE, SourceInfo
from ..store import SaveResult, Store, check_block_size
from .common import (
    PartialFailure,
    emit_json,
    human_bytes,
    json_option,
    need_store,
    note,
    parse_size,
    progress,
    series_option,
    store_option,
)
from .opening import announce_created, open_for_save
from .options import codec_options, make_policy

F = TypeVar("F", bound=Callable[..., Any])

#: Below this, the object count gets large enough to hurt (4 KiB, the original
#: tool's default, makes 256 objects per MiB of weights).
SMALL_BLOCK_WARNING = 64 * 1024


def _parse_meta(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def block_size_option(default: str | None = "1MiB") -> Callable[[F], F]:
    return click.option(
        "--block-size",
        default=default,
        show_default=default is not None,
        metavar="SIZE",
        help="Block size (bytes, or with K/M suffix). 1 MiB balances dedup "
        "granularity against object count."
        + ("" if default else " Default: the series' latest checkpoint's, else 1 MiB."),
    )


def checked_block_size(text: str, warn: bool = True) -> int:
    bs = check_block_size(parse_size(text, "block size"))  # a usage error before any warning
    if warn:
        warn_block_size(bs)
    return bs


def warn_block_size(bs: int) -> None:
    if bs < SMALL_BLOCK_WARNING:
        note(
            f"warning: block size {bs} makes {(1 << 30) // max(bs, 1):,} objects per GiB of weights; "
            f"the default {human_bytes(DEFAULT_BLOCK_SIZE)} is much cheaper to store and list"
        )


def precheck_sources(paths: list[Path], kind: str | None) -> None:
    """Refuse a missing or foreign source before the store is touched, so a
    failed save leaves the store (and the history import) as it was."""
    from ..sources import detect_kind
    from ..sources.seed import is_checkpoint_root

    for path in paths:
        if path.is_dir() and (path / "config").is_file() and not is_checkpoint_root(path):
            raise UsageError(
                f"{path} is an apollo_cas store, not weights to save",
                "name it with --store; to copy a checkpoint out of it, "
                f"run 'apollo-cas restore --store {path} --to DIR'",
            )
        if (kind or detect_kind(path)) == "handles":
            from ..sources.handles import read_handles

            read_handles(path)  # parses and checks the file; opens no CUDA memory
        elif not path.exists():
            raise SourceNotFound(f"{path} does not exist", "check the path of the source")


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


def save_sources(
    store: Store,
    paths: list[Path],
    *,
    kind: str | None,
    series: str,
    tag: str | None,
    block_size: int | None,
    force: bool,
    meta: dict[str, str],
    rank: int | None,
    world_size: int | None,
    as_json: bool,
    handle_options: dict[str, Any] | None = None,
    group: str | None = None,
) -> list[SaveResult]:
    """Save each source path in order; a seed root imports its whole history.

    Each source is its own checkpoint, so one that fails while being read does
    not stop the others (an error of the store itself does): every failure is
    reported as it happens, and if any failed the call ends with
    :class:`PartialFailure` listing what was saved and what was not (exit 1).
    A single source's error is raised as it is.
    """
    results: list[SaveResult] = []
    saved: list[str] = []
    failed: list[tuple[object, ApolloError]] = []
    for i, path in enumerate(paths):
        try:
            results += _save_one(
                store,
                path,
                kind=kind,
                series=series,
                tag=tag if i == len(paths) - 1 else None,
                block_size=block_size,
                force=force,
                meta=meta,
                rank=rank,
                world_size=world_size,
                as_json=as_json,
                handle_options=handle_options,
                group=group,
            )
            saved.append(str(path))
        except ApolloError as exc:
            if len(paths) == 1:
                raise
            note(f"failed: {exc}")
            failed.append((path, exc))
            if not isinstance(exc, (SourceError, InvalidName)):
                # The store itself failed (locked, full, unreachable): the next
                # sources would fail the same way.
                not_tried = [str(p) for p in paths[i + 1 :]]
                break
    else:
        not_tried = []
    if failed:
        raise PartialFailure.of(
            "source",
            saved,
            failed,
            {"results": [r.to_json() for r in results]},
            total=len(paths),
            not_tried=not_tried,
        )
    return results


def _save_one(
    store: Store,
    path: Path,
    *,
    kind: str | None,
    series: str,
    tag: str | None,
    block_size: int | None,
    force: bool,
    meta: dict[str, str],
    rank: int | None,
    world_size: int | None,
    as_json: bool,
    handle_options: dict[str, Any] | None,
    group: str | None,
) -> list[SaveResult]:
    from ..sources import detect_kind, open_path
    from ..sources.seed import is_checkpoint_root

    k = kind or detect_kind(path)
    if k == "seed" and is_checkpoint_root(path):
        return import_history(
            store,
            path,
            series=series,
            block_size=block_size,
            force=force,
            meta=meta,
            tag=tag,
            as_json=as_json,
        )
    info = SourceInfo(kind=k, location=str(path), rank=rank, world_size=world_size)
    options = dict(handle_options or {}) if k == "handles" else {}
    with open_path(path, k, info, **options) as src:
        for what in src.left_out:
            note(f"{path}: not saved: {what} (only tensors of the model are checkpointed)")
        check = None
        if k == "handles":
            from ..sources.handles import check_against

            check = functools.partial(check_against, force=force)
        total = sum(t.nbytes for t in src.tensors())
        with progress(total, f"save {path.name}", not as_json) as bar:
            r = store.save(
                src,
                series=series,
                block_size=block_size,
                force=force,
                metadata=meta,
                tag=tag,
                progress=bar,
                check=check,
                group=group,
            )
    print_result(r, str(path), as_json)
    return [r]


@click.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@store_option
@click.option(
    "--tag", metavar="NAME", help="Tag the new checkpoint (gc never removes tagged ones)."
)
@block_size_option(default=None)
@json_option
@click.option(
    "--source-kind",
    type=click.Choice(["safetensors", "pt", "handles", "seed"]),
    help="Override the detected kind of SOURCE.",
)
@series_option
@click.option(
    "--force",
    is_flag=True,
    help="Add a checkpoint even if nothing changed; save stale-looking handles.",
)
@click.option(
    "--meta", multiple=True, metavar="KEY=VALUE", help="Free-form metadata to record (repeatable)."
)
@click.option(
    "--rank", type=int, help="Tensor-parallel rank of these weights (recorded in the manifest)."
)
@click.option(
    "--world-size", type=int, help="Tensor-parallel world size (recorded in the manifest)."
)
@click.option(
    "--group",
    metavar="NAME",
    help="Join this rank's checkpoint to the multi-rank checkpoint NAME (with --rank, "
    "--world-size); each rank saves into series SERIES.rankR.",
)
@click.option(
    "--handles",
    "handles",
    type=click.Path(path_type=Path),
    help="The original tool's CUDA IPC handles file (same as SOURCE with --source-kind handles).",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path),
    help="The original tool's checkpoint directory: used as the store; its old "
    "checkpoints are imported on first use.",
)
@click.option(
    "--max-handles-age",
    type=float,
    metavar="SECONDS",
    help="Refuse a handles file older than this (its handles may be stale).",
)
@click.option(
    "--no-owner-check",
    is_flag=True,
    help="Do not require the process that exported the handles to be alive.",
)
@click.option(
    "--device-map",
    metavar="FROM:TO,...",
    help="Map the GPU indices recorded in the handles file to this process's "
    "(when CUDA_VISIBLE_DEVICES differs from the exporter's).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Use at most N threads (hashing, compression, device copies), leaving the "
    "other cores to the server (default: all cores).",
)
@codec_options
def save(
    sources: tuple[Path, ...],
    store: str | None,
    tag: str | None,
    block_size: str | None,
    as_json: bool,
    source_kind: str | None,
    series: str,
    force: bool,
    meta: tuple[str, ...],
    rank: int | None,
    world_size: int | None,
    handles: Path | None,
    checkpoint_dir: Path | None,
    max_handles_age: float | None,
    no_owner_check: bool,
    device_map: str | None,
    codec: str,
    level: int,
    delta: bool | None,
    group: str | None,
    workers: int | None,
) -> None:
    """Save SOURCE... as checkpoints: only blocks the store lacks are written.

    SOURCE is a safetensors file or directory, a .pt state_dict, a handles file,
    or a checkpoint directory of the original tool (a directory of them imports
    the whole history with its timestamps). Several SOURCEs are saved in order.
    A save that changes nothing adds no checkpoint unless --force.
    """
    paths = list(sources)
    kind = source_kind
    if handles is not None:
        paths.append(handles)
        kind = kind or "handles"
    origin = None
    if checkpoint_dir is not None:
        if store and Path(store) != checkpoint_dir:
            raise UsageError(
                "--store and --checkpoint-dir name different places", "pass one of them"
            )
        store, origin = str(checkpoint_dir), "--checkpoint-dir"
    if not paths and checkpoint_dir is None:
        raise UsageError(
            "nothing to save",
            "name a SOURCE (or --handles FILE, or --checkpoint-dir DIR to import)",
        )
    location = need_store(store, origin)
    bs = checked_block_size(block_size, warn=False) if block_size else None
    meta_map = _parse_meta(meta)
    if not paths:
        assert checkpoint_dir is not None
        import_only(checkpoint_dir, location, make_policy(codec, level, delta), series, as_json)
        return
    precheck_sources(paths, kind)
    if bs is not None:
        warn_block_size(bs)
    st, created = open_for_save(
        location, make_policy(codec, level, delta), allow_non_empty=force, workers=workers
    )
    with st:
        try:
            if tag is not None and rank is None:
                st.check_tag(tag, series)  # before the first of several sources is saved
            results = (
                import_seed_history(st, checkpoint_dir, series, as_json)
                if checkpoint_dir is not None
                else []
            )
            results += save_sources(
                st,
                paths,
                kind=kind,
                series=series,
                tag=tag,
                block_size=bs,
                force=force,
                meta=meta_map,
                rank=rank,
                world_size=world_size,
                as_json=as_json,
                handle_options={
                    "max_age": max_handles_age,
                    "check_owner_pid": not no_owner_check,
                    "device_map": device_map,
                },
                group=group,
            )
        finally:
            announce_created(st, created)
    if as_json:
        emit_json(results[0].to_json() if len(results) == 1 else [r.to_json() for r in results])


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
