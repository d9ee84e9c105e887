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
def _max(a, b):
    return tl.maximum(a, b)


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
    last = tl.max(tl.where(nz, col, -1), axis=0)
    bits = tl.reduce(x.to(tl.int64) & MASK, 0, _or)
    at = (r * t + j) * 3
    tl.store(stats + at, cnt)
    tl.store(stats + at + 1, last)
    tl.store(stats + at + 2, bits)


@triton.jit
def sparse_extract_kernel(
    par, stats, table, out, m, t, TILE: tl.constexpr, TPOW: tl.constexpr, WS: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    r = tl.load(table + i * 3)
    first = tl.load(table + i * 3 + 1)
    c = tl.load(table + i * 3 + 2)
    # What the row's earlier tiles hold: elements before this tile's, and the index
    # of the last of them (-1: none), from xor_stats' table.
    before = tl.arange(0, TPOW)
    earlier = before < j
    at = (r * t + before) * 3
    prefix = tl.sum(tl.load(stats + at, mask=earlier, other=0), axis=0)
    carry = tl.max(tl.load(stats + at + 1, mask=earlier, other=-1), axis=0)
    col = j * TILE + tl.arange(0, TILE)
    inside = col < m
    x = tl.load(par + r * m + col, mask=inside, other=0)
    nz = (x != 0) & inside
    rank = tl.cumsum(nz.to(tl.int64), axis=0) - 1
    # The previous changed element of each one: an inclusive running maximum over
    # the element before each position (loaded shifted by one), then the carry.
    shifted = inside & (col > j * TILE)
    xp = tl.load(par + r * m + col - 1, mask=shifted, other=0)
    prev = tl.associative_scan(tl.where(shifted & (xp != 0), col - 1, -1), 0, _max)
    prev = tl.maximum(prev, carry)
    gap = col - prev - 1
    pos = prefix + rank
    base = (4 + WS) * first + pos
    for k in tl.static_range(4):
        tl.store(out + base + k * c, ((gap >> (8 * k)) & 0xFF).to(tl.uint8), mask=nz)
    v = x.to(tl.int64)
    for k in tl.static_range(WS):
        tl.store(out + base + (4 + k) * c, ((v >> (8 * k)) & 0xFF).to(tl.uint8), mask=nz)


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
