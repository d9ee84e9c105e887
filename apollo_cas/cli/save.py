"""``apollo-cas save``: checkpoint one or more sources."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from ..save_paths import SaveOptions, check_sources
from .common import (
    emit_json,
    json_option,
    need_store,
    series_option,
    store_option,
)
from .history import Shown, import_only
from .opening import announce_created, open_for_save
from .options import (
    block_size_option,
    checked_block_size,
    codec_options,
    make_policy,
    warn_block_size,
)


def _parse_meta(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta {item!r} is not KEY=VALUE")
        out[key] = value
    return out


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
    checked = check_sources(paths, kind)  # before the store (or its history) is touched
    if bs is not None:
        warn_block_size(bs)
    st, created = open_for_save(
        location, make_policy(codec, level, delta), allow_non_empty=force, workers=workers
    )
    options = SaveOptions(
        series=series,
        tag=tag,
        block_size=bs,
        force=force,
        metadata=meta_map,
        rank=rank,
        world_size=world_size,
        handle_options={
            "max_age": max_handles_age,
            "check_owner_pid": not no_owner_check,
            "device_map": device_map,
        },
        group=group,
    )
    with st:
        try:
            results = checked.save(st, options, history=checkpoint_dir, events=Shown(as_json))
        finally:
            announce_created(st, created)
    if as_json:
        emit_json(results[0].to_json() if len(results) == 1 else [r.to_json() for r in results])
