"""Two Triton kernels for a dense step's piece: XOR with statistics, and codec 4's planes.

A dense step's device thread queued ~130 torch operations per 256 MiB piece (gather,
XOR, plane split, counts, ``nonzero``, the gap and value planes). Each releases and
retakes the GIL, and with the parent's readers and the encoders running the retake
is what the thread waited on: py-spy on the H200 (17.1 GB step,
benchmarks/results/h200_2026-12-03c/) put the thread on ordinary torch calls, off
the CPU (0.66 CPU s in a 2.6 s callback). These kernels do that work in two launches:

- :func:`xor_stats`: ``parent[r] ^= live block r`` (read in place through a table of
  element offsets, no gather), and per tile of ``TILE`` elements the count of changed
  elements, the index of the last one, and the OR of the XOR values (which of its byte
  planes are not all zero);
- :func:`sparse_extract`: for the rows the host takes as codec 4, the byte planes of
  the gaps and values of their changed elements, written straight into the layout
  :func:`apollo_cas.gpu.delta_ops.sparse_planes` builds (the torch version, which
  stays the reference and the CPU path).

Both run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests compare them with the
torch steps there).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

#: Elements per program. 4096 bf16 elements (8 KiB) keep 128 tiles per 1 MiB block,
#: so a 256 MiB piece is 32,768 programs.
TILE = 4096

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Fields per tile in the statistics table: changed elements, last changed index, OR.
STAT_FIELDS = 3


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
    Returns ``out``'s ``(n, tiles, 3)`` int64 view: per tile the changed elements, the
    index in its row of the last one (-1: none), and the OR of its XOR values.
    """
    n, bs = parent.shape
    m = bs // ws
    t = tiles(m)
    stats = out[: n * t * STAT_FIELDS].view(n, t, STAT_FIELDS)
    if n:
        mask = -1 if ws == 8 else (1 << (8 * ws)) - 1
        _kernels()[0][(n, t)](
            parent.view(_INT[ws]),
            live_base[:8].view(_INT[ws]),
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
) -> None:
    """Codec 4's gap and value planes of the rows ``table`` lists, into ``out``.

    ``parent``: the XOR rows :func:`xor_stats` left; ``stats``: its table; ``table``:
    ``(k, 3)`` int64 on the device, per taken row (row, first element among the taken
    rows' elements, its changed elements), as :func:`row_table` builds. Row r's planes
    take ``(4 + ws) * count`` bytes of ``out`` at ``(4 + ws) * first``.
    """
    k = int(table.shape[0])
    m = int(parent.shape[1]) // ws
    t = int(stats.shape[1])
    if k:
        _kernels()[1][(k, t)](
            parent.view(_INT[ws]),
            stats,
            table,
            out,
            m,
            t,
            TILE=TILE,
            TPOW=max(2, 1 << (t - 1).bit_length()),
            WS=ws,
        )


def row_summary(stats: np.ndarray, w: int, ws: int) -> tuple[np.ndarray, np.ndarray]:
    """From :func:`xor_stats`' table (on the host): per row the changed elements, and the
    ``(w, n)`` flags of which of its ``w`` byte planes hold a non-zero byte (``w`` is
    ``ws``, or 1 for one plane that is the whole XOR)."""
    counts = stats[:, :, 0].sum(axis=1)
    if w == 1:
        return counts, (counts > 0)[None, :]
    if w != ws:
        raise ValueError(f"plane width {w} with elements of {ws} bytes")
    bits = np.bitwise_or.reduce(stats[:, :, 2], axis=1)
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


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The two kernels (importing Triton only when a kernel runs)."""
    from . import sparse_device

    return sparse_device.xor_stats_kernel, sparse_device.sparse_extract_kernel
