"""The restore pipeline's read stage: a batch's chunks and their delta bases, read and
parsed on a pool of host threads.

A batch's first round of reads is *submitted* (:meth:`ChunkGather._gather_start`)
before the previous batch's is *collected* (:meth:`ChunkGather._gather_finish`), so
the pool always has queued work: waiting for every group of one batch before the next
batch's groups were handed out left threads idle at each batch's slowest group. On the
H200 host the same reader read a 17 GB checkpoint's 11.5 GB of packs at 29.7 GB/s in
windows of 512 chunks and 33-36 GB/s in windows of 2,048, against 40.5 GB/s for the
packs read whole (benchmarks/results/h200_2026-12-03e/pack_reads.json): the cost is
the barrier per window, not the reads.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import FormatVersionError
from .accounting import RestoreStats
from .chunkplan import ChunkPlan, Place, corrupt, parse_chunk, slices
from .envelopes import parse_planes
from .readers import Arena, BlobReader, RawReader, into_arena

__all__ = ["READ_AHEAD", "READ_GROUPS_PER_WORKER", "ChunkGather", "Reading", "settle"]

#: Batches whose reads are on the pool beyond the one being collected. One is enough
#: to keep every thread busy, and each holds an arena (the pipeline has three).
READ_AHEAD = 1
#: Read groups per pool thread and batch. With the next batch's groups queued behind,
#: a thread that finishes early takes one of those, so one (larger) group per thread
#: is enough for balance: a reader call of 128 chunks read 33-36 GB/s on the H200
#: host where calls of 32 read 29.7 (run1_pack_reads.json, 16 threads), and each
#: call is Python work under the GIL.
READ_GROUPS_PER_WORKER = 1


@dataclass
class Reading:
    """A batch whose first round of reads is on the pool."""

    k: int
    want: list[tuple[bytes, int]]
    futures: list[Future[tuple[int, list[ChunkPlan], float, int]]]
    arena: Arena | None
    busy_s: float


class ChunkGather:
    """Mixin of :class:`~apollo_cas.gpu.restore.RestorePipeline`: the read stage."""

    reader: BlobReader
    read_raw: RawReader
    workers: int
    direct: bool
    #: parse the 2-byte byte-plane chunks of a read group together (numpy,
    #: :mod:`apollo_cas.gpu.envelopes`); False: every chunk by ``parse_chunk``
    vector_parse: bool
    stats: RestoreStats
    _pools: dict[str, ThreadPoolExecutor]
    _live: dict[bytes, tuple[int, int, int]]
    _batch_of: list[int]

    def _pool(self, name: str) -> ThreadPoolExecutor:
        """A pool kept for the pipeline's life (one for reads, one for staging), fed
        contiguous groups of work: a future per chunk or piece cost 23.5 us of held GIL
        each here (bounded_map, 16 threads, 2 cores), ~65k of them for 17 GB."""
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(self.workers, f"apollo-{name}")
        return pool

    def _submit(
        self, want: list[tuple[bytes, int]], arena: Arena | None
    ) -> list[Future[tuple[int, list[ChunkPlan], float, int]]]:
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
        def read_group(sl: slice) -> tuple[int, list[ChunkPlan], float, int]:
            tc = time.thread_time()
            got = list(self.reader(ids[sl], arena))
            if len(got) != len(ids[sl]):
                raise RuntimeError(f"blob reader returned {len(got)} chunks for {len(ids[sl])} ids")
            where: list[int | None] = [None] * len(got)
            if arena is not None:
                where = [arena.offset_of(b) for b in got]
                if self.direct:
                    # Direct mode copies the arena to the device as is: bring stored
                    # bytes a reader returned as its own (one object per chunk) into it.
                    for i, at in enumerate(where):
                        if at is None:
                            got[i] = into_arena(arena, got[i])
                            where[i] = arena.offset_of(got[i])
            group = want[sl]
            lengths = [len(b) for b in got]
            fast: list[ChunkPlan | None] = [None] * len(got)
            if self.vector_parse and arena is not None and arena.array is not None:
                fast = parse_planes(
                    arena.array, where, lengths, got, ids[sl], [size for _, size in group]
                )
            plans = [
                c if c is not None else parse(cid, size, b)
                for c, (cid, size), b in zip(fast, group, got, strict=True)
            ]
            for c, at in zip(plans, where, strict=True):
                c.at = at
            together = sum(c is not None for c in fast)
            return sum(lengths), plans, time.thread_time() - tc, together

        pool = self._pool("read")
        return [
            pool.submit(read_group, sl)
            for sl in slices(len(ids), self.workers, READ_GROUPS_PER_WORKER)
        ]

    def _collect(
        self, futures: list[Future[tuple[int, list[ChunkPlan], float, int]]]
    ) -> list[ChunkPlan]:
        """The plans of submitted reads, in the order asked; the first error is raised
        once every group has stopped (none may still write into the arena then)."""
        out: list[ChunkPlan] = []
        try:
            for fut in futures:
                nbytes, plans, cpu, together = fut.result()
                self.stats.stored_bytes_read += nbytes
                self.stats.parsed_together += together
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
        """Submit batch ``k``'s chunk reads (each id once)."""
        t0 = time.perf_counter()
        want: list[tuple[bytes, int]] = []
        asked: set[bytes] = set()
        for p in ps:
            if p.chunk_id not in asked:
                asked.add(p.chunk_id)
                want.append((p.chunk_id, p.size))
        futures = self._submit(want, arena)
        return Reading(k, want, futures, arena, time.perf_counter() - t0)

    def _gather_finish(self, r: Reading) -> tuple[dict[bytes, ChunkPlan], list[bytes]]:
        """Collect batch ``r.k``'s chunks, then read their delta bases round by round."""
        t0 = time.perf_counter()
        k, arena = r.k, r.arena
        chunks: dict[bytes, ChunkPlan] = {}
        order: list[bytes] = []
        n_places = len(r.want)
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
                lv = self._live.get(b)
                if lv is not None and (lv[2] < 0 or self._batch_of[lv[2]] >= k):
                    # Not overwritten before this batch places its blocks.
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
