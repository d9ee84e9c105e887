"""Read-only commands: ``list``, ``stats``, ``diff``, and ``tag``."""

from __future__ import annotations

import click

from .. import reports
from ..errors import UsageError
from ..store import Store
from .common import (
    emit_json,
    human_bytes,
    human_time,
    json_option,
    need_store,
    ratio,
    series_option,
    store_option,
    table,
)


def _source_text(src: dict[str, object]) -> str:
    text = str(src["kind"])
    if src.get("rank") is not None:
        text += f" rank {src['rank']}/{src.get('world_size') or '?'}"
    meta = src.get("metadata") or {}
    if isinstance(meta, dict) and meta:
        text += " " + ",".join(f"{k}={v}" for k, v in sorted(meta.items()))
    return text


@click.command("list")
@store_option
@json_option
def list_cmd(store: str | None, as_json: bool) -> None:
    """List checkpoints, oldest first.

    \b
    SIZE   the checkpoint's size (original bytes)
    NEW    bytes of its blocks the store lacked (after dedup, before compression)
    STORED what those new blocks took on disk (after compression)
    DEDUP  SIZE / NEW; COMPR  NEW / STORED ('-' when nothing was new)
    """
    with Store.open(need_store(store)) as st:
        rows = reports.list_rows(st)
        groups = st.groups()
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo("no checkpoints")
        return
    body = [
        [
            r.id[:12],
            human_time(r.created),
            r.series,
            ",".join(r.tags + (["latest"] if r.latest else [])),
            human_bytes(r.logical_bytes),
            human_bytes(r.new_raw_bytes),
            human_bytes(r.new_stored_bytes),
            ratio(r.dedup_ratio),
            ratio(r.compression_ratio),
            _source_text(r.source),
        ]
        for r in rows
    ]
    click.echo(
        table(
            body,
            ["ID", "TIME", "SERIES", "REFS", "SIZE", "NEW", "STORED", "DEDUP", "COMPR", "SOURCE"],
        )
    )
    if groups:
        click.echo("")
        gbody = [
            [
                g.name,
                g.series,
                human_time(g.created),
                f"{len(g.members)}/{g.world_size}" + ("" if g.complete else " incomplete"),
                " ".join(f"{r}:{c[:12]}" for r, c in sorted(g.members.items())),
            ]
            for g in groups
        ]
        click.echo(table(gbody, ["GROUP", "SERIES", "TIME", "RANKS", "CHECKPOINTS"]))


@click.command()
@click.argument("ref", required=False)
@store_option
@series_option
@json_option
def stats(ref: str | None, store: str | None, series: str, as_json: bool) -> None:
    """Store totals (logical vs stored bytes, dedup and compression), or one checkpoint's."""
    with Store.open(need_store(store)) as st:
        if ref is not None:
            cid = st.resolve(ref, series)
            cp = next(c for c in st.checkpoints() if c.checkpoint_id == cid)
            row = reports.CheckpointRow.of(cp)
            if as_json:
                emit_json(row.to_json())
                return
            m = cp.manifest
            click.echo(
                f"checkpoint {cid}\n"
                f"  created     {human_time(m.created)}\n"
                f"  series      {m.series}   parent {(m.parent or '-')[:12]}\n"
                f"  tensors     {len(m.tensors)}   block size {human_bytes(m.block_size)}\n"
                f"  size        {human_bytes(m.logical_bytes)} in {m.stats.chunks} blocks\n"
                f"  new         {m.stats.new_chunks} blocks, {human_bytes(m.stats.new_raw_bytes)} "
                f"raw -> {human_bytes(m.stats.new_stored_bytes)} stored\n"
                f"  source      {_source_text(row.source)}"
            )
            return
        s = reports.store_stats(st)
    if as_json:
        emit_json(s.to_json())
        return
    sizes = [human_bytes(n) for n in (s.logical_bytes, s.compressed_bytes, s.deduplicated_bytes)]
    click.echo(
        f"checkpoints        {s.checkpoints}\n"
        f"{'':19s}{'original':12s}{'compressed':12s}deduplicated\n"
        f"{'all checkpoints':19s}{sizes[0]:12s}{sizes[1]:12s}{sizes[2]}"
    )
    bases = (
        f"\ndelta bases        {s.base_only_chunks} chunks, {human_bytes(s.base_only_stored_bytes)}"
        " stored, kept only because newer chunks are XOR deltas of them"
        if s.base_only_chunks
        else ""
    )
    click.echo(
        f"unique data        {human_bytes(s.unique_raw_bytes)} in {s.unique_chunks - s.base_only_chunks}"
        f" chunks (before compression){bases}\n"
        f"stored             {human_bytes(s.stored_bytes)} in {s.stored_chunks} chunk objects"
        f" ({s.unreferenced_chunks} unreferenced)\n"
        f"dedup ratio        {ratio(s.dedup_ratio)} (original / unique data)\n"
        f"compression ratio  {ratio(s.compression_ratio)} (unique data / its stored size)\n"
        f"overall            {ratio(s.total_ratio)} (original / stored)"
    )
    if s.per_checkpoint:
        click.echo("")
        body = [
            [
                r.id[:12],
                human_time(r.created),
                human_bytes(r.logical_bytes),
                str(r.new_chunks),
                human_bytes(r.new_raw_bytes),
                human_bytes(r.new_stored_bytes),
                ratio(r.dedup_ratio),
                ratio(r.compression_ratio),
            ]
            for r in s.per_checkpoint
        ]
        click.echo(
            table(
                body,
                ["ID", "TIME", "SIZE", "NEW CHUNKS", "NEW", "STORED", "DEDUP", "COMPR"],
            )
        )


