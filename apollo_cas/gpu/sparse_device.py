"""Triton device code of :mod:`apollo_cas.gpu.sparse_kernels` (imported only where a
kernel runs: the CPU path needs no Triton). See that module for what they compute."""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def xor_stats_kernel(par, live, offs, stats, m, t, TILE: tl.constexpr, MASK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    col = j * TILE + tl.arange(0, TILE)
    inside = col < m
    src = tl.load(offs + r)
    p = tl.load(par + r * m + col, mask=inside, other=0)
    q = tl.load(live + src + col, mask=inside, other=0)
    x = p ^ q
    tl.store(par + r * m + col, x, mask=inside)
    nz = (x != 0) & inside
    cnt = tl.sum(nz.to(tl.int64), axis=0)
    bits = tl.reduce(x.to(tl.int64) & MASK, 0, _or)
    at = (r * t + j) * 2
    tl.store(stats + at, cnt)
    tl.store(stats + at + 1, bits)


@triton.jit
def sparse_values_kernel(
    par, stats, table, idx, out, m, t, TILE: tl.constexpr, TPOW: tl.constexpr, WS: tl.constexpr
):
    # Pass 1 of codec 4's planes: each changed element's index (into ``idx``, in
    # order) and its value's byte planes. The gaps come in pass 2 from consecutive
    # indices: the running maximum this kernel took for them, in int64, was most of a
    # dense step's device time (0.65 s of 0.75 s on the saver's stream, 17.1 GB, H100,
    # benchmarks/results/h100_2026-12-07 run 1).
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    r = tl.load(table + i * 3)
    first = tl.load(table + i * 3 + 1)
    c = tl.load(table + i * 3 + 2)
    # Elements of the row's earlier tiles, from xor_stats' table.
    before = tl.arange(0, TPOW)
    prefix = tl.sum(tl.load(stats + (r * t + before) * 2, mask=before < j, other=0), axis=0)
    lane = tl.arange(0, TILE)
    col = j * TILE + lane
    inside = col < m
    x = tl.load(par + r * m + col, mask=inside, other=0)
    nz = (x != 0) & inside
    pos = prefix + (tl.cumsum(nz.to(tl.int32), axis=0) - 1)
    tl.store(idx + first + pos, (j * TILE).to(tl.int32) + lane, mask=nz)
    base = (4 + WS) * first + pos
    v = x.to(tl.int64)
    for k in tl.static_range(WS):
        tl.store(out + base + (4 + k) * c, ((v >> (8 * k)) & 0xFF).to(tl.uint8), mask=nz)


@triton.jit
def sparse_gaps_kernel(table, idx, out, TILE: tl.constexpr, WS: tl.constexpr):
    # Pass 2: the gap before each changed element (its index less the previous one's,
    # less one; the row's first counts from -1), as four byte planes.
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    first = tl.load(table + i * 3 + 1)
    c = tl.load(table + i * 3 + 2)
    e = j * TILE + tl.arange(0, TILE)
    inside = e < c
    cur = tl.load(idx + first + e, mask=inside, other=0)
    prv = tl.load(idx + first + e - 1, mask=inside & (e > 0), other=-1)
    gap = cur - prv - 1
    base = (4 + WS) * first + e
    for k in tl.static_range(4):
        tl.store(out + base + k * c, ((gap >> (8 * k)) & 0xFF).to(tl.uint8), mask=inside)


@triton.jit
def _gaps(dev, g, n, e, inside):
    """Codec 4's u32 gaps of elements ``e`` from their 4 byte planes at ``dev + g``."""
    b0 = tl.load(dev + g + e, mask=inside, other=0).to(tl.int64)
    b1 = tl.load(dev + g + n + e, mask=inside, other=0).to(tl.int64)
    b2 = tl.load(dev + g + 2 * n + e, mask=inside, other=0).to(tl.int64)
    b3 = tl.load(dev + g + 3 * n + e, mask=inside, other=0).to(tl.int64)
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


@triton.jit
def gap_sums_kernel(dev, chunks, tiles, sums, TILE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ci = tl.load(tiles + 2 * t)
    j = tl.load(tiles + 2 * t + 1)
    n = tl.load(chunks + 6 * ci)
    g = tl.load(chunks + 6 * ci + 1)
    e = j * TILE + tl.arange(0, TILE)
    inside = e < n
    step = tl.where(inside, _gaps(dev, g, n, e, inside) + 1, 0)
    tl.store(sums + t, tl.sum(step, axis=0))


@triton.jit
def scatter_kernel(dev, chunks, tiles, starts, target, TILE: tl.constexpr, W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ci = tl.load(tiles + 2 * t)
    j = tl.load(tiles + 2 * t + 1)
    n = tl.load(chunks + 6 * ci)
    g = tl.load(chunks + 6 * ci + 1)
    v = tl.load(chunks + 6 * ci + 2)
    base = tl.load(chunks + 6 * ci + 3)
    m = tl.load(chunks + 6 * ci + 4)
    first = tl.load(chunks + 6 * ci + 5)
    # What the chunk's earlier tiles add up to: ``starts`` is the running sum of every
    # tile's ``gap + 1`` over the whole call, exclusive, so the difference from the
    # chunk's first tile is the sum over its own tiles before this one.
    prefix = tl.load(starts + t) - tl.load(starts + first)
    e = j * TILE + tl.arange(0, TILE)
    inside = e < n
    step = tl.where(inside, _gaps(dev, g, n, e, inside) + 1, 0)
    # Element k of a chunk sits at sum(gap[0..k] + 1) - 1; past the block (a damaged
    # chunk) it is clamped to the last element, which then fails the hash check.
    idx = tl.minimum(tl.cumsum(step, axis=0) + prefix - 1, m - 1)
    val = tl.zeros((TILE,), dtype=tl.int64)
    for k in tl.static_range(W):
        byte = tl.load(dev + v + k * n + e, mask=inside, other=0).to(tl.int64)
        val = val | (byte << (8 * k))
    tl.store(target + base + idx, val.to(target.dtype.element_ty), mask=inside)
