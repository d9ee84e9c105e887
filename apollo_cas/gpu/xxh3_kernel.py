"""XXH3-128 (seed 0) of every fixed-size block of a byte buffer, computed on the GPU.

Each digest is bit-exact with ``xxhash.xxh3_128_digest(block)`` (canonical form: the
high 64 bits then the low 64 bits, both big-endian), so a block id computed where
the weights live equals the id the CPU path computes from the same bytes.

How the work is split: XXH3 is sequential inside one input (eight 64-bit
accumulators are updated stripe after stripe), so the parallelism is *across*
blocks: one program hashes ``GROUP`` blocks side by side, and inside a block the
eight accumulator lanes are vectorised as four (even, odd) pairs, because the
algorithm adds each input word into the *neighbouring* lane (``acc[i ^ 1]``).
With ``GROUP = 8`` and one warp, every thread owns one lane pair of one block and
loads 16 contiguous bytes per stripe.

Only XXH3's long path (inputs of more than 240 bytes) runs on the device; block
sizes are therefore required to be at least 256 bytes. The one input that can be
shorter is the last, partial block; when it is 240 bytes or less it takes one of
XXH3's five short paths, and it is hashed on the host with ``xxhash`` (it is at
most 240 bytes, so copying it costs nothing).

:func:`block_digests_many` hashes the blocks of many separate tensors (a whole model)
in one launch, from a cached table of block addresses: one launch per tensor would put
only tens of blocks in flight, far too few for a GPU.

The kernels themselves are in :mod:`apollo_cas.gpu.xxh3_device`; this module is the
host side. It imports torch and triton at the top; import it only when GPU hashing
is wanted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import xxhash

from .xxh3_device import (
    _MIDSIZE_MAX,
    BLOCK_SIZE_MULTIPLE,
    MIN_BLOCK_SIZE,
    T_INIT,
    _xxh3_full_blocks_kernel,
    _xxh3_many_full_kernel,
    _xxh3_many_tail_kernel,
    _xxh3_tail_kernel,
    secret_table_words,
)
from .xxh3_plans import ManyPlan, plan_for

__all__ = [
    "DEFAULT_CONFIG",
    "MIN_BLOCK_SIZE",
    "T_INIT",
    "LaunchConfig",
    "as_bytes",
    "available",
    "block_digests",
    "block_digests_many",
    "check_block_size",
    "interpreted",
    "secret_table_words",
]


@dataclass(frozen=True)
class LaunchConfig:
    """How the full-block kernel is launched (docs/GPU_HASH.md has the measured sweep).

    ``group`` blocks per program (8 with one warp gives every thread one lane pair of
    one block); ``unroll`` 1024-byte scramble blocks per loop iteration (more bytes in
    flight per block); ``evict_first`` streams the input past L2.
    """

    group: int = 8
    unroll: int = 1
    num_warps: int = 1
    num_stages: int = 1
    evict_first: bool = False


DEFAULT_CONFIG = LaunchConfig()


_TABLES: dict[torch.device, torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def _secret_table(device: torch.device) -> torch.Tensor:
    """The secret table as an int64 tensor on ``device`` (cached; torch has no full uint64)."""
    with _TABLES_LOCK:
        table = _TABLES.get(device)
        if table is None:
            signed = [w - (1 << 64) if w >= 1 << 63 else w for w in secret_table_words()]
            table = torch.tensor(signed, dtype=torch.int64, device=device)
            _TABLES[device] = table
        return table


# --------------------------------------------------------------------------- host code


def available() -> bool:
    """True when a CUDA device is usable (triton, imported by this module, is present)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in row-major order as a 1-D uint8 tensor on the same device.

    A contiguous tensor is viewed (no copy); a non-contiguous one is copied first.
    """
    flat = t.reshape(-1)
    if not flat.is_contiguous():  # pragma: no cover - reshape(-1) already copies then
        flat = flat.contiguous()
    if flat.dtype == torch.uint8:
        return flat
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat.view(torch.uint8)


def check_block_size(block_size: int) -> None:
    """Raise ValueError unless ``block_size`` is an int, a multiple of 64 and >= 256."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < MIN_BLOCK_SIZE or block_size % BLOCK_SIZE_MULTIPLE:
        raise ValueError(
            f"block_size must be a multiple of {BLOCK_SIZE_MULTIPLE} and at least "
            f"{MIN_BLOCK_SIZE} bytes, got {block_size}"
        )


