"""What is stored, as a rank of a served model sees it: list and stats replies."""

from __future__ import annotations

from typing import Any

from ... import layout
from ...store import Store
from .ops import rank_series

__all__ = ["list_store", "stats_store"]


def list_store(
    store: Store, *, rank: int = 0, world_size: int = 1, series: str = layout.DEFAULT_SERIES
) -> dict[str, Any]:
    """This rank's checkpoints (oldest first) and the store's multi-rank groups."""
    from ...reports import CheckpointRow

    mine = rank_series(series, rank, world_size)
    rows = [CheckpointRow.of(c).to_json() for c in store.checkpoints() if c.manifest.series == mine]
    groups = []
    for g in store.groups():
        if g.series != series:
            continue
        versions = set()
        for cid in g.members.values():
            try:
                versions.add(store.manifest(cid).source.metadata.get("weight_version"))
            except Exception:  # a member gc removed: the group still lists
                versions.add("?")
        groups.append(
            {
                "name": g.name,
                "world_size": g.world_size,
                "complete": g.complete,
                "members": {str(r): c for r, c in sorted(g.members.items())},
                "created": g.created,
                # Ranks that recorded different weight versions: not one point in time.
                "consistent": len(versions) <= 1,
            }
        )
    return {
        "ok": True,
        "store": store.location,
        "series": mine,
        "rank": rank,
        "world_size": world_size,
        "latest": store.latest(mine),
        "checkpoints": rows,
        "groups": groups,
    }


def stats_store(
    store: Store,
    *,
    ref: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    series: str = layout.DEFAULT_SERIES,
    totals: bool = False,
) -> dict[str, Any]:
    """One checkpoint of this rank (``ref``, default latest) and, with ``totals``,
    the whole store's dedup and compression (lists every chunk: slow on S3)."""
    from ...reports import CheckpointRow, store_stats
    from ...store import Checkpoint

    cid = store.resolve(ref or "latest", rank_series(series, rank, world_size))
    row = CheckpointRow.of(Checkpoint(cid, store.manifest(cid))).to_json()
    out: dict[str, Any] = {"ok": True, "rank": rank, "world_size": world_size, "checkpoint": row}
    if totals:
        st = store_stats(store).to_json()
        st.pop("per_checkpoint", None)
        out["store"] = st
    return out
