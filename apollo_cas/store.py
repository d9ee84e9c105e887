"""The store: the public facade over a repository, the save path and the restore targets.

:class:`~apollo_cas.repository.Repository` owns what a store is (config,
refs, manifests, the chunk inventory, the commit); :class:`Store` adds the
verbs users call (save, restore, load, tag) with their locks. The save
orchestration lives in :mod:`apollo_cas.saving`, the restore entry points in
:mod:`apollo_cas.restoring`: the methods here keep the public signatures and
their documentation, and hand over. Sources, targets, gc, verify and the CLI
go through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from . import codecs, layout, restoring, saving
from .backends import Backend, open_backend
from .decoding import ChunkReader, Decoder
from .inventory import ChunkInventory
from .locks import Locks
from .manifest import GroupRecord, Manifest, StoreConfig
from .parallel import default_workers
from .pipeline import ProgressFn
from .repository import Checkpoint, Repository
from .restoring import RestoreResult
from .saving import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SaveResult, check_block_size
from .sources.base import Source

__all__ = [
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "Checkpoint",
    "RestoreResult",
    "SaveResult",
    "Store",
    "check_block_size",
]


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
        return cls.from_backend(
            open_backend(os.fspath(location)),
            create=create,
            policy=policy,
            workers=workers,
            format=format,
            pack_size=pack_size,
        )

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        *,
        create: bool = False,
        policy: codecs.CodecPolicy | None = None,
        workers: int | None = None,
        format: int | None = None,
        pack_size: int | None = None,
    ) -> Store:
        """:meth:`open` on a backend object (a wrapper that counts, logs or fails
        calls, in tests and benchmarks): the same checks of the store's config."""
        store = cls(backend, policy, workers)
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
            raise saving.tag_taken(name, current)

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
        ``force``. ``check(parent_manifest, source)`` may refuse the save before
        anything is written; a source that checks itself against the previous
        checkpoint (a handles file: stale handles) is always checked, unless ``force``. A source with a rank and a world
        size above 1 saves into the series ``<series>.rank<r>``; ``group`` joins
        its checkpoint to the multi-rank checkpoint of that name. Without
        ``block_size`` a save uses its series' latest checkpoint's block size
        (1 MiB for a series' first save), so deltas and dedup carry on.
        """
        return saving.save(
            self,
            source,
            series=series,
            tag=tag,
            block_size=block_size,
            force=force,
            metadata=metadata,
            created=created,
            progress=progress,
            check=check,
            group=group,
            new_format=self._format,
            new_pack_size=self._pack_size,
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
        return restoring.restore_files(
            self,
            ref,
            to,
            format=format,
            series=series,
            max_shard_size=max_shard_size,
            safetensors_layout=safetensors_layout,
            exact=exact,
            progress=progress,
        )

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
        return restoring.restore_group(
            self,
            name,
            to,
            format=format,
            series=series,
            rank=rank,
            max_shard_size=max_shard_size,
            progress=progress,
        )

    def load(
        self,
        ref: str | None = None,
        *,
        device: str | None = None,
        series: str = layout.DEFAULT_SERIES,
        batch_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Checkpoint ``ref`` as a dict of torch tensors (on ``device`` if given).

        On a CUDA device the chunks are copied to the GPU compressed, decoded and
        verified there (docs/GPU_RESTORE.md), in batches of ``batch_bytes`` of raw
        output (default :data:`~apollo_cas.gpu.accounting.LOAD_BATCH_BYTES`, 1 GiB: 4 GiB
        of pinned memory and about 6 GB of device scratch; smaller batches hold less
        and load more slowly); elsewhere they are decoded on the CPU.
        """
        return restoring.load(self, ref, device=device, series=series, batch_bytes=batch_bytes)

    def restore_pipeline(self, block_size: int, device: str | Any = "cuda", **options: Any) -> Any:
        """A :class:`~apollo_cas.gpu.restore.RestorePipeline` reading this store's chunks.

        ``options`` go to the pipeline (``batch_bytes``, ``frames``, ``workers``).
        """
        return restoring.restore_pipeline(self, block_size, device, **options)

    def restore_into(
        self,
        ref: str | None,
        tensors: Mapping[str, Any],
        *,
        only_changed: bool = True,
        series: str = layout.DEFAULT_SERIES,
        dry_run: bool = False,
        progress: ProgressFn | None = None,
        batch_bytes: int | None = None,
    ) -> Any:
        """Restore checkpoint ``ref`` into ``tensors`` (the caller's, e.g. live parameters), in place.

        ``tensors`` must match the checkpoint's names, dtypes and shapes exactly and be
        contiguous (TargetError before anything is written otherwise). With
        ``only_changed`` only the blocks whose XXH3-128 differs from the checkpoint are
        written, else every block. Every written block is decoded and verified on the
        tensors' device first. Pause whatever reads or writes the tensors (serving,
        training) while this runs. ``batch_bytes`` (default
        :data:`~apollo_cas.gpu.accounting.DEFAULT_BATCH_BYTES`, 256 MiB: about 1 GiB
        pinned and 1.5-2 GB of device scratch beside the caller's tensors) bounds what
        the pipeline holds; 1 GiB restores faster where the device has room. Returns a
        :class:`~apollo_cas.targets.live.LiveRestoreReport`.
        """
        return restoring.restore_into(
            self,
            ref,
            tensors,
            only_changed=only_changed,
            series=series,
            dry_run=dry_run,
            progress=progress,
            batch_bytes=batch_bytes,
        )

    def decoder(self, nbytes: int) -> Decoder:
        """A decoder for a restore of ``nbytes``: worker processes when they pay
        off and the backend can be opened by another process."""
        return Decoder.for_reader(
            self.reader, self.workers, self.location, self.backend.capabilities, nbytes
        )
