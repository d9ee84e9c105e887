"""The save orchestration behind ``Store.save``: locks, parent, delta bases, fencing, commit.

:func:`save` runs one save under the store's shared lock: it finds the series'
parent, offers its blocks as delta bases (:func:`~apollo_cas.delta_bases.base_finder`), lets the save
path write the new chunks (:mod:`apollo_cas.pipeline` does the blocks, hashes
and codecs), builds the manifest with every delta edge it needs
(:func:`bases_closure`), proves its lease was held without a gap
(:func:`fence`) and commits through the repository. It reaches the store only
through :class:`SavingStore`, so this module does not import the facade.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import layout, unborn
from .backends import Backend
from .chunkstore import ChunkStore
from .codecs import chain
from .delta_bases import BaseFinder, base_finder
from .errors import ConcurrentUpdate, CorruptChunk, Refused, UsageError
from .filesets import same_files
from .inventory import ChunkInventory
from .locks import Lease, Locks
from .manifest import (
    DEFAULT_BLOCK_SIZE,
    Manifest,
    SavedFilesRef,
    SaveStats,
    SourceInfo,
)
from .parallel import worker_limit
from .pipeline import ProgressFn, WriteResult, same_content, write_source
from .repository import Repository
from .sources import open_mapping
from .sources.base import Source
from .sources.previous import ChecksPrevious

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 256 << 20


@dataclass(frozen=True)
class SaveResult:
    """What a save did."""

    checkpoint_id: str | None  # the new checkpoint, or the unchanged latest
    parent: str | None
    series: str
    unchanged: bool  # nothing changed: no checkpoint was added
    manifest: Manifest | None  # the new checkpoint's (or the unchanged latest's) manifest
    stats: SaveStats  # what this save did (new chunks are 0 when unchanged)
    seconds: float
    fetched_bytes: int = 0
    #: CPU seconds of this process during the save (all threads), beside ``seconds``
    cpu_seconds: float = 0.0
    #: Wall seconds of each phase, in order: ``open`` (locks, parent, checks), the
    #: steps of writing the new chunks (``ids``, ``gpu_delta``, ``encode``: see
    #: ``pipeline.WriteResult.phases``), ``flush`` (packs and index durable),
    #: ``commit`` (manifest and ref), so a benchmark can say where a save's time goes.
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        st = self.stats
        return {
            "checkpoint": self.checkpoint_id,
            "parent": self.parent,
            "series": self.series,
            "unchanged": self.unchanged,
            "seconds": round(self.seconds, 4),
            "cpu_seconds": round(self.cpu_seconds, 4),
            "logical_bytes": st.logical_bytes,
            "chunks": st.chunks,
            "new_chunks": st.new_chunks,
            "new_raw_bytes": st.new_raw_bytes,
            "new_stored_bytes": st.new_stored_bytes,
            "device_to_host_bytes": self.fetched_bytes,
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
        }


class _Phases:
    """Wall seconds between marks, each named for the phase it ends."""

    def __init__(self, t0: float) -> None:
        self.last = t0
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now
        return self.seconds

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Mark ``name``, recorded as the phases ``parts`` it was made of, if any."""
        total = self.mark(name).pop(name)
        self.seconds.update(parts or {name: total})


def check_block_size(block_size: int) -> int:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 256:
        raise UsageError(
            f"block size {block_size} out of range",
            f"use a multiple of 256 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} (default 1 MiB)",
        )
    return block_size


class SavingStore(Protocol):
    """What a save uses of the :class:`~apollo_cas.store.Store` facade."""

    backend: Backend
    locks: Locks
    repo: Repository
    chunks: ChunkStore
    workers: int
    #: The format and pack size a store created by this save gets (``Store.open``'s).
    new_format: int | None
    new_pack_size: int | None
    #: "auto", "always" or "never": see ``Store.device_delta``.
    device_delta: str
    device_delta_batch_bytes: int | None
    device_delta_parent_batch_bytes: int | None
    device_delta_timing: bool
    device_delta_kernels: bool
    device_delta_switch_interval: float | None
    device_delta_read_threads: int | None
    last_device_delta: Any

    @property
    def inventory(self) -> ChunkInventory: ...

    def latest(self, series: str = ...) -> str | None: ...

    def manifest(self, checkpoint_id: str) -> Manifest: ...

    def check_tag(self, name: str, series: str = ...) -> None: ...

    def tag(self, ref: str, name: str, *, force: bool = ..., series: str = ...) -> str: ...

    def restore_pipeline(self, block_size: int, device: str | Any = ..., **options: Any) -> Any: ...


