"""The GPU delta path's entry: whether a save's source can take it, and the hook the
save pipeline calls for a device source (docs/GPU_DELTA.md)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ApolloError
from ..parallel import switch_interval
from ..sources.base import BlockRequest
from .delta_jobs import DEFAULT_BATCH_BYTES, BaseIds, DeltaSaveStats, TallyFn, plan_jobs
from .delta_save import GpuDeltaSaver

log = logging.getLogger(__name__)

__all__ = ["DeviceDeltaHook", "delta_device", "make_hook"]

#: The hook ``pipeline.write_source`` calls for a device source:
#: ``hook(wanted, where, ids, tally) -> (wanted-indices left to the CPU path, D2H bytes)``.
DeviceDeltaHook = Callable[
    [Sequence[BlockRequest], Sequence[tuple[int, int]], Sequence[Sequence[bytes]], TallyFn],
    tuple[list[int], int],
]


def dense_workers(workers: int) -> int:
    """Threads for a dense step's host work (the parent's reads and the encoding):
    half the save's, at least 2 where it has 2.

    The step is bound by the one device thread that queues the GPU's work, and every
    other Python thread competes with it for the GIL: a 17.1 GB dense step on the 16-core
    H200 host took 3.83 s with 8 threads against 4.63 s with 16 (device thread 2.89 s
    against 3.61 s; two processes one after the other, results/h200_2026-12-03b), and
    its encoding needs only ~4 cores (18 CPU s in 4.6 s).
    """
    return max(min(2, workers), workers // 2)


def delta_device(source: Any, mode: str) -> torch.device | None:
    """The one device of ``source``'s tensors the GPU delta path runs on, or None.

    ``mode`` "auto": only when every tensor is on one CUDA device; "always": also on
    the CPU (every tensor on the CPU: the same steps on CPU tensors, for tests and
    smoke runs); "never": None.
    """
    if mode == "never":
        return None
    if mode not in ("auto", "always"):
        raise ValueError(f"device delta mode {mode!r}: use auto, always or never")
    ts = source.tensors()
    devs = {t.bytes.device for t in ts if t.nbytes}
    if len(devs) != 1:
        return None
    (d,) = devs
    if d.type == "cuda":
        return d if torch.cuda.is_available() else None
    return d if mode == "always" and d.type == "cpu" else None


def make_hook(
    store: Any,
    source: Any,
    base_for: BaseIds,
    block_size: int,
    mode: str = "auto",
    batch_bytes: int | None = None,
    parent_batch_bytes: int | None = None,
    on_stats: Callable[[DeltaSaveStats], None] | None = None,
    switch: float | None = None,
) -> DeviceDeltaHook | None:
    """The GPU delta hook for a save of ``source`` into ``store`` (None: not usable here).

    ``batch_bytes``: changed blocks per piece (the saver's scratch); ``parent_batch_bytes``:
    parent blocks per batch of the restore pipeline that decodes them (at least a piece;
    None: one piece). ``switch``: the interpreter's switch interval while the path runs
    (None: as it is).
    """
    dev = delta_device(source, mode)
    if dev is None:
        return None
    tensors = source.tensors()
    batch = DEFAULT_BATCH_BYTES if batch_bytes is None else int(batch_bytes)
    parent_batch = max(block_size, batch, parent_batch_bytes or 0)

    def hook(
        wanted: Sequence[BlockRequest],
        where: Sequence[tuple[int, int]],
        ids: Sequence[Sequence[bytes]],
        tally: TallyFn,
    ) -> tuple[list[int], int]:
        itemsizes = [t.dtype.itemsize for t in tensors]
        jobs, rest = plan_jobs(
            wanted, ids, where, itemsizes, base_for, store.chunks.policy, block_size
        )
        if not jobs:
            return rest, 0
        workers = dense_workers(store.workers)
        pipe = store.restore_pipeline(
            block_size,
            dev,
            batch_bytes=parent_batch,
            workers=workers,
            read_workers=store.device_delta_read_threads,
        )
        try:
            saver = GpuDeltaSaver(
                store.chunks,
                pipe,
                [t.bytes for t in tensors],
                block_size,
                dev,
                workers=workers,
                batch_bytes=batch,
                device_timing=store.device_delta_timing,
                kernel_steps=store.device_delta_kernels,
                fetch=source.fetch,
            )
            try:
                with switch_interval(switch):
                    saver.stats.switch_interval_s = sys.getswitchinterval()
                    rest += saver.run(jobs, tally)
            except ApolloError:
                raise  # a clear error (weights changed mid-save, disk full): the save fails
            except Exception as exc:
                # A defect or device failure of this path. What it wrote is content-addressed
                # and verified on the device; the CPU path redoes every job (skipping chunks
                # that exist), so the save still completes, and the stats say why.
                log.warning("GPU delta save failed, using the CPU path: %r", exc)
                saver.stats.error = f"{type(exc).__name__}: {exc}"
                rest = sorted(set(rest) | {j.i for j in jobs})
        finally:
            pipe.close()
        if on_stats is not None:
            on_stats(saver.stats)
        return sorted(rest), saver.stats.d2h_bytes

    return hook
