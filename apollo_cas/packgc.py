"""gc of a format-2 store: a plan of which packs to delete, repack and re-index, and its execution.

Like restic's ``prune`` (``PlanPrune`` / ``PrunePlan.Execute``): the plan is
computed without a lock and is what ``gc --dry-run`` prints; executing it

1. (no lock) copies the live chunks of packs whose unused fraction is above
   ``max_unused`` into new packs, verifying each, and writes their index:
   until step 3 every such chunk simply has two copies, which readers accept;
2. (exclusive lock, see :mod:`apollo_cas.gc`) re-reads the index, so the packs
   of saves that finished meanwhile are seen, and takes the chunks those saves
   need into the live set; a pack is deleted only if each of its live chunks
   has a copy in a pack that stays (so a chunk a concurrent save deduplicated
   against is never lost, promise 4);
3. writes one index naming every pack that stays, durably, then deletes the
   index objects it replaces, then the packs. A kill anywhere leaves either
   duplicate entries (harmless) or packs no index names (garbage for the next gc).

A pack no index names (an interrupted save or repack) is deleted once it is
older than the grace period, unless its trailer holds a live chunk that no
index names: then an index is written for it (a lost index is rebuilt from
the pack, never a reason to lose data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import layout, packs
from .backends.base import ObjectInfo
from .errors import ApolloError, ObjectNotFound
from .inventory import PackIndex, PackInventory
from .pack_objects import PackWriter, iter_pack_keys, read_trailer, write_index
from .parallel import bounded_map

#: Default of ``gc --max-unused``: a pack with more than this fraction of its
#: bytes unused is repacked (restic's prune defaults to 5% of the repository).
DEFAULT_MAX_UNUSED = 0.05

ProgressFn = Callable[[str, int, int], None]


@dataclass
class PackPlan:
    """What gc will do to the packs of a format-2 store."""

    delete: dict[str, int] = field(default_factory=dict)  # pack id -> size: nothing live
    repack: dict[str, int] = field(default_factory=dict)  # pack id -> size: mostly unused
    keep: set[str] = field(default_factory=set)
    #: chunk id -> (pack id, entry) of every live chunk to copy out of ``repack``
    copy: list[tuple[bytes, str, packs.PackEntry]] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)  # unindexed, old: delete
    reindex: list[packs.PackInfo] = field(default_factory=list)  # unindexed, holding live chunks
    pack_size: int = 0
    index_sizes: list[int] = field(default_factory=list)  # of every index object read
    keep_counts: list[int] = field(default_factory=list)  # entry counts of packs that stay
    young_orphans: int = 0
    live_chunks: int = 0
    chunks_dropped: int = 0  # dead chunk copies in deleted and repacked packs
    orphan_chunks: int = 0  # chunks in unindexed packs that go
    unused_bytes_left: int = 0  # unused bytes in packs that stay

    def _new_packs(self) -> list[tuple[int, int]]:
        """(size, entry count) of each pack the copy writes, as
        :class:`~apollo_cas.pack_objects.PackWriter` seals them."""
        out = []
        n = open_bytes = 0
        for _, _, e in self.copy:
            n += 1
            open_bytes += e.length
            if open_bytes >= self.pack_size:
                out.append((open_bytes + packs.trailer_size(n), n))
                n = open_bytes = 0
        return out + ([(open_bytes + packs.trailer_size(n), n)] if n else [])

    @property
    def new_pack_bytes(self) -> int:
        return sum(size for size, _ in self._new_packs())

    @property
    def index_bytes_freed(self) -> int:
        """Index bytes deleted minus the consolidated index written."""
        if not (self.delete or self.repack or self.orphans or len(self.index_sizes) > 1):
            return 0
        after = packs.index_size(
            [
                *self.keep_counts,
                *(n for _, n in self._new_packs()),
                *(len(i.entries) for i in self.reindex),
            ]
        )
        has_packs = bool(self.keep_counts or self.copy or self.reindex)
        return sum(self.index_sizes) - (after if has_packs else 0)

    @property
    def bytes_freed(self) -> int:
        return (
            sum(self.delete.values())
            + sum(self.orphans.values())
            + sum(self.repack.values())
            - self.new_pack_bytes
            + self.index_bytes_freed
        )

    def to_json(self) -> dict[str, object]:
        return {
            "packs_deleted": len(self.delete) + len(self.orphans),
            "packs_repacked": len(self.repack),
            "packs_reindexed": len(self.reindex),
            "chunks_repacked": len(self.copy),
            "pack_bytes_freed": self.bytes_freed,
            "unused_bytes_left": self.unused_bytes_left,
        }


def _old_enough(mtime: float, now: float, grace: float) -> bool:
    """Whether an unindexed object may be garbage: a save on another host may
    still be writing a young one (its index comes after its packs)."""
    return mtime < now - grace


def _assign(idx: PackIndex, live: set[bytes]) -> dict[str, int]:
    """Used bytes per pack when every live chunk is counted once, in the pack
    with the most live chunks (duplicates elsewhere count as unused)."""
    count = {pid: sum(1 for e in p.entries if e.chunk_id in live) for pid, p in idx.packs.items()}
    used = dict.fromkeys(idx.packs, 0)
    placed: set[bytes] = set()
    for pid in sorted(idx.packs, key=lambda p: (-count[p], p)):
        for e in idx.packs[pid].entries:
            if e.chunk_id in live and e.chunk_id not in placed:
                placed.add(e.chunk_id)
                used[pid] += e.length
    return used


def chunk_infos(
    inv: PackInventory, chunk_ids: set[bytes], workers: int
) -> dict[bytes, ObjectInfo | None]:
    """Size and age of each indexed chunk in ``chunk_ids``: its envelope's length and
    the modification time of the newest pack holding it (one stat per pack). The
    grace window for young unreferenced chunks (gc) reads a pack's age as its
    chunks' age, as format 1 reads a chunk object's."""
    idx = inv.index()
    holders: dict[str, list[packs.PackEntry]] = {}
    for pid, info in idx.packs.items():
        hit = [e for e in info.entries if e.chunk_id in chunk_ids]
        if hit:
            holders[pid] = hit

    def mtime(pid: str) -> float | None:
        try:
            return inv.backend.info(layout.pack_key(pid)).mtime
        except ObjectNotFound:  # deleted meanwhile
            return None

    pids = sorted(holders)
    out: dict[bytes, ObjectInfo | None] = {}
    for pid, t in zip(pids, bounded_map(mtime, pids, workers), strict=True):
        if t is None:
            continue
        for e in holders[pid]:
            prev = out.get(e.chunk_id)
            if prev is None or prev.mtime < t:
                out[e.chunk_id] = ObjectInfo(e.length, t)
    return out


def plan(
    inv: PackInventory,
    live: set[bytes],
    *,
    max_unused: float = DEFAULT_MAX_UNUSED,
    grace: float,
    now: float | None = None,
) -> tuple[PackPlan, PackIndex]:
    """Which packs to delete, repack and re-index, given the live chunks."""
    now = time.time() if now is None else now
    idx = PackIndex.load(inv.backend, inv.workers)
    out = PackPlan(pack_size=inv.pack_size, live_chunks=len(live & set(idx.chunks)))
    used = _assign(idx, live)
    copied: set[bytes] = set()
    for pid, info in sorted(idx.packs.items()):
        u = used[pid]
        # The trailer is part of what a pack needs: only dead envelopes are unused.
        unused = info.size - packs.trailer_size(len(info.entries)) - u
        if u == 0:
            out.delete[pid] = info.size
        elif unused / info.size > max_unused:
            out.repack[pid] = info.size
        else:
            out.keep.add(pid)
            out.keep_counts.append(len(info.entries))
            out.unused_bytes_left += unused
    out.index_sizes = [
        packs.index_size(len(idx.packs[p].entries) for p in pids) for pids in idx.indexes.values()
    ]
    out.chunks_dropped = sum(
        1
        for pid in (*out.delete, *out.repack)
        for e in idx.packs[pid].entries
        if e.chunk_id not in live
    )
    # Live chunks whose chosen copy is in a repacked pack (or whose only copies are).
    staying = {e.chunk_id for pid in out.keep for e in idx.packs[pid].entries}
    for pid in sorted(out.repack):
        for e in idx.packs[pid].entries:
            if e.chunk_id in live and e.chunk_id not in staying and e.chunk_id not in copied:
                copied.add(e.chunk_id)
                out.copy.append((e.chunk_id, pid, e))
    for pid, key in iter_pack_keys(inv.backend):
        if pid in idx.packs:
            continue
        try:
            st = inv.backend.info(key)
        except ObjectNotFound:
            continue
        if not _old_enough(st.mtime, now, grace):
            out.young_orphans += 1
            continue
        try:
            info = read_trailer(inv.backend, pid)
        except ApolloError:  # truncated or not a pack: nothing can be read from it
            out.orphans[pid] = st.size
            continue
        if any(e.chunk_id in live and e.chunk_id not in idx.chunks for e in info.entries):
            out.reindex.append(info)
        else:
            out.orphans[pid] = st.size
            out.orphan_chunks += len(info.entries)
    out.chunks_dropped += out.orphan_chunks
    return out, idx


def copy_live(
    inv: PackInventory, read: Callable[[bytes, bytes], object], p: PackPlan
) -> str | None:
    """Step 1: copy the live chunks of repacked packs into new packs; write their
    index. ``read(chunk id, envelope)`` decodes and verifies a chunk (a corrupt
    chunk stops gc: copying it would hide nothing, deleting it loses data)."""
    if not p.copy and not p.reindex:
        return None
    writer = PackWriter(inv.backend, inv.pack_size)
    try:
        for cid, pid, e in p.copy:
            blob = inv.backend.get_range(layout.pack_key(pid), e.offset, e.length)
            read(cid, blob)
            writer.append(cid, blob, e.raw_size, e.base)
        infos = writer.close()
    except BaseException:
        writer.abandon()
        raise
    inv.backend.sync()
    return write_index(inv.backend, infos + p.reindex)


@dataclass
class PackSweep:
    """What step 2-3 did."""

    packs_deleted: int = 0
    bytes_freed: int = 0
    chunks_dropped: int = 0
    kept_for_safety: int = 0  # planned packs kept: a save deduplicated against them
    rescued_chunks: int = 0  # chunks of planned packs that became live meanwhile
    #: The lease lapsed (gc was frozen): nothing more was deleted. Before the new
    #: index was written, ``left`` is empty and the whole sweep runs again; after,
    #: ``left`` holds the unindexed packs still to delete (see :func:`finish`).
    lapsed: bool = False
    left: dict[str, packs.PackInfo | None] = field(default_factory=dict)


def _no_lapse() -> bool:
    return True


def sweep(
    inv: PackInventory,
    p: PackPlan,
    live: set[bytes],
    workers: int,
    written: str | None = None,
    *,
    held: Callable[[], bool] = _no_lapse,
    batch: int = 512,
    step: ProgressFn | None = None,
) -> PackSweep:
    """Steps 2-3, under the exclusive lock: ``live`` includes every chunk that
    a manifest present now needs; ``written`` is the index step 1 wrote (not
    counted as freed when it is replaced). ``held()`` says whether gc's lease
    is still held (a clock check): it is asked before the index is replaced and
    before each ``batch`` of pack deletes, and a lapse stops the sweep there
    (``lapsed``): a save may have deduplicated against what we planned to drop,
    so gc must re-list the manifests before it deletes more (as in format 1)."""
    idx = PackIndex.load(inv.backend, inv.workers)
    doomed = {pid for pid in (*p.delete, *p.repack) if pid in idx.packs}
    staying = {
        e.chunk_id for pid, info in idx.packs.items() if pid not in doomed for e in info.entries
    }
    res = PackSweep()
    res.rescued_chunks = len(
        {e.chunk_id for pid in doomed for e in idx.packs[pid].entries if e.chunk_id in live}
        - {cid for cid, _, _ in p.copy}
    )
    for pid in sorted(doomed):
        if any(e.chunk_id in live and e.chunk_id not in staying for e in idx.packs[pid].entries):
            doomed.discard(pid)  # a chunk only it holds became live: keep it
            res.kept_for_safety += 1
            staying |= {e.chunk_id for e in idx.packs[pid].entries}
    remaining = [info for pid, info in sorted(idx.packs.items()) if pid not in doomed]
    if doomed or p.orphans or len(idx.indexes) > 1:
        if not held():
            res.lapsed = True
            res.rescued_chunks = res.kept_for_safety = 0
            return res
        new_id = write_index(inv.backend, remaining) if remaining else None
        old = [iid for iid in idx.indexes if iid != new_id]
        if remaining and (new_id not in idx.indexes or new_id == written):
            res.bytes_freed -= packs.index_size(len(i.entries) for i in remaining)
        res.bytes_freed += sum(
            packs.index_size(len(idx.packs[q].entries) for q in idx.indexes[i])
            for i in old
            if i != written
        )
        for _ in bounded_map(inv.backend.delete, [layout.index_key(i) for i in old], workers):
            pass
        inv.backend.sync()
    victims: dict[str, packs.PackInfo | None] = {pid: idx.packs[pid] for pid in doomed}
    victims.update({pid: None for pid in p.orphans if pid not in idx.packs})
    sizes = {pid: idx.packs[pid].size for pid in doomed}
    sizes.update({pid: n for pid, n in p.orphans.items() if pid not in idx.packs})
    res.chunks_dropped = (
        sum(1 for pid in doomed for e in idx.packs[pid].entries if e.chunk_id not in live)
        + p.orphan_chunks
    )
    _delete_packs(inv, victims, sizes, res, workers, held, batch, step)
    return res


def finish(
    inv: PackInventory,
    left: dict[str, packs.PackInfo | None],
    live: set[bytes],
    workers: int,
    *,
    held: Callable[[], bool] = _no_lapse,
    batch: int = 512,
    step: ProgressFn | None = None,
) -> PackSweep:
    """The rest of a sweep whose lease lapsed after it replaced the index, under a
    new lease, with ``live`` re-listed: an unindexed pack that holds a live chunk
    no index names is indexed again (never a reason to lose data); the others go."""
    idx = PackIndex.load(inv.backend, inv.workers)
    res = PackSweep()
    victims: dict[str, packs.PackInfo | None] = {}
    sizes: dict[str, int] = {}
    rescue: list[packs.PackInfo] = []
    for pid, known in sorted(left.items()):
        if pid in idx.packs:
            # A save wrote the same pack again meanwhile (pack ids are content
            # hashes) and indexed it: it is that save's now.
            continue
        try:
            info = known or read_trailer(inv.backend, pid)
        except ObjectNotFound:
            continue  # already gone
        except ApolloError:  # not a readable pack: nothing can be read from it
            info = None
        if info is not None and any(
            e.chunk_id in live and e.chunk_id not in idx.chunks for e in info.entries
        ):
            rescue.append(info)
            continue
        victims[pid] = info
        sizes[pid] = info.size if info is not None else _size(inv, pid)
    if rescue:
        if not held():
            return PackSweep(lapsed=True, left=dict(left))
        write_index(inv.backend, rescue)
        inv.backend.sync()
        res.kept_for_safety = len(rescue)
        res.rescued_chunks = sum(
            1
            for i in rescue
            for e in i.entries
            if e.chunk_id in live and e.chunk_id not in idx.chunks
        )
    _delete_packs(inv, victims, sizes, res, workers, held, batch, step)
    return res


def _size(inv: PackInventory, pid: str) -> int:
    try:
        return inv.backend.info(layout.pack_key(pid)).size
    except ApolloError:
        return 0


def _delete_packs(
    inv: PackInventory,
    victims: dict[str, packs.PackInfo | None],
    sizes: dict[str, int],
    res: PackSweep,
    workers: int,
    held: Callable[[], bool],
    batch: int,
    step: ProgressFn | None,
) -> None:
    """Delete ``victims`` a batch at a time while ``held()``; a lapse leaves the rest in ``res.left``."""
    order = sorted(victims)
    done = 0
    while order:
        if not held():
            res.lapsed = True
            res.left = {pid: victims[pid] for pid in order}
            break
        part, order = order[:batch], order[batch:]
        for _ in bounded_map(inv.backend.delete, [layout.pack_key(q) for q in part], workers):
            pass
        done += len(part)
        res.packs_deleted += len(part)
        res.bytes_freed += sum(sizes.get(q, 0) for q in part)
        if step is not None:
            step("sweep", done, len(victims))
    inv.backend.sync()
    inv.refresh(reread=True)
