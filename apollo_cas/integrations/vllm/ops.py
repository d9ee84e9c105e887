"""What the worker extension does, as functions of a model and a rank.

Nothing here knows vLLM: every function takes the model (an ``nn.Module`` or
a wrapper of one), the tensor-parallel ``rank`` and ``world_size``, and a
:class:`~apollo_cas.store.Store`, and returns a JSON-ready ``dict``. The
extension (``extension.py``) only finds those arguments inside a worker.
CI runs these on CPU modules; docs/VLLM.md says what that leaves unverified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ... import layout
from ...errors import CorruptChunk, RefNotFound, SourceError, TargetError, UsageError
from ...manifest import DEFAULT_BLOCK_SIZE, SourceInfo
from ...sources.base import BlockRequest, FetchedBatch, Source, SourceTensor
from ...sources.device import DeviceSource, byte_view, host_block_digests, kernel_accepts
from ...store import Store
from .collect import Collected, collect_tensors
from .periodic import UpdateGuard

log = logging.getLogger(__name__)

#: What a hot restore needs paused, repeated in every restore reply.
MUST_PAUSE = {
    "serving": "requests served while blocks are written see half-restored weights: pause "
    "generation first (vLLM's pause endpoint where the server has one, or stop sending "
    "requests) and resume after",
    "weight_updates": "updates through the wrapped vLLM entry points and apollo_begin_update "
    "wait on this worker's guard; any other writer of the weights must be stopped",
    "prefix_cache": "KV blocks cached before the restore were computed with other weights: "
    "reset it after (POST /reset_prefix_cache, LLM.reset_prefix_cache())",
}

__all__ = [
    "MUST_PAUSE",
    "export_handles_module",
    "hot_restore",
    "restore_module",
    "save_module",
]


class _UpdatedDuringSave(Exception):
    """An update ran between collecting the tensors and hashing them: take them again."""


class _SnapshotSource(Source):
    """A device source whose block digests are taken under the update guard.

    The digests are the snapshot: the pipeline fetches only blocks the store
    lacks, and the host re-hashes each fetched block against them, so an
    update after the snapshot cannot put bytes under a wrong id.
    """

    def __init__(
        self,
        inner: DeviceSource,
        guard: UpdateGuard,
        generation: int,
        timeout: float | None = None,
        rank: int = 0,
    ) -> None:
        self.inner = inner
        self._timeout = timeout
        self._rank = rank
        self.info = inner.info
        self._guard = guard
        self._generation = generation
        #: Seconds the guard was held while hashing (what an update may wait).
        self.guard_seconds = 0.0
        #: Seconds the block digests took (GPU kernel, or host xxhash for CPU weights).
        self.hash_seconds = 0.0
        #: Seconds the snapshot waited for an update to finish.
        self.wait_seconds = 0.0

    def tensors(self) -> list[SourceTensor]:
        return list(self.inner.tensors())

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        t_wait = time.perf_counter()
        with _snapshot(self._guard, self._timeout, self._rank) as gen:
            t0 = time.perf_counter()
            self.wait_seconds = t0 - t_wait
            try:
                if gen != self._generation:
                    raise _UpdatedDuringSave()
                digests = self.inner.block_digests(block_size)
                if digests is None and not self.inner.on_device:
                    # CPU weights: the same snapshot semantics, hashed on the host.
                    digests = host_block_digests(
                        [t.bytes.numpy().data for t in self.inner.tensors()], block_size
                    )
                return digests
            finally:
                self.hash_seconds = time.perf_counter() - t0
                self.guard_seconds += self.hash_seconds

    def fetch(self, requests: Sequence[BlockRequest]) -> Iterator[tuple[int, memoryview]]:
        return self.inner.fetch(requests)

    def fetch_batches(self, requests: Sequence[BlockRequest]) -> Iterator[FetchedBatch]:
        return self.inner.fetch_batches(requests)

    def close(self) -> None:
        self.inner.close()


def _busy(rank: int) -> SourceError:
    return SourceError(
        f"the weights of rank {rank} are being updated (an update began and has not finished)",
        "save after the update ends (finish_weight_update or apollo_end_update)",
    )


def _stable(guard: UpdateGuard, timeout: float | None, rank: int) -> tuple[int, str | None]:
    try:
        return guard.stable(timeout)
    except TimeoutError:
        raise _busy(rank) from None


@contextlib.contextmanager
def _snapshot(guard: UpdateGuard, timeout: float | None, rank: int) -> Iterator[int]:
    try:
        cm = guard.snapshot(timeout)
        gen = cm.__enter__()
    except TimeoutError:
        raise _busy(rank) from None
    try:
        yield gen
    except BaseException as exc:
        if not cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)


def _check_placement(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(
            f"rank {rank} outside world size {world_size}",
            "pass the tensor-parallel rank and size of this worker",
        )


def rank_series(series: str, rank: int, world_size: int) -> str:
    """The series this rank's checkpoints live in (``<series>.rank<r>`` when sharded)."""
    return (
        layout.rank_series(series, rank) if world_size > 1 else layout.check_name(series, "series")
    )


