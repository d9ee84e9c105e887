"""Keep glibc from returning every freed chunk buffer to the kernel.

Each 1 MiB block is decoded into fresh buffers. By default glibc serves
allocations that large with mmap and unmaps them on free, so every chunk costs
256 page faults to map and zero its memory again: one 1 GiB restore made
743,000 faults. Keeping freed memory in the heap cut that to 14,700 and the
restore from 2.53 s to 1.08 s; a 1 GiB save went from 3.9 s to 3.0 s
(benchmarks/results/compare.md, 2-core VM; a later 1 GiB save there showed no
difference, 0.75 s both ways). On the H200 its effect on saves is not shown: the one
same-host comparison (8.49 s against 10.49 s for 17.1 GB) ran its tuned process second,
with Triton's kernels already compiled into the on-disk cache by the first
(benchmarks/results/h200_2026-12-03b/README.md). The command-line processes do
this at start-up. A library must not retune the allocator of the program that
imports it, so in-process callers (a trainer saving through :class:`~apollo_cas.Store`)
opt in: ``apollo_cas.keep_freed_memory()`` once, early.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Tune glibc (if that is the C library) for block-sized buffers; True if applied.

    Freed memory up to 1 GiB per allocation stays in the process's heap (no mmap and
    munmap per buffer, no page faults to map it again), at the cost of the process
    keeping its high-water mark of heap memory."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    ok &= mallopt(_M_TOP_PAD, 256 << 20)
    return bool(ok)
