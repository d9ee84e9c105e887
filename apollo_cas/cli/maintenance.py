"""Maintenance commands: ``unlock`` (gc, verify and forget join them)."""

from __future__ import annotations

import click

from ..store import Store
from .common import emit_json, json_option, need_store, note, store_option


@click.command()
@store_option
@click.option("--force", is_flag=True,
              help="Also remove locks of live processes and other hosts (make sure none runs).")
@json_option
def unlock(store: str | None, force: bool, as_json: bool) -> None:
    """Remove stale locks (of dead processes on this host, or expired); --force removes all."""
    with Store.open(need_store(store)) as st:
        removed = st.locks.break_all() if force else st.locks.clear_stale()
        left = st.locks.all()
    if as_json:
        emit_json({"removed": removed, "remaining": [lk.describe() for lk in left]})
        return
    click.echo(f"removed {removed} lock(s)")
    for lk in left:
        note(f"still held: {lk.describe()} (use --force if that process is gone)")


COMMANDS = [unlock]
