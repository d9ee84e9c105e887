"""gc's phase 1, the plan: what goes, what stays reachable, in which order chunks may go.

Nothing here deletes or takes the exclusive lock; :mod:`apollo_cas.gc` runs
the plan (format 1 here, format 2 through :mod:`apollo_cas.packgc`) and a dry
run reports it. :func:`mark` is the part both formats share: the retention
selection (:mod:`apollo_cas.retention`), whole multi-rank groups, and the
chunks reachable from every kept manifest (delta bases included). The other
functions answer the questions the plan and the sweep's re-checks ask: which
unreferenced chunks are young leftovers of a save that may still be in
flight, in which order candidates may be deleted (dependents before their
bases), what the refs name now.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .backends.base import ObjectInfo
from .errors import ApolloError, ObjectNotFound
from .manifest import Manifest
from .parallel import bounded_map
from .repository import Checkpoint
from .retention import RetentionPolicy, Selection, select
from .store import Store


@dataclass
class GcReport:
    """What gc did (or, with ``dry_run``, would do)."""

    dry_run: bool
    policy: str
    kept: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    manifests_deleted: int = 0
    manifest_bytes: int = 0
    chunks_deleted: int = 0
    chunk_bytes: int = 0
    chunks_kept: int = 0
    temporaries_removed: int = 0
    groups_deleted: int = 0
    rescued_chunks: int = 0  # candidates protected by saves that finished during phase 1
    young_chunks_kept: int = 0  # unreferenced but younger than the grace window (a save in flight?)
    #: format 2: what happened to packs (packgc.PackPlan.to_json, plus what the sweep did)
    packs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    lock_wait_seconds: float = 0.0

    @property
    def bytes_freed(self) -> int:
        return self.manifest_bytes + self.chunk_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "policy": self.policy,
            "kept": self.kept,
            "forgotten": self.forgotten,
            "reasons": {k: v for k, v in self.reasons.items() if k in set(self.kept)},
            "manifests_deleted": self.manifests_deleted,
            "chunks_deleted": self.chunks_deleted,
            "chunks_kept": self.chunks_kept,
            "bytes_freed": self.bytes_freed,
            "temporaries_removed": self.temporaries_removed,
            "groups_deleted": self.groups_deleted,
            "rescued_chunks": self.rescued_chunks,
            "young_chunks_kept": self.young_chunks_kept,
            **({"packs": self.packs} if self.packs else {}),
            "seconds": round(self.seconds, 4),
            "lock_wait_seconds": round(self.lock_wait_seconds, 4),
        }


def load_manifests(store: Store, ids: Iterable[str]) -> dict[str, Manifest]:
    """Load manifests on the store's threads (S3 gets are latency-bound)."""
    ids = list(ids)
    return dict(zip(ids, bounded_map(store.manifest, ids, store.workers), strict=True))


def reachable(manifests: Iterable[Manifest]) -> set[bytes]:
    out: set[bytes] = set()
    for m in manifests:
        out |= m.chunk_ids()
    return out


def stored_sizes(store: Store, keys: list[str]) -> list[int]:
    """Stored size of each key (0 if it is gone), in order."""

    def size(key: str) -> int:
        try:
            return store.backend.info(key).size
        except ApolloError:  # ObjectNotFound: deleted meanwhile
            return 0

    return list(bounded_map(size, keys, store.workers))


def dependents_first(
    store: Store, candidates: set[bytes], manifests: Iterable[Manifest]
) -> list[bytes]:
    """Candidates ordered so that a delta chunk goes before the chunk it is a delta
    against.

    The sweep may release its lock between batches; a save that runs in such a
    gap may deduplicate against a candidate not yet deleted, and its manifest
    then rescues that chunk *and its base chain*. That is only possible if no
    base was deleted before its dependents, hence this order (deepest first).
    Edges come from the manifests' ``bases``; chunks no manifest names
    (leftovers of interrupted saves) have their header read.
    """
    bases: dict[bytes, bytes] = {}
    for m in manifests:
        bases.update(m.bases)
    covered = set(bases)
    for m in manifests:
        covered |= m.chunk_ids()
    orphans = sorted(candidates - covered)

    def base_of(cid: bytes) -> bytes | None:
        try:
            return store.chunks.base_of(cid)
        except ApolloError:  # an unreadable leftover: nothing can depend on it
            return None

    for cid, base in zip(orphans, bounded_map(base_of, orphans, store.workers), strict=True):
        if base is not None:
            bases[cid] = base

    def depth(cid: bytes) -> int:
        d = 0
        while cid in bases and d < 1024:
            cid = bases[cid]
            d += 1
        return d

    return sorted(candidates, key=lambda c: (-depth(c), c))