def tag_taken(name: str, current: str) -> Refused:
    """The refusal of a save whose ``--tag`` names another checkpoint."""
    return Refused(
        f"tag {name!r} already names {current[:12]}; nothing was saved",
        "pick another --tag name, or move the tag first with 'apollo-cas tag --force'",
    )


def save(
    store: SavingStore,
    source: Source | Mapping[str, Any],
    *,
    series: str = layout.DEFAULT_SERIES,
    tag: str | None = None,
    block_size: int | None = None,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
    created: float | None = None,
    progress: ProgressFn | None = None,
    check: Callable[[Manifest | None, Source], None] | None = None,
    group: str | None = None,
) -> SaveResult:
    """Checkpoint ``source`` (a Source, or a mapping of tensors / arrays).

    Only blocks the store lacks are compressed and written. If nothing changed
    since the series' latest checkpoint, no checkpoint is added unless
    ``force``. ``check(parent_manifest, source)`` may refuse the save before
    anything is written; a source that checks itself against the previous
    checkpoint (a handles file: stale handles) is always checked, unless
    ``force``. A source with a rank and a world size above 1 saves into the
    series ``<series>.rank<r>``; ``group`` joins its checkpoint to the
    multi-rank checkpoint of that name. Without ``block_size`` a save uses its
    series' latest checkpoint's block size (1 MiB for a series' first save), so
    deltas and dedup carry on. A store this save creates gets ``Store.open``'s
    ``format`` and ``pack_size`` (``store.new_format``, ``store.new_pack_size``).
    """
    new_format, new_pack_size = store.new_format, store.new_pack_size
    t0, cpu0 = time.perf_counter(), time.process_time()
    phases = _Phases(t0)
    layout.check_name(series, "series")
    for name in (tag, group):
        if name is not None:
            layout.check_name(name, "tag" if name is tag else "group")
    if block_size is not None:
        check_block_size(block_size)
    if not isinstance(source, Source):
        source = open_mapping(source, SourceInfo(kind="mapping"))
    info = source.info
    if metadata:
        info = replace(info, metadata={**info.metadata, **dict(metadata)})
    series = series_for(series, info, group)
    with (
        unborn.first_save(store.backend, store.locks) as first,
        store.locks.hold("shared", f"save {series}") as lease,
        worker_limit(store.workers),
    ):
        if not first:  # a store of another format is refused
            store.repo.open_config(False, new_format, new_pack_size)
        else:  # chunks go into the layout the config will name at the first commit
            store.repo.plan_config(new_format, new_pack_size)
        # Only what is known *now*, under the lock, may be trusted: gc may have
        # swept chunks this process saw in an earlier save.
        store.chunks.forget_known()
        parent_id = store.latest(series)
        parent = store.manifest(parent_id) if parent_id else None
        if isinstance(source, ChecksPrevious):  # always: the source's own guarantee
            source.check_previous(parent, force=force)
        if check is not None:
            check(parent, source)
        if tag is not None:  # before anything is written: a tag never moves silently
            store.check_tag(tag, series)
        if block_size is None:
            block_size = parent.block_size if parent is not None else DEFAULT_BLOCK_SIZE
        if parent is not None and parent.block_size == block_size:
            store.chunks.known.update(parent.chunk_ids())
        base_for = base_finder(store, source, parent, block_size)
        phases.mark("open")
        try:
            res = write_source(
                store.chunks,
                source,
                block_size,
                store.workers,
                base_for,
                progress,
                device_delta_hook(store, source, base_for, block_size),
            )
            phases.split("write", res.phases)
            saved_files = put_saved_files(store, source)
            # Every new chunk durable and findable (format 2: packs, then
            # their index) before the manifest that names them.
            store.chunks.flush()
        except BaseException:
            store.chunks.discard()
            raise
        source.check_unchanged()  # bytes read from a file rewritten meanwhile are torn
        phases.mark("flush")
        elapsed = time.perf_counter() - t0
        if same_content(res.tensors, parent) and same_files(saved_files, parent) and not force:
            cid, manifest, unchanged = parent_id, parent, True
        else:
            manifest = Manifest(
                series=series,
                created=created if created is not None else (source.created or time.time()),
                block_size=block_size,
                tensors=res.tensors,
                source=info,
                parent=parent_id,
                stats=replace(res.stats, seconds=round(elapsed, 6)),
                bases=bases_closure(store, res, parent),
                saved_files=saved_files,
            )
            taken = store.repo.read_ref(layout.tag_key(tag)) if tag is not None else None
            if tag is not None and taken is not None:
                # It names the parent (check_tag), and this save adds a checkpoint.
                raise tag_taken(tag, taken)
            if first:  # the store is born with its first commit, and only if it can
                manifest.encode_checked(f"save of {info.location or info.kind}")
                store.repo.open_config(True, new_format, new_pack_size)
            # A time the source recorded (an import) may be older than latest;
            # the clock's "now" never counts as older (hosts' clocks differ).
            dated = created is not None or source.created is not None
            fence(store, lease, manifest)
            cid, manifest, unchanged = store.repo.commit(manifest, parent_id, force, dated)
            if not unchanged and lease.lapsed():
                fence(store, lease, manifest, committed=cid)
        # Still under the shared lock: once released, a concurrent save may
        # move latest past cid and gc could forget it before it is named.
        if tag and cid:
            try:
                store.tag(cid, tag, series=series)
            except UsageError as exc:  # another process took the name meanwhile
                raise UsageError(
                    f"checkpoint {cid[:12]} was saved, but {exc.message} (set by another "
                    "process during this save)",
                    f"name it with 'apollo-cas tag {cid[:12]} OTHER_NAME'",
                ) from None
        if group and cid:
            store.repo.join_group(group, series, info, cid)
    stats = res.stats if unchanged else manifest.stats if manifest else res.stats
    return SaveResult(
        cid,
        manifest.parent if manifest else None,
        series,
        unchanged,
        manifest,
        stats,
        time.perf_counter() - t0,
        res.fetched_bytes,
        time.process_time() - cpu0,
        phases.mark("commit"),
    )