def block_digests(
    data: torch.Tensor, block_size: int, config: LaunchConfig | None = None
) -> torch.Tensor:
    """XXH3-128 (seed 0) of every ``block_size`` block of ``data``, on ``data``'s device.

    ``data`` is a tensor of any dtype (hashed as its row-major bytes, see
    :func:`as_bytes`) on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.
    Returns a ``(n_blocks, 16)`` uint8 tensor on the same device whose row ``i`` equals
    ``xxhash.xxh3_128_digest(bytes(data[i * block_size:(i + 1) * block_size]))``;
    ``n_blocks = ceil(len / block_size)`` and the last block may be shorter. Raises
    ValueError unless ``block_size`` is a multiple of 64 and at least 256. ``config``:
    another launch configuration (tests and benchmarks), else :data:`DEFAULT_CONFIG`.
    """
    config = config or DEFAULT_CONFIG
    check_block_size(block_size)
    buf = as_bytes(data)
    device = buf.device
    n = buf.numel()
    n_blocks = -(-n // block_size)
    if n_blocks == 0:
        return torch.empty((0, 16), dtype=torch.uint8, device=device)
    if buf.data_ptr() % 16 or buf.storage_offset() % 8:
        # Stripes are loaded as aligned 16-byte pairs of words; a view that starts
        # mid-word (e.g. a byte slice), or whose storage offset torch cannot
        # reinterpret as int64, is copied once into fresh, aligned memory.
        buf = buf.clone()
    n_full = n // block_size
    tail = n - n_full * block_size
    table = _secret_table(device)
    out = torch.empty((n_blocks, 2), dtype=torch.int64, device=device)
    if n_full:
        words = buf[: n_full * block_size].view(torch.int64)
        grid = (triton.cdiv(n_full, config.group),)
        _xxh3_full_blocks_kernel[grid](
            words,
            table,
            out,
            n_full,
            BLOCK_WORDS=block_size // 8,
            GROUP=config.group,
            UNROLL=config.unroll,
            EVICTION="evict_first" if config.evict_first else "",
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if tail > _MIDSIZE_MAX:
        tail_bytes = buf[n_full * block_size :]
        tail_words = tail_bytes[: tail // 8 * 8].view(torch.int64)
        _xxh3_tail_kernel[(1,)](tail_words, tail_bytes, table, out[n_full:], tail, num_warps=1)
    digests = _canonical(out)
    if 0 < tail <= _MIDSIZE_MAX:
        # Short paths (lengths 1-240) on the host: at most 240 bytes cross to the CPU.
        host_tail = buf[n_full * block_size :].cpu().numpy().tobytes()
        row = torch.frombuffer(bytearray(xxhash.xxh3_128_digest(host_tail)), dtype=torch.uint8)
        digests[n_blocks - 1] = row.to(device)
    return digests


# ------------------------------------------------------------------ many tensors, one launch
# (the tables of block addresses: gpu/xxh3_plans.py)

_TAIL_STREAMS: dict[torch.device, Any] = {}


def _tail_stream(device: torch.device) -> Any:
    """A side stream of ``device`` for the tail kernel (created once per device)."""
    with _TABLES_LOCK:
        s = _TAIL_STREAMS.get(device)
        if s is None:
            s = torch.cuda.Stream(device=device)
            _TAIL_STREAMS[device] = s
        return s


def _flat_bytes(v: torch.Tensor) -> torch.Tensor:
    """:func:`as_bytes` without the new tensor object when ``v`` already is flat bytes
    (a few microseconds per view add up to milliseconds over a whole model)."""
    if v.dtype == torch.uint8 and v.dim() == 1 and (v.numel() <= 1 or v.stride(0) == 1):
        return v
    return as_bytes(v)


def block_digests_many(
    views: Sequence[torch.Tensor], block_size: int, config: LaunchConfig | None = None
) -> torch.Tensor:
    """XXH3-128 of every ``block_size`` block of each of ``views``, in one kernel launch.

    The result equals ``torch.cat([block_digests(v, block_size) for v in views])``: a
    ``(sum of ceil(len / block_size), 16)`` uint8 tensor on the views' device, rows in
    view order then block order, bit-exact with ``xxhash.xxh3_128_digest``. ``views``
    are tensors of any dtype (hashed as their row-major bytes) on one CUDA device, or
    on the CPU under ``TRITON_INTERPRET=1``; an empty list gives a ``(0, 16)`` CPU
    tensor.

    Every full block of every view is hashed by one launch that reads a table of block
    addresses; tails of more than 240 bytes by one more launch (on a side stream, so it
    overlaps the first); tails of 240 bytes or less on the host. The tables are cached
    per (addresses, lengths, block size): repeated saves of the same live tensors do
    not rebuild them. Views that do not start on a 16-byte boundary are copied (and
    such calls are not cached). Raises ValueError for a bad ``block_size`` or views on
    different devices. ``config``: as for :func:`block_digests`.
    """
    config = config or DEFAULT_CONFIG
    check_block_size(block_size)
    if not views:
        return torch.empty((0, 16), dtype=torch.uint8)
    bufs = [_flat_bytes(v) for v in views]
    device = bufs[0].device
    for b in bufs:
        if b.device != device:
            raise ValueError(f"views on different devices: {device} and {b.device}")
    cache = True
    for i, b in enumerate(bufs):
        if b.numel() and b.data_ptr() % 16:
            # Stripes are loaded as aligned 16-byte pairs of words (see block_digests).
            bufs[i] = b.clone()
            cache = False  # the copy's address is new every call
    plan = plan_for(bufs, block_size, device, cache)
    if plan.n_rows == 0:
        return torch.empty((0, 16), dtype=torch.uint8, device=device)
    base = bufs[plan.base]
    try:
        # The kernels address every view from the base view's first byte, as words
        # (full blocks) and as bytes (the tails' unaligned final stripe).
        base_words = base[:8].view(torch.int64) if base.numel() >= 8 else None
    except RuntimeError:  # storage offset not a multiple of 8: cannot alias as words
        base_words = None
    if base_words is None and plan.n_full + plan.n_tail:
        return torch.cat([block_digests(b, block_size, config) for b in bufs])
    cuda = device.type == "cuda"
    n_int = plan.n_full + plan.n_tail
    out = torch.empty((n_int, 2), dtype=torch.int64, device=device)
    table = _secret_table(device)
    if cuda:
        current = torch.cuda.current_stream(device)
        if plan.ready is not None:
            current.wait_event(plan.ready)  # plans built on another stream
        for t in (plan.addr, plan.tails, plan.perm):
            if t is not None:
                # An evicted plan's tables must outlive kernels still reading them.
                t.record_stream(current)
    if plan.n_tail:
        assert plan.tails is not None
        # Tails first, on a side stream: each is one long sequential block, so started
        # alongside the full blocks they add no time at the end.
        side = _tail_stream(device) if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                _launch_tails(base_words, base, plan, table, out)
            # ``out`` and any aligned copies belong to the current stream, which waits
            # for the side stream below; the cached tail table may be evicted later.
            plan.tails.record_stream(side)
        else:
            _launch_tails(base_words, base, plan, table, out)
    if plan.n_full:
        assert base_words is not None and plan.addr is not None
        _launch_many_full(base_words, plan.addr, table, out, plan.n_full, block_size, config)
    if plan.n_tail and cuda:
        torch.cuda.current_stream(device).wait_stream(_tail_stream(device))
    digests = _canonical(out)
    if plan.short:
        # Short paths (1-240 bytes) on the host: one gather, one copy each way.
        parts = [bufs[i][o : o + n] for i, o, n in plan.short]
        host = torch.cat(parts).cpu().numpy().tobytes()
        rows = bytearray()
        pos = 0
        for _i, _o, n in plan.short:
            rows += xxhash.xxh3_128_digest(host[pos : pos + n])
            pos += n
        short_rows = torch.frombuffer(rows, dtype=torch.uint8).view(-1, 16).to(device)
        digests = torch.cat([digests, short_rows])
    if plan.perm is not None:
        digests = digests.index_select(0, plan.perm)
    return digests


def row_digests(
    rows: torch.Tensor,
    sizes: Sequence[int],
    block_size: int,
    to_device: Any = None,
) -> torch.Tensor:
    """XXH3-128 of ``rows[i, :sizes[i]]`` for every row i: ``(n, 16)`` uint8 on the
    rows' device (what :func:`block_digests_many` gives for those views).

    ``rows`` is ``(n, block_size)`` contiguous uint8 (the restore's decoded rows; each
    size at most ``block_size``). Every row is hashed as a full block by one launch
    over the buffer, and only the short rows (a tensor's last block) get a view each
    and a second launch whose digests replace theirs. The restore built a view per row
    for :func:`block_digests_many` before: about 1,000 torch calls per 1 GiB batch on
    the thread that feeds the GPU, the line py-spy found that thread holding the GIL on
    most (17.1 GB loads on the H200, benchmarks/results/h200_2026-12-03e, run 3).
    ``to_device(array)``: how the short rows' int64 index reaches the device (e.g.
    ``Uploads.from_numpy``, no stream sync); by default a copy.
    """
    n = int(rows.shape[0])
    if n == 0:
        return torch.empty((0, 16), dtype=torch.uint8, device=rows.device)
    if rows.dim() != 2 or int(rows.shape[1]) != block_size or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous (n, {block_size}) bytes")
    short = [i for i, s in enumerate(sizes) if s != block_size]
    if len(short) * 2 > n:  # mostly short rows: hash each once
        return block_digests_many([rows[i, : sizes[i]] for i in range(n)], block_size)
    got = block_digests(rows.reshape(-1), block_size)
    if short:
        part = block_digests_many([rows[i, : sizes[i]] for i in short], block_size)
        where = np.asarray(short, dtype=np.int64)
        idx = (
            to_device(where, rows.device)
            if to_device is not None
            else torch.from_numpy(where).to(rows.device)
        )
        got.index_copy_(0, idx, part)
    return got


def _canonical(out: torch.Tensor) -> torch.Tensor:
    """``(n, 16)`` digests from the kernels' ``(n, 2)`` int64 halves: each 64-bit half
    big-endian, the high half (stored at ``[i, 0]``) first."""
    n = int(out.shape[0])
    return out.view(torch.uint8).view(n, 2, 8).flip(2).reshape(n, 16)


def digests_at(
    base: torch.Tensor,
    units: torch.Tensor,
    block_size: int,
    config: LaunchConfig | None = None,
    canonical: bool = True,
    out: torch.Tensor | None = None,
    words: torch.Tensor | None = None,
) -> torch.Tensor:
    """XXH3-128 of ``len(units)`` full blocks where they lie: block ``i`` starts
    ``16 * units[i]`` bytes after the first byte of the 1-D uint8 ``base`` (an int64
    table on its device). Returns ``(n, 16)`` uint8 digests in canonical form, as
    :func:`block_digests` gives; with ``canonical=False`` the kernel's ``(n, 2)``
    int64 halves (high, low: an id read as two big-endian int64). A dense step hashes
    its live blocks this way instead of gathering them first.

    A caller that launches this for every piece may pass ``out`` (``(n, 2)`` int64, with
    ``canonical=False``) and ``words`` (``base[:8].view(torch.int64)``), made once:
    every torch call gives up the GIL, and taking it back is what a dense step's device
    thread waits on (see :mod:`apollo_cas.gpu.sparse_kernels`)."""
    config = config or DEFAULT_CONFIG
    check_block_size(block_size)
    n = int(units.numel())
    if out is None:
        out = torch.empty((n, 2), dtype=torch.int64, device=base.device)
    elif canonical or tuple(out.shape) != (n, 2) or out.dtype != torch.int64:
        raise ValueError(f"out must be ({n}, 2) int64 digest halves, with canonical=False")
    if n:
        if words is None:
            words = base[:8].view(torch.int64)
        _launch_many_full(words, units, _secret_table(base.device), out, n, block_size, config)
    return _canonical(out) if canonical else out


def _launch_many_full(
    words: torch.Tensor,
    addr: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    n: int,
    block_size: int,
    config: LaunchConfig,
) -> None:
    """The table-driven kernel over ``n`` full blocks at ``addr`` (16-byte units from ``words``)."""
    _xxh3_many_full_kernel[(triton.cdiv(n, config.group),)](
        words,
        addr,
        table,
        out,
        n,
        BLOCK_WORDS=block_size // 8,
        GROUP=config.group,
        UNROLL=config.unroll,
        EVICTION="evict_first" if config.evict_first else "",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _launch_tails(
    base_words: torch.Tensor | None,
    base: torch.Tensor,
    plan: ManyPlan,
    table: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The tail kernel over the plan's tail table, writing rows ``n_full`` onwards."""
    _xxh3_many_tail_kernel[(plan.n_tail,)](
        base_words, base, plan.tails, table, out[plan.n_full :], num_warps=1
    )


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` was set
    before triton was imported): then they take CPU tensors."""
    return type(_xxh3_full_blocks_kernel).__name__ == "InterpretedFunction"