def infos(store: Store, chunk_ids: Iterable[bytes]) -> dict[bytes, ObjectInfo | None]:
    """Size and modification time of each chunk (None if it is gone), one stat or HEAD each."""
    ids = list(chunk_ids)

    def info(cid: bytes) -> ObjectInfo | None:
        try:
            return store.backend.info(layout.chunk_key(cid.hex()))
        except ObjectNotFound:
            return None

    return dict(zip(ids, bounded_map(info, ids, store.workers), strict=True))


def stored_size(info: ObjectInfo | None) -> int:
    return info.size if info is not None else 0


def young_orphans(
    store: Store,
    candidates: set[bytes],
    manifests: Iterable[Manifest],
    infos: dict[bytes, ObjectInfo | None],
    since: float,
) -> set[bytes]:
    """Candidates gc must keep for now: chunks no manifest names that were written
    after ``since`` (gc's start minus its grace window), and their delta bases.

    Such a chunk may belong to a save still in flight whose lock lapsed (frozen
    past its lease): it is kept until it is older than the window, which is at
    least a lock TTL by default. Chunks of forgotten manifests are not young
    leftovers and go whatever their age: a save that re-uses them is caught by
    its fencing (docs/CONCURRENCY.md). A kept delta keeps its base chain, so no
    save can later deduplicate against a chunk whose base is gone.
    """
    manifests = list(manifests)
    named: set[bytes] = set()
    bases: dict[bytes, bytes] = {}
    for m in manifests:
        named |= m.chunk_ids()
        bases.update(m.bases)
    keep = {c for c in candidates - named if (i := infos.get(c)) is not None and i.mtime > since}
    todo = list(keep)
    while todo:
        cid = todo.pop()
        try:
            base = bases[cid] if cid in bases else store.chunks.base_of(cid)
        except ApolloError:  # an unreadable leftover: nothing to keep for it
            base = None
        if base is not None and base not in keep and base in candidates:
            keep.add(base)
            todo.append(base)
    return keep


def referenced(store: Store) -> set[str]:
    return set(store.tags().values()) | set(store.series().values())


def group_records(store: Store) -> list[Any]:
    """Multi-rank group records (``GroupRecord``), if this store version has them."""
    fn = getattr(store, "groups", None)
    return list(fn()) if fn is not None else []


def apply_groups(groups: list[Any], keep: set[str], reasons: dict[str, list[str]]) -> list[Any]:
    """A group is restored as a whole: keep every member of a group any of whose
    members is kept (adds to ``keep``). Returns the groups none of whose members
    is kept: their records go too."""
    dead = []
    for g in groups:
        members = set(g.members.values())
        if members & keep:
            for cid in members - keep:
                if cid in reasons:
                    keep.add(cid)
                    why = f"group {g.series}/{g.name}"
                    if why not in reasons[cid]:
                        reasons[cid].append(why)
        else:
            dead.append(g)
    return dead


@dataclass
class Marked:
    """What phase 1 decided, in either format."""

    checkpoints: list[Checkpoint]  # every checkpoint, oldest first
    sel: Selection  # keep / forget, with whole groups kept together
    manifests: dict[str, Manifest]  # every checkpoint's manifest, by id
    forget_ids: set[str]
    dead_groups: list[Any]  # group records none of whose members is kept
    reachable: set[bytes]  # chunks a kept manifest names (delta bases included)
    manifest_size: dict[str, int]  # stored size of each forgotten manifest


def mark(store: Store, policy: RetentionPolicy, now: float | None) -> Marked:
    """Choose what to forget and compute what stays reachable; saves run meanwhile."""
    checkpoints = store.checkpoints()
    sel = select(checkpoints, policy, time.time() if now is None else now)
    manifests = {c.checkpoint_id: c.manifest for c in checkpoints}
    keep_ids = set(sel.keep)
    dead_groups = apply_groups(group_records(store), keep_ids, sel.reasons)
    forget_ids = set(sel.forget) - keep_ids
    sel = sel._replace(
        keep=[c for c in manifests if c in keep_ids],
        forget=[c for c in sel.forget if c in forget_ids],
    )
    reachable_ids = reachable(m for cid, m in manifests.items() if cid not in forget_ids)
    sizes = stored_sizes(store, [layout.manifest_key(c) for c in sel.forget])
    manifest_size = dict(zip(sel.forget, sizes, strict=True))
    return Marked(
        checkpoints, sel, manifests, forget_ids, dead_groups, reachable_ids, manifest_size
    )


def report_plan(report: GcReport, marked: Marked) -> None:
    """The parts of a dry run's report both formats share: checkpoints and manifests."""
    sel = marked.sel
    report.kept, report.forgotten, report.reasons = sel.keep, sel.forget, sel.reasons
    report.groups_deleted = len(marked.dead_groups)
    report.manifests_deleted = len(sel.forget)
    report.manifest_bytes = sum(marked.manifest_size.values())
