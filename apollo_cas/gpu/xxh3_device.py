"""The XXH3-128 (seed 0) device code: Triton kernels for the long path of every block.

The host side (launches, plans, the short inputs hashed with ``xxhash``) is
:mod:`apollo_cas.gpu.xxh3_kernel`; the method and its measurements are in its
docstring and docs/GPU_HASH.md. This module holds XXH3's constants, the table of
pre-read secret words the kernels load, and the ``@triton.jit`` functions.
It imports triton at the top.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

#: Smallest block size accepted: every full block must take XXH3's long path (> 240 bytes).
MIN_BLOCK_SIZE = 256
#: Block sizes must be whole stripes so that every stripe load of a full block is aligned.
BLOCK_SIZE_MULTIPLE = 64
#: Inputs up to this length take XXH3's short paths (hashed on the host here).
_MIDSIZE_MAX = 240

# XXH3's default 192-byte secret (from FARSH), as published in the xxHash specification.
_KSECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
_SECRET_SIZE = len(_KSECRET)  # 192: 16 stripes per 1024-byte scramble block

_PRIME32_1 = 0x9E3779B1
_PRIME32_2 = 0x85EBCA77
_PRIME32_3 = 0xC2B2AE3D
_PRIME64_1 = 0x9E3779B185EBCA87
_PRIME64_2 = 0xC2B2AE3D27D4EB4F
_PRIME64_3 = 0x165667B19E3779F9
_PRIME64_4 = 0x85EBCA77C2B2AE63
_PRIME64_5 = 0x27D4EB2F165667C5
_PRIME_MX1 = 0x165667919E3779F9

# Offsets (in 64-bit words) into the small table of pre-read secret words that every
# kernel loads. Pre-reading on the host turns the secret's unaligned reads (offsets 7
# and 11 bytes from an edge) into aligned word loads on the device.
_T_STRIPE = 0  # 24 words: stripe s of a scramble block uses words s .. s+7
_T_SCRAMBLE = 16  # the scramble key is the secret's last 64 bytes = words 16 .. 23
_T_LAST = 24  # 8 words at byte 192 - 64 - 7 = 121: key of the final stripe
_T_MERGE_LO = 32  # 8 words at byte 11: merge key of the low half
_T_MERGE_HI = 40  # 8 words at byte 192 - 64 - 11 = 117: merge key of the high half
T_INIT = 48  # the 8 initial accumulator values
_T_WORDS = 56

# The same constants, visible inside @triton.jit code (which only reads constexpr globals).
_C_PRIME32_1 = tl.constexpr(_PRIME32_1)
_C_PRIME64_1 = tl.constexpr(_PRIME64_1)
_C_PRIME64_2 = tl.constexpr(_PRIME64_2)
_C_PRIME_MX1 = tl.constexpr(_PRIME_MX1)
_C_ALL_ONES = tl.constexpr(0xFFFFFFFFFFFFFFFF)
_C_T_SCRAMBLE = tl.constexpr(_T_SCRAMBLE)
_C_T_LAST = tl.constexpr(_T_LAST)
_C_T_MERGE_LO = tl.constexpr(_T_MERGE_LO)
_C_T_MERGE_HI = tl.constexpr(_T_MERGE_HI)
_C_T_INIT = tl.constexpr(T_INIT)


def secret_table_words() -> list[int]:
    """The 56 unsigned 64-bit words the kernels read (layout: the ``_T_*`` offsets)."""

    def word(offset: int) -> int:
        return int(struct.unpack_from("<Q", _KSECRET, offset)[0])

    words = [word(8 * j) for j in range(24)]
    words += [word(_SECRET_SIZE - 64 - 7 + 8 * i) for i in range(8)]
    words += [word(11 + 8 * i) for i in range(8)]
    words += [word(_SECRET_SIZE - 64 - 11 + 8 * i) for i in range(8)]
    words += [
        _PRIME32_3,
        _PRIME64_1,
        _PRIME64_2,
        _PRIME64_3,
        _PRIME64_4,
        _PRIME32_2,
        _PRIME64_5,
        _PRIME32_1,
    ]
    assert len(words) == _T_WORDS
    return words


# --------------------------------------------------------------------------- device code
# Every value is tl.uint64 so that shifts are logical and products wrap mod 2**64 like C.


@triton.jit
def _pair_offsets():  # type: ignore[no-untyped-def]
    """Word offsets of the 8 lanes of a stripe, shaped [1, 4, 2]: lane = 2 * pair + parity."""
    pair = tl.arange(0, 4)[None, :, None]
    parity = tl.arange(0, 2)[None, None, :]
    return pair * 2 + parity


@triton.jit
def _load_pairs(ptr, offs):  # type: ignore[no-untyped-def]
    """Load int64 words at ``offs`` (last dim 2) and split them into even and odd lanes."""
    v = tl.load(ptr + offs).to(tl.uint64, bitcast=True)
    return tl.split(v)


@triton.jit
def _load_data_pairs(ptr, offs, EVICTION: tl.constexpr):  # type: ignore[no-untyped-def]
    """:func:`_load_pairs` for input data (read once; EVICTION is "" or "evict_first")."""
    v = tl.load(ptr + offs, eviction_policy=EVICTION)
    return tl.split(v.to(tl.uint64, bitcast=True))


@triton.jit
def _mul32to64(x):  # type: ignore[no-untyped-def]
    """(x mod 2**32) * (x >> 32): written as a widening 32x32 multiply (one IMAD.WIDE)."""
    lo = x.to(tl.uint32).to(tl.uint64)
    hi = (x >> 32).to(tl.uint32).to(tl.uint64)
    return lo * hi


@triton.jit
def _accumulate_512(acc_e, acc_o, de, do, ke, ko):  # type: ignore[no-untyped-def]
    """One stripe: acc[i ^ 1] += data[i]; acc[i] += lo32(data[i] ^ key[i]) * hi32(...)."""
    acc_e = acc_e + do + _mul32to64(de ^ ke)
    acc_o = acc_o + de + _mul32to64(do ^ ko)
    return acc_e, acc_o


@triton.jit
def _stripe(  # type: ignore[no-untyped-def]
    acc_e, acc_o, words_ptr, sec_ptr, word_off, sec_off, offs, sec_offs, EVICTION: tl.constexpr
):
    """One stripe of input at word ``word_off`` keyed with table words from ``sec_off``."""
    de, do = _load_data_pairs(words_ptr, word_off + offs, EVICTION)
    ke, ko = _load_pairs(sec_ptr, sec_off + sec_offs)
    return _accumulate_512(acc_e, acc_o, de, do, ke, ko)


@triton.jit
def _scramble(acc_e, acc_o, sec_ptr, sec_offs):  # type: ignore[no-untyped-def]
    """After every 1024 bytes: acc = (acc ^ (acc >> 47) ^ key) * PRIME32_1."""
    ke, ko = _load_pairs(sec_ptr, _C_T_SCRAMBLE + sec_offs)
    acc_e = (acc_e ^ (acc_e >> 47) ^ ke) * _C_PRIME32_1
    acc_o = (acc_o ^ (acc_o >> 47) ^ ko) * _C_PRIME32_1
    return acc_e, acc_o


@triton.jit
def _scramble_block(  # type: ignore[no-untyped-def]
    acc_e, acc_o, words_ptr, sec_ptr, word_off, offs, sec_offs, EVICTION: tl.constexpr
):
    """16 stripes (1024 bytes) with keys at secret words 0..22, then a scramble."""
    for s in tl.static_range(16):
        acc_e, acc_o = _stripe(
            acc_e, acc_o, words_ptr, sec_ptr, word_off + s * 8, s, offs, sec_offs, EVICTION
        )
    return _scramble(acc_e, acc_o, sec_ptr, sec_offs)


@triton.jit
def _accumulate_all_but_last(  # type: ignore[no-untyped-def]
    words_ptr,
    sec_ptr,
    base,
    length,
    offs,
    sec_offs,
    GROUP: tl.constexpr,
    UNROLL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """XXH3_hashLong's loop up to, not including, the final (overlapping) stripe.

    ``base`` ([GROUP, 1, 1] int64) is each block's first word; ``length`` is the
    block length in bytes (a constexpr for full blocks, a runtime value for the tail).
    ``offs`` are the lane offsets [1, 4, 2]; ``sec_offs`` the same broadcast to
    [GROUP, 4, 2], so that key loads get the data's register layout (no shuffles).
    """
    init_e, init_o = _load_pairs(sec_ptr, _C_T_INIT + sec_offs)
    acc_e = tl.zeros((GROUP, 4), dtype=tl.uint64) + init_e
    acc_o = tl.zeros((GROUP, 4), dtype=tl.uint64) + init_o
    # (len - 1) / 1024 full scramble blocks: an input of exactly k * 1024 bytes scrambles
    # only k - 1 times and ends with 15 stripes plus the last stripe.
    n_scramble = (length - 1) // 1024
    # UNROLL scramble blocks per iteration puts UNROLL KiB of loads in flight per block.
    for c in range(n_scramble // UNROLL):
        for u in tl.static_range(UNROLL):
            acc_e, acc_o = _scramble_block(
                acc_e,
                acc_o,
                words_ptr,
                sec_ptr,
                base + (c * UNROLL + u) * 128,
                offs,
                sec_offs,
                EVICTION,
            )
    for c in range(n_scramble // UNROLL * UNROLL, n_scramble):
        acc_e, acc_o = _scramble_block(
            acc_e, acc_o, words_ptr, sec_ptr, base + c * 128, offs, sec_offs, EVICTION
        )
    # Whole stripes of the last, partial scramble block (never including the final byte).
    n_stripes = ((length - 1) - n_scramble * 1024) // 64
    for s in range(n_stripes):
        acc_e, acc_o = _stripe(
            acc_e,
            acc_o,
            words_ptr,
            sec_ptr,
            base + n_scramble * 128 + s * 8,
            s,
            offs,
            sec_offs,
            EVICTION,
        )
    return acc_e, acc_o


@triton.jit
def _avalanche(h):  # type: ignore[no-untyped-def]
    h = h ^ (h >> 37)
    h = h * _C_PRIME_MX1
    return h ^ (h >> 32)


@triton.jit
def _merge_accs(acc_e, acc_o, sec_ptr, table_off, offs, start):  # type: ignore[no-untyped-def]
    """start + sum_i fold64((acc[2i] ^ key[2i]) * (acc[2i+1] ^ key[2i+1])), avalanched."""
    ke, ko = _load_pairs(sec_ptr, table_off + offs)
    a = acc_e ^ ke
    b = acc_o ^ ko
    folded = (a * b) ^ tl.umulhi(a, b)
    return _avalanche(start + tl.sum(folded, axis=1))


@triton.jit
def _finalize_128(acc_e, acc_o, sec_ptr, length_u64, offs):  # type: ignore[no-untyped-def]
    lo = _merge_accs(acc_e, acc_o, sec_ptr, _C_T_MERGE_LO, offs, length_u64 * _C_PRIME64_1)
    hi = _merge_accs(
        acc_e, acc_o, sec_ptr, _C_T_MERGE_HI, offs, (length_u64 * _C_PRIME64_2) ^ _C_ALL_ONES
    )
    return hi, lo


@triton.jit
def _hash_full_group(  # type: ignore[no-untyped-def]
    words_ptr,
    sec_ptr,
    base,
    BLOCK_WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    UNROLL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """(hi, lo) of GROUP full blocks of BLOCK_WORDS * 8 bytes starting at words ``base``.

    ``base`` is [GROUP, 1, 1] int64. Shared by the one-buffer and the many-tensor
    kernels, so both run exactly the same (inlined) code.
    """
    offs = _pair_offsets()
    sec_offs = offs + tl.zeros((GROUP, 1, 1), dtype=tl.int32)
    acc_e, acc_o = _accumulate_all_but_last(
        words_ptr, sec_ptr, base, BLOCK_WORDS * 8, offs, sec_offs, GROUP, UNROLL, EVICTION
    )
    # Final stripe: the last 64 bytes, aligned because the block is whole stripes.
    acc_e, acc_o = _stripe(
        acc_e,
        acc_o,
        words_ptr,
        sec_ptr,
        base + (BLOCK_WORDS - 8),
        _C_T_LAST,
        offs,
        sec_offs,
        EVICTION,
    )
    length = tl.full((GROUP,), BLOCK_WORDS * 8, dtype=tl.uint64)
    return _finalize_128(acc_e, acc_o, sec_ptr, length, sec_offs)


@triton.jit
def _xxh3_full_blocks_kernel(  # type: ignore[no-untyped-def]
    words_ptr,
    sec_ptr,
    out_ptr,
    n_blocks,
    BLOCK_WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    UNROLL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """Hash GROUP consecutive full blocks of BLOCK_WORDS * 8 bytes; write (hi, lo) per block."""
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * GROUP + tl.arange(0, GROUP)
    valid = blk < n_blocks
    # Lanes past the end re-hash the last block (their stores are masked), so that no
    # load needs a mask.
    base = (tl.minimum(blk, n_blocks - 1) * BLOCK_WORDS)[:, None, None]
    hi, lo = _hash_full_group(words_ptr, sec_ptr, base, BLOCK_WORDS, GROUP, UNROLL, EVICTION)
    tl.store(out_ptr + blk * 2, hi.to(tl.int64, bitcast=True), mask=valid)
    tl.store(out_ptr + blk * 2 + 1, lo.to(tl.int64, bitcast=True), mask=valid)


@triton.jit
def _xxh3_many_full_kernel(  # type: ignore[no-untyped-def]
    words_ptr,
    addr_ptr,
    sec_ptr,
    out_ptr,
    n_blocks,
    BLOCK_WORDS: tl.constexpr,
    GROUP: tl.constexpr,
    UNROLL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """Hash full blocks scattered over many tensors: block ``i`` starts at byte
    ``16 * addr[i]`` from ``words_ptr`` (the lowest-addressed tensor of the launch).

    The table holds 16-byte units, not bytes: multiplying by 2 words tells the
    compiler every block start is 16-byte aligned, so the stripe loads stay 128-bit
    (a raw loaded offset has unknown alignment and would split them).
    """
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * GROUP + tl.arange(0, GROUP)
    valid = blk < n_blocks
    pair = tl.load(addr_ptr + tl.minimum(blk, n_blocks - 1))
    base = (pair * 2)[:, None, None]
    hi, lo = _hash_full_group(words_ptr, sec_ptr, base, BLOCK_WORDS, GROUP, UNROLL, EVICTION)
    tl.store(out_ptr + blk * 2, hi.to(tl.int64, bitcast=True), mask=valid)
    tl.store(out_ptr + blk * 2 + 1, lo.to(tl.int64, bitcast=True), mask=valid)


@triton.jit
def _hash_tail(words_ptr, bytes_ptr, sec_ptr, word_base, length):  # type: ignore[no-untyped-def]
    """(hi, lo) of one input of ``length`` > 240 bytes starting at word ``word_base``."""
    offs = _pair_offsets()
    base = tl.zeros((1, 1, 1), dtype=tl.int64) + word_base
    acc_e, acc_o = _accumulate_all_but_last(words_ptr, sec_ptr, base, length, offs, offs, 1, 1, "")
    # The final stripe starts at length - 64, which need not be 8-byte aligned: assemble
    # its little-endian words from bytes.
    byte = tl.arange(0, 8)[None, None, None, :]
    byte_offs = offs[:, :, :, None] * 8 + byte
    raw = tl.load(bytes_ptr + (word_base * 8 + length - 64) + byte_offs).to(tl.uint64)
    words = tl.sum(raw << (byte * 8).to(tl.uint64), axis=3)
    de, do = tl.split(words)
    ke, ko = _load_pairs(sec_ptr, _C_T_LAST + offs)
    acc_e, acc_o = _accumulate_512(acc_e, acc_o, de, do, ke, ko)
    length_u64 = tl.zeros((1,), dtype=tl.uint64) + length.to(tl.uint64)
    return _finalize_128(acc_e, acc_o, sec_ptr, length_u64, offs)


@triton.jit
def _xxh3_tail_kernel(words_ptr, bytes_ptr, sec_ptr, out_ptr, length):  # type: ignore[no-untyped-def]
    """Hash one input of ``length`` > 240 bytes (any length): the buffer's last block."""
    hi, lo = _hash_tail(words_ptr, bytes_ptr, sec_ptr, 0, length)
    zero = tl.arange(0, 1)
    tl.store(out_ptr + zero, hi.to(tl.int64, bitcast=True))
    tl.store(out_ptr + zero + 1, lo.to(tl.int64, bitcast=True))


@triton.jit
def _xxh3_many_tail_kernel(words_ptr, bytes_ptr, tail_ptr, sec_ptr, out_ptr):  # type: ignore[no-untyped-def]
    """One program per tail of more than 240 bytes: row ``t`` of the tail table is
    (start in 16-byte units from ``words_ptr``, length in bytes)."""
    t = tl.program_id(0).to(tl.int64)
    pair = tl.load(tail_ptr + t * 2)
    # A tail is shorter than a block: int32, as in the one-buffer tail kernel.
    length = tl.load(tail_ptr + t * 2 + 1).to(tl.int32)
    hi, lo = _hash_tail(words_ptr, bytes_ptr, sec_ptr, pair * 2, length)
    row = t * 2 + tl.arange(0, 1)
    tl.store(out_ptr + row, hi.to(tl.int64, bitcast=True))
    tl.store(out_ptr + row + 1, lo.to(tl.int64, bitcast=True))
