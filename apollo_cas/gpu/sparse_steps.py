"""Codec 4 (sparse delta) on the device: a chunk's decoded gaps and values scattered
into its row.

The frames of a codec-4 chunk (docs/CODECS.md) decode, with the batch's other zstd
frames, into two staging slots: ``4*n`` bytes of gaps and ``w*n`` bytes of XOR values,
each as byte planes (plane 0 first). Here the chunk's row becomes ``block XOR base``:
zero, and value ``k`` at element ``index[k] = sum(gap[0..k] + 1) - 1``. The pipeline's
XOR chains then XOR the base row in, exactly as for a codec-3 delta, so the base is
whatever the chain logic placed there (read, decoded, or a live block).

Everything is torch ops on the batch's tensors, a fixed number per element width
and sub-batch (no per-chunk launches, no host sync): chunks of one width are
concatenated, the gaps' cumulative sum is taken once and each chunk's start
subtracted. An index past a chunk's block (only a damaged chunk has one: the host
checked the frames' sizes, not their contents) is clamped to its last element, so
nothing is written outside its row; that row then fails the hash check, which names
the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import sparse_kernels
from .chunkplan import ChunkPlan, runs_within
from .staging import Uploads

#: Changed elements scattered per round: bounds the index temporaries (about 80 bytes
#: per element: ~160 MiB), whatever the batch size.
SUB_ELEMENTS = 1 << 21

_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def scatter_sparse(
    chunks: Sequence[ChunkPlan],
    dev: torch.Tensor,
    r2: torch.Tensor,
    uploads: Uploads | None = None,
    kernel: bool | None = None,
) -> None:
    """Fill the rows of codec-4 ``chunks`` (consecutive rows of ``r2``) with their XOR
    against the base, from their decoded slots in ``dev``.

    ``kernel``: True runs the two Triton launches of ``sparse_kernels.scatter`` (on CPU
    tensors under ``TRITON_INTERPRET=1``, for tests), False the torch operations below;
    by default the kernels on CUDA where Triton is installed."""
    lo, hi = chunks[0].row, chunks[-1].row + 1
    if [c.row for c in chunks] != list(range(lo, hi)):
        raise AssertionError("codec-4 rows must be consecutive")
    r2[lo:hi].zero_()
    by_w: dict[int, list[ChunkPlan]] = {}
    for c in chunks:
        if c.nchanged:
            by_w.setdefault(c.w, []).append(c)
    if kernel is None:
        kernel = r2.is_cuda and sparse_kernels.available()
    uploads = uploads or Uploads(1)
    for w, cs in by_w.items():
        if kernel:
            table = np.array(
                [(c.nchanged, c.slots[0], c.slots[1], c.row, c.size) for c in cs], dtype=np.int64
            )
            sparse_kernels.scatter(dev, r2, w, table, uploads)
            continue
        for part in runs_within(cs, lambda c: c.nchanged, SUB_ELEMENTS):
            _scatter(part, w, dev, r2, uploads)


def _scatter(
    cs: list[ChunkPlan], w: int, dev: torch.Tensor, r2: torch.Tensor, uploads: Uploads
) -> None:
    device = r2.device
    epr = r2.shape[1] // w  # elements per row (row_bytes is a multiple of 64)
    meta_rows = []
    start = 0
    for c in cs:
        meta_rows.append([c.nchanged, c.slots[0], c.slots[1], start, c.row * epr, c.size // w])
        start += c.nchanged
    total = start
    # One small copy, by the pinned uploads (a pageable copy to a GPU waits for the
    # stream); a field per row, so each is a contiguous 1-D tensor.
    meta = uploads.from_numpy(np.array(meta_rows, dtype=np.int64).T.copy(), device)
    n_, g_, v_, s_, r_, m_ = meta.unbind(0)
    seg = torch.repeat_interleave(torch.arange(len(cs), device=device), n_, output_size=total)
    nseg = n_[seg]
    j = torch.arange(total, device=device) - s_[seg]  # element k of its chunk
    # Gaps: u32 from their 4 byte planes.
    gpos = g_[seg] + j
    gaps = dev[gpos].to(torch.int64)
    for p in range(1, 4):
        gaps |= dev[gpos + p * nseg].to(torch.int64) << (8 * p)
    run = torch.cumsum(gaps + 1, 0)
    before = torch.where(s_ > 0, run[(s_ - 1).clamp(min=0)], torch.zeros_like(s_))
    idx = torch.minimum(run - before[seg] - 1, m_[seg] - 1)
    # Values: w-byte elements from their w byte planes (little-endian, as stored).
    vpos = v_[seg] + j
    if w == 1:
        vals = dev[vpos]
    else:
        vb = torch.empty((total, w), dtype=torch.uint8, device=device)
        for p in range(w):
            vb[:, p] = dev[vpos + p * nseg]
        vals = vb.view(_DTYPES[w]).view(-1)
    target = r2.view(-1).view(_DTYPES[w])
    target.index_put_((r_[seg] + idx,), vals)
