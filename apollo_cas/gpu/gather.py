"""The restore pipeline's read stage: a batch's chunks and their delta bases, read and
parsed on a pool of host threads.

A batch's first round of reads is *submitted* (:meth:`ChunkGather._gather_start`)
before the previous batch's is *collected* (:meth:`ChunkGather._gather_finish`), so
the pool always has queued work: waiting for every group of one batch before the next
batch's groups were handed out left threads idle at each batch's slowest group. On the
H200 host the same reader read a 17 GB checkpoint's 11.5 GB of packs at 29.7 GB/s in
windows of 512 chunks and 33-36 GB/s in windows of 2,048, against 40.5 GB/s for the
packs read whole (benchmarks/results/h200_2026-12-03e/run1_pack_reads.json): the cost is
the barrier per window, not the reads.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import FormatVersionError
from .accounting import RestoreStats
from .chunkplan import ChunkPlan, Place, corrupt, parse_chunk, slices
from .readers import Arena, ArenaViews, BlobReader, RawReader, into_arena

__all__ = [
    "GPU_READ_THREADS",
    "READ_AHEAD",
    "READ_GROUPS_PER_WORKER",
    "BaseOf",
    "ChunkGather",
    "Reading",
    "read_threads",
    "settle",
]

#: Batches whose reads are on the pool beyond the one being collected. One is enough
#: to keep every thread busy, and each holds an arena (the pipeline has three).
READ_AHEAD = 1
#: Read groups per pool thread and batch. With the next batch's groups queued behind,
#: a thread that finishes early takes one of those, so one (larger) group per thread
#: is enough for balance: a reader call of 128 chunks read 33-36 GB/s on the H200
#: host where calls of 32 read 29.7 (run1_pack_reads.json, 16 threads), and each
#: call is Python work under the GIL.
READ_GROUPS_PER_WORKER = 1
#: The delta base of a stored chunk as the store's index records it (None: a full
#: chunk, or not known without reading it).
BaseOf = Callable[[bytes], "bytes | None"]
#: The most read threads of a pipeline on a GPU. Its reads no longer limit a load (they
#: wait for free arenas), the interpreter lock does: every read thread parses under it
#: and the thread that feeds the device waits to take it back. With 8 instead of 16 on
#: the H200 host, a warm 17.1 GB load took 1.18 / 1.02 s against 1.23-1.36 / 1.09-1.22 s,
#: after a dense step 2.04 / 1.74 s against 1.99-2.14 / 2.15-2.25 s (two runs of
#: benchmarks/probe_restore_threads.py: h200_2026-12-03e run3 and run6). With 4 the
#: reads limit again (1.11 s reading).
GPU_READ_THREADS = 8


def read_threads(workers: int, on_gpu: bool) -> int:
    """The read pool's default size: ``workers``, at most :data:`GPU_READ_THREADS` for a
    pipeline on a GPU (on the CPU the decode is the host's work: no evidence yet)."""
    return max(1, min(workers, GPU_READ_THREADS) if on_gpu else workers)


@dataclass
class Reading:
    """A batch whose first round of reads is on the pool."""

    k: int
    want: list[tuple[bytes, int]]
    futures: list[Future[tuple[int, list[ChunkPlan], float]]]
    arena: Arena | None
    busy_s: float
    #: how many of ``want`` are the batch's own chunks (the rest: delta bases the
    #: index named, read in the same round)
    n_chunks: int


class ChunkGather:
    """Mixin of :class:`~apollo_cas.gpu.restore.RestorePipeline`: the read stage."""

    reader: BlobReader
    read_raw: RawReader
    #: the delta base of a stored chunk from the store's index, without reading it
    #: (format 2), or None: bases are then found by parsing each delta
    base_of: BaseOf | None
    workers: int
    #: threads of the read pool (``workers``, at most :data:`GPU_READ_THREADS` on a GPU)
    read_workers: int
    direct: bool
    stats: RestoreStats
    _pools: dict[str, ThreadPoolExecutor]
    _live: dict[bytes, tuple[int, int, int]]
    _batch_of: list[int]

    def _pool(self, name: str, threads: int | None = None) -> ThreadPoolExecutor:
        """A pool kept for the pipeline's life (one for reads, one for staging), fed
        contiguous groups of work: a future per chunk or piece cost 23.5 us of held GIL
        each here (bounded_map, 16 threads, 2 cores), ~65k of them for 17 GB."""
        pool = self._pools.get(name)
        if pool is None:
            n = threads or self.workers
            pool = self._pools[name] = ThreadPoolExecutor(n, f"apollo-{name}")
        return pool

    def _submit(
        self, want: list[tuple[bytes, int]], arena: Arena | None
    ) -> list[Future[tuple[int, list[ChunkPlan], float]]]:
        """Hand ``want``'s reads to the pool, one contiguous group of ids per task."""
        ids = [cid for cid, _ in want]

        def parse(cid: bytes, size: int, blob: Any) -> ChunkPlan:
            try:
                c = parse_chunk(blob, cid, size)
            except FormatVersionError:
                c = None  # a newer envelope: the CPU decoder says what to do
            if c is None:
                c = self._fallback(cid, size)
            return c

        # The same thread parses what it read, so one group's parsing overlaps another's
        # reads (a barrier between reading and parsing the whole batch cost read time).
        # CPU seconds go back with the result: pool threads adding to the stats
        # themselves could lose updates.
        def read_group(sl: slice) -> tuple[int, list[ChunkPlan], float]:
            tc = time.thread_time()
            got = self.reader(ids[sl], arena)
            if len(got) != len(ids[sl]):
                raise RuntimeError(f"blob reader returned {len(got)} chunks for {len(ids[sl])} ids")
            where: Sequence[int | None] = ()
            if self.direct and arena is not None:
                # Direct mode copies the arena to the device as is: bring stored bytes
                # a reader returned as its own (one object per chunk) into it. Where
                # each lies goes with its plan: the thread that feeds the device looked
                # it up again per chunk (9% of its GIL time in py-spy, H200, run 3).
                known = got.at if isinstance(got, ArenaViews) else None
                if known is not None and None not in known:
                    where = known  # the pack reader read them there
                else:
                    placed = [into_arena(arena, b) for b in got]
                    got = [b for b, _ in placed]
                    where = [at for _, at in placed]
            nbytes = sum(len(b) for b in got)
            plans = [parse(cid, size, b) for (cid, size), b in zip(want[sl], got, strict=True)]
            if where:
                for c, at in zip(plans, where, strict=True):
                    if c.fallback is None:
                        c.at = at
            return nbytes, plans, time.thread_time() - tc

        pool = self._pool("read", self.read_workers)
        return [
            pool.submit(read_group, sl)
            for sl in slices(len(ids), self.read_workers, READ_GROUPS_PER_WORKER)
        ]

    def _collect(
        self, futures: list[Future[tuple[int, list[ChunkPlan], float]]]
    ) -> list[ChunkPlan]:
        """The plans of submitted reads, in the order asked; the first error is raised
        once every group has stopped (none may still write into the arena then)."""
        out: list[ChunkPlan] = []
        try:
            for fut in futures:
                nbytes, plans, cpu = fut.result()
                self.stats.stored_bytes_read += nbytes
                self.stats.read_cpu_s += cpu
                out.extend(plans)
        except BaseException:
            settle(futures)
            raise
        return out

    def _read(self, want: list[tuple[bytes, int]], arena: Arena | None) -> list[ChunkPlan]:
        return self._collect(self._submit(want, arena))

    def _fallback(self, cid: bytes, size: int) -> ChunkPlan:
        raw = self.read_raw(cid)
        if len(raw) != size:
            raise corrupt(cid, f"decoded to {len(raw)} bytes, its place needs {size}")
        self.stats.cpu_fallback_chunks += 1
        c = ChunkPlan(cid, size, fallback=raw)
        c.pieces = [(0, size)]
        return c

    def _gather_start(self, k: int, ps: list[Place], arena: Arena | None) -> Reading:
        """Submit batch ``k``'s chunk reads (each id once) and, where the index names
        them, their delta bases' in the same round."""
        t0 = time.perf_counter()
        want: list[tuple[bytes, int]] = []
        asked: set[bytes] = set()
        for p in ps:
            if p.chunk_id not in asked:
                asked.add(p.chunk_id)
                want.append((p.chunk_id, p.size))
        n_chunks = len(want)
        if self.base_of is not None:
            # Bases found only by parsing each delta were a second round of reads per
            # batch, queued behind the next batch's on the pool: after a dense step the
            # read thread was the limit (1.17 s reading of a 1.33 s load of 17.1 GB on
            # the H200, h200_2026-12-03f run 1). A base the index names wrongly (damage)
            # is only a wasted read: the chains are taken from the parsed envelopes.
            for cid, size in want[:n_chunks]:
                b = self.base_of(cid)
                while b is not None and b not in asked and not self._live_base(b, k):
                    asked.add(b)
                    want.append((b, size))
                    b = self.base_of(b)
        futures = self._submit(want, arena)
        return Reading(k, want, futures, arena, time.perf_counter() - t0, n_chunks)

    def _live_base(self, b: bytes, k: int) -> bool:
        """Whether base ``b`` is in a live destination block that batch ``k`` may copy
        it from (not overwritten before batch ``k`` places its blocks)."""
        lv = self._live.get(b)
        return lv is not None and (lv[2] < 0 or self._batch_of[lv[2]] >= k)

    def _gather_finish(self, r: Reading) -> tuple[dict[bytes, ChunkPlan], list[bytes]]:
        """Collect batch ``r.k``'s chunks, then read their delta bases round by round."""
        t0 = time.perf_counter()
        k, arena = r.k, r.arena
        chunks: dict[bytes, ChunkPlan] = {}
        order: list[bytes] = []
        n_places = r.n_chunks
        plans = self._collect(r.futures)
        while plans:
            for c in plans:
                chunks[c.cid] = c
                order.append(c.cid)
            want: list[tuple[bytes, int]] = []
            seen: set[bytes] = set()
            for cid in order:
                c = chunks[cid]
                b = c.base
                if b is None or b in chunks or b in seen:
                    continue
                if self._live_base(b, k):
                    lv = self._live[b]
                    chunks[b] = ChunkPlan(b, c.size, live=(lv[0], lv[1]))
                    order.append(b)
                    continue
                seen.add(b)
                want.append((b, c.size))
            plans = self._read(want, arena) if want else []
        self.stats.chunks_decoded += n_places
        self.stats.bases_decoded += len(order) - n_places
        self.stats.read_s += r.busy_s + time.perf_counter() - t0
        return chunks, order


def settle(futures: Sequence[Future[Any]]) -> None:
    """Cancel what has not started and wait for the rest (their errors are dropped:
    the caller raises its own)."""
    for f in futures:
        f.cancel()
    concurrent.futures.wait(futures)
