"""The device-side steps of a GPU delta save, as plain torch ops (they run on CPU tensors too).

Rows are blocks: a ``(n, block_size)`` uint8 tensor holds ``n`` whole blocks. The steps,
in the order :mod:`apollo_cas.gpu.delta_save` runs them on each batch:

1. :func:`gather_rows`: the live blocks into rows (one copy per run of consecutive
   blocks of one tensor);
2. :func:`check_rows`: every live row hashes to the id the save recorded for it
   (the Triton kernel on a GPU, xxhash on the CPU), so weights that changed since the
   digests were taken are an error, never a chunk named wrongly;
3. :func:`xor_rows_`: parent rows ^= live rows, on 8-byte lanes;
4. :func:`split_planes`: the XOR rows into byte planes, ``(w, n, m)``, plane k = byte k
   of every element (the layout of codec 2);
5. :func:`nonzero_planes` and :func:`pack_planes`: which (plane, row) pairs hold a
   non-zero byte, and only those packed contiguously for the one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import torch

from ..errors import CorruptChunk
from .blocks import mismatches_later
from .staging import Uploads

#: (source tensor index, byte offset in it, first row, rows): one copy of whole blocks.
Run = tuple[int, int, int, int]


def row_runs(blocks: Sequence[tuple[int, int]], block_size: int) -> list[Run]:
    """Coalesce ``(tensor, offset)`` of consecutive rows into runs of adjacent blocks."""
    runs: list[Run] = []
    for row, (ti, off) in enumerate(blocks):
        if runs:
            t, o, r, n = runs[-1]
            if t == ti and o + n * block_size == off and r + n == row:
                runs[-1] = (t, o, r, n + 1)
                continue
        runs.append((ti, off, row, 1))
    return runs


def gather_rows(
    srcs: Sequence[torch.Tensor], runs: Sequence[Run], rows: torch.Tensor, block_size: int
) -> None:
    """Copy every run of whole blocks of the 1-D uint8 ``srcs`` into ``rows``."""
    flat = rows.view(-1)
    for ti, off, row, n in runs:
        nb = n * block_size
        flat[row * block_size : row * block_size + nb].copy_(
            srcs[ti][off : off + nb], non_blocking=True
        )


def check_rows(
    rows: torch.Tensor,
    ids: Sequence[bytes],
    block_size: int,
    kernel: ModuleType | None,
    uploads: Uploads | None = None,
) -> Callable[[], None]:
    """Queue the check that row i hashes to ``ids[i]`` (XXH3-128); returns the verdict,
    which raises CorruptChunk for a row that does not. On a GPU the verdict waits for
    the device only when called: checking in place cost a round trip per batch, 17.6 ms
    of the device thread per 256 MiB piece of a 17.1 GB dense step on the H200 (1.13 s
    in all, for 1.1 ms of hash kernel; benchmarks/results/h200_2026-12-03/)."""
    n = len(ids)
    if not n:
        return lambda: None
    if kernel is not None:
        got = kernel.block_digests(rows.reshape(-1)[: n * block_size], block_size)
        later = mismatches_later(got, ids, uploads)
    else:
        import xxhash

        host = rows[:n].contiguous().cpu().numpy()
        bad = [i for i in range(n) if xxhash.xxh3_128_digest(host[i].data) != ids[i]]

        def later() -> list[int]:
            return bad

    def verdict() -> None:
        raise_for(later(), ids)

    return verdict


def raise_for(bad: Sequence[int], ids: Sequence[bytes]) -> None:
    """CorruptChunk naming the first of the live blocks ``bad`` (indices into ``ids``)
    that no longer hash to the ids the save recorded; nothing when there are none."""
    if bad:
        raise CorruptChunk(
            f"block with id {ids[bad[0]].hex()} no longer hashes to it on the device "
            f"({len(bad)} blocks of this batch differ)",
            "the weights changed during the save (pause training while saving); retry",
        )


def xor_rows_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ^= b`` for two equal ``(n, block_size)`` uint8 tensors; returns ``a``."""
    if a.shape[-1] % 8 == 0:
        a.view(torch.int64).bitwise_xor_(b.view(torch.int64))
    else:
        a.bitwise_xor_(b)
    return a


def split_planes(rows: torch.Tensor, w: int, out: torch.Tensor) -> torch.Tensor:
    """Byte planes of ``w``-byte elements: ``out[k, i, j] = rows[i, j*w + k]``.

    ``out`` is a contiguous uint8 buffer of at least ``rows.numel()`` bytes; returns
    its ``(w, n, m)`` view. ``w = 1`` is a copy (an inner zstd codec has one "plane").
    """
    n, bs = rows.shape
    m = bs // w
    q = out.view(-1)[: n * bs].view(w, n, m)
    src = rows.view(n, m, w)
    for k in range(w):
        q[k].copy_(src[:, :, k])
    return q


