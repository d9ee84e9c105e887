"""Garbage collection: forget checkpoints by retention policy, sweep unreferenced chunks.

Two phases, so saves are stalled only for the deletions themselves (restic's
most-voted complaint is an exclusive lock held through a whole prune):

1. **Mark, without an exclusive lock.** Load every manifest, choose the
   checkpoints to forget (:mod:`apollo_cas.retention`), compute the set of
   chunks reachable from every kept manifest (``Manifest.chunk_ids()``, which
   includes delta bases), and list the chunks present. Saves run meanwhile.
2. **Sweep, under the exclusive lock.** No save runs now (saves hold a shared
   lock from before they look at the store until after their ref moved). Re-read
   the refs and the manifest list: a manifest that appeared since phase 1 is a
   save that finished meanwhile, and its chunks join the reachable set; a
   checkpoint that got a tag meanwhile is kept. Then delete, in this order:
   dead multi-rank group records, forgotten manifests (no ref names them, so
   the store stays consistent if we die here), unreferenced chunks (no
   remaining manifest names them), and leftovers of interrupted writes older
   than a grace period.

The sweep holds the lock at most ``max_hold`` seconds at a time: a long sweep
releases it between batches so queued saves get in, then re-lists manifests
before the next batch. A save that dedups against a chunk gc considers garbage
either finished before a batch (its manifest is re-listed, the chunk and its
delta bases are kept) or runs after the chunk was deleted (``exists()`` says
so, and the save writes it again). Chunks are deleted dependents first, so a
delta's base is never gone while the delta can still be found. The full
argument is in docs/CONCURRENCY.md.

Phase 1 is the plan (:mod:`apollo_cas.gcplan`; what ``--dry-run`` prints),
phase 2 its execution (here). Both go through the store's chunk inventory: in
format 1 the sweep deletes chunk objects (below); in format 2 it deletes and
repacks pack objects (:mod:`apollo_cas.packgc`), with the same locks and the
same re-checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import gcplan, layout, packgc
from .errors import ConcurrentUpdate, CorruptManifest, Refused
from .gcplan import GcReport, Marked
from .inventory import LooseInventory, PackInventory
from .locks import Lease
from .manifest import Manifest
from .parallel import bounded_map
from .retention import RetentionPolicy
from .store import Store

#: Leftovers of interrupted writes younger than this are left alone: temporary
#: files, and chunks that no manifest names. A save may still be in flight
#: even though we hold the exclusive lock (clock skew, a lock that expired under
#: a stalled writer). At least a lock TTL (30 min), so that a save whose lease
#: just ran out still finds the chunks it wrote (docs/CONCURRENCY.md).
DEFAULT_GRACE = 3600.0

#: How long the sweep waits for running saves to release their shared locks.
DEFAULT_LOCK_TIMEOUT = 600.0

#: The longest the sweep holds the exclusive lock at a time; saves that wait
#: for it give up after a minute (locks.hold's default timeout).
DEFAULT_MAX_HOLD = 20.0
#: Between holds the sweep waits this long, so waiting saves get the lock.
YIELD_SECONDS = 3.5
#: Objects deleted per step of a hold (the lease is checked between steps).
DELETE_BATCH = 512

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def _still_held(lease: Lease) -> bool:
    """Fencing for gc: whether our exclusive lease was held without a gap until now
    (then renewed). A gc frozen past its TTL may have lost its lock to a save that
    then deduplicated against our candidates: it must re-list before deleting."""
    return lease.confirm()


def lease_held(lease: Lease) -> Callable[[], bool]:
    """What a pack sweep asks before it replaces the index and before each batch of
    deletes: our lease held without a gap (:func:`_still_held`, as format 1 asks
    before each batch)."""
    return lambda: _still_held(lease)


def _delete_while_held(store: Store, lease: Lease, keys: list[str]) -> bool:
    """Delete ``keys`` while ``lease`` is held; False (some maybe left) if it lapsed."""
    if not _still_held(lease):
        return False

    def delete(key: str) -> None:
        if not lease.lapsed():  # a clock check: a freeze mid-batch stops the rest of it
            store.backend.delete(key)

    for _ in bounded_map(delete, keys, store.workers):
        pass
    return not lease.lapsed()


def gc(
    store: Store,
    policy: RetentionPolicy | None = None,
    *,
    dry_run: bool = False,
    grace: float = DEFAULT_GRACE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    max_hold: float = DEFAULT_MAX_HOLD,
    progress: ProgressFn | None = None,
    now: float | None = None,
    max_unused: float = packgc.DEFAULT_MAX_UNUSED,
) -> GcReport:
    """Forget checkpoints that ``policy`` does not keep, then sweep unreferenced chunks.

    Never deletes a chunk reachable from a kept manifest, nor one a concurrent
    save will reference (see the module docstring). A manifest that cannot be
    read stops gc before anything is deleted: without it we cannot know which
    chunks it needs (run ``verify``, then ``forget`` it). Chunks no manifest
    names and temporaries younger than ``grace`` seconds are kept. The exclusive lock is
    held at most about ``max_hold`` seconds at a time; a longer sweep lets
    waiting saves in between batches. In a format-2 store, packs with more than
    ``max_unused`` of their bytes unused are repacked (0: every pack with any
    unused byte).
    """
    t0 = time.perf_counter()
    started = time.time()  # the grace window counts back from here
    policy = policy or RetentionPolicy()
    report = GcReport(dry_run=dry_run, policy=policy.describe())
    step = progress or (lambda stage, done, total: None)

    # -- phase 1: mark, concurrently with saves ----------------------------------
    step("mark", 0, 1)
    marked = gcplan.mark(store, policy, now)
    inventory = store.inventory
    if isinstance(inventory, PackInventory):
        return _gc_packs(
            store, inventory, report, marked, dry_run, grace, lock_timeout, max_unused, step,
            t0, started,
        )  # fmt: skip
    assert isinstance(inventory, LooseInventory)
    sel, manifests, forget_ids = marked.sel, marked.manifests, marked.forget_ids
    present = inventory.ids()
    candidates = present - marked.reachable
    # Sizes and ages are gathered now, outside the lock (one stat or HEAD per object).
    infos = gcplan.infos(store, candidates)
    young = gcplan.young_orphans(store, candidates, manifests.values(), infos, started - grace)
    candidates -= young
    report.young_chunks_kept = len(young)
    ordered = gcplan.dependents_first(store, candidates, manifests.values())
    chunk_size = {c: gcplan.stored_size(infos.get(c)) for c in ordered}
    step("mark", 1, 1)

    if dry_run:
        gcplan.report_plan(report, marked)
        report.chunks_deleted = len(candidates)
        report.chunk_bytes = sum(chunk_size.values())
        report.chunks_kept = len(present) - len(candidates)
        report.seconds = time.perf_counter() - t0
        return report

    # -- phase 2: sweep, with no save running ----------------------------------
    seen = set(manifests)
    pending = ordered
    forget_sorted: list[str] = []
    first = True
    while True:
        t_lock = time.perf_counter()
        with store.locks.hold("exclusive", "gc", timeout=lock_timeout) as lease:
            report.lock_wait_seconds += time.perf_counter() - t_lock
            held_since = time.monotonic()
            # Saves that finished since we last looked: whatever they reference
            # stays, including chunks they deduplicated against our candidates.
            new_ids = set(store.checkpoint_ids()) - seen
            if new_ids:
                needed = gcplan.reachable(gcplan.load_manifests(store, new_ids).values())
                seen |= new_ids
                kept = [c for c in pending if c not in needed]
                report.rescued_chunks += len(pending) - len(kept)
                pending = kept
            if first and _still_held(lease):
                first = False
                rescued = _forget_under_lock(store, marked, forget_ids, seen, report, step)
                if rescued:
                    forget_ids -= rescued
                    needed = gcplan.reachable(manifests[c] for c in rescued)
                    pending = [c for c in pending if c not in needed]
                forget_sorted = [c for c in sel.forget if c in forget_ids]
            while pending and not first:  # at least one batch per hold, then until max_hold
                batch, pending = pending[:DELETE_BATCH], pending[DELETE_BATCH:]
                keys = [layout.chunk_key(c.hex()) for c in batch]
                if not _delete_while_held(store, lease, keys):
                    pending = batch + pending  # lost our lease: re-list before going on
                    break
                report.chunks_deleted += len(batch)
                report.chunk_bytes += sum(chunk_size.get(c, 0) for c in batch)
                step("sweep", report.chunks_deleted, report.chunks_deleted + len(pending))
                if time.monotonic() - held_since >= max_hold:
                    break
            store.backend.sync()
            if not pending and not first:
                report.temporaries_removed = store.backend.remove_temporaries(
                    older_than=time.time() - grace
                )
                break
        # Let saves that queued up behind us in before the next batch: their lock
        # retries back off up to ~3 s.
        time.sleep(YIELD_SECONDS)

    store.chunks.forget_known()  # this process's cache may name chunks just swept
    report.chunks_kept = len(present) - report.chunks_deleted
    report.kept = [c.checkpoint_id for c in marked.checkpoints if c.checkpoint_id not in forget_ids]
    report.kept += sorted(seen - set(manifests))
    report.forgotten = forget_sorted
    report.reasons = sel.reasons
    report.seconds = time.perf_counter() - t0
    return report


def _forget_under_lock(
    store: Store,
    marked: Marked,
    forget_ids: set[str],
    seen: set[str],
    report: GcReport,
    step: ProgressFn,
) -> set[str]:
    """Under the exclusive lock: re-read refs and groups, then delete dead group
    records and the forgotten manifests. Returns the checkpoints rescued (no
    longer forgotten: a ref or a kept group names them now)."""
    # Refs may have moved and tags may have been added since phase 1:
    # never delete what a ref names now, nor the chunks it needs.
    sel = marked.sel
    rescued = forget_ids & gcplan.referenced(store)
    live = seen - forget_ids - rescued
    dead_groups = gcplan.apply_groups(gcplan.group_records(store), live, sel.reasons)
    rescued |= forget_ids & live
    forget_sorted = [c for c in sel.forget if c in forget_ids - rescued]
    # Group records name manifests like refs do: they go before the
    # manifests they name.
    for g in dead_groups:
        store.backend.delete(layout.group_key(g.series, g.name))
    report.groups_deleted = len(dead_groups)
    # Manifests first: once they are gone nothing names the chunks
    # below, so a kill at any point of the sweep leaves a consistent store.
    for i, cid in enumerate(forget_sorted):
        store.backend.delete(layout.manifest_key(cid))
        step("forget", i + 1, len(forget_sorted))
    store.backend.sync()
    report.manifests_deleted = len(forget_sorted)
    report.manifest_bytes = sum(marked.manifest_size.get(c, 0) for c in forget_sorted)
    return rescued


def _gc_packs(
    store: Store,
    inventory: PackInventory,
    report: GcReport,
    marked: Marked,
    dry_run: bool,
    grace: float,
    lock_timeout: float,
    max_unused: float,
    step: ProgressFn,
    t0: float,
    started: float,
) -> GcReport:
    """gc of a format-2 store: plan (the dry run), copy, then sweep under the lock."""
    sel, manifests, forget_ids = marked.sel, marked.manifests, marked.forget_ids
    # Young unreferenced chunks (a save in flight?) and their bases stay, as in format 1.
    candidates = inventory.ids() - marked.reachable
    infos = packgc.chunk_infos(inventory, candidates, store.workers)
    young = gcplan.young_orphans(store, candidates, manifests.values(), infos, started - grace)
    report.young_chunks_kept = len(young)
    reachable = marked.reachable | young
    plan, _idx = packgc.plan(inventory, reachable, max_unused=max_unused, grace=grace)
    step("mark", 1, 1)
    report.packs = plan.to_json()
    report.chunks_kept = plan.live_chunks
    if dry_run:
        gcplan.report_plan(report, marked)
        report.chunk_bytes = plan.bytes_freed
        report.chunks_deleted = plan.chunks_dropped
        report.seconds = time.perf_counter() - t0
        return report
    # Step 1, no lock: live chunks of mostly-unused packs into new packs.
    step("repack", 0, len(plan.copy))
    written = packgc.copy_live(inventory, store.chunks.decode, plan)
    step("repack", len(plan.copy), len(plan.copy))
    seen = set(manifests)
    new: dict[str, Manifest] = {}
    left: dict[str, Any] | None = None  # unindexed packs a lapsed sweep left to delete
    forgotten = False
    deleted = safety = 0
    while True:
        t_lock = time.perf_counter()
        with store.locks.hold("exclusive", "gc", timeout=lock_timeout) as lease:
            report.lock_wait_seconds += time.perf_counter() - t_lock
            # Saves that finished since we last looked: what they need stays.
            fresh = set(store.checkpoint_ids()) - seen
            new.update(gcplan.load_manifests(store, fresh))
            seen |= fresh
            if not _still_held(lease):  # frozen past our lease: what we listed may be stale
                continue
            if not forgotten:
                forgotten = True
                rescued = _forget_under_lock(store, marked, forget_ids, seen, report, step)
                forget_ids = forget_ids - rescued
            live = gcplan.reachable(m for c, m in manifests.items() if c not in forget_ids)
            live |= gcplan.reachable(new.values()) | young
            held = lease_held(lease)
            if left is None:
                done = packgc.sweep(
                    inventory, plan, live, store.workers, written,
                    held=held, batch=DELETE_BATCH, step=step,
                )  # fmt: skip
                report.chunk_bytes = done.bytes_freed - plan.new_pack_bytes
                report.chunks_deleted = done.chunks_dropped
                deleted, safety = 0, 0
            else:
                done = packgc.finish(
                    inventory, left, live, store.workers, held=held, batch=DELETE_BATCH, step=step
                )
                report.chunk_bytes += done.bytes_freed
            deleted += done.packs_deleted
            safety += done.kept_for_safety
            report.packs.update(packs_deleted=deleted, kept_for_safety=safety)
            report.rescued_chunks += done.rescued_chunks
            if done.lapsed:  # lost our lease: re-list before deleting more
                if done.left:
                    left = done.left
                continue
            report.temporaries_removed = store.backend.remove_temporaries(
                older_than=time.time() - grace
            )
            break
    new_ids = set(new)
    store.chunks.forget_known()
    report.kept = [c.checkpoint_id for c in marked.checkpoints if c.checkpoint_id not in forget_ids]
    report.kept += sorted(new_ids)
    report.forgotten = [c for c in sel.forget if c in forget_ids]
    report.reasons = sel.reasons
    report.seconds = time.perf_counter() - t0
    return report


def forget(store: Store, checkpoint_id: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
    """Drop one checkpoint's manifest; its chunks go at the next ``gc``.

    Refuses a checkpoint a ref names (a tag, or a series' latest). Runs under the
    exclusive lock so a concurrent ``tag`` cannot point at it while it goes.
    """
    layout.check_hex_id(checkpoint_id, "checkpoint id")
    with store.locks.hold(
        "exclusive", f"forget {checkpoint_id[:12]}", timeout=lock_timeout
    ) as lease:
        tags = sorted(t for t, c in store.tags().items() if c == checkpoint_id)
        if tags:
            raise Refused(
                f"checkpoint {checkpoint_id[:12]} is tagged {', '.join(tags)}",
                f"delete the tag first: apollo-cas tag --delete {tags[0]}",
            )
        for g in gcplan.group_records(store):
            ranks = sorted(r for r, c in g.members.items() if c == checkpoint_id)
            if ranks:
                raise Refused(
                    f"checkpoint {checkpoint_id[:12]} is rank {ranks[0]} of group "
                    f"{g.series}/{g.name}",
                    "a group is kept or forgotten as a whole by gc's retention policy",
                )
        latest = sorted(s for s, c in store.series().items() if c == checkpoint_id)
        if latest:
            raise Refused(
                f"checkpoint {checkpoint_id[:12]} is the latest of series {', '.join(latest)}",
                "the latest checkpoint of a series is always kept; save a newer one first",
            )
        key = layout.manifest_key(checkpoint_id)
        if not store.backend.exists(key):
            raise CorruptManifest(
                f"checkpoint {checkpoint_id} has no manifest in {store.location}",
                "see 'apollo-cas list'",
            )
        if not _still_held(lease):  # frozen past our lease: the checks above are stale
            raise ConcurrentUpdate(
                f"forget {checkpoint_id[:12]} lost its lock while checking", "run it again"
            )
        store.backend.delete(key)
        store.backend.sync()
