"""Device steps of the GPU restore pipeline: copy (and, in direct mode, the plane-major
rearrangement), decode, interleave (and codec 4's scatter), XOR, verify, place."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CorruptChunk
from .blocks import host_block_digests, mismatches_later
from .chunkplan import COPY, FRAME, HINT, Batch, ChunkPlan, align_up, corrupt
from .readers import PAD, BlobReader
from .segments import Segments, copy_into_many
from .sparse_steps import scatter_sparse
from .staging import Stager, Uploads
from .zstd import FrameDecoder


class DeviceSteps:
    """The pipeline's device steps (a mixin of :class:`~apollo_cas.gpu.restore.RestorePipeline`)."""

    frames: FrameDecoder | None
    reader: BlobReader
    block_size: int
    workers: int
    device: torch.device
    cuda: bool
    stream: Any
    stager: Stager
    stats: Any
    _kernel: Any
    _dev: torch.Tensor | None
    #: two device mirrors of arenas (by batch parity), and after each the event of the
    #: last read of it (the layout built from it) on ``stream``
    _mirrors: list[torch.Tensor | None]
    _mirror_read: list[Any]
    copy_stream: Any
    direct: bool
    _rows: list[torch.Tensor | None]
    _events: list[Events]
    _free: Any
    #: Pinned buffers for the small tables each batch sends to the device.
    uploads: Uploads

    def _buffers(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        own = self.cuda or self.direct  # else the host slot is the device buffer
        if not own:
            dev = batch.host
        else:
            if self._dev is None or self._dev.numel() < batch.used:
                self._dev = torch.empty(max(1, batch.used), dtype=torch.uint8, device=self.device)
            dev = self._dev
        need = max(1, len(batch.rows)) * batch.row_bytes
        # Two row buffers: batch k+1 is decoded and verified before batch k's verdict is
        # read and its rows placed (see :meth:`_device_stage`).
        slot = batch.k % 2
        have = self._rows[slot]
        if have is None or have.numel() < need:
            have = self._rows[slot] = torch.empty(need, dtype=torch.uint8, device=self.device)
        rows = have
        scratch = sum(int(r.numel()) for r in self._rows if r is not None)
        scratch += int(dev.numel()) if own else 0
        if self.cuda:
            scratch += sum(int(m.numel()) for m in self._mirrors if m is not None)
        self.stats.device_scratch_bytes = max(self.stats.device_scratch_bytes, scratch)
        return dev, rows

    def _mirror_of(self, batch: Batch) -> torch.Tensor:
        """The batch's stored bytes on the device: its arena copied as is (one copy of
        the claimed prefix), or on the CPU the arena itself.

        The copy runs on ``copy_stream``, into the mirror of the batch's parity, so
        batch k+1 crosses PCIe while batch k is decoded on ``stream`` (on one stream the
        copy, 0.21 s of 11.5 GB at 55 GB/s for 17 GB, added to the decode's time). A
        mirror is rewritten only after ``stream`` has built the layout out of it."""
        arena = batch.arena
        n = min(arena.used + PAD, arena.nbytes)
        if not self.cuda:
            return arena.tensor
        slot = batch.k % 2
        mirror = self._mirrors[slot]
        if mirror is None or mirror.numel() < arena.nbytes:
            with torch.cuda.stream(self.copy_stream):
                # Allocated on the copy stream, which writes it first; ``stream`` reads it
                # after waiting for that copy (and it lives as long as the pipeline).
                mirror = self._mirrors[slot] = torch.empty(
                    arena.nbytes, dtype=torch.uint8, device=self.device
                )
        if self._mirror_read[slot] is not None:
            self.copy_stream.wait_event(self._mirror_read[slot])
        ev = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            mirror[:n].copy_(arena.tensor[:n], non_blocking=True)
            ev.record(self.copy_stream)
        self.stats.h2d_bytes += n
        arena.copied = ev  # the reader waits for it before it reuses the arena
        self.stream.wait_event(ev)
        return mirror

    def _mirror_done(self, batch: Batch) -> None:
        """Batch ``batch``'s mirror has been read (queued on ``stream``): the copy of the
        batch two on may overwrite it once ``stream`` gets here."""
        if self.cuda and self.direct:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self._mirror_read[batch.k % 2] = ev

    def _fill_on_device(self, batch: Batch, dev: torch.Tensor) -> None:
        """Direct mode: the staging layout built on the device from the verbatim stored
        bytes, instead of by host copies into a pinned slot (the host staging step took
        1.98 s of 6.2 s for 17 GB on the H200, after the read). Every plane, frame and
        tail of the batch is one range of a :class:`~apollo_cas.gpu.segments.Segments`
        table, copied by one launch per source buffer (a ``torch.cat`` per plane group
        took 1.28 s of host time of a 2.35 s load). Every piece is taken 16-byte padded
        (the bytes after it are the next chunk's or the arena's slack, never read as data)
        so each lands 16-byte aligned for nvCOMP."""
        mirror = self._mirror_of(batch)
        arena = batch.arena
        # One bulk copy per source buffer: the mirror of the arena, and (rarely) a
        # chunk's own copy when it is not in the arena.
        from_mirror = Segments()
        bulk: list[tuple[torch.Tensor, Segments]] = [(mirror, from_mirror)]
        srcs: dict[bytes, tuple[Segments, int]] = {}

        def src(c: ChunkPlan) -> tuple[Segments, int]:
            got = srcs.get(c.cid)
            if got is None:
                data = c.fallback if c.fallback is not None else c.blob
                off = None
                if c.fallback is None:
                    off = c.at if c.at is not None else arena.offset_of(data)
                if off is not None:
                    got = (from_mirror, off)
                else:
                    # Not in the arena (decoded on the CPU, or no room): its own copy.
                    t = torch.zeros(len(data) + PAD, dtype=torch.uint8)
                    t[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    bulk.append((t.to(self.device), Segments()))
                    got = (bulk[-1][1], 0)
                    self.stats.h2d_bytes += len(data)
                srcs[c.cid] = got
            return got

        pos = batch.packed_start
        for g in batch.groups:
            where = [src(c) for c in g.chunks]
            for kk, kind in enumerate(g.kinds):
                if kind != COPY:
                    continue
                a = g.slot(kk, 0)
                for i, ((segs, b), c) in enumerate(zip(where, g.chunks, strict=True)):
                    segs.add(b + c.pieces[kk][0], a + i * g.mp, g.mp)
            for (segs, b), c in zip(where, g.chunks, strict=True):
                for kk, kind in enumerate(g.kinds):
                    if kind == FRAME:
                        off, ln = c.pieces[kk]
                        segs.add(b + off, pos, align_up(ln))
                        pos += align_up(ln)
                if c.tail[1]:
                    segs.add(b + c.tail[0], pos, align_up(c.tail[1]))
                    pos += align_up(c.tail[1])
        for c in batch.sparse:  # its two frames, after the groups' (as _layout packed them)
            segs, b = src(c)
            for off, ln in c.pieces:
                segs.add(b + off, pos, align_up(ln))
                pos += align_up(ln)
        if pos != batch.used:
            raise AssertionError(f"staging layout ends at {pos}, the batch uses {batch.used}")
        for t, segs in bulk:
            segs.copy(t, dev, uploads=self.uploads)
        self._mirror_done(batch)
        self.stats.frames += len(batch.frames)

    def _device_stage(self, batch: Batch, dests: Sequence[torch.Tensor]) -> Pending:
        """Queue batch ``batch``'s copy, decode, interleave and verification; its
        verdict is read and its rows placed by :meth:`_finish`, after the caller has
        queued the next batch: the host never waits for the device between batches
        (reading each batch's verdict at once cost a stream synchronisation per batch,
        0.38 s of a 2.35 s load of 17 GB on the H200, with the device idle meanwhile)."""
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            ev = Events(self.cuda)
            dev, rows = self._buffers(batch)
            ev.mark("start")
            if self.direct:
                self._fill_on_device(batch, dev)
            elif self.cuda:
                for a, n in batch.copy_ranges:
                    dev[a : a + n].copy_(batch.host[a : a + n], non_blocking=True)
                    self.stats.h2d_bytes += n
                self.stager.release(batch.k, [self.stream])
                self._free.release()  # the producer may fill this slot once the copy ran
            ev.mark("copied")
            if batch.frames and self.frames is not None:
                try:
                    keep = self.frames.decode(
                        dev,
                        [f[0] for f in batch.frames],
                        [f[1] for f in batch.frames],
                        dev,
                        [f[2] for f in batch.frames],
                        [f[3] for f in batch.frames],
                    )
                    ev.keep(keep)
                except CorruptChunk:
                    raise
                except Exception:
                    # nvCOMP refused the batch (a damaged frame, most likely): decode its
                    # frames on the host, which names the chunk or gets them right.
                    self._host_frames(batch, dev)
            ev.mark("decoded")
            r2 = rows[: len(batch.rows) * batch.row_bytes].view(len(batch.rows), batch.row_bytes)
            self._interleave(batch, dev, r2, dests)
            ev.mark("interleaved")
            verdict = self._verify(batch, r2)
            ev.mark("verified")
        if not self.cuda and not self.direct:
            self._free.release()  # on the CPU the slot itself was the device buffer
        return Pending(batch, r2, verdict, ev)

    def _finish(self, pending: Pending, dests: Sequence[torch.Tensor]) -> None:
        """Raise CorruptChunk if ``pending``'s batch failed verification, else queue the
        copies of its verified rows into the destinations."""
        batch = pending.batch
        bad = pending.verdict()
        if bad:
            worst = min((batch.rows[i] for i in bad), key=lambda c: (c.depth, c.row))
            more = f" ({len(bad)} chunks of this batch failed)" if len(bad) > 1 else ""
            raise CorruptChunk(
                f"chunk {worst.cid.hex()} is corrupt: its decoded content does not hash to "
                f"its name{more}",
                HINT,
            )
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            pending.events.mark("placing")
            self._place(batch, pending.rows, dests)
            pending.events.mark("placed")
        self._events.append(pending.events)
        self.stats.batches += 1
        self.stats.raw_bytes += sum(p.size for p in batch.places)

    def _host_frames(self, batch: Batch, dev: torch.Tensor) -> None:
        """Every frame of ``batch`` decoded by python-zstandard from its blob, then copied."""
        from ..codecs import zstd_frames

        # The arena the blobs were read into may hold the next batch by now: read again.
        ids = [c.cid for g in batch.groups for c in g.chunks if FRAME in g.kinds]
        ids += [c.cid for c in batch.sparse if c.pieces]
        blobs = dict(zip(ids, self.reader(ids, None), strict=True))
        for c in batch.sparse:
            sizes = (4 * c.nchanged, c.w * c.nchanged)
            for (off, n), a, m in zip(c.pieces, c.slots, sizes, strict=False):
                try:
                    raw = zstd_frames.decompress_exact(memoryview(blobs[c.cid])[off : off + n], m)
                except zstd_frames.FrameError as exc:
                    raise corrupt(c.cid, str(exc)) from exc
                dev[a : a + m].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                for kk, kind in enumerate(g.kinds):
                    if kind != FRAME:
                        continue
                    off, n = c.pieces[kk]
                    try:
                        raw = zstd_frames.decompress_exact(
                            memoryview(blobs[c.cid])[off : off + n], g.m
                        )
                    except zstd_frames.FrameError as exc:
                        raise corrupt(c.cid, str(exc)) from exc
                    a = g.slot(kk, j)
                    dev[a : a + g.m].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def _interleave(
        self, batch: Batch, dev: torch.Tensor, r2: torch.Tensor, dests: Sequence[torch.Tensor]
    ) -> None:
        for g in batch.groups:
            n = len(g.chunks)
            block = r2[g.first_row : g.first_row + n, : g.m * g.w]
            planes_t = dev[g.start : g.start + g.w * n * g.mp].view(g.w, n, g.mp)[:, :, : g.m]
            if g.w == 1:
                block.copy_(planes_t[0])
            else:
                out = block.view(n, g.m, g.w)
                for kk in range(g.w):
                    out[:, :, kk].copy_(planes_t[kk])
        for row, off, n in batch.tails:
            c = batch.rows[row]
            m = c.size // c.w * c.w
            r2[row, m : m + n].copy_(dev[off : off + n])
        for c in batch.rows:
            if c.live is not None:
                d, o = c.live
                r2[c.row, : c.size].copy_(dests[d][o : o + c.size])
        if batch.sparse:
            # Codec 4: its row becomes block XOR base (zero but at the changed
            # elements), then the chains below XOR the base in like codec 3's.
            scatter_sparse(batch.sparse, dev, r2, self.uploads)
        # XOR chains, shallowest first: a base's row is final before its deltas use it.
        by_depth: dict[int, list[ChunkPlan]] = {}
        for c in batch.rows:
            if c.base is not None:
                by_depth.setdefault(c.depth, []).append(c)
        if not by_depth:
            return
        wide = r2.view(torch.int64) if batch.row_bytes % 8 == 0 else r2
        for d in sorted(by_depth):
            cs = by_depth[d]
            idx = [c.row for c in cs]
            bidx = [batch.chunks[c.base].row for c in cs if c.base is not None]
            # The row tables go by the pinned uploads: ``torch.tensor(..., device=cuda)``
            # is a pageable copy, which waits for everything queued on the stream, so
            # the host stopped running ahead of the device at every batch with deltas.
            bases = wide.index_select(
                0, self.uploads.from_numpy(np.asarray(bidx, dtype=np.int64), r2.device)
            )
            lo, hi = idx[0], idx[-1] + 1
            if idx == list(range(lo, hi)):
                wide[lo:hi].bitwise_xor_(bases)
            else:
                it = self.uploads.from_numpy(np.asarray(idx, dtype=np.int64), r2.device)
                wide.index_copy_(0, it, wide.index_select(0, it).bitwise_xor_(bases))

    def _verify(self, batch: Batch, r2: torch.Tensor) -> Callable[[], list[int]]:
        """Hash every row against its chunk id; returns the verdict: a function giving
        the rows that failed (on a GPU it waits for the device only when called)."""
        if self._kernel is not None and self._kernel_ok():
            sizes = [c.size for c in batch.rows]
            if batch.row_bytes == self.block_size:
                # Full rows in one launch over the buffer, short ones by a view each.
                got = self._kernel.row_digests(r2, sizes, self.block_size, self.uploads.from_numpy)
            else:
                views = [r2[c.row, : c.size] for c in batch.rows]
                got = self._kernel.block_digests_many(views, self.block_size)
            return mismatches_later(got, [c.cid for c in batch.rows], self.uploads)
        views = [r2[c.row, : c.size] for c in batch.rows]
        if self.cuda:
            host = [v.cpu().numpy().data for v in views]
        else:
            host = [v.numpy().data for v in views]
        ds = host_block_digests(host, self.block_size, self.workers)
        bad = [i for i, c in enumerate(batch.rows) if ds[i] != [c.cid]]
        return lambda: bad

    def _kernel_ok(self) -> bool:
        try:
            assert self._kernel is not None
            self._kernel.check_block_size(self.block_size)
        except ValueError:
            return False
        return True

    def _place(self, batch: Batch, r2: torch.Tensor, dests: Sequence[torch.Tensor]) -> None:
        """Queue the copies of the batch's verified rows into the destinations: runs of
        places that lie back to back in both, all in one launch on CUDA
        (:func:`~apollo_cas.gpu.segments.copy_into_many`)."""
        rb = batch.row_bytes
        runs: list[list[int]] = []  # [dest, dest offset, flat offset, length]
        run: list[int] | None = None
        for p in batch.places:
            c = batch.chunks[p.chunk_id]
            src = c.row * rb
            if (
                run is not None
                and run[0] == p.dest
                and run[1] + run[3] == p.offset
                and run[2] + run[3] == src
            ):
                run[3] += p.size
                continue
            run = [p.dest, p.offset, src, p.size]
            runs.append(run)
            if p.size != rb:
                run = None
        copy_into_many(r2.view(-1), dests, runs, uploads=self.uploads)

    def _sum_events(self) -> None:
        for ev in self._events:
            t = ev.elapsed()
            self.stats.copy_s += t.get("copied", 0.0)
            self.stats.decode_s += t.get("decoded", 0.0)
            self.stats.interleave_s += t.get("interleaved", 0.0)
            self.stats.verify_s += t.get("verified", 0.0)
            # "placing" spans the next batch's work, queued before this one's verdict.
            self.stats.place_s += t.get("placed", 0.0)
        self._events = []


@dataclass
class Pending:
    """A batch queued up to its verification, waiting for its verdict and placement."""

    batch: Batch
    rows: torch.Tensor
    verdict: Callable[[], list[int]]
    events: Events


class Events:
    """CUDA events between phases (host clock on the CPU), read once the work is done.

    Each mark also records the host clock, so a phase's device interval can be set
    beside the time the host took to queue it (:meth:`host_elapsed`): where the two
    match, the device waited for the host."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, Any]] = []
        self.host: list[float] = []
        self._keep: list[Any] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.host.append(now)
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, now))

    def keep(self, obj: Any) -> None:
        self._keep.append(obj)

    def elapsed(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_a, ea), (b, eb) in zip(self.marks, self.marks[1:], strict=False):
            out[b] = ea.elapsed_time(eb) / 1e3 if self.cuda else eb - ea
        self._keep = []
        return out

    def host_elapsed(self) -> dict[str, float]:
        """Host seconds between the marks (the time to queue each phase, plus any wait)."""
        return {
            b: tb - ta
            for (b, _), ta, tb in zip(self.marks[1:], self.host, self.host[1:], strict=False)
        }
