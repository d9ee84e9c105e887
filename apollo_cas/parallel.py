"""The thread pool every stage shares.

xxhash, zstandard, numpy and file I/O release the GIL, so plain threads use all
cores without the cost of moving blocks between processes.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from . import settings

T = TypeVar("T")
R = TypeVar("R")


#: The most threads a pool may use in this context (None: no limit). Set by
#: :func:`worker_limit` around a save, so every pool it starts (hashing, codecs,
#: device fetch) leaves the rest of the cores to the server beside it.
_LIMIT: ContextVar[int | None] = ContextVar("apollo_cas_worker_limit", default=None)


@contextmanager
def worker_limit(workers: int) -> Iterator[None]:
    """Cap :func:`default_workers` and :func:`bounded_map` at ``workers`` in this context."""
    token = _LIMIT.set(max(1, workers))
    try:
        yield
    finally:
        _LIMIT.reset(token)


@contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` in this context, the old interval after it
    (None: leave it). Process-wide: every thread hands the GIL over that often."""
    if seconds is None:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def capped_workers(n: int) -> int:
    """``n`` threads, or fewer where :func:`worker_limit` caps this context (at least 1)."""
    cap = _LIMIT.get()
    return max(1, n if cap is None else min(n, cap))


def default_workers() -> int:
    threads = settings.threads()  # APOLLO_CAS_THREADS
    if threads is not None:
        return capped_workers(threads)
    return capped_workers(
        max(
            1,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        )
    )


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, window: int | None = None
) -> Iterator[R]:
    """Apply ``fn`` to ``items`` on ``workers`` threads, yielding results in order.

    At most ``window`` items are in flight, so memory stays bounded however long
    ``items`` is; an exception in any task is raised here, and remaining tasks are
    cancelled.
    """
    workers = capped_workers(workers)
    window = window or workers * 4
    if workers <= 1:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apollo") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