def put_saved_files(store: SavingStore, source: Source) -> SavedFilesRef | None:
    """Store the record of the files ``source`` was read from (exact restores)."""
    record = source.saved_files()
    if record is None:
        return None
    data = record.encode()
    return SavedFilesRef(record.kind, store.chunks.put_block(data).chunk_id, len(data))


def series_for(series: str, info: SourceInfo, group: str | None) -> str:
    """Ranks of a tensor-parallel model save into one series each."""
    if info.rank is not None and (info.world_size or 1) > 1:
        if not 0 <= info.rank < (info.world_size or 1):
            raise UsageError(f"rank {info.rank} outside world size {info.world_size}")
        return layout.rank_series(series, info.rank)
    if group is not None:
        raise UsageError(
            "--group needs --rank and --world-size",
            "a group joins the checkpoints of several ranks",
        )
    return series


def device_delta_hook(
    store: SavingStore,
    source: Source,
    base_for: BaseFinder | None,
    block_size: int,
) -> Any:
    """The GPU delta hook for a device source with a parent, else None (CPU path)."""
    store.last_device_delta = None
    device = sys.modules.get("apollo_cas.sources.device")  # loaded by any device source
    if (
        base_for is None
        or store.device_delta == "never"
        or device is None
        or not isinstance(source, device.DeviceSource)
    ):
        return None
    from .gpu.accounting import checked_batch_bytes
    from .gpu.delta_hook import make_hook

    batch = checked_batch_bytes(store.device_delta_batch_bytes, "Store.device_delta_batch_bytes")
    parent_batch = checked_batch_bytes(
        store.device_delta_parent_batch_bytes, "Store.device_delta_parent_batch_bytes"
    )
    for name, what in (
        ("device_delta_timing", "True times the GPU delta path's steps with CUDA events"),
        ("device_delta_kernels", "False runs the GPU delta path's steps as torch operations"),
    ):
        value = getattr(store, name)
        if not isinstance(value, bool):
            raise UsageError(f"Store.{name} must be True or False, got {value!r}", what)
    switch = store.device_delta_switch_interval
    if switch is not None and (
        isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch <= 1
    ):
        raise UsageError(
            f"Store.device_delta_switch_interval must be None or seconds in (0, 1], got {switch!r}",
            "None leaves Python's switch interval as it is; 0.001 hands the GIL over every ms",
        )

    threads = store.device_delta_read_threads
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise UsageError(
            f"Store.device_delta_read_threads must be None or a positive int, got {threads!r}",
            "None keeps the restore pipeline's default (at most 8 threads on a GPU)",
        )

    def keep(stats: Any) -> None:
        store.last_device_delta = stats

    return make_hook(
        store,
        source,
        base_for,
        block_size,
        store.device_delta,
        batch_bytes=batch,
        parent_batch_bytes=parent_batch,
        on_stats=keep,
        switch=None if switch is None else float(switch),
    )