def _names(
    world_size: int, tag: str | None, group: str | None, weight_version: str | None
) -> tuple[str | None, str | None]:
    """(store tag, group). Tags are store-wide, so ranks share a group name instead."""
    if world_size == 1:
        return tag or group, None
    group = group or tag or (f"wv-{weight_version}" if weight_version is not None else None)
    if group is None:
        raise UsageError(
            f"a save of {world_size} tensor-parallel ranks needs a group name",
            "pass group=NAME (the same on every rank), a tag, or a weight version",
        )
    return None, group


def save_module(
    store: Store,
    model: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    series: str = layout.DEFAULT_SERIES,
    tag: str | None = None,
    group: str | None = None,
    weight_version: str | int | None = None,
    guard: UpdateGuard | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    metadata: Mapping[str, str] | None = None,
    retries: int = 3,
    exclude: str | None = None,
    include_attributes: bool = True,
    snapshot_timeout: float | None = None,
) -> dict[str, Any]:
    """Checkpoint this rank's tensors of ``model`` into ``store``; a JSON-ready summary.

    The digests are taken under ``guard`` (updates wait for the hash only); a
    save that loses a race with an update (the host hash of a fetched block
    differs from its digest) is retried up to ``retries`` times, taking the
    tensors again. With ``world_size > 1`` the checkpoint joins ``group``
    (default: the tag, else ``wv-<weight_version>``). ``snapshot_timeout``
    bounds the wait for an update to finish (``SourceError`` after it); a
    save on the thread that runs updates must pass 0, or it waits for itself.
    """
    _check_placement(rank, world_size)
    guard = guard or UpdateGuard()
    known = weight_version is not None or guard.weight_version is not None
    if world_size > 1 and not (group or tag or known):
        _names(world_size, tag, group, None)  # refuse before waiting for the guard
    attempts = 0
    while True:
        attempts += 1
        t_wait = time.perf_counter()
        # Take the tensors while no update runs, without holding the guard: the
        # digest snapshot below refuses them if an update began since.
        gen, known_version = _stable(guard, snapshot_timeout, rank)
        waited = time.perf_counter() - t_wait
        version = str(weight_version) if weight_version is not None else known_version
        store_tag, group_name = _names(world_size, tag, group, version)
        meta = {"engine": "vllm", "hostname": socket.gethostname(), "pid": str(os.getpid())}
        meta.update(metadata or {})
        if version is not None:
            meta["weight_version"] = version
        collected = collect_tensors(model, include_attributes=include_attributes, exclude=exclude)
        info = SourceInfo(
            kind="vllm",
            location=f"{socket.gethostname()}:{os.getpid()}",
            rank=rank,
            world_size=world_size,
            metadata={**meta, **_collected_meta(collected)},
        )
        inner = DeviceSource(collected.tensors, info)
        src = _SnapshotSource(inner, guard, gen, snapshot_timeout, rank)
        try:
            if inner.on_device and not kernel_accepts(block_size):
                # No GPU hash here: the snapshot is the whole save (updates wait for it).
                log.warning("GPU hashing unavailable: weight updates wait for the whole save")
                with guard.snapshot():
                    res = store.save(
                        inner, series=series, tag=store_tag, block_size=block_size,
                        group=group_name,
                    )  # fmt: skip
            else:
                res = store.save(
                    src, series=series, tag=store_tag, block_size=block_size, group=group_name
                )
            break
        except (CorruptChunk, _UpdatedDuringSave) as exc:
            if attempts > retries:
                raise
            log.info("weights changed during the save (%s); taking them again", exc or "update")
        finally:
            src.close()
    out = {"ok": True, **res.to_json()}
    out.update(
        rank=rank,
        world_size=world_size,
        tag=store_tag,
        group=group_name,
        weight_version=version,
        tensors=len(collected.tensors),
        module_attributes=len(collected.attributes),
        aliases=len(collected.aliases),
        hash_seconds=round(src.hash_seconds, 6),
        guard_seconds=round(src.guard_seconds, 6),
        guard_wait_seconds=round(waited + src.wait_seconds, 6),
        attempts=attempts,
    )
    return out


def _collected_meta(c: Collected) -> dict[str, str]:
    import json

    meta = {"module_attributes": json.dumps(sorted(c.attributes))}
    if c.aliases:
        meta["aliases"] = json.dumps(c.aliases, sort_keys=True)
    return meta


# ----------------------------------------------------------------------------- restore


