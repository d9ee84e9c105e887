"""The store: the public facade over a repository, the save path and the restore targets.

:class:`~apollo_cas.repository.Repository` owns what a store is (config,
refs, manifests, the chunk inventory, the commit); :class:`Store` adds the
verbs users call (save, restore, load, tag) with their locks. The save
orchestration lives in :mod:`apollo_cas.saving`, the restore entry points in
:mod:`apollo_cas.restoring`: ``Store.save`` and ``Store.restore*``/``load`` are
those functions, bound here as methods (one signature and docstring each). Sources, targets, gc, verify and the CLI
go through it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypedDict

from . import codecs, layout, restoring, saving
from .backends import Backend, open_backend
from .decoding import ChunkReader, Decoder
from .inventory import ChunkInventory
from .locks import Locks
from .manifest import GroupRecord, Manifest, StoreConfig
from .parallel import default_workers
from .repository import Checkpoint, Repository
from .restoring import RestoreResult
from .saving import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SaveResult, check_block_size

if TYPE_CHECKING:
    from typing import Unpack

__all__ = [
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "Checkpoint",
    "RestoreResult",
    "SaveResult",
    "Store",
    "check_block_size",
]


class OpenOptions(TypedDict, total=False):
    """The keyword options of :meth:`Store.from_backend`, which :meth:`Store.open` passes on."""

    create: bool
    policy: codecs.CodecPolicy | None
    workers: int | None
    format: int | None
    pack_size: int | None


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
        #: The format and pack size a store created by this object gets (``open``'s).
        self.new_format: int | None = None
        self.new_pack_size: int | None = None
        #: Dense-step saves of device tensors with a parent: "auto" decodes the parent's
        #: blocks and computes the XOR deltas on the GPU when the tensors are on CUDA
        #: (apollo_cas/gpu/delta_save.py), "always" also runs those steps on CPU
        #: tensors (tests), "never" keeps the CPU delta path.
        self.device_delta = "auto"
        #: Changed blocks per batch of that path, in bytes (device scratch and pinned
        #: memory grow with it, docs/GPU_DELTA.md); None: its default, 256 MiB.
        self.device_delta_batch_bytes: int | None = None
        #: Parent blocks the restore pipeline decodes per batch for that path, in bytes
        #: (at least one batch of changed blocks; a batch is then used as several
        #: pieces); None: one batch of changed blocks.
        self.device_delta_parent_batch_bytes: int | None = None
        #: Time that path's device steps with CUDA events too (``DeltaSaveStats.steps``).
        #: Off by default: the events are 16 of the ~90 operations the one device thread
        #: queues per batch, and that thread is what limits the step (docs/GPU_DELTA.md);
        #: the host's intervals (``steps_host``) matched the events' within a few percent.
        self.device_delta_timing = False
        #: Run that path's per-piece steps as two Triton kernels on CUDA
        #: (gpu/sparse_kernels.py); False: as torch operations (the CPU's way).
        self.device_delta_kernels = True
        #: The interpreter's switch interval (seconds) while that path runs, restored
        #: after it; None leaves it as it is. The path is bound by one thread that
        #: queues the device's work and gives up the GIL at every torch call: the
        #: shorter the interval, the sooner it gets the GIL back from the threads
        #: reading and encoding beside it. 1 ms against Python's 5 ms, H200: 17.1 GB
        #: dense steps 2.17-2.20 s against 2.27-2.44 s (three alternating rounds in
        #: one process), 53.6 GB 6.26 s against 7.18 s (docs/GPU_DELTA.md); 0.5 ms
        #: was no better than 1 ms.
        self.device_delta_switch_interval: float | None = 0.001
        #: Threads that read and parse the parent's chunks for that path (the restore
        #: pipeline's read pool); None: the pipeline's default (at most 8 on a GPU).
        #: They parse under the GIL beside the threads that bound a dense step, yet
        #: 8, 4 and 2 of them gave 1.93-2.07, 1.94-2.19 and 1.95-2.11 s per 17.1 GB
        #: step on an H100 host (results/h200_2026-12-07, run 2): the default stays.
        self.device_delta_read_threads: int | None = None
        #: What the last save's GPU delta path did (a DeltaSaveStats), None if unused.
        self.last_device_delta: Any = None

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike[str], **options: Unpack[OpenOptions]) -> Store:
        """Open the store at ``location``. With ``create``, a missing store is
        created (in ``format``, default 2: packs); otherwise it must exist (a
        typo must not silently make a new one). An existing store keeps its format.
        The options are :meth:`from_backend`'s."""
        return cls.from_backend(open_backend(os.fspath(location)), **options)

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
        calls, in tests and benchmarks): the same checks of the store's config.
        ``policy``: the codecs of new chunks; ``workers``: see :class:`Store`;
        ``format`` and ``pack_size``: those of a store this object creates."""
        store = cls(backend, policy, workers)
        store.new_format = format
        store.new_pack_size = pack_size
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
        return self.repo.open_config(create, self.new_format, self.new_pack_size)

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

    # -- save and restore ----------------------------------------------------
    # One definition each, documented where it is written (saving.py,
    # restoring.py): the facade binds them as its methods.
    save = saving.save

    def read_chunk(self, chunk_id: bytes, size: int | None = None) -> bytes:
        """Verified raw bytes of one chunk (of decoded length ``size``, if given)."""
        raw = self.chunks.read(chunk_id, size)
        return raw if isinstance(raw, bytes) else bytes(raw)

    restore = restoring.restore
    restore_files = restoring.restore_files
    restore_group = restoring.restore_group
    load = restoring.load
    restore_pipeline = restoring.restore_pipeline
    restore_into = restoring.restore_into

    def decoder(self, nbytes: int) -> Decoder:
        """A decoder for a restore of ``nbytes``: worker processes when they pay
        off and the backend can be opened by another process."""
        return Decoder.for_reader(
            self.reader, self.workers, self.location, self.backend.capabilities, nbytes
        )
