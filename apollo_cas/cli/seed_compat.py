"""``apollo-checkpoint``: the original tool's command line, kept for cron lines.

``save --handles FILE --checkpoint-dir DIR --block-size N`` and
``list --checkpoint-dir DIR`` with the original defaults. DIR becomes the
store; the original tool's checkpoints in it are imported on first use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from .. import frontend
from ..allocator import keep_freed_memory
from ..history import resume_history, series_block_size
from ..opening import open_for_save
from ..save_paths import SaveOptions, check_sources
from ..store import Store
from .common import F, human_bytes, human_time, note
from .history import Shown
from .main import run
from .opening import announce_created
from .options import checked_block_size, make_policy, warn_block_size

DEFAULT_HANDLES = "/tmp/vllm_weight_handles.pt"
DEFAULT_DIR = "/home/ubuntu/checkpoints"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def compat() -> None:
    """Efficient GPU weight checkpointing (apollo_cas, compatible with apollo-checkpoint)."""


def path_option(name: str, default: str, help: str) -> Callable[[F], F]:
    """An option naming a path, with the original tool's default (shown in --help)."""
    return click.option(
        name, default=default, show_default=True, type=click.Path(path_type=Path), help=help
    )


checkpoint_dir_option = path_option(
    "--checkpoint-dir", DEFAULT_DIR, "Checkpoint directory (the store)."
)


@compat.command()
@path_option("--handles", DEFAULT_HANDLES, "Path to vLLM weight IPC handles.")
@checkpoint_dir_option
@click.option(
    "--block-size",
    default=None,
    type=str,
    help="Block size in bytes (default 1 MiB; the original 4096 is honoured with a warning).",
)
def save(handles: Path, checkpoint_dir: Path, block_size: str | None) -> None:
    """Save a checkpoint (only changed blocks are written)."""
    bs = checked_block_size(block_size, warn=False) if block_size else None
    checked = check_sources([handles], "handles")  # before the history import touches DIR
    if bs is not None:
        warn_block_size(bs)
    st, created = open_for_save(str(checkpoint_dir), make_policy("auto", 1, None))
    shown = Shown(as_json=False)
    with st:
        try:
            resume_history(st, checkpoint_dir, series="default", events=shown)
            if bs is None:
                # The original tool's block size, once its history is imported
                # (the series "default" even for a rank's handles file).
                bs = series_block_size(st, "default")
            checked.save(st, SaveOptions(block_size=bs), events=shown)
        finally:
            announce_created(st, created)


@compat.command("list")
@checkpoint_dir_option
def list_cmd(checkpoint_dir: Path) -> None:
    """List checkpoints."""
    if not checkpoint_dir.exists():
        click.echo("No checkpoints directory")
        return
    from ..sources.seed import scan_root

    good, skipped = scan_root(checkpoint_dir)
    try:
        st: Store | None = Store.open(checkpoint_dir)
    except Exception:
        st = None
    checkpoints = st.checkpoints() if st is not None else []
    imported = {
        Path(c.manifest.source.location).resolve()
        for c in checkpoints
        if c.manifest.source.kind == "seed"
    }
    for p in good:
        if p.resolve() in imported:
            continue  # listed below as a checkpoint of the store
        size = (p / "weights.bin").stat().st_size if (p / "weights.bin").exists() else 0
        click.echo(f" {p.name} ({size / 1e9:.1f} GB) [original tool, not yet imported]")
    for s in skipped:
        note(f" {s.path.name}: {s.reason}")
    if st is None:
        return
    with st:
        for c in checkpoints:
            marker = " ← latest" if c.latest_of else ""
            click.echo(
                f" {human_time(c.manifest.created)} {c.checkpoint_id[:12]} "
                f"({human_bytes(c.manifest.logical_bytes)}){marker}"
            )


def main() -> None:
    keep_freed_memory()
    sys.exit(run(compat, prog="apollo-checkpoint", fe=frontend.APOLLO_CHECKPOINT))
