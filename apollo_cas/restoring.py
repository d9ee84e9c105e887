"""The restore entry points behind ``Store.restore*`` and ``Store.load``.

Each resolves the checkpoint, then hands its manifest to a target: the saved
files byte for byte (:mod:`apollo_cas.targets.exact`), ``flat`` or
``safetensors`` directories, torch tensors, or the caller's live tensors in
place; CUDA destinations go through the GPU restore pipeline
(:func:`restore_pipeline`, docs/GPU_RESTORE.md). The targets, torch and the
GPU code are imported only by the paths that use them (torch-free start-up).
The store is reached only through :class:`RestoringStore`, so this module
does not import the facade. These functions are the :class:`~apollo_cas.store.Store`
methods of the same names (the facade binds them; their documentation is here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from . import layout
from .backends import Backend
from .chunkstore import ChunkStore
from .decoding import Decoder
from .errors import RefNotFound, UsageError
from .inventory import ChunkInventory
from .manifest import GroupRecord, Manifest
from .pipeline import ProgressFn

if TYPE_CHECKING:
    from typing import Unpack


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


class RestoringStore(Protocol):
    """What a restore uses of the :class:`~apollo_cas.store.Store` facade."""

    backend: Backend
    chunks: ChunkStore
    workers: int

    @property
    def inventory(self) -> ChunkInventory: ...

    @property
    def format(self) -> int: ...

    def resolve(self, ref: str | None, series: str = ...) -> str: ...

    def manifest(self, checkpoint_id: str) -> Manifest: ...

    def group(self, name: str, series: str = ...) -> GroupRecord: ...

    def read_chunk(self, chunk_id: bytes, size: int | None = None) -> bytes: ...

    def decoder(self, nbytes: int) -> Decoder: ...

    def restore_pipeline(self, block_size: int, device: str | Any = ..., **options: Any) -> Any: ...


def restore_files(
    store: RestoringStore,
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

    cid = store.resolve(ref, series)
    manifest = store.manifest(cid)
    form, record = choose_form(
        manifest,
        cid,
        store.read_chunk,
        format=format,
        layout=safetensors_layout,
        max_shard_size=max_shard_size,
        exact=exact,
    )
    dest = Path(to)
    decoder = store.decoder(manifest.logical_bytes)
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


class RestoreOptions(TypedDict, total=False):
    """The keyword options of :func:`restore_files`, which :func:`restore` passes on."""

    format: str | None
    series: str
    max_shard_size: int | None
    safetensors_layout: str
    exact: bool | None
    progress: ProgressFn | None


def restore(
    store: RestoringStore,
    ref: str | None,
    to: str | os.PathLike[str],
    **options: Unpack[RestoreOptions],
) -> list[str]:
    """Write checkpoint ``ref`` into directory ``to``; returns the paths written.
    See :func:`restore_files` for the options."""
    return restore_files(store, ref, to, **options).paths


def restore_group(
    store: RestoringStore,
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

    rec = store.group(name, series)
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
        paths += restore(
            store,
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
    store: RestoringStore,
    ref: str | None = None,
    *,
    device: str | None = None,
    series: str = layout.DEFAULT_SERIES,
    batch_bytes: int | None = None,
) -> dict[str, Any]:
    """Checkpoint ``ref`` as a dict of torch tensors (on ``device`` if given).

    On a CUDA device the chunks are copied to the GPU compressed, decoded and
    verified there (docs/GPU_RESTORE.md), in batches of ``batch_bytes`` of raw
    output (default :data:`~apollo_cas.gpu.accounting.LOAD_BATCH_BYTES`, 1 GiB: about
    2 GiB of pinned memory, 4 GiB at most, and 4.5-6.7 GB of device scratch, whatever
    the model's size; smaller batches hold less and load more slowly); elsewhere they
    are decoded on the CPU.
    """
    from .gpu.accounting import LOAD_BATCH_BYTES, checked_batch_bytes
    from .targets.tensors import load_tensors, load_tensors_pipeline

    manifest = store.manifest(store.resolve(ref, series))
    if device is not None and str(device).startswith("cuda"):
        pipe = store.restore_pipeline(
            manifest.block_size,
            device,
            batch_bytes=checked_batch_bytes(batch_bytes) or LOAD_BATCH_BYTES,
        )
        try:
            return load_tensors_pipeline(pipe, manifest)
        finally:
            pipe.close()
    return load_tensors(store.decoder(manifest.logical_bytes), manifest, device)


def restore_pipeline(
    store: RestoringStore, block_size: int, device: str | Any = "cuda", **options: Any
) -> Any:
    """A :class:`~apollo_cas.gpu.restore.RestorePipeline` reading this store's chunks.

    ``options`` go to the pipeline (``batch_bytes``, ``frames``, ``workers``).
    """
    from .gpu.restore import RestorePipeline, file_reader, object_reader, pack_reader

    options.setdefault("workers", store.workers)
    # Chunk files or packs read straight into the pipeline's arena where each key is a
    # plain file (declared by the backend, not guessed from its type).
    root = store.backend.capabilities.files_root
    # The pipeline calls the reader from its own threads: one thread per call here.
    # Format 2: chunks located in packs, adjacent ones read as one range.
    if store.format >= 2:
        reader = pack_reader(
            store.chunks.locate_many, store.backend.get_range, root, store.inventory.refresh
        )
        # The index knows every chunk's delta base: a batch reads its bases with it.
        options.setdefault("base_of", store.chunks.base_of)
    elif root is not None:
        reader = file_reader(root, 1)
    else:
        reader = object_reader(store.chunks.get_blob, 1)
    return RestorePipeline(reader, store.chunks.read, block_size, device=device, **options)


def restore_into(
    store: RestoringStore,
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
    import torch

    from .targets.live import restore_into as restore_live

    manifest = store.manifest(store.resolve(ref, series))
    devices = {str(t.device) for t in tensors.values() if isinstance(t, torch.Tensor)}
    devices = devices or {"cpu"}
    device = sorted(devices)[0]
    if len(devices) > 1:
        raise UsageError(
            f"tensors on several devices ({', '.join(sorted(devices))})",
            "restore each device's tensors with its own restore_into call",
        )
    from .gpu.accounting import checked_batch_bytes

    chosen = checked_batch_bytes(batch_bytes)
    options = {"batch_bytes": chosen} if chosen else {}
    pipe = store.restore_pipeline(manifest.block_size, device, **options)
    try:
        return restore_live(
            pipe,
            tensors,
            manifest,
            only_changed=only_changed,
            dry_run=dry_run,
            progress=progress,
        )
    finally:
        pipe.close()
