"""The save path: split tensors into blocks, hash, skip known, compress, write.

Blocks are aligned to tensor starts, so a change inside one tensor never shifts
the blocks of another, and the bytes a save writes are bounded by the bytes of
the tensors it touched, at any block size.

Two shapes of the same pipeline:

* host sources (files, CPU tensors): one task per block on the shared pool does
  hash -> existence check -> encode -> write, reading zero-copy views;
* device sources: the GPU hashes every block in place, only blocks the store
  lacks are fetched through pinned buffers, then encoded and written.

In a format-2 store (packs) the tasks hash and encode, and the caller's thread
stores the results in tensor order (``ChunkStore.ordered_writes``), so a save's
packs hold its chunks in the order a restore reads them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

from .chunkstore import ChunkStore, Prepared, PutResult
from .manifest import Manifest, SaveStats, TensorEntry
from .parallel import bounded_map, capped_workers
from .sources.base import BlockRequest, FetchedBatch, Source

if TYPE_CHECKING:
    from . import codecs

ProgressFn = Callable[[int], None]
T = TypeVar("T")


@dataclass
class WriteResult:
    """Tensor entries and statistics of the blocks of one source."""

    tensors: tuple[TensorEntry, ...]
    stats: SaveStats
    bases: dict[bytes, bytes] = field(default_factory=dict)
    #: Bytes that crossed from the device to the host (device sources).
    fetched_bytes: int = 0
    #: Wall seconds of its steps: ``ids`` (a device source's block ids and the
    #: lookup of each), ``gpu_delta`` (the GPU delta path), ``encode`` (every other
    #: block read, encoded and handed to the store).
    phases: dict[str, float] = field(default_factory=dict)


def block_spans(nbytes: int, block_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every block of a tensor of ``nbytes`` (the last may be short)."""
    full = nbytes - nbytes % block_size
    spans = [(o, block_size) for o in range(0, full, block_size)]
    if full < nbytes:
        spans.append((full, nbytes - full))
    return spans


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.new_chunks = 0
        self.new_raw = 0
        self.new_stored = 0
        self.bases: dict[bytes, bytes] = {}

    def add(self, r: PutResult, raw_len: int) -> None:
        if not r.written:
            return
        with self.lock:
            self.new_chunks += 1
            self.new_raw += raw_len
            self.new_stored += r.stored_size
            if r.base is not None:
                self.bases[r.chunk_id] = r.base


BaseFor = Callable[[int, int], "codecs.Base | None"]
#: Stores some of a device source's wanted blocks another way (the GPU delta save,
#: apollo_cas/gpu/delta_save.py): ``hook(wanted, where, ids, tally)`` returns the
#: indices into ``wanted`` left to the ordinary path and the bytes it copied to the host.
DeviceDeltaHook = Callable[
    [
        list[BlockRequest],
        list[tuple[int, int]],
        list[list[bytes]],
        Callable[[PutResult, int], None],
    ],
    tuple[list[int], int],
]


