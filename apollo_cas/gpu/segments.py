"""Many byte ranges copied between two device buffers in one kernel launch.

The GPU restore builds each batch's staging layout from the stored bytes already on the
device: every plane and frame of every chunk is one range (about 50,000 per 17 GB
checkpoint). As one ``torch.cat`` per plane group, slicing a tensor per range, this took
1.28 s of the host thread of a 2.35 s warm load on the H200 (profile of 2026-12-02):
the device copy itself is a few milliseconds. Here the ranges go up as one table (cut on
the host only where one is longer than :data:`SPAN`), and one Triton launch copies them:
program (i, j) copies piece j, of at most :data:`PIECE` bytes, of range i. Without Triton
or on the CPU the same ranges are copied one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .staging import Uploads

#: Bytes one program copies.
PIECE = 16384
#: The longest range of the table: the launch's second grid axis is the pieces of the
#: longest range, so one long range would make every short one launch as many programs
#: (mostly idle). Ranges are restore pieces (planes and frames of 1 MiB blocks, or runs
#: of rows), so nearly every table goes up as it is. The table used to be cut into
#: 16 KiB pieces on the host: about 65,000 rows per 1 GiB batch, made by eight numpy
#: calls over them, which py-spy found in 40% of the feeding thread's samples of a load
#: after a dense step (H200, benchmarks/results/h200_2026-12-03f/run2_threads.json).
SPAN = 1 << 20


class Segments:
    """Ranges to copy from one source buffer into one destination buffer, in bulk.

    ``add(src_offset, dst_offset, length)`` records a range; :meth:`copy` copies them all.
    """

    __slots__ = ("_dst", "_len", "_src")

    def __init__(self) -> None:
        self._src: list[int] = []
        self._dst: list[int] = []
        self._len: list[int] = []

    def add(self, src_offset: int, dst_offset: int, length: int) -> None:
        if length > 0:
            self._src.append(src_offset)
            self._dst.append(dst_offset)
            self._len.append(length)

    def __len__(self) -> int:
        return len(self._len)

    def copy(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        kernel: bool | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        """Copy every range from ``src`` to ``dst`` (1-D uint8, one device), queued on
        the current stream. Raises ValueError for a range outside either buffer.

        ``kernel``: True forces the Triton launch (on CPU tensors under
        ``TRITON_INTERPRET=1``, for tests), False the range-by-range copy; by default
        the kernel runs on CUDA tensors where Triton is installed. ``uploads``: the
        reusable pinned buffers the copy table travels through (else one is pinned)."""
        if not self._len:
            return
        s = np.asarray(self._src, dtype=np.int64)
        d = np.asarray(self._dst, dtype=np.int64)
        n = np.asarray(self._len, dtype=np.int64)
        if int(s.min()) < 0 or int(d.min()) < 0:
            raise ValueError("a range starts before its buffer")
        if int((s + n).max()) > src.numel() or int((d + n).max()) > dst.numel():
            raise ValueError("a range ends past its buffer")
        fn = _kernel() if (src.is_cuda if kernel is None else kernel) else None
        if fn is None:
            if kernel:
                raise RuntimeError("the segment copy kernel needs Triton")
            for a, b, k in zip(self._src, self._dst, self._len, strict=True):
                dst[b : b + k].copy_(src[a : a + k], non_blocking=True)
            return
        _launch(fn, src, dst, spans(s, d, n), uploads)


def copy_into_many(
    src: torch.Tensor,
    dests: Sequence[torch.Tensor],
    runs: list[list[int]],
    kernel: bool | None = None,
    uploads: Uploads | None = None,
) -> None:
    """Copy ``runs`` of [dest index, dest offset, source offset, length] from ``src``
    into the 1-D uint8 tensors ``dests`` (one device), in one launch.

    The restore placed a batch's verified rows with one ``copy_`` per run (about 430
    per 17 GB load): each call gave up the GIL and waited up to a switch interval to
    take it back from 16 read threads, and py-spy found the host thread there for
    30-45% of a warm load while the device was busy 0.50 s of 1.12 s (H200,
    benchmarks/results/h200_2026-12-03e). One table-driven launch writes every run:
    destinations are addressed from the lowest one's first byte (one device address
    space), the way the XXH3 kernel reads many tensors. ``kernel`` as in
    :meth:`Segments.copy`. Raises ValueError for a run outside its destination.
    """
    if not runs:
        return
    r = np.asarray(runs, dtype=np.int64).reshape(-1, 4)
    used = set(r[:, 0].tolist())
    sizes = np.zeros(len(dests), dtype=np.int64)
    ptrs = np.zeros(len(dests), dtype=np.int64)
    for i in used:
        sizes[i] = dests[i].numel()
        ptrs[i] = dests[i].data_ptr()
    if int(r[:, 1].min()) < 0 or int(r[:, 2].min()) < 0:
        raise ValueError("a run starts before its buffer")
    if bool((r[:, 1] + r[:, 3] > sizes[r[:, 0]]).any()) or int((r[:, 2] + r[:, 3]).max()) > (
        src.numel()
    ):
        raise ValueError("a run ends past its buffer")
    fn = _kernel() if (src.is_cuda if kernel is None else kernel) else None
    if fn is None:
        if kernel:
            raise RuntimeError("the segment copy kernel needs Triton")
        for d, o, a, k in runs:
            dests[d][o : o + k].copy_(src[a : a + k], non_blocking=True)
        return
    base = min(used, key=lambda i: int(ptrs[i]))
    dst_off = ptrs[r[:, 0]] - ptrs[base] + r[:, 1]
    _launch(fn, src, dests[base], spans(r[:, 2], dst_off, r[:, 3]), uploads)


def _launch(fn: Any, src: torch.Tensor, dst: torch.Tensor, table: np.ndarray, up: Any) -> None:
    count = int(table.shape[1])
    per = -(-int(table[2].max()) // PIECE)
    dev_table = (up or Uploads(1)).from_numpy(table, src.device)
    src_ok, dst_ok = alignment(table, src.data_ptr(), dst.data_ptr())
    fn[(count, per)](
        src, dst, dev_table, count, PIECE=PIECE, SRC_ALIGNED=src_ok, DST_ALIGNED=dst_ok
    )


def alignment(table: np.ndarray, src_ptr: int, dst_ptr: int) -> tuple[bool, bool]:
    """Whether the source side and the destination side of every range of ``table`` (its
    base pointer, offset and length) are multiples of 16 bytes, so the kernel may be told
    so and move 16 bytes per access on that side instead of one.

    The restore's placement is aligned on both sides (rows 64-byte aligned into tensors
    at block offsets); its staging fill on the destination side only (chunks lie at any
    offset of a pack, and are copied into 16-byte aligned slots, padded)."""
    # One reduction for all three rows: this runs on the thread that feeds the device.
    src_bits, dst_bits, len_bits = (int(x) & 15 for x in np.bitwise_or.reduce(table, axis=1))
    src_ok = not (len_bits or src_bits or src_ptr & 15)
    dst_ok = not (len_bits or dst_bits or dst_ptr & 15)
    return src_ok, dst_ok


def spans(s: np.ndarray, d: np.ndarray, n: np.ndarray, span: int = SPAN) -> np.ndarray:
    """The ranges as a (3, count) int64 table of source offsets, destination offsets and
    lengths, each range longer than ``span`` bytes cut into ranges of at most ``span``."""
    if not len(n) or int(n.max()) <= span:
        return np.stack((s, d, n)).astype(np.int64, copy=False)
    per = (n + span - 1) // span
    total = int(per.sum())
    first = np.repeat(np.cumsum(per) - per, per)
    start = (np.arange(total, dtype=np.int64) - first) * span  # offset within its range
    out = np.empty((3, total), dtype=np.int64)
    out[0] = np.repeat(s, per) + start
    out[1] = np.repeat(d, per) + start
    out[2] = np.minimum(span, np.repeat(n, per) - start)
    return out


@functools.cache
def _kernel() -> Any:
    """The Triton copy kernel, or None where Triton is missing."""
    triton = _triton()
    if triton is None:
        return None
    import triton.language as tl

    @triton.jit
    def copy_pieces(  # type: ignore[no-untyped-def]
        src,
        dst,
        table,
        count,
        PIECE: tl.constexpr,
        SRC_ALIGNED: tl.constexpr,
        DST_ALIGNED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        start = tl.program_id(1).to(tl.int64) * PIECE
        a = tl.load(table + pid) + start
        b = tl.load(table + count + pid) + start
        k = tl.load(table + 2 * count + pid) - start
        # True by alignment(): lets the compiler move 16 bytes per access on that side.
        if SRC_ALIGNED or DST_ALIGNED:
            k = tl.multiple_of(k, 16)
        if SRC_ALIGNED:
            a = tl.multiple_of(a, 16)
        if DST_ALIGNED:
            b = tl.multiple_of(b, 16)
        offs = tl.arange(0, PIECE)
        mask = offs < k
        x = tl.load(src + a + offs, mask=mask)
        tl.store(dst + b + offs, x, mask=mask)

    return copy_pieces


def _triton() -> ModuleType | None:
    try:
        import triton
    except ImportError:
        return None
    return triton
