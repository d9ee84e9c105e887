"""``apollo-cas migrate``: convert a format-1 store to format 2 (packs)."""

from __future__ import annotations

import click

from ..store import Store
from .common import emit_json, human_bytes, json_option, need_store, store_option


@click.command()
@store_option
@click.option(
    "--dry-run", is_flag=True, help="Show how many chunks and bytes would move; change nothing."
)
@json_option
def migrate(store: str | None, dry_run: bool, as_json: bool) -> None:
    """Convert a store of format 1 (one object per chunk) to format 2 (pack files).

    Every chunk is verified on the way. Saves, gc and verify wait (exclusive
    lock); restores keep working. Safe to interrupt: run it again to finish.
    Format-1 stores also keep working as they are.
    """
    from ..migration import migrate as run_migrate

    with Store.open(need_store(store)) as st:
        r = run_migrate(st, dry_run=dry_run)
    if as_json:
        emit_json(r.to_json())
        return
    if r.from_format == 2 and not r.chunk_objects_deleted:
        click.echo(f"store {st.location} is already format 2; nothing to do")
    elif dry_run:
        click.echo(
            f"dry run: would move {r.chunks} chunk(s), {human_bytes(r.chunk_bytes)}, into about "
            f"{r.packs_written} pack(s) and delete their chunk objects; nothing was changed"
        )
    else:
        click.echo(
            f"migrated {st.location} to format 2: {r.chunks} chunk(s) "
            f"({r.already_packed} already packed), {r.packs_written} pack(s) written, "
            f"{r.chunk_objects_deleted} chunk object(s) deleted in {r.seconds:.2f}s"
        )