def write_source(
    chunks: ChunkStore,
    source: Source,
    block_size: int,
    workers: int,
    base_for: BaseFor | None = None,
    progress: ProgressFn | None = None,
    device_delta: DeviceDeltaHook | None = None,
) -> WriteResult:
    """Store every block of ``source`` that the store lacks.

    ``device_delta``, for a source that hashes on its device, stores what it can of
    the changed blocks first (deltas computed on the GPU); the rest take this path.
    """
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    tensors = source.tensors()
    spans = [block_spans(t.nbytes, block_size) for t in tensors]
    ids: list[list[bytes]] = [[b""] * len(s) for s in spans]
    tally = _Tally()
    fetched = 0
    device_ids = source.block_digests(block_size)
    ordered = chunks.ordered_writes

    def store(p: Prepared) -> PutResult:
        r = chunks.commit(p)
        tally.add(r, p.raw_size)
        return r

    if device_ids is None:

        def host_task(group: list[tuple[int, int]]) -> list[Prepared]:
            items = []
            for ti, bi in group:
                t = tensors[ti]
                off, length = spans[ti][bi]
                base = base_for(ti, bi) if base_for else None
                items.append((t.read(off, length), t.dtype.itemsize, None, base))
            out = chunks.prepare_many(items)
            for (ti, bi), p in zip(group, out, strict=True):
                ids[ti][bi] = p.chunk_id
                if not ordered:
                    store(p)  # format 1: each task writes its own chunk object
            return out

        per = group_size(block_size)
        jobs = groups(((ti, bi) for ti, s in enumerate(spans) for bi in range(len(s))), per)
        # At most workers + 2 groups in flight: memory of ~(workers + 2) * GROUP_BYTES.
        for group in bounded_map(host_task, jobs, workers, window=capped_workers(workers) + 2):
            for p in group:
                if ordered:
                    store(p)
                if progress:
                    progress(p.raw_size)
    else:
        wanted: list[BlockRequest] = []
        where: list[tuple[int, int]] = []
        seen: set[bytes] = set()
        for ti, t in enumerate(tensors):
            if len(device_ids[ti]) != len(spans[ti]):
                raise RuntimeError(f"device digests for {t.name}: wrong block count")
            for bi, cid in enumerate(device_ids[ti]):
                ids[ti][bi] = cid
                if cid in seen or chunks.exists(cid):
                    continue
                seen.add(cid)
                off, length = spans[ti][bi]
                wanted.append(BlockRequest(ti, off, length))
                where.append((ti, bi))
        if progress:
            progress(sum(t.nbytes for t in tensors) - sum(r.length for r in wanted))
        t0 = _lap(phases, "ids", t0)
        if device_delta is not None and wanted:
            before = sum(r.length for r in wanted)
            rest, moved = device_delta(wanted, where, ids, tally.add)
            fetched += moved
            wanted = [wanted[i] for i in rest]
            where = [where[i] for i in rest]
            if progress:
                progress(before - sum(r.length for r in wanted))
            t0 = _lap(phases, "gpu_delta", t0)

        def device_task(group: list[tuple[int, memoryview]]) -> list[Prepared]:
            items = []
            for i, data in group:
                ti, bi = where[i]
                base = base_for(ti, bi) if base_for else None
                items.append((data, tensors[ti].dtype.itemsize, ids[ti][bi], base))
            out = chunks.prepare_many(items)
            if not ordered:
                for p in out:
                    store(p)
            return out

        for p in _encode_fetched(source, wanted, device_task, workers, group_size(block_size)):
            if ordered:
                store(p)
            fetched += p.raw_size
            if progress:
                progress(p.raw_size)

    _lap(phases, "encode", t0)
    entries = tuple(
        TensorEntry(t.name, t.dtype.name, tuple(t.shape), t.nbytes, tuple(ids[ti]))
        for ti, t in enumerate(tensors)
    )
    stats = SaveStats(
        logical_bytes=sum(t.nbytes for t in tensors),
        chunks=sum(len(s) for s in spans),
        new_chunks=tally.new_chunks,
        new_raw_bytes=tally.new_raw,
        new_stored_bytes=tally.new_stored,
    )
    return WriteResult(entries, stats, tally.bases, fetched, phases)


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Record the seconds since ``since`` as phase ``name``; returns now."""
    now = time.perf_counter()
    phases[name] = now - since
    return now


#: Bytes of blocks per encoding task (``ChunkStore.prepare_many``), at most
#: :data:`GROUP_BLOCKS` blocks: their zstd frames are made in one call, so an
#: encoding thread takes the GIL a few times per group instead of a few times per
#: block (codecs/batch.py says why that matters); small enough that a 256 MiB fetch
#: batch of 1 MiB blocks still gives each of 16 threads a task.
GROUP_BYTES = 16 << 20
GROUP_BLOCKS = 16


def group_size(block_size: int) -> int:
    """Blocks per encoding task for blocks of ``block_size`` bytes."""
    return max(1, min(GROUP_BLOCKS, GROUP_BYTES // max(1, block_size)))


def groups(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive lists of ``size`` (the last may be shorter)."""
    it = iter(items)
    while group := list(islice(it, size)):
        yield group


def _encode_fetched(
    source: Source,
    wanted: list[BlockRequest],
    task: Callable[[list[tuple[int, memoryview]]], list[Prepared]],
    workers: int,
    per_task: int,
) -> Iterator[Prepared]:
    """``task`` on the fetched blocks, ``per_task`` at a time, on ``workers``
    threads; results in request order.

    Tasks read the source's batch views in place: a batch is released (and its
    buffer refilled) only once every task on it has finished, and at most two
    batches are being encoded while the source copies the next. Copying each view
    out first, on this one thread, capped a full save of 17.1 GB from an H200 at
    ~1.5 GB/s (benchmarks/results/h200_2026-12-03/full_save_probe.json).
    """
    pending: deque[tuple[FetchedBatch, list[Future[list[Prepared]]]]] = deque()

    def finish_oldest() -> Iterator[Prepared]:
        done, futures = pending.popleft()
        for f in futures:
            yield from f.result()
        done.release()

    batches = source.fetch_batches(wanted)
    pool = ThreadPoolExecutor(max_workers=capped_workers(workers), thread_name_prefix="apollo")
    try:
        for batch in batches:
            tasks = [pool.submit(task, g) for g in groups(batch.items, per_task)]
            pending.append((batch, tasks))
            if len(pending) == 2:
                yield from finish_oldest()
        while pending:
            yield from finish_oldest()
    finally:
        # Nothing may still read a view when the source's buffers are reused or freed.
        pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def same_content(a: tuple[TensorEntry, ...], parent: Manifest | None) -> bool:
    """Whether a save would record exactly the parent's tensors."""
    return parent is not None and a == parent.tensors