def hot_restore(
    store: Store, checkpoint_id: str, tensors: Mapping[str, torch.Tensor], *, dry_run: bool = False
) -> dict[str, Any]:
    """Write checkpoint ``checkpoint_id`` into ``tensors`` in place; verified.

    The one call into the in-place restore: ``Store.restore_into(ref, tensors,
    only_changed=True)`` (the GPU restore pipeline) where the store has it, else
    :func:`apollo_cas.targets.live.restore_live`, the hot restore it replaces.
    Non-contiguous tensors (vLLM's transposed fp8 weights) are restored into
    contiguous copies and copied back, then compared byte for byte.
    """
    from ...targets.live import restore_live

    staged = {n: t.contiguous() for n, t in tensors.items() if not t.is_contiguous()}
    targets = {n: staged.get(n, t) for n, t in tensors.items()}
    restore_into = getattr(store, "restore_into", None)  # the GPU restore pipeline's entry
    if restore_into is not None:
        report = restore_into(checkpoint_id, targets, only_changed=True, dry_run=dry_run)
    else:
        report = restore_live(
            targets, store.manifest(checkpoint_id), store.read_chunk, dry_run=dry_run
        )
    if staged and not dry_run:
        for n, copy in staged.items():
            tensors[n].copy_(copy)
            if not torch.equal(byte_view(tensors[n]), byte_view(copy)):
                raise TargetError(
                    f"restored bytes of non-contiguous {n!r} did not reach the live tensor",
                    "the live weights are in an undefined state: restart the server",
                )
    return {**report.to_dict(), "non_contiguous": len(staged)}


def _resolve(
    store: Store,
    *,
    rank: int,
    world_size: int,
    series: str,
    ref: str | None,
    group: str | None,
) -> str:
    if group is not None:
        rec = store.group(group, series)
        if rec.world_size != world_size:
            raise UsageError(
                f"group {group!r} was saved by {rec.world_size} ranks, this server has {world_size}",
                "restore into a server with the same tensor-parallel size, or restore to files",
            )
        cid = rec.members.get(rank)
        if cid is None:
            raise RefNotFound(
                f"group {group!r} has no checkpoint of rank {rank}",
                f"ranks present: {sorted(rec.members)}",
            )
        return cid
    return store.resolve(ref or "latest", rank_series(series, rank, world_size))


def restore_module(
    store: Store,
    model: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    ref: str | None = None,
    group: str | None = None,
    series: str = layout.DEFAULT_SERIES,
    guard: UpdateGuard | None = None,
    dry_run: bool = False,
    exclude: str | None = None,
    include_attributes: bool = True,
) -> dict[str, Any]:
    """Write a checkpoint (``ref`` of this rank's series, or this rank's member of
    ``group``) back into the live tensors of ``model``, only where they differ.

    Refuses (nothing written) a checkpoint of another rank or world size, and
    any difference in names, dtypes or shapes. Holds ``guard`` as an update.
    """
    _check_placement(rank, world_size)
    guard = guard or UpdateGuard()
    cid = _resolve(store, rank=rank, world_size=world_size, series=series, ref=ref, group=group)
    src = store.manifest(cid).source
    for what, saved, live in (("rank", src.rank, rank), ("world size", src.world_size, world_size)):
        if saved is not None and saved != live and not (what == "rank" and world_size == 1):
            raise UsageError(
                f"checkpoint {cid[:12]} was saved by {what} {saved}, this worker is {what} {live}",
                "name this rank's checkpoint (a group restores every rank its own)",
            )
    version = src.metadata.get("weight_version")
    if dry_run:  # compares only: not an update
        collected = collect_tensors(model, include_attributes=include_attributes, exclude=exclude)
        report = hot_restore(store, cid, collected.tensors, dry_run=True)
    else:
        with guard.updating():
            try:
                collected = collect_tensors(
                    model, include_attributes=include_attributes, exclude=exclude
                )
                report = hot_restore(store, cid, collected.tensors)
            except BaseException:
                guard.set_weight_version(None)  # whatever the weights are now, not that
                raise
            # Later saves record the version of the weights just written (or none).
            guard.set_weight_version(version)
    return {
        "ok": True,
        "checkpoint": cid,
        "rank": rank,
        "world_size": world_size,
        "group": group,
        "weight_version": version,
        **report,
        "must_pause": MUST_PAUSE,
    }


# ----------------------------------------------------------------------------- export


def export_handles_module(
    model: Any,
    path: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    include_meta: bool = True,
    exclude: str | None = None,
    include_attributes: bool = True,
) -> dict[str, Any]:
    """Write this rank's handles file (docs/HANDLES.md) for ``apollo-cas save`` from cron.

    ``path`` may hold ``{rank}``; with several ranks and no placeholder the
    rank goes before the suffix (``handles.pt`` -> ``handles.rank1.pt``).
    """
    from ...sources.handles import write_handles

    _check_placement(rank, world_size)
    p = Path(path.format(rank=rank) if "{rank}" in path else path)
    if world_size > 1 and "{rank}" not in path:
        p = p.with_name(f"{p.stem}.rank{rank}{p.suffix}")
    collected = collect_tensors(model, include_attributes=include_attributes, exclude=exclude)
    write_handles(p, collected.tensors, rank=rank, world_size=world_size, include_meta=include_meta)
    return {
        "ok": True,
        "path": str(p),
        "rank": rank,
        "world_size": world_size,
        "tensors": len(collected.tensors),
        "bytes": collected.nbytes,
        "module_attributes": len(collected.attributes),
        "command": f"apollo-cas save {p} --store STORE"
        + (" --group NAME" if world_size > 1 else ""),
    }
