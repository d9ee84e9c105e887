"""The store: checkpoints made of chunks, refs that name them, and the verbs on them.

This is the one place that combines backends, chunks, manifests, refs and
locks. Everything else (sources, targets, gc, verify, the CLI) goes through it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import codecs, layout
from .backends import Backend, open_backend
from .chunkstore import ChunkStore
from .decoding import Decoder
from .errors import (
    AmbiguousRef,
    ConcurrentUpdate,
    CorruptManifest,
    InvalidName,
    ObjectNotFound,
    RefNotFound,
    StoreNotFound,
    UsageError,
)
from .hashing import digest_hex
from .locks import Locks
from .manifest import (
    DEFAULT_BLOCK_SIZE,
    GroupRecord,
    Manifest,
    SaveStats,
    SourceInfo,
    StoreConfig,
    TensorEntry,
)
from .parallel import default_workers
from .pipeline import ProgressFn, WriteResult, same_content, write_source
from .sources import open_mapping
from .sources.base import Source

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 256 << 20
_CAS_RETRIES = 20


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

    def to_json(self) -> dict[str, Any]:
        st = self.stats
        return {
            "checkpoint": self.checkpoint_id,
            "parent": self.parent,
            "series": self.series,
            "unchanged": self.unchanged,
            "seconds": round(self.seconds, 4),
            "logical_bytes": st.logical_bytes,
            "chunks": st.chunks,
            "new_chunks": st.new_chunks,
            "new_raw_bytes": st.new_raw_bytes,
            "new_stored_bytes": st.new_stored_bytes,
            "device_to_host_bytes": self.fetched_bytes,
        }


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint id with its manifest and the refs that name it."""

    checkpoint_id: str
    manifest: Manifest
    tags: tuple[str, ...] = ()
    latest_of: tuple[str, ...] = ()


def check_block_size(block_size: int) -> int:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 256:
        raise UsageError(
            f"block size {block_size} out of range",
            f"use a multiple of 256 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} (default 1 MiB)",
        )
    return block_size