def nonzero_planes(q: torch.Tensor) -> torch.Tensor:
    """``(w, n)`` bool: whether plane k of row i holds any non-zero byte."""
    m = q.shape[2]
    if m % 8 == 0:
        return q.view(torch.int64).ne(0).any(dim=2)
    return q.ne(0).any(dim=2)


def pack_planes(q: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The planes ``keep`` selects (indices into the flattened ``(w*n)`` planes), packed
    into ``out`` in that order; returns the ``(len(keep), m)`` view."""
    w, n, m = q.shape
    k = int(keep.numel())
    dst = out.view(-1)[: k * m].view(k, m)
    if k:
        torch.index_select(q.view(w * n, m), 0, keep, out=dst)
    return dst


_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed_elements(rows: torch.Tensor, ws: int) -> torch.Tensor:
    """``(n,)`` int64: elements of ``ws`` bytes whose XOR is not zero, per row."""
    return rows.view(_INT[ws]).ne(0).sum(dim=1)


def sparse_rows(
    rows: torch.Tensor,
    ws: int,
    take: Sequence[bool],
    idx_out: torch.Tensor,
    val_out: torch.Tensor,
    counts: Sequence[int],
) -> int:
    """Positions and XOR values of the changed elements of the rows ``take`` selects.

    For each run of consecutive selected rows, in row order and within a row in element
    order: the element index (int32) into ``idx_out`` and its ``ws`` value bytes into
    ``val_out``. ``counts`` are the rows' :func:`changed_elements`, already on the host:
    with them each run's ``nonzero`` has a known size and queues without a round trip
    to the device. The caller picks rows whose counts fit ``idx_out``; returns how many
    elements were written.
    """
    xv = rows.view(_INT[ws])
    pos = 0
    r = 0
    n = len(take)
    while r < n:
        if not take[r]:
            r += 1
            continue
        r1 = r
        while r1 < n and take[r1]:
            r1 += 1
        k = int(sum(counts[r:r1]))
        if k:
            sub = xv[r:r1]
            nz = torch.nonzero_static(sub, size=k)
            idx_out[pos : pos + k].copy_(nz[:, 1])
            vals = sub[nz[:, 0], nz[:, 1]]
            val_out[pos * ws : (pos + k) * ws].copy_(vals.view(torch.uint8))
        pos += k
        r = r1
    return pos


def sparse_planes(
    idx: torch.Tensor,
    val: torch.Tensor,
    counts: Sequence[int],
    ws: int,
    out: torch.Tensor,
    uploads: Uploads | None = None,
) -> torch.Tensor:
    """Codec 4's byte planes of the changed elements :func:`sparse_rows` found, row by row.

    ``idx``/``val``: the first ``sum(counts)`` indices (int32) and ``ws``-byte values,
    ``counts``: the elements of each selected row, in order. Row ``r`` (elements
    ``e_r..e_r+c_r``) gets ``(4 + ws) * c_r`` bytes of ``out`` at ``(4 + ws) * e_r``:
    the 4 byte planes of its gaps (``index[k] - index[k-1] - 1``, the first gap its
    first index), then the ``ws`` byte planes of its values: the bytes codec 4
    compresses, so the host only runs zstd (splitting them there cost ~0.5 ms of CPU
    per block, under the GIL, and starved the pipeline's thread: H200, 17 GB dense step).
    ``uploads``: the pinned :class:`~apollo_cas.gpu.staging.Uploads` the counts travel
    by (without, a pageable copy). Returns ``out``'s used prefix.
    """
    n = int(sum(counts))
    used = out[: (4 + ws) * n]
    if n == 0:
        return used
    dev = idx.device
    counts_np = np.asarray(counts, dtype=np.int64)
    if uploads is not None:
        c = uploads.from_numpy(counts_np, dev)
    else:  # a pageable copy: on a GPU it waits for the work queued on the stream
        c = torch.from_numpy(counts_np).to(dev)
    # output_size and torch.where keep this free of host synchronisations.
    row = torch.repeat_interleave(torch.arange(len(counts), device=dev), c, output_size=n)
    start = (torch.cumsum(c, 0) - c)[row]  # first element of each element's row
    j = torch.arange(n, device=dev) - start  # position within its row
    crow = c[row]
    ix = idx[:n].to(torch.int64)
    # full_like is a fill kernel; ``prev[0] = -1`` was a pageable copy of a scalar,
    # a stream sync per piece (tests/gpu/test_no_sync.py, on the H200).
    prev = torch.full_like(ix, -1)
    prev[1:] = ix[:-1]
    prev = torch.where(j == 0, -1, prev)
    gaps = (ix - prev - 1).to(torch.int32).view(torch.uint8).view(n, 4)
    vals = val[: ws * n].view(n, ws)
    base = (4 + ws) * start + j
    for k in range(4):
        used[base + k * crow] = gaps[:, k]
    for k in range(ws):
        used[base + (4 + k) * crow] = vals[:, k]
    return used
