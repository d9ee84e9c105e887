"""The tables of block addresses behind ``xxh3_kernel.block_digests_many``: one
launch hashes the full blocks of many tensors from a table of their start addresses,
and the table is built once per set of addresses (cached)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .staging import Uploads
from .xxh3_device import _MIDSIZE_MAX

# A model is hundreds of separate tensors. One launch per tensor gives each launch only
# tens of 1 MiB blocks, and because XXH3 is sequential inside a block, the GPU then sits
# mostly idle (0.35-0.56 TB/s on an H200 with 16 streams, against 4 TB/s for one
# contiguous buffer). block_digests_many instead hashes the full blocks of every tensor
# in one launch, from a table of block start addresses, so thousands of blocks are in
# flight at once.

#: Plans kept per process. Saves of the same live tensors repeat every few minutes, so
#: the table of block addresses is built once; a few entries cover several models or
#: block sizes without holding much memory (8 bytes per block: 128 KiB for 16 GiB in
#: 1 MiB blocks).
PLAN_CACHE_SIZE = 8


@dataclass(frozen=True)
class ManyPlan:
    """Where every block of a list of byte views is hashed, and where its digest goes.

    Internal output rows are: full blocks (``n_full``, the table-driven kernel), then
    tails of more than 240 bytes (``n_tail``, the tail kernel), then tails of 240 bytes
    or less (``short``, hashed on the host). ``perm`` maps the returned row order (view
    by view, block by block) to those internal rows; ``None`` when they coincide.
    """

    n_rows: int
    n_full: int
    n_tail: int
    #: index of the view whose first byte is the lowest address: every table offset is
    #: relative to it, so offsets are never negative
    base: int
    #: (n_full,) int64: start of each full block, in 16-byte units from the base
    addr: torch.Tensor | None
    #: (n_tail, 2) int64: (start in 16-byte units from the base, length in bytes)
    tails: torch.Tensor | None
    #: (view index, byte offset, length) of each tail of 1-240 bytes
    short: tuple[tuple[int, int, int], ...]
    #: (n_rows,) int64 gather index, or None for the identity
    perm: torch.Tensor | None
    #: CUDA event recorded once the tables are on the device (None on the CPU)
    ready: Any


PLANS: OrderedDict[tuple[Any, ...], ManyPlan] = OrderedDict()
PLANS_LOCK = threading.Lock()


def _build_plan(
    ptrs: Sequence[int], lens: Sequence[int], block_size: int, device: torch.device
) -> ManyPlan:
    """The tables of :class:`ManyPlan` for views at ``ptrs`` of ``lens`` bytes.

    Built with a few vectorised numpy ops (not a Python loop per block), so a 16 GiB
    model in 4 KiB blocks (4M blocks) still plans in milliseconds, and sent to
    ``device`` in one copy queued on its current stream.
    """
    unit = block_size // 16
    on_kernel = [i for i, n in enumerate(lens) if n > _MIDSIZE_MAX]
    base = min(on_kernel, key=lambda i: ptrs[i]) if on_kernel else 0
    base_ptr = ptrs[base]
    starts: list[int] = []  # per view with full blocks: start unit minus its first block index
    counts: list[int] = []
    shifts: list[int] = []  # per such view: returned row minus internal row of its blocks
    tails: list[tuple[int, int]] = []
    tail_rows: list[int] = []  # returned row of each tail kernel row, then each short tail
    short: list[tuple[int, int, int]] = []
    short_rows: list[int] = []
    n_full = 0
    row = 0
    for i, n in enumerate(lens):
        nf, tail = divmod(n, block_size)
        pair0 = (ptrs[i] - base_ptr) // 16 if n > _MIDSIZE_MAX else 0
        if nf:
            starts.append(pair0 - n_full * unit)
            counts.append(nf)
            shifts.append(row - n_full)
        n_full += nf
        row += nf
        if tail > _MIDSIZE_MAX:
            tails.append((pair0 + nf * unit, tail))
            tail_rows.append(row)
            row += 1
        elif tail:
            short.append((i, nf * block_size, tail))
            short_rows.append(row)
            row += 1

    # The tables are built on the host (numpy) and sent in one pinned copy: built on
    # the device from Python lists they were five pageable copies, and each made the
    # host wait for the stream. A restore verifies every batch with a new plan (its
    # row buffers are laid out anew), so that stopped the host from queueing ahead at
    # every batch (10 syncs in a 1 GiB load, benchmarks/probe_syncs.py, H200).
    extra = tail_rows + short_rows
    # Internal rows are already in view order when every tail belongs to the last views
    # (a single view, or tails only at the end): then no gather is needed.
    reorder = extra != list(range(n_full, row))
    counts_a = np.asarray(counts, dtype=np.int64)
    blocks = np.arange(n_full, dtype=np.int64)
    parts: list[np.ndarray] = []
    if n_full:
        parts.append(np.repeat(np.asarray(starts, dtype=np.int64), counts_a) + blocks * unit)
    if reorder:
        perm_h = np.empty(row, dtype=np.int64)
        if n_full:
            perm_h[blocks + np.repeat(np.asarray(shifts, dtype=np.int64), counts_a)] = blocks
        perm_h[np.asarray(extra, dtype=np.int64)] = np.arange(
            n_full, n_full + len(extra), dtype=np.int64
        )
        parts.append(perm_h)
    if tails:
        parts.append(np.asarray(tails, dtype=np.int64).reshape(-1))
    addr = perm = tails_t = None
    ready = None
    if parts:
        table = _upload(np.concatenate(parts), device)
        pos = 0
        if n_full:
            addr, pos = table[:n_full], n_full
        if reorder:
            perm, pos = table[pos : pos + row], pos + row
        if tails:
            tails_t = table[pos : pos + 2 * len(tails)].view(len(tails), 2)
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return ManyPlan(
        n_rows=row,
        n_full=n_full,
        n_tail=len(tails),
        base=base,
        addr=addr,
        tails=tails_t,
        short=tuple(short),
        perm=perm,
        ready=ready,
    )


#: One set of pinned upload buffers per thread (an ``Uploads`` serves one thread).
_LOCAL = threading.local()


def _uploads() -> Uploads:
    uploads = getattr(_LOCAL, "uploads", None)
    if uploads is None:
        # A restore builds a plan per batch for its short rows (new addresses each
        # time), a few tables each: with 16 slots a buffer's last copy is batches old.
        uploads = _LOCAL.uploads = Uploads(slots=16)
    return uploads


def _upload(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """``table`` on ``device``, by this thread's pinned buffers on CUDA (no stream sync)."""
    return _uploads().from_numpy(table, device)


def upload_wait_s() -> float:
    """Seconds this thread has waited for a free upload buffer of its plans (see
    :attr:`~apollo_cas.gpu.staging.Uploads.waited_s`)."""
    return _uploads().waited_s


def plan_for(
    bufs: Sequence[torch.Tensor], block_size: int, device: torch.device, cache: bool
) -> ManyPlan:
    """The cached plan of these exact addresses and lengths, or a new one."""
    ptrs = tuple(b.data_ptr() for b in bufs)
    lens = tuple(b.numel() for b in bufs)
    # The plan is a pure function of the addresses and lengths, so a hit is correct
    # even if the tensors were freed and others allocated at the same places.
    key = (str(device), block_size, ptrs, lens)
    with PLANS_LOCK:
        plan = PLANS.get(key)
        if plan is not None:
            PLANS.move_to_end(key)
            return plan
    plan = _build_plan(ptrs, lens, block_size, device)
    if cache:
        with PLANS_LOCK:
            PLANS[key] = plan
            while len(PLANS) > PLAN_CACHE_SIZE:
                PLANS.popitem(last=False)
    return plan
