"""Triton kernels for codec 4 on the device: a dense step's piece (XOR with statistics,
codec 4's planes) and the restore's scatter of codec-4 chunks into their rows.

A dense step's device thread queued ~130 torch operations per 256 MiB piece (gather,
XOR, plane split, counts, ``nonzero``, the gap and value planes). Each releases and
retakes the GIL, and with the parent's readers and the encoders running the retake
is what the thread waited on: py-spy on the H200 (17.1 GB step,
benchmarks/results/h200_2026-12-03c/) put the thread on ordinary torch calls, off
the CPU (0.66 CPU s in a 2.6 s callback). These kernels do that work in three launches:

- :func:`xor_stats`: ``parent[r] ^= live block r`` (read in place through a table of
  element offsets, no gather), and per tile of ``TILE`` elements the count of changed
  elements and the OR of the XOR values (which of its byte planes are not all zero);
- :func:`sparse_extract`: for the rows the host takes as codec 4, the byte planes of
  the gaps and values of their changed elements (in two passes: indices and values,
  then gaps from consecutive indices), written straight into the layout
  :func:`apollo_cas.gpu.delta_ops.sparse_planes` builds (the torch version, which
  stays the reference and the CPU path).

Both run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests compare them with the
torch steps there).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: Elements per program. 4096 bf16 elements (8 KiB) keep 128 tiles per 1 MiB block,
#: so a 256 MiB piece is 32,768 programs.
TILE = 4096

#: The signed integer type of each element width (the kernels read elements as these).
INT_TYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Fields per tile in the statistics table: changed elements, OR of the XOR values
#: (the kernels in sparse_device index it by this width).
STAT_FIELDS = 2


def tiles(elements: int) -> int:
    """Tiles per block of ``elements`` elements."""
    return -(-elements // TILE)


def xor_stats(
    parent: torch.Tensor,
    live_base: torch.Tensor,
    offsets: torch.Tensor,
    ws: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """XOR every parent row with its live block, in place, and count what changed.

    ``parent``: ``(n, block_size)`` uint8 rows; ``live_base``: a 16-byte aligned 1-D
    uint8 tensor of at least 8 bytes from whose first byte every live block is
    addressed (blocks may lie before it, in other tensors); ``offsets``: ``(n,)`` int64 on the
    device, row r's live block starts ``offsets[r]`` elements of ``ws`` bytes after it.
    Returns ``out``'s ``(n, tiles, STAT_FIELDS)`` int64 view: per tile the changed
    elements and the OR of its XOR values.

    A caller may pass ``parent`` already as ``(n, m)`` elements of ``ws`` bytes, the
    live base as its first 8 bytes in that type, and ``out`` already as that view:
    each view made here is a torch call, which gives up the GIL (see the module doc).
    """
    typed = INT_TYPES[ws]
    n, m = parent.shape
    if parent.dtype != typed:
        m //= ws
        parent = parent.view(typed)
    t = tiles(m)
    stats = out if out.dim() == 3 else out[: n * t * STAT_FIELDS].view(n, t, STAT_FIELDS)
    if tuple(stats.shape) != (n, t, STAT_FIELDS):
        raise ValueError(f"statistics of shape {tuple(stats.shape)} for {n} rows of {t} tiles")
    if n:
        mask = -1 if ws == 8 else (1 << (8 * ws)) - 1
        _kernels()[0][(n, t)](
            parent,
            live_base if live_base.dtype == typed else live_base[:8].view(typed),
            offsets,
            stats,
            m,
            t,
            TILE=TILE,
            MASK=mask,
        )
    return stats


def sparse_extract(
    parent: torch.Tensor,
    stats: torch.Tensor,
    table: torch.Tensor,
    ws: int,
    out: torch.Tensor,
    counts: Sequence[int],
    scratch: torch.Tensor | None = None,
) -> None:
    """Codec 4's gap and value planes of the rows ``table`` lists, into ``out``.

    ``parent``: the XOR rows :func:`xor_stats` left; ``stats``: its table; ``table``:
    ``(k, 3)`` int64 on the device, per taken row (row, first element among the taken
    rows' elements, its changed elements), as :func:`row_table` builds, and ``counts``
    the same changed elements on the host. Row r's planes take ``(4 + ws) * count``
    bytes of ``out`` at ``(4 + ws) * first``; ``parent`` may be passed already typed, as
    for :func:`xor_stats`. ``scratch``: int32, at least ``sum(counts)`` elements (the
    changed elements' indices between the two passes), else made here.
    """
    k = int(table.shape[0])
    m = int(parent.shape[1])
    if parent.dtype != INT_TYPES[ws]:
        m //= ws
        parent = parent.view(INT_TYPES[ws])
    t = int(stats.shape[1])
    if not k:
        return
    total = sum(counts)
    if scratch is None:
        scratch = torch.empty(max(1, total), dtype=torch.int32, device=parent.device)
    elif int(scratch.shape[0]) < total:
        raise ValueError(f"scratch of {int(scratch.shape[0])} indices for {total} elements")
    values, gaps = _kernels()[1]
    values[(k, t)](
        parent,
        stats,
        table,
        scratch,
        out,
        m,
        t,
        TILE=TILE,
        TPOW=max(2, 1 << (t - 1).bit_length()),
        WS=ws,
    )
    gaps[(k, max(1, -(-max(counts) // TILE)))](table, scratch, out, TILE=TILE, WS=ws)


def row_summary(stats: np.ndarray, w: int, ws: int) -> tuple[np.ndarray, np.ndarray]:
    """From :func:`xor_stats`' table (on the host): per row the changed elements, and the
    ``(w, n)`` flags of which of its ``w`` byte planes hold a non-zero byte (``w`` is
    ``ws``, or 1 for one plane that is the whole XOR)."""
    counts = stats[:, :, 0].sum(axis=1)
    if w == 1:
        return counts, (counts > 0)[None, :]
    if w != ws:
        raise ValueError(f"plane width {w} with elements of {ws} bytes")
    bits = np.bitwise_or.reduce(stats[:, :, 1], axis=1)
    flags = np.stack([(bits >> (8 * k)) & 0xFF for k in range(w)]) != 0
    return counts, flags


def row_table(rows: list[int], counts: list[int]) -> np.ndarray:
    """The ``(k, 3)`` int64 table :func:`sparse_extract` takes for these rows."""
    c = np.asarray(counts, dtype=np.int64)
    out = np.empty((len(rows), 3), dtype=np.int64)
    out[:, 0] = rows
    out[:, 1] = np.cumsum(c) - c
    out[:, 2] = c
    return out


def scatter(
    dev: torch.Tensor,
    rows: torch.Tensor,
    w: int,
    chunks: np.ndarray,
    uploads: Any,
) -> None:
    """Codec 4's decode on the device: each chunk's values written into its row.

    ``dev``: the staging buffer (uint8) the chunks' gap and value frames decoded into;
    ``rows``: ``(r, row_bytes)`` uint8, the chunks' rows already zeroed; ``chunks``:
    ``(k, 5)`` int64 per chunk of element width ``w``: changed elements, gaps' and
    values' offsets in ``dev``, row, raw size. Element ``i`` of a chunk goes to
    ``sum(gap[0..i] + 1) - 1``, clamped into the chunk's own row (a damaged chunk
    then fails its hash check). Two launches and a running sum per call, whatever the
    number of chunks: the torch version (``gpu/sparse_steps.py``) is about 25
    operations per part.
    ``uploads``: the :class:`~apollo_cas.gpu.staging.Uploads` the tables travel by.
    """
    n = chunks[:, 0]
    chunks = chunks[n > 0]
    if not len(chunks):
        return
    n = chunks[:, 0]
    per = -(-n // TILE)
    first = np.cumsum(per) - per
    total = int(per.sum())
    table = np.empty((len(chunks), 6), dtype=np.int64)
    table[:, :3] = chunks[:, :3]
    table[:, 3] = chunks[:, 3] * (rows.shape[1] // w)  # first element of the row
    table[:, 4] = chunks[:, 4] // w
    table[:, 5] = first
    tiles_t = np.empty((total, 2), dtype=np.int64)
    tiles_t[:, 0] = np.repeat(np.arange(len(chunks)), per)
    tiles_t[:, 1] = np.arange(total) - np.repeat(first, per)
    both = uploads.from_numpy(np.concatenate([table.ravel(), tiles_t.ravel()]), dev.device)
    chunk_d, tile_d = both[: table.size], both[table.size :]
    sums = torch.empty(total, dtype=torch.int64, device=dev.device)
    gap_sums, scatter_k = _kernels()[2:]
    gap_sums[(total,)](dev, chunk_d, tile_d, sums, TILE=TILE)
    # Exclusive running sum over all tiles, by torch: the scatter kernel takes the
    # difference from its chunk's first tile. Before, each program summed its chunk's
    # earlier tiles over a constexpr power of two sized by the batch's longest chunk,
    # so every new size compiled the kernel again, and a restore after a crash is the
    # first call of its process. (The first load of deltas in run 2 of
    # benchmarks/results/h200_2026-12-03d spent 1.6 s of device time in the phase these
    # kernels run in, against 0.05 s for a load of full chunks; how much of it was
    # compiling was not measured.)
    starts = torch.cumsum(sums, 0).sub_(sums)
    target = rows.view(-1) if w == 1 else rows.view(-1).view(INT_TYPES[w])
    scatter_k[(total,)](dev, chunk_d, tile_d, starts, target, TILE=TILE, W=w)


def available() -> bool:
    """Whether Triton is installed (the kernels' launchers need it)."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


@functools.cache
def _kernels() -> tuple[Any, Any, Any, Any]:
    """The kernels (importing Triton only when a kernel runs)."""
    from . import sparse_device as d

    return (
        d.xor_stats_kernel,
        (d.sparse_values_kernel, d.sparse_gaps_kernel),
        d.gap_sums_kernel,
        d.scatter_kernel,
    )
