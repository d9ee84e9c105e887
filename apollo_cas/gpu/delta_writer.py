"""The host half of a dense-step save: a piece's deltas encoded on host threads and
stored, in order where the store writes in order (docs/GPU_DELTA.md).

:class:`~apollo_cas.gpu.delta_save.GpuDeltaSaver` hands each piece's rows here once
their planes are on the host; this module makes the codec-3 and codec-4 chunks
(:mod:`apollo_cas.gpu.delta_encode`), stores them, and compares deltas above the
accept fraction with the block's full encoding, as ``codecs.encode`` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..chunkstore import ChunkStore
from ..codecs.envelope import Blob
from ..sources.base import BlockRequest
from .delta_encode import DeltaBlob, SparsePlanes, choose, encode_delta, outright_many
from .delta_jobs import DeltaJob, DeltaSaveStats, TallyFn

__all__ = ["DeltaWriter", "collect"]

#: One block of a piece: (job, its non-zero planes' host views by plane, its codec-4
#: planes or None, its changed-element count or None, whether it is codec 4 outright).
Item = tuple[DeltaJob, list[Any], SparsePlanes | None, int | None, bool]


def collect(futs: list[Future[Any]]) -> None:
    """Wait for one piece's encodings (their errors raise here), and forget them."""
    for f in futs:
        f.result()
    futs.clear()


class DeltaWriter:
    """Encodes and stores the pieces of one saver run.

    ``pool`` runs the encoders (``workers`` threads); ``store_thread`` stores a piece's
    chunks in order where ``chunks`` writes in order (pack files, store format 2), else
    the encoders store them as they finish. Deltas queued for a comparison with their full encoding are
    compared once ``compare_every`` of them wait, and at :meth:`finish`.
    """

    def __init__(
        self,
        chunks: ChunkStore,
        block_size: int,
        stats: DeltaSaveStats,
        tally: TallyFn,
        pool: ThreadPoolExecutor,
        workers: int,
        store_thread: ThreadPoolExecutor,
        *,
        sparse: bool,
        fetch: Callable[[Sequence[BlockRequest]], Any] | None,
        compare_every: int,
    ) -> None:
        self.chunks = chunks
        self.policy = chunks.policy
        self.block_size = block_size
        self.stats = stats
        self.tally = tally
        self.pool = pool
        self.workers = workers
        self.sparse = sparse
        self.fetch = fetch
        self.compare_every = compare_every
        self.ordered = bool(getattr(chunks, "ordered_writes", False))
        self.store_thread = store_thread if self.ordered else None
        self._stored: list[Future[None]] = []
        self._compare_list: list[tuple[DeltaJob, DeltaBlob]] = []
        self._compare_lock = threading.Lock()

    def piece(self, items: Sequence[Item]) -> list[Future[Any]]:
        """Queue one piece's blocks for encoding; returns the encoders' futures (the
        piece's pinned slot is free once they are done: :func:`collect`)."""
        n = len(items)
        # A task per group of blocks, not per block: a submit is ~28 us of the pipeline
        # thread's time (24,602 of them: 0.68 s of a 17 GB dense step on the H200).
        step = max(1, -(-n // (4 * self.workers)))
        futs = [self.pool.submit(self._encode_many, items[a : a + step]) for a in range(0, n, step)]
        compare = len(self._compare_list) >= self.compare_every
        if self.store_thread is not None:
            # Stored in order by the store thread, not by the device thread: ~9 us of
            # Python per chunk (256 per piece) on the thread every piece waits for.
            self._stored_done(wait_all=False)
            self._stored.append(self.store_thread.submit(self._store, list(futs), compare))
        elif compare:
            self._compare()
        return futs

    def finish(self) -> None:
        """Wait for every piece's chunks to be stored, then compare what still waits."""
        self._stored_done(wait_all=True)
        self._compare()

    def _encode(
        self,
        job: DeltaJob,
        views: list[Any],
        changes: Any = None,
        changed: int | None = None,
        dropped: bool = False,
    ) -> tuple[DeltaJob, Blob] | None:
        d = encode_delta(
            views,
            job.w,
            self.block_size,
            job.base,
            job.depth,
            self.policy.level,
            job.itemsize,
            self.sparse,
            changes,
            changed,
            dropped,
        )
        return self._keep(job, d)

    def _keep(self, job: DeltaJob, d: DeltaBlob) -> tuple[DeltaJob, Blob] | None:
        """Store an encoded delta (or queue it for comparison with the full encoding);
        returns it instead where the store thread stores chunks in order."""
        if not d.accepted:
            with self._compare_lock:
                self._compare_list.append((job, d))
            return None
        assert d.blob is not None
        if self.ordered:
            return job, d.blob
        bs = self.block_size
        self.tally(self.chunks.put_encoded(job.cid, d.blob, job.base, bs), bs)
        return None

    def _encode_many(self, items: Sequence[Item]) -> list[tuple[DeltaJob, Blob]]:
        """:meth:`_encode` of each item; the chunks left for the store thread.

        Blocks taken as codec 4 outright have their frames made together
        (:func:`~apollo_cas.gpu.delta_encode.outright_many`), the same bytes."""
        outright: list[tuple[Item, SparsePlanes]] = []
        for it in items:
            ch = it[2]
            if it[4] and isinstance(ch, SparsePlanes):
                outright.append((it, ch))
        made = outright_many(
            [(ch, it[0].itemsize, it[0].base, it[0].depth) for it, ch in outright],
            self.block_size,
            self.policy.level,
        )
        ready = {id(it): d for (it, _), d in zip(outright, made, strict=True) if d is not None}
        out = []
        for item in items:
            d = ready.get(id(item))
            got = self._encode(*item) if d is None else self._keep(item[0], d)
            if got is not None:
                out.append(got)
        return out

    def _store(self, futs: Sequence[Future[Any]], compare: bool) -> None:
        """On the store thread: one piece's chunks, in order, once encoded; then the
        deltas waiting for a comparison, when the piece asked for it."""
        bs = self.block_size
        for f in futs:
            for job, blob in f.result():
                self.tally(self.chunks.put_encoded(job.cid, blob, job.base, bs), bs)
        if compare:
            self._compare()

    def _stored_done(self, wait_all: bool) -> None:
        """Raise the store thread's first error, if any; bound what it has queued (at most
        four pieces' chunks wait for it), or wait for all of it."""
        while self._stored and (wait_all or len(self._stored) > 4 or self._stored[0].done()):
            self._stored.pop(0).result()

    def _compare(self) -> None:
        """Deltas above the accept fraction against the full encoding of the live block."""
        with self._compare_lock:
            todo = list(self._compare_list)
            self._compare_list.clear()
        if not todo:
            return
        t0 = time.perf_counter()
        bs = self.block_size
        reqs = [BlockRequest(j.tensor, j.offset, bs) for j, _ in todo]
        if self.fetch is None:
            raise RuntimeError("a delta needs its full encoding to compare, and no fetch was given")
        for i, view in self.fetch(reqs):
            job, d = todo[i]
            blob = choose(d, view, self.policy, job.itemsize)
            self.stats.d2h_bytes += bs
            self.stats.compared_blocks += 1
            is_delta = blob is d.blob
            if not is_delta:
                self.stats.full_chunks += 1
            base = job.base if is_delta else None
            self.tally(self.chunks.put_encoded(job.cid, blob, base, bs), bs)
        self.stats.compare_s += time.perf_counter() - t0
