"""The tables of block addresses behind ``xxh3_kernel.block_digests_many``: one
launch hashes the full blocks of many tensors from a table of their start addresses,
and the table is built once per set of addresses (cached)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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

    Built with a few vectorised torch ops on ``device`` (not a Python loop per block),
    so a 16 GiB model in 4 KiB blocks (4M blocks) still plans in milliseconds.
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

    def dev(values: list[int] | list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    addr = None
    perm = None
    extra = tail_rows + short_rows
    # Internal rows are already in view order when every tail belongs to the last views
    # (a single view, or tails only at the end): then no gather is needed.
    reorder = extra != list(range(n_full, row))
    if n_full:
        counts_t = dev(counts)
        blocks = torch.arange(n_full, dtype=torch.int64, device=device)
        addr = torch.repeat_interleave(dev(starts), counts_t, output_size=n_full) + blocks * unit
        if reorder:
            perm = torch.empty(row, dtype=torch.int64, device=device)
            shift = torch.repeat_interleave(dev(shifts), counts_t, output_size=n_full)
            perm[blocks + shift] = blocks
    elif reorder:
        perm = torch.empty(row, dtype=torch.int64, device=device)
    if perm is not None:
        perm[dev(extra)] = torch.arange(n_full, n_full + len(extra), device=device)
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return ManyPlan(
        n_rows=row,
        n_full=n_full,
        n_tail=len(tails),
        base=base,
        addr=addr,
        tails=dev(tails) if tails else None,
        short=tuple(short),
        perm=perm,
        ready=ready,
    )


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
