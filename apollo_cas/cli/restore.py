"""``apollo-cas restore``: a checkpoint back to files."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import click

from ..errors import UsageError
from ..store import Store
from .common import (
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


@click.command()
@click.argument("ref", required=False, default="latest")
@store_option
@click.option(
    "--to",
    "to",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Directory to write into (created if missing).",
)
@click.option(
    "--live",
    "live",
    type=click.Path(path_type=Path),
    metavar="HANDLES",
    help="Hot restore: write into the running tensors behind this handles file only "
    "the blocks that differ, then verify on the device. Pause serving first.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "flat"]),
    default=None,
    help="safetensors: model.safetensors (or shards + index); flat: weights.bin + weights.json. "
    "Default: the form the checkpoint was saved in (saved files come back exactly), "
    "else safetensors.",
)
@click.option(
    "--exact/--no-exact",
    "exact",
    default=None,
    help="--exact: the saved files byte for byte or an error saying why not; --no-exact: "
    "the rewritten form. Default: exact for checkpoints saved from files unless "
    "--format, --layout or --max-shard-size ask for another form.",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    default="5GB",
    show_default=True,
    help="Largest safetensors shard; bigger checkpoints get shards and an index.",
)
@click.option(
    "--layout",
    "st_layout",
    type=click.Choice(["auto", "hf", "vllm-sharded"]),
    default="auto",
    show_default=True,
    help="safetensors naming: hf (model-0000i-of-n) or vLLM's per-rank "
    "model-rank-R-part-P (auto: vllm-sharded for handles saved with --rank).",
)
@click.option(
    "--group", metavar="NAME", help="Restore the multi-rank checkpoint NAME (REF is ignored)."
)
@click.option("--rank", type=int, help="With --group: only this rank.")
@series_option
@json_option
def restore(
    ref: str,
    store: str | None,
    to: Path,
    fmt: str | None,
    exact: bool | None,
    max_shard_size: str,
    st_layout: str,
    group: str | None,
    rank: int | None,
    series: str,
    as_json: bool,
    live: Path | None,
) -> None:
    """Write checkpoint REF (default: latest) into PATH, bit-exactly.

    A checkpoint saved from files gives back those files, byte for byte and
    under their names, unless --format, --layout, --max-shard-size or
    --no-exact ask for another form; others are written as safetensors.
    Files appear only when complete; the file that names the others
    (weights.json, model.safetensors.index.json) is written last.
    """
    import time

    t0 = time.perf_counter()
    if live is not None:
        restore_live_handles(need_store(store), ref, series, live, as_json)
        return
    if to is None:
        raise UsageError(
            "missing --to PATH", "name the directory to restore into, or use --live HANDLES"
        )
    shard = parse_size(max_shard_size, "shard size")
    before = existing_files(to)
    # The default shard size asks for nothing: only a given one rewrites saved files.
    source = click.get_current_context().get_parameter_source("max_shard_size")
    asked_shard = shard if source != click.core.ParameterSource.DEFAULT else None
    if group is not None:
        if exact:
            raise UsageError(
                "--exact does not apply to --group",
                "a group is written in vLLM's per-rank layout; restore one rank's checkpoint "
                "by id for its saved files",
            )
        with Store.open(need_store(store)) as st:
            paths = st.restore_group(
                group,
                to,
                format=fmt or "safetensors",
                series=series,
                rank=rank,
                max_shard_size=shard,
            )
        seconds = time.perf_counter() - t0
        replaced = report_replaced(paths, before)
        if as_json:
            emit_json(
                {"group": group, "files": paths, "replaced": replaced, "seconds": round(seconds, 4)}
            )
        else:
            click.echo(f"restored group {group} to {to} in {seconds:.2f}s: {len(paths)} files")
        return
    with Store.open(need_store(store)) as st:
        cid = st.resolve(ref, series)
        manifest = st.manifest(cid)
        with progress(manifest.logical_bytes, f"restore {cid[:12]}", not as_json) as bar:
            res = st.restore_files(
                cid,
                to,
                format=fmt,
                max_shard_size=asked_shard,
                safetensors_layout=st_layout,
                exact=exact,
                progress=bar,
            )
    paths = res.paths
    seconds = time.perf_counter() - t0
    replaced = report_replaced(paths, before)
    if as_json:
        emit_json(
            {
                "checkpoint": cid,
                "files": paths,
                "replaced": replaced,
                "bytes": manifest.logical_bytes,
                "seconds": round(seconds, 4),
                **res.to_json(),
            }
        )
    else:
        click.echo(
            f"restored {cid[:12]} ({human_bytes(manifest.logical_bytes)}) to {to} "
            f"in {seconds:.2f}s: " + ", ".join(Path(p).name for p in paths)
        )
        click.echo(
            "exact: the files as they were saved (same names, same bytes)"
            if res.exact
            else f"rewritten, not the saved files: {res.reason}"
        )


def existing_files(to: Path) -> dict[str, bool]:
    """Files already in ``to`` (and in its ``rank-R`` directories) -> read-only?"""
    out: dict[str, bool] = {}
    if not to.is_dir():
        return out
    dirs = [to, *(d for d in to.glob("rank-*") if d.is_dir())]
    for d in dirs:
        for p in d.iterdir():
            with contextlib.suppress(OSError):
                st = p.lstat()
                if stat.S_ISREG(st.st_mode):
                    out[str(p)] = not st.st_mode & 0o222
    return out


def report_replaced(paths: list[str], before: dict[str, bool]) -> list[str]:
    """Say on stderr which files the restore put in place of existing ones."""
    replaced = [p for p in paths if p in before]
    for p in replaced:
        note(f"replaced {p}" + (" (it was read-only)" if before[p] else ""))
    return replaced


def restore_live_handles(store: str, ref: str, series: str, handles: Path, as_json: bool) -> None:
    """Roll the weights of a running server back to REF, in place."""
    from ..sources.handles import open_handles
    from ..targets.live import SERVING_NOTICE

    note(SERVING_NOTICE)
    with Store.open(store) as st:
        cid = st.resolve(ref, series)
        with open_handles(handles) as src:
            # Decoded and verified on the device before each block is written.
            report = st.restore_into(cid, src.live_tensors(), only_changed=True)
    if as_json:
        emit_json({"checkpoint": cid, **report.to_dict()})
    else:
        click.echo(
            f"hot-restored {cid[:12]} into {handles}: {report.blocks_written}/"
            f"{report.blocks_checked} blocks differed, {human_bytes(report.bytes_written)} "
            f"written in {report.seconds:.2f}s; verified on the device: "
            f"{'yes' if report.verified else 'no'}"
        )