class Store:
    """A content-addressed checkpoint store at a directory or ``s3://`` URL."""

    def __init__(
        self,
        backend: Backend,
        policy: codecs.CodecPolicy | None = None,
        workers: int | None = None,
    ) -> None:
        self.backend = backend
        self.chunks = ChunkStore(backend, policy or codecs.CodecPolicy())
        self.workers = workers or default_workers()
        self.locks = Locks(backend)
        self._manifests: dict[str, Manifest] = {}
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
    ) -> Store:
        """Open the store at ``location``. With ``create``, a missing store is
        created; otherwise it must exist (a typo must not silently make a new one)."""
        store = cls(open_backend(os.fspath(location)), policy, workers)
        store._check_config(create)
        return store

    @property
    def location(self) -> str:
        return self.backend.location

    def _check_config(self, create: bool) -> StoreConfig | None:
        where = self.location
        try:
            return StoreConfig.decode(self.backend.get(layout.CONFIG_KEY), where)
        except ObjectNotFound:
            if not create:
                raise StoreNotFound(
                    f"no apollo_cas store at {where}",
                    "check --store / APOLLO_CAS_STORE; a store is created by its first save",
                ) from None
        self.backend.put_if_absent(layout.CONFIG_KEY, StoreConfig().encode())
        return None

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- refs ----------------------------------------------------------------
    def _read_ref(self, key: str) -> str | None:
        try:
            value = self.backend.get(key).decode("ascii", "replace").strip()
        except ObjectNotFound:
            return None
        try:
            return layout.check_hex_id(value, "ref target")
        except InvalidName:
            raise CorruptManifest(
                f"ref {key} in {self.location} is damaged ({value[:40]!r})",
                "point it at a good checkpoint with 'apollo-cas tag'",
            ) from None

    def latest(self, series: str = layout.DEFAULT_SERIES) -> str | None:
        """The id of the newest checkpoint of ``series``, or None."""
        return self._read_ref(layout.series_key(series))

    def series(self) -> dict[str, str]:
        out = {}
        for key in self.backend.list(layout.SERIES_PREFIX):
            name = key[len(layout.SERIES_PREFIX) :]
            target = self._read_ref(key)
            if target:
                out[name] = target
        return out

    def tags(self) -> dict[str, str]:
        out = {}
        for key in self.backend.list(layout.TAGS_PREFIX):
            target = self._read_ref(key)
            if target:
                out[key[len(layout.TAGS_PREFIX) :]] = target
        return out

    def tag(
        self, ref: str, name: str, *, force: bool = False, series: str = layout.DEFAULT_SERIES
    ) -> str:
        """Point tag ``name`` at ``ref``. An existing tag moves only with ``force``."""
        key = layout.tag_key(name)
        # A shared lock, like a save: gc and forget delete manifests only under
        # the exclusive lock, so the checkpoint resolved here still exists when
        # the tag is written (no dangling tag).
        with self.locks.hold("shared", f"tag {name}"):
            target = self.resolve(ref, series)
            for _ in range(_CAS_RETRIES):
                current = self._read_ref(key)
                if current is not None and current != target and not force:
                    raise UsageError(
                        f"tag {name!r} already names {current[:12]}",
                        "pick another name, or pass --force to move it",
                    )
                expected = self.backend.get(key) if current is not None else None
                if self.backend.compare_and_swap(key, expected, target.encode()):
                    return target
        raise ConcurrentUpdate(f"tag {name!r} kept changing", "retry")

    def untag(self, name: str) -> None:
        """Delete a tag (the checkpoint stays until gc's retention drops it)."""
        key = layout.tag_key(name)
        try:
            old = self.backend.get(key)
        except ObjectNotFound:
            raise RefNotFound(
                f"no tag {name!r} in {self.location}", "see 'apollo-cas list'"
            ) from None
        self.backend.compare_and_swap(key, old, None)

    # -- manifests -----------------------------------------------------------
    def checkpoint_ids(self) -> list[str]:
        return [
            k[len(layout.MANIFESTS_PREFIX) :]
            for k in self.backend.list(layout.MANIFESTS_PREFIX)
            if len(k) == len(layout.MANIFESTS_PREFIX) + 32
        ]

    def manifest(self, checkpoint_id: str) -> Manifest:
        """Load and check one manifest (its bytes must hash to its id)."""
        cached = self._manifests.get(checkpoint_id)
        if cached is not None:
            return cached
        key = layout.manifest_key(checkpoint_id)
        try:
            data = self.backend.get(key)
        except ObjectNotFound:
            raise CorruptManifest(
                f"checkpoint {checkpoint_id} is referenced but its manifest is missing",
                "run 'apollo-cas verify'",
            ) from None
        if digest_hex(data) != checkpoint_id:
            raise CorruptManifest(
                f"manifest {checkpoint_id} is corrupt (content does not match its id)",
                "run 'apollo-cas verify'; restore another checkpoint",
            )
        m = Manifest.decode(data, key)
        self._manifests[checkpoint_id] = m
        return m

    def resolve(self, ref: str | None, series: str = layout.DEFAULT_SERIES) -> str:
        """Turn ``latest``, a tag, or a unique id prefix into a checkpoint id."""
        ref = ref or "latest"
        if ref == "latest" or ref.startswith("latest@"):
            s = ref.split("@", 1)[1] if "@" in ref else series
            target = self.latest(s)
            if target is None:
                raise RefNotFound(
                    f"series {s!r} in {self.location} has no checkpoint yet",
                    "save one first, or name a checkpoint id or tag",
                )
            return target
        try:
            target = self._read_ref(layout.tag_key(ref))
        except InvalidName:
            target = None
        if target:
            return target
        low = ref.lower()
        if len(low) >= 4 and all(c in "0123456789abcdef" for c in low):
            hits = [c for c in self.checkpoint_ids() if c.startswith(low)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise AmbiguousRef(
                    f"{ref!r} matches {len(hits)} checkpoints", "give more characters of the id"
                )
        raise RefNotFound(
            f"no checkpoint or tag {ref!r} in {self.location}",
            "see 'apollo-cas list' for ids and tags",
        )

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first, with the refs naming it."""
        tags: dict[str, list[str]] = {}
        for t, cid in self.tags().items():
            tags.setdefault(cid, []).append(t)
        latest: dict[str, list[str]] = {}
        for s, cid in self.series().items():
            latest.setdefault(cid, []).append(s)
        out = [
            Checkpoint(
                cid,
                self.manifest(cid),
                tuple(sorted(tags.get(cid, []))),
                tuple(sorted(latest.get(cid, []))),
            )
            for cid in self.checkpoint_ids()
        ]
        out.sort(key=lambda c: (c.manifest.created, c.checkpoint_id))
        return out

    # -- save ----------------------------------------------------------------
    def save(
        self,
        source: Source | Mapping[str, Any],
        *,
        series: str = layout.DEFAULT_SERIES,
        tag: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
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
        its checkpoint to the multi-rank checkpoint of that name.
        """
        t0 = time.perf_counter()
        layout.check_name(series, "series")
        for name in (tag, group):
            if name is not None:
                layout.check_name(name, "tag" if name is tag else "group")
        check_block_size(block_size)
        if not isinstance(source, Source):
            source = open_mapping(source, SourceInfo(kind="mapping"))
        info = source.info
        if metadata:
            info = replace(info, metadata={**info.metadata, **dict(metadata)})
        series = self._series_for(series, info, group)
        self._check_config(create=True)
        with self.locks.hold("shared", f"save {series}"):
            # Only what is known *now*, under the lock, may be trusted: gc may have
            # swept chunks this process saw in an earlier save.
            self.chunks.forget_known()
            parent_id = self.latest(series)
            parent = self.manifest(parent_id) if parent_id else None
            if check is not None:
                check(parent, source)
            if parent is not None and parent.block_size == block_size:
                self.chunks.known.update(parent.chunk_ids())
            base_for = self._base_finder(source, parent, block_size)
            res = write_source(
                self.chunks,
                source,
                block_size,
                self.workers,
                base_for,
                progress,
                self._device_delta(source, base_for, block_size),
            )
            self.backend.sync()
            elapsed = time.perf_counter() - t0
            if same_content(res.tensors, parent) and not force:
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
                )
                cid, manifest, unchanged = self._commit(manifest, parent_id, force)
            # Still under the shared lock: once released, a concurrent save may
            # move latest past cid and gc could forget it before it is named.
            if tag and cid:
                self.tag(cid, tag, series=series, force=not unchanged)
            if group and cid:
                self._join_group(group, series, info, cid)
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
        )

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

    # -- multi-rank groups ---------------------------------------------------------
    def _join_group(self, name: str, series: str, info: SourceInfo, cid: str) -> GroupRecord:
        """Add this rank's checkpoint to group ``name`` by compare-and-swap."""
        base_series = series.rsplit(".rank", 1)[0]
        key = layout.group_key(base_series, name)
        world = info.world_size or 1
        rank = info.rank or 0
        for _ in range(_CAS_RETRIES):
            try:
                old: bytes | None = self.backend.get(key)
            except ObjectNotFound:
                old = None
            rec = (
                GroupRecord.decode(old, key)
                if old is not None
                else GroupRecord(series=base_series, name=name, world_size=world, members={})
            )
            if rec.world_size != world:
                raise UsageError(
                    f"group {name!r} has world size {rec.world_size}, this rank says {world}",
                    "use another --group name for a different parallel layout",
                )
            rec = replace(rec, members={**rec.members, rank: cid})
            if self.backend.compare_and_swap(key, old, rec.encode()):
                return rec
        raise ConcurrentUpdate(f"group {name!r} kept changing", "retry")

    def groups(self) -> list[GroupRecord]:
        """Every multi-rank checkpoint, oldest first."""
        out = []
        for key in self.backend.list(layout.GROUPS_PREFIX):
            try:
                out.append(GroupRecord.decode(self.backend.get(key), key))
            except ObjectNotFound:
                continue
        return sorted(out, key=lambda g: (g.created, g.series, g.name))

    def group(self, name: str, series: str = layout.DEFAULT_SERIES) -> GroupRecord:
        key = layout.group_key(series, name)
        try:
            return GroupRecord.decode(self.backend.get(key), key)
        except ObjectNotFound:
            raise RefNotFound(
                f"no group {name!r} in series {series!r} of {self.location}",
                "see 'apollo-cas list'",
            ) from None

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

        def root_of(cid: bytes) -> tuple[bytes, int]:
            d = 0
            while cid in bases:
                cid = bases[cid]
                d += 1
            return cid, d

        def find(ti: int, bi: int) -> codecs.Base | None:
            p = matches[ti]
            if p is None:
                return None
            cid = p.chunks[bi]
            root, d = root_of(cid)
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
        out: dict[bytes, bytes] = {}
        todo = [c for t in res.tensors for c in t.chunks]
        seen: set[bytes] = set()
        while todo:
            cid = todo.pop()
            if cid in seen:
                continue
            seen.add(cid)
            if cid in known:
                base: bytes | None = known[cid]
            elif cid in parent_ids or cid in res.bases:
                base = None
            else:
                base = self.chunks.base_of(cid)  # a dedup hit outside the parent: read its header
            if base is not None:
                out[cid] = base
                todo.append(base)
        return out

    def _commit(
        self, manifest: Manifest, parent_id: str | None, force: bool
    ) -> tuple[str, Manifest, bool]:
        """Write the manifest durably, then move the series ref by compare-and-swap.

        If another save moved the ref first, re-parent onto it (or, if it
        recorded the same content, add nothing): neither checkpoint is lost or
        recorded twice.
        """
        key = layout.series_key(manifest.series)
        for _ in range(_CAS_RETRIES):
            data = manifest.encode()
            cid = digest_hex(data)
            wrote = self.backend.put_if_absent(layout.manifest_key(cid), data)
            expected = parent_id.encode() if parent_id else None
            if self.backend.compare_and_swap(key, expected, cid.encode()):
                self._manifests[cid] = manifest
                return cid, manifest, False
            if wrote:
                # Lost the race: this manifest names the old parent and no ref
                # names it. Left in place it would list as a second copy of this
                # checkpoint; the re-parented one below replaces it.
                self.backend.delete(layout.manifest_key(cid))
            parent_id = self.latest(manifest.series)
            if parent_id is None:
                continue
            other = self.manifest(parent_id)
            if other.tensors == manifest.tensors and not force:
                return parent_id, other, True
            manifest = replace(manifest, parent=parent_id)
        raise ConcurrentUpdate(
            f"series {manifest.series!r} kept moving while saving",
            "too many concurrent saves to one series; retry",
        )

    # -- reading -------------------------------------------------------------
    def read_chunk(self, chunk_id: bytes) -> bytes:
        """Verified raw bytes of one chunk."""
        return self.chunks.read(chunk_id)

    def restore(
        self,
        ref: str | None,
        to: str | os.PathLike[str],
        *,
        format: str = "safetensors",
        series: str = layout.DEFAULT_SERIES,
        max_shard_size: int | None = None,
        safetensors_layout: str = "auto",
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """Write checkpoint ``ref`` into directory ``to`` as ``flat`` or ``safetensors``.

        Outputs appear only when complete; returns the paths written.
        """
        from pathlib import Path

        manifest = self.manifest(self.resolve(ref, series))
        dest = Path(to)
        decoder = Decoder.for_store(self, manifest.logical_bytes)
        if format == "flat":
            from .targets.flat import restore_flat

            paths = restore_flat(decoder, manifest, dest, progress)
        elif format == "safetensors":
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
            raise UsageError(f"unknown restore format {format!r}", "use flat or safetensors")
        return [str(p) for p in paths]

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
        return load_tensors(Decoder.for_store(self, manifest.logical_bytes), manifest, device)

    def restore_pipeline(self, block_size: int, device: str | Any = "cuda", **options: Any) -> Any:
        """A :class:`~apollo_cas.gpu.restore.RestorePipeline` reading this store's chunks.

        ``options`` go to the pipeline (``batch_bytes``, ``frames``, ``workers``).
        """
        from .backends.local import LocalBackend
        from .gpu.restore import RestorePipeline, file_reader, object_reader

        options.setdefault("workers", self.workers)
        if isinstance(self.backend, LocalBackend):
            reader = file_reader(self.backend.root, options["workers"])
        else:
            reader = object_reader(self.chunks.get_blob, options["workers"])
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
        from .gpu.blocks import byte_view
        from .targets.live import restore_into

        manifest = self.manifest(self.resolve(ref, series))
        devices = {str(byte_view(t).device) for t in tensors.values() if hasattr(t, "device")} or {
            "cpu"
        }
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