def bases_closure(
    store: SavingStore, res: WriteResult, parent: Manifest | None
) -> dict[bytes, bytes]:
    """Every (chunk -> base) edge this checkpoint needs, for gc and verify."""
    known = dict(parent.bases) if parent else {}
    known.update(res.bases)
    parent_ids = parent.chunk_ids() if parent else set()

    def base_of(cid: bytes) -> bytes | None:
        if cid in known:
            return known[cid]
        if cid in parent_ids or cid in res.bases:
            return None
        return store.chunks.base_of(cid)  # a dedup hit outside the parent: read its header

    out: dict[bytes, bytes] = {}
    done: set[bytes] = set()
    for cid in dict.fromkeys(c for t in res.tensors for c in t.chunks):
        if cid in done:
            continue
        try:
            links = chain.walk(cid, base_of)
        except chain.ChainError:
            # The parent's manifest says these bases loop: believe the chunks'
            # own headers, which a restore follows; if they loop too, the
            # chunk cannot be restored and no manifest may name it.
            try:
                links = chain.walk(cid, store.chunks.base_of)
            except chain.ChainError as exc:
                raise CorruptChunk(
                    f"chunk {cid.hex()} cannot be restored: {exc}",
                    "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
                ) from None
        out.update(itertools.pairwise(links))
        done.update(links)
    return out


def fence(
    store: SavingStore, lease: Lease, manifest: Manifest, committed: str | None = None
) -> None:
    """Commit only on a lease held without a gap (fencing; docs/CONCURRENCY.md).

    A save frozen past its lock's TTL (SIGSTOP, a suspended VM, swapping)
    may have lost its lock to a gc that then swept chunks this save had
    found present. Then take the lock again and prove that every chunk the
    manifest names (delta bases included) still exists; if not, fail with
    nothing committed (a ``committed`` checkpoint, whose lease lapsed while
    its ref moved, is withdrawn if its ref still names it).
    """
    if committed is None and lease.confirm():
        return
    lease.reacquire()
    store.chunks.forget_known()
    store.inventory.refresh()  # what the store holds now, not what this process saw
    missing = len(manifest.chunk_ids() - store.inventory.ids())
    if not missing:
        return
    if committed is not None:
        key = layout.series_key(manifest.series)
        old = manifest.parent.encode() if manifest.parent else None
        if store.backend.compare_and_swap(key, committed.encode(), old):
            store.backend.delete(layout.manifest_key(committed))
    raise ConcurrentUpdate(
        f"save to series {manifest.series!r} was stalled past its lock's lease and "
        f"{missing} of its chunks were removed meanwhile by gc; nothing was committed",
        "run the save again",
    )
