"""The store: the public facade over a repository, the save path and the restore targets.

:class:`~apollo_cas.repository.Repository` owns what a store is (config,
refs, manifests, the chunk inventory, the commit); :class:`Store` adds the
verbs users call (save, restore, load, tag) with their locks. Sources, targets,
gc, verify and the CLI go through it.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import codecs, layout, unborn
from .backends import Backend, open_backend
from .codecs import chain
from .decoding import ChunkReader, Decoder
from .errors import (
    ConcurrentUpdate,
    CorruptChunk,
    RefNotFound,
    Refused,
    UsageError,
)
from .filesets import same_files
from .inventory import ChunkInventory
from .locks import Lease, Locks
from .manifest import (
    DEFAULT_BLOCK_SIZE,
    GroupRecord,
    Manifest,
    SavedFilesRef,
    SaveStats,
    SourceInfo,
    StoreConfig,
    TensorEntry,
)
from .parallel import default_workers, worker_limit
from .pipeline import ProgressFn, WriteResult, same_content, write_source
from .repository import Checkpoint, Repository
from .sources import open_mapping
from .sources.base import Source

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
        }


@dataclass(frozen=True)
class RestoreResult:
    """What a restore wrote, and whether it is the saved files byte for byte."""

    checkpoint_id: str
    paths: list[str]
    format: str  # safetensors or flat
    exact: bool  # the files as saved: same names, same bytes
    reason: str | None = None  # why not exact, when not

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "exact": self.exact, "not_exact_because": self.reason}


def check_block_size(block_size: int) -> int:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 256:
        raise UsageError(
            f"block size {block_size} out of range",
            f"use a multiple of 256 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} (default 1 MiB)",
        )
    return block_size


class Store:
    """A content-addressed checkpoint store at a directory or ``s3://`` URL.

    ``workers`` bounds the threads of every pool a save starts (hashing, codecs,
    device fetch) and of restores; default: all cores (``APOLLO_CAS_THREADS``).
    """

    def __init__(
        self,
        backend: Backend,
        policy: codecs.CodecPolicy | None = None,
        workers: int | None = None,
    ) -> None:
        self.backend = backend
        self.workers = workers or default_workers()
        self.repo = Repository(backend, policy or codecs.CodecPolicy(), self.workers)
        self.chunks = self.repo.chunks
        #: What restores read chunks through (a seam: tests wrap it to inject failures).
        self.reader: ChunkReader = self.chunks
        self.locks = Locks(backend)
        # The format and pack size a store created by this object gets.
        self._format: int | None = None
        self._pack_size: int | None = None
        #: Dense-step saves of device tensors with a parent: "auto" decodes the parent's
        #: blocks and computes the XOR deltas on the GPU when the tensors are on CUDA
        #: (apollo_cas/gpu/delta_save.py), "always" also runs those steps on CPU
        #: tensors (tests), "never" keeps the CPU delta path.
        self.device_delta = "auto"
        #: What the last save's GPU delta path did (a DeltaSaveStats), None if unused.
        self.last_device_delta: Any = None

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        create: bool = False,
        policy: codecs.CodecPolicy | None = None,
        workers: int | None = None,
        format: int | None = None,
        pack_size: int | None = None,
    ) -> Store:
        """Open the store at ``location``. With ``create``, a missing store is
        created (in ``format``, default 2: packs); otherwise it must exist (a
        typo must not silently make a new one). An existing store keeps its format."""
        store = cls(open_backend(os.fspath(location)), policy, workers)
        store._format = format
        store._pack_size = pack_size
        store._check_config(create)
        return store

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def inventory(self) -> ChunkInventory:
        """The chunks present, in this store's format (gc, verify and stats use it)."""
        return self.repo.inventory

    def _check_config(self, create: bool) -> StoreConfig | None:
        return self.repo.open_config(create, self._format, self._pack_size)

    @property
    def format(self) -> int:
        """The store format (1: a chunk per object, 2: packs; docs/FORMAT.md)."""
        return self.repo.format

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- refs and manifests (the repository's) --------------------------------
    def latest(self, series: str = layout.DEFAULT_SERIES) -> str | None:
        """The id of the newest checkpoint of ``series``, or None."""
        return self.repo.latest(series)

    def series(self) -> dict[str, str]:
        return self.repo.series()

    def tags(self) -> dict[str, str]:
        return self.repo.tags()

    def tag(
        self, ref: str, name: str, *, force: bool = False, series: str = layout.DEFAULT_SERIES
    ) -> str:
        """Point tag ``name`` at ``ref``. An existing tag moves only with ``force``."""
        layout.tag_key(name)
        # A shared lock, like a save: gc and forget delete manifests only under
        # the exclusive lock, so the checkpoint resolved here still exists when
        # the tag is written (no dangling tag).
        with self.locks.hold("shared", f"tag {name}"):
            return self.repo.tag(ref, name, force=force, series=series)

    def check_tag(self, name: str, series: str = layout.DEFAULT_SERIES) -> None:
        """Refuse ``save --tag name`` before anything is written if the tag names
        a checkpoint other than the series' latest (a save that changes nothing
        keeps it there; one that adds a checkpoint is refused before it commits).
        Moving a tag takes ``apollo-cas tag --force``, as it always did."""
        current = self.repo.read_ref(layout.tag_key(name))
        if current is not None and current != self.latest(series):
            raise self._tag_taken(name, current)

    @staticmethod
    def _tag_taken(name: str, current: str) -> Refused:
        return Refused(
            f"tag {name!r} already names {current[:12]}; nothing was saved",
            "pick another --tag name, or move the tag first with 'apollo-cas tag --force'",
        )

    def untag(self, name: str) -> None:
        """Delete a tag (the checkpoint stays until gc's retention drops it)."""
        self.repo.untag(name)

    def checkpoint_ids(self) -> list[str]:
        return self.repo.checkpoint_ids()

    def manifest(self, checkpoint_id: str) -> Manifest:
        """Load and check one manifest (its bytes must hash to its id)."""
        return self.repo.manifest(checkpoint_id)

    def resolve(self, ref: str | None, series: str = layout.DEFAULT_SERIES) -> str:
        """Turn ``latest``, a tag, or a unique id prefix into a checkpoint id."""
        return self.repo.resolve(ref, series)

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first, with the refs naming it."""
        return self.repo.checkpoints()

    def groups(self) -> list[GroupRecord]:
        """Every multi-rank checkpoint, oldest first."""
        return self.repo.groups()

    def group(self, name: str, series: str = layout.DEFAULT_SERIES) -> GroupRecord:
        return self.repo.group(name, series)

    # -- save ----------------------------------------------------------------
    def save(
        self,
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
        ``force``. ``check(parent_manifest, source)`` may refuse the save (stale
        handles) before anything is written. A source with a rank and a world
        size above 1 saves into the series ``<series>.rank<r>``; ``group`` joins
        its checkpoint to the multi-rank checkpoint of that name. Without
        ``block_size`` a save uses its series' latest checkpoint's block size
        (1 MiB for a series' first save), so deltas and dedup carry on.
        """
        t0, cpu0 = time.perf_counter(), time.process_time()
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
        series = self._series_for(series, info, group)
        with (
            unborn.first_save(self.backend, self.locks) as first,
            self.locks.hold("shared", f"save {series}") as lease,
            worker_limit(self.workers),
        ):
            if not first:
                self._check_config(create=False)  # a store of another format is refused
            else:  # chunks go into the layout the config will name at the first commit
                self.repo.plan_config(self._format, self._pack_size)
            # Only what is known *now*, under the lock, may be trusted: gc may have
            # swept chunks this process saw in an earlier save.
            self.chunks.forget_known()
            parent_id = self.latest(series)
            parent = self.manifest(parent_id) if parent_id else None
            if check is not None:
                check(parent, source)
            if tag is not None:  # before anything is written: a tag never moves silently
                self.check_tag(tag, series)
            if block_size is None:
                block_size = parent.block_size if parent is not None else DEFAULT_BLOCK_SIZE
            if parent is not None and parent.block_size == block_size:
                self.chunks.known.update(parent.chunk_ids())
            base_for = self._base_finder(source, parent, block_size)
            try:
                res = write_source(
                    self.chunks,
                    source,
                    block_size,
                    self.workers,
                    base_for,
                    progress,
                    self._device_delta(source, base_for, block_size),
                )
                saved_files = self._put_saved_files(source)
                # Every new chunk durable and findable (format 2: packs, then
                # their index) before the manifest that names them.
                self.chunks.flush()
            except BaseException:
                self.chunks.discard()
                raise
            source.check_unchanged()  # bytes read from a file rewritten meanwhile are torn
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
                    bases=self._bases_closure(res, parent),
                    saved_files=saved_files,
                )
                taken = self.repo.read_ref(layout.tag_key(tag)) if tag is not None else None
                if tag is not None and taken is not None:
                    # It names the parent (check_tag), and this save adds a checkpoint.
                    raise self._tag_taken(tag, taken)
                if first:  # the store is born with its first commit, and only if it can
                    manifest.encode_checked(f"save of {info.location or info.kind}")
                    self._check_config(create=True)
                # A time the source recorded (an import) may be older than latest;
                # the clock's "now" never counts as older (hosts' clocks differ).
                dated = created is not None or source.created is not None
                self._fence(lease, manifest)
                cid, manifest, unchanged = self.repo.commit(manifest, parent_id, force, dated)
                if not unchanged and lease.lapsed():
                    self._fence(lease, manifest, committed=cid)
            # Still under the shared lock: once released, a concurrent save may
            # move latest past cid and gc could forget it before it is named.
            if tag and cid:
                try:
                    self.tag(cid, tag, series=series)
                except UsageError as exc:  # another process took the name meanwhile
                    raise UsageError(
                        f"checkpoint {cid[:12]} was saved, but {exc.message} (set by another "
                        "process during this save)",
                        f"name it with 'apollo-cas tag {cid[:12]} OTHER_NAME'",
                    ) from None
            if group and cid:
                self.repo.join_group(group, series, info, cid)
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
        )

    def _put_saved_files(self, source: Source) -> SavedFilesRef | None:
        """Store the record of the files ``source`` was read from (exact restores)."""
        record = source.saved_files()
        if record is None:
            return None
        data = record.encode()
        return SavedFilesRef(record.kind, self.chunks.put_block(data).chunk_id, len(data))

    @staticmethod
    def _series_for(series: str, info: SourceInfo, group: str | None) -> str:
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

    def _base_finder(
        self, source: Source, parent: Manifest | None, block_size: int
    ) -> Callable[[int, int], codecs.Base | None] | None:
        """Delta bases: the parent's block at the same place of the same tensor."""
        policy = self.chunks.policy
        if (
            parent is None
            or not policy.delta
            or policy.max_delta_depth == 0
            or parent.block_size != block_size
        ):
            return None
        by_name = {t.name: t for t in parent.tensors}
        tensors = source.tensors()
        matches: list[TensorEntry | None] = []
        for t in tensors:
            p = by_name.get(t.name)
            ok = p is not None and p.dtype == t.dtype.name and p.shape == tuple(t.shape)
            matches.append(p if ok else None)
        bases = parent.bases

        def find(ti: int, bi: int) -> codecs.Base | None:
            p = matches[ti]
            if p is None:
                return None
            cid = p.chunks[bi]
            try:
                links = chain.walk(cid, bases.get)
            except chain.ChainError:
                # The parent's bases loop (or run on past the format's bound): a
                # delta against it could not be restored; store the block in full.
                return None
            root, d = links[-1], len(links) - 1
            # When the parent's chain is at the depth limit the codec deltas
            # against the chain's full root instead of storing a full chunk.
            root_base = (
                codecs.Base(chunk_id=root, raw=lambda: self.chunks.read(root), depth=0)
                if d
                else None
            )
            return codecs.Base(
                chunk_id=cid, raw=lambda: self.chunks.read(cid), depth=d, root=root_base
            )

        return find

    def _device_delta(
        self,
        source: Source,
        base_for: Callable[[int, int], codecs.Base | None] | None,
        block_size: int,
    ) -> Any:
        """The GPU delta hook for a device source with a parent, else None (CPU path)."""
        self.last_device_delta = None
        device = sys.modules.get("apollo_cas.sources.device")  # loaded by any device source
        if (
            base_for is None
            or self.device_delta == "never"
            or device is None
            or not isinstance(source, device.DeviceSource)
        ):
            return None
        from .gpu.delta_save import make_hook

        def keep(stats: Any) -> None:
            self.last_device_delta = stats

        return make_hook(self, source, base_for, block_size, self.device_delta, on_stats=keep)

    def _bases_closure(self, res: WriteResult, parent: Manifest | None) -> dict[bytes, bytes]:
        """Every (chunk -> base) edge this checkpoint needs, for gc and verify."""
        known = dict(parent.bases) if parent else {}
        known.update(res.bases)
        parent_ids = parent.chunk_ids() if parent else set()

        def base_of(cid: bytes) -> bytes | None:
            if cid in known:
                return known[cid]
            if cid in parent_ids or cid in res.bases:
                return None
            return self.chunks.base_of(cid)  # a dedup hit outside the parent: read its header

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
                    links = chain.walk(cid, self.chunks.base_of)
                except chain.ChainError as exc:
                    raise CorruptChunk(
                        f"chunk {cid.hex()} cannot be restored: {exc}",
                        "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
                    ) from None
            out.update(itertools.pairwise(links))
            done.update(links)
        return out

    def _fence(self, lease: Lease, manifest: Manifest, committed: str | None = None) -> None:
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
        self.chunks.forget_known()
        self.inventory.refresh()  # what the store holds now, not what this process saw
        missing = len(manifest.chunk_ids() - self.inventory.ids())
        if not missing:
            return
        if committed is not None:
            key = layout.series_key(manifest.series)
            old = manifest.parent.encode() if manifest.parent else None
            if self.backend.compare_and_swap(key, committed.encode(), old):
                self.backend.delete(layout.manifest_key(committed))
        raise ConcurrentUpdate(
            f"save to series {manifest.series!r} was stalled past its lock's lease and "
            f"{missing} of its chunks were removed meanwhile by gc; nothing was committed",
            "run the save again",
        )

    # -- reading -------------------------------------------------------------
    def read_chunk(self, chunk_id: bytes, size: int | None = None) -> bytes:
        """Verified raw bytes of one chunk (of decoded length ``size``, if given)."""
        return self.chunks.read(chunk_id, size)

    def restore(
        self,
        ref: str | None,
        to: str | os.PathLike[str],
        *,
        format: str | None = None,
        series: str = layout.DEFAULT_SERIES,
        max_shard_size: int | None = None,
        safetensors_layout: str = "auto",
        exact: bool | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """Write checkpoint ``ref`` into directory ``to``; returns the paths written.
        See :meth:`restore_files` for the options."""
        return self.restore_files(
            ref,
            to,
            format=format,
            series=series,
            max_shard_size=max_shard_size,
            safetensors_layout=safetensors_layout,
            exact=exact,
            progress=progress,
        ).paths

    def restore_files(
        self,
        ref: str | None,
        to: str | os.PathLike[str],
        *,
        format: str | None = None,
        series: str = layout.DEFAULT_SERIES,
        max_shard_size: int | None = None,
        safetensors_layout: str = "auto",
        exact: bool | None = None,
        progress: ProgressFn | None = None,
    ) -> RestoreResult:
        """Write checkpoint ``ref`` into directory ``to`` as ``flat`` or ``safetensors``.

        A checkpoint saved from files comes back as those files, byte for byte and
        under their names (``exact``), unless ``format``, ``safetensors_layout``
        (other than auto) or ``max_shard_size`` ask for another form or ``exact``
        is False; ``exact=True`` that cannot be honoured is a UsageError. Other
        checkpoints are rewritten (``format`` defaults to safetensors). Outputs
        appear only when complete.
        """
        from pathlib import Path

        from .targets.exact import choose_form, restore_exact

        cid = self.resolve(ref, series)
        manifest = self.manifest(cid)
        form, record = choose_form(
            manifest,
            cid,
            self.read_chunk,
            format=format,
            layout=safetensors_layout,
            max_shard_size=max_shard_size,
            exact=exact,
        )
        dest = Path(to)
        decoder = self.decoder(manifest.logical_bytes)
        if record is not None:
            paths = restore_exact(decoder, manifest, record, dest, progress)
        elif form.format == "flat":
            from .targets.flat import restore_flat

            paths = restore_flat(decoder, manifest, dest, progress)
        elif form.format == "safetensors":
            from .targets.safetensors_dir import DEFAULT_SHARD_SIZE, restore_safetensors

            paths = restore_safetensors(
                decoder,
                manifest,
                dest,
                max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE,
                layout=safetensors_layout,
                progress=progress,
            )
        else:
            raise UsageError(f"unknown restore format {form.format!r}", "use flat or safetensors")
        return RestoreResult(cid, [str(p) for p in paths], form.format, form.exact, form.reason)

    def restore_group(
        self,
        name: str,
        to: str | os.PathLike[str],
        *,
        format: str = "safetensors",
        series: str = layout.DEFAULT_SERIES,
        rank: int | None = None,
        max_shard_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """Restore every rank of a multi-rank checkpoint (or one ``rank``) into ``to``.

        safetensors: vLLM's per-rank layout (``model-rank-R-part-P``), all ranks in
        one directory; flat: ``rank-R/weights.bin`` + ``weights.json`` per rank.
        """
        from pathlib import Path

        rec = self.group(name, series)
        if not rec.complete:
            missing = sorted(set(range(rec.world_size)) - set(rec.members))
            if rank is None or rank not in rec.members:
                raise RefNotFound(
                    f"group {name!r} is incomplete: ranks {missing} never saved",
                    "restore the ranks that exist with --rank, or an older group",
                )
        ranks = [rank] if rank is not None else sorted(rec.members)
        paths: list[str] = []
        for r in ranks:
            if r not in rec.members:
                raise RefNotFound(
                    f"group {name!r} has no rank {r}", f"ranks present: {sorted(rec.members)}"
                )
            dest = Path(to) / f"rank-{r}" if format == "flat" else Path(to)
            paths += self.restore(
                rec.members[r],
                dest,
                format=format,
                series=series,
                max_shard_size=max_shard_size,
                safetensors_layout="vllm-sharded",
                progress=progress,
            )
        return paths

    def load(
        self,
        ref: str | None = None,
        *,
        device: str | None = None,
        series: str = layout.DEFAULT_SERIES,
    ) -> dict[str, Any]:
        """Checkpoint ``ref`` as a dict of torch tensors (on ``device`` if given).

        On a CUDA device the chunks are copied to the GPU compressed, decoded and
        verified there (docs/GPU_RESTORE.md); elsewhere they are decoded on the CPU.
        """
        from .targets.tensors import load_tensors, load_tensors_pipeline

        manifest = self.manifest(self.resolve(ref, series))
        if device is not None and str(device).startswith("cuda"):
            pipe = self.restore_pipeline(manifest.block_size, device)
            try:
                return load_tensors_pipeline(pipe, manifest)
            finally:
                pipe.close()
        return load_tensors(self.decoder(manifest.logical_bytes), manifest, device)

    def restore_pipeline(self, block_size: int, device: str | Any = "cuda", **options: Any) -> Any:
        """A :class:`~apollo_cas.gpu.restore.RestorePipeline` reading this store's chunks.

        ``options`` go to the pipeline (``batch_bytes``, ``frames``, ``workers``).
        """
        from .backends.local import LocalBackend
        from .gpu.restore import RestorePipeline, file_reader, object_reader, pack_reader

        options.setdefault("workers", self.workers)
        root = self.backend.root if isinstance(self.backend, LocalBackend) else None
        # The pipeline calls the reader from its own threads: one thread per call here.
        # Format 2: chunks located in packs, adjacent ones read as one range.
        if self.format >= 2:
            reader = pack_reader(
                self.chunks.locate, self.backend.get_range, root, self.inventory.refresh
            )
        elif root is not None:
            reader = file_reader(root, 1)
        else:
            reader = object_reader(self.chunks.get_blob, 1)
        return RestorePipeline(reader, self.chunks.read, block_size, device=device, **options)

    def restore_into(
        self,
        ref: str | None,
        tensors: Mapping[str, Any],
        *,
        only_changed: bool = True,
        series: str = layout.DEFAULT_SERIES,
        dry_run: bool = False,
        progress: ProgressFn | None = None,
    ) -> Any:
        """Restore checkpoint ``ref`` into ``tensors`` (the caller's, e.g. live parameters), in place.

        ``tensors`` must match the checkpoint's names, dtypes and shapes exactly and be
        contiguous (TargetError before anything is written otherwise). With
        ``only_changed`` only the blocks whose XXH3-128 differs from the checkpoint are
        written, else every block. Every written block is decoded and verified on the
        tensors' device first. Pause whatever reads or writes the tensors (serving,
        training) while this runs. Returns a
        :class:`~apollo_cas.targets.live.LiveRestoreReport`.
        """
        import torch

        from .targets.live import restore_into

        manifest = self.manifest(self.resolve(ref, series))
        devices = {str(t.device) for t in tensors.values() if isinstance(t, torch.Tensor)}
        devices = devices or {"cpu"}
        device = sorted(devices)[0]
        if len(devices) > 1:
            raise UsageError(
                f"tensors on several devices ({', '.join(sorted(devices))})",
                "restore each device's tensors with its own restore_into call",
            )
        pipe = self.restore_pipeline(manifest.block_size, device)
        try:
            return restore_into(
                pipe,
                tensors,
                manifest,
                only_changed=only_changed,
                dry_run=dry_run,
                progress=progress,
            )
        finally:
            pipe.close()

    def decoder(self, nbytes: int) -> Decoder:
        """A decoder for a restore of ``nbytes``: worker processes when they pay
        off and the backend can be opened by another process."""
        return Decoder.for_reader(
            self.reader, self.workers, self.location, self.backend.capabilities, nbytes
        )
