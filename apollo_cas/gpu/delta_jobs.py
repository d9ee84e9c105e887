"""The GPU delta save's plan: which changed blocks become delta jobs, against which base,
and the figures one save reports (:mod:`apollo_cas.gpu.delta_save` runs the jobs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .. import codecs
from ..chunkstore import PutResult
from ..codecs import planes
from ..sources.base import BlockRequest
from .accounting import rounded

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "BaseIds",
    "DeltaJob",
    "DeltaSaveStats",
    "inner_width",
    "plan_jobs",
]

#: Changed blocks per batch. 256 MiB keeps device scratch near 1 GiB and pinned host
#: memory near 0.5 GiB beside the pipeline's own, at any model size.
DEFAULT_BATCH_BYTES = 256 << 20

#: Tally callback of the save pipeline: (put result, raw length).
TallyFn = Callable[[PutResult, int], None]


class BaseIds(Protocol):
    """The delta bases of a save's blocks, as the GPU path plans them (delta_bases.BaseFinder)."""

    def ids(self, ti: int, bi: int) -> tuple[bytes, int, bytes] | None:
        """(base id, its chain depth, its chain's root id) of tensor ``ti``'s block ``bi``."""
        ...


class DeltaJob(NamedTuple):
    """One changed block the GPU path stores as a delta (a NamedTuple: a dense step plans
    one per block on the thread the step waits for, and a frozen dataclass took 2.8 us
    to make, 45 ms for 17 GB; not an on-disk record)."""

    i: int  # index in the save's list of wanted blocks
    tensor: int
    offset: int
    cid: bytes  # the live block's id (GPU hash)
    base: bytes  # the base chunk's id
    depth: int  # the new chunk's depth (1 + the base's)
    w: int  # plane width: the itemsize for inner planes, 1 for inner zstd
    itemsize: int


@dataclass
class DeltaSaveStats:
    """What one GPU delta save did (seconds are wall time of the caller's thread)."""

    blocks: int = 0
    batches: int = 0
    #: Pieces whose device steps ran as the two kernels of gpu.sparse_kernels (the
    #: rest as torch ops; the kernel pieces have no "gather" step).
    kernel_pieces: int = 0
    fallback_blocks: int = 0
    damaged_batches: int = 0
    compared_blocks: int = 0
    full_chunks: int = 0
    planes_total: int = 0
    planes_nonzero: int = 0
    d2h_bytes: int = 0
    decode_s: float = 0.0
    device_s: float = 0.0
    wait_s: float = 0.0
    compare_s: float = 0.0
    pinned_bytes: int = 0
    device_scratch_bytes: int = 0
    #: The interpreter's switch interval while the path ran (``sys.getswitchinterval``).
    switch_interval_s: float = 0.0
    #: Seconds between the device steps of every batch, summed (CUDA events on the
    #: device, with ``Store.device_delta_timing``; the host clock on the CPU; else
    #: empty): gather, check, xor_planes, count,
    #: sparse_rows, pack, slot_wait, to_host. A step that reads a result on the host
    #: (count, sparse_rows, pack) includes the wait for the device work before it.
    steps: dict[str, float] = field(default_factory=dict)
    #: The host's seconds between the same marks (queueing each step, plus waits),
    #: and the device thread's other work per piece: setup (before the first mark),
    #: sync (the last copy's wait and the verdict), assemble (the rows' host views),
    #: submit (handing them to the encoders).
    steps_host: dict[str, float] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    #: Set when the path failed and the CPU path stored its blocks instead.
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = rounded(self)
        out["steps"] = {k: round(v, 5) for k, v in self.steps.items()}
        out["steps_host"] = {k: round(v, 5) for k, v in self.steps_host.items()}
        return out


def inner_width(policy: codecs.CodecPolicy, itemsize: int, n: int) -> int | None:
    """The plane width the full codec would use (1: zstd), None when no delta is tried."""
    if policy.codec == "raw" or not policy.delta or policy.max_delta_depth == 0:
        return None
    if policy.codec in ("planes", "auto") and planes.usable(n, itemsize):
        return itemsize
    return 1


def plan_jobs(
    wanted: Sequence[BlockRequest],
    ids: Sequence[Sequence[bytes]],
    where: Sequence[tuple[int, int]],
    itemsizes: Sequence[int],
    bases: BaseIds,
    policy: codecs.CodecPolicy,
    block_size: int,
) -> tuple[list[DeltaJob], list[int]]:
    """Split the wanted blocks into GPU delta jobs and the indices left to the CPU path.

    The base is the one ``bases`` offers, with ``codecs.encode``'s chain rules: a
    base at the depth limit is replaced by its root; no usable base, a short block or
    a policy without deltas leaves the block to the CPU path.
    """
    jobs: list[DeltaJob] = []
    rest: list[int] = []
    limit = policy.max_delta_depth
    widths = [inner_width(policy, k, block_size) for k in itemsizes]
    base_ids = bases.ids
    for i, r in enumerate(wanted):
        ti, bi = where[i]
        w = widths[ti]
        got = base_ids(ti, bi) if w is not None and r.length == block_size else None
        if got is None:
            rest.append(i)
            continue
        base, depth, root = got
        if depth + 1 > limit and depth:
            base, depth = root, 0  # the chain's full root instead
        if depth + 1 > limit:
            rest.append(i)
            continue
        assert w is not None
        jobs.append(DeltaJob(i, ti, r.offset, ids[ti][bi], base, depth + 1, w, itemsizes[ti]))
    return jobs, rest