@click.command()
@click.argument("ref_a")
@click.argument("ref_b")
@store_option
@series_option
@json_option
def diff(ref_a: str, ref_b: str, store: str | None, series: str, as_json: bool) -> None:
    """Which tensors changed from REF_A to REF_B, by how many blocks and bytes."""
    with Store.open(need_store(store)) as st:
        d = reports.diff(st, ref_a, ref_b, series)
    if as_json:
        emit_json(d.to_json())
        return
    click.echo(
        f"{d.a[:12]} -> {d.b[:12]}: {d.tensors_changed} of {d.tensors_total} tensors differ, "
        f"{human_bytes(d.bytes_changed)} of {human_bytes(d.bytes_total)} in changed blocks"
    )
    if d.changes:
        body = [
            [c.name, c.status, f"{c.blocks_changed}/{c.blocks_total}", human_bytes(c.bytes_changed)]
            for c in d.changes
        ]
        click.echo(table(body, ["TENSOR", "STATUS", "BLOCKS", "BYTES"]))


@click.command()
@click.argument("names", nargs=-1, metavar="REF NAME | --delete NAME")
@store_option
@series_option
@click.option("--force", is_flag=True, help="Move the tag if it already names another checkpoint.")
@click.option("--delete", is_flag=True, help="Delete tag NAME (the checkpoint stays).")
@json_option
def tag(
    names: tuple[str, ...], store: str | None, series: str, force: bool, delete: bool, as_json: bool
) -> None:
    """Name checkpoint REF with tag NAME; gc never removes a tagged checkpoint.

    'tag --delete NAME' deletes the tag ('tag - NAME --delete', the old spelling,
    still works).
    """
    if delete:
        if len(names) == 2 and names[0] == "-":
            names = names[1:]
        if len(names) != 1:
            raise UsageError("tag --delete takes one NAME", "apollo-cas tag --delete NAME")
        (name,) = names
    else:
        if len(names) != 2:
            raise UsageError(
                "tag takes REF and NAME", "apollo-cas tag REF NAME, or tag --delete NAME"
            )
        ref, name = names
    with Store.open(need_store(store)) as st:
        if delete:
            st.untag(name)
            target = None
        else:
            target = st.tag(ref, name, force=force, series=series)
    if as_json:
        emit_json({"tag": name, "checkpoint": target, "deleted": delete})
    elif delete:
        click.echo(f"deleted tag {name}")
    else:
        click.echo(f"tagged {target[:12] if target else ''} as {name}")
