"""Host steps of the GPU restore pipeline: a batch's layout and, without a frame decoder,
its pinned slot's bytes.

The layout (plane slots of like chunks, then packed zstd frames and tails) is the same
in both modes; in *direct* mode (a frame decoder is there: nvCOMP on a GPU) the device
fills it from a verbatim copy of the stored bytes (:mod:`apollo_cas.gpu.device_steps`)
and :meth:`HostStaging._fill`, the host copy, does not run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .chunkplan import (
    COPY,
    FRAME,
    Batch,
    ChunkPlan,
    Place,
    PlaneGroup,
    add_range,
    align_up,
    corrupt,
    slices,
)
from .staging import Stager
from .zstd import FrameDecoder


def _sparse_sizes(c: ChunkPlan) -> tuple[int, int]:
    """Decoded sizes of a codec-4 chunk's two frames: gaps, values."""
    return 4 * c.nchanged, c.w * c.nchanged


class HostStaging:
    """The pipeline's host steps (a mixin of :class:`~apollo_cas.gpu.restore.RestorePipeline`)."""

    frames: FrameDecoder | None
    block_size: int
    workers: int
    stager: Stager
    stats: Any
    direct: bool

    def _pool(self, name: str, threads: int | None = None) -> ThreadPoolExecutor:
        raise NotImplementedError

    def _layout(
        self, k: int, ps: list[Place], chunks: dict[bytes, ChunkPlan], order: list[bytes]
    ) -> Batch:
        """Rows and the plane-major staging layout of one batch."""
        host_frames = self.frames is None
        groups: dict[tuple[int, int, tuple[int, ...]], PlaneGroup] = {}
        lives: list[ChunkPlan] = []
        sparse: list[ChunkPlan] = []
        for cid in order:
            c = chunks[cid]
            if c.live is not None:
                lives.append(c)
                continue
            if c.is_sparse:
                sparse.append(c)
                continue
            kinds = tuple(COPY for _ in c.kinds) if host_frames else c.kinds
            key = (c.w, c.size // c.w, kinds)
            g = groups.get(key)
            if g is None:
                g = groups[key] = PlaneGroup(c.w, c.size // c.w, kinds, [])
            g.chunks.append(c)
        pos = 0
        rows: list[ChunkPlan] = []
        for g in groups.values():
            g.start = pos
            pos += g.w * len(g.chunks) * g.mp
            g.first_row = len(rows)
            for c in g.chunks:
                c.row = len(rows)
                rows.append(c)
        # Codec 4: rows after the groups' (one run: zeroed at once), and a slot for its
        # decoded gaps and values each (at most its raw size: _parse_sparse).
        sparse_start = pos
        for c in sparse:
            c.row = len(rows)
            rows.append(c)
            gslot = pos
            pos = align_up(pos + 4 * c.nchanged)
            c.slots = (gslot, pos)
            pos = align_up(pos + c.w * c.nchanged)
        for c in lives:
            c.row = len(rows)
            rows.append(c)
        batch = Batch(k, ps, chunks, list(groups.values()), rows, align_up(self.block_size, 64))
        batch.sparse = sparse
        # Copy ranges: plane runs that arrive as bytes; frames and tails packed after.
        for g in batch.groups:
            for kk, kind in enumerate(g.kinds):
                if kind == COPY:
                    a = g.slot(kk, 0)
                    add_range(batch.copy_ranges, a, len(g.chunks) * g.mp)
        if host_frames and pos > sparse_start:
            add_range(batch.copy_ranges, sparse_start, pos - sparse_start)
        fpos = pos
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                for kk, kind in enumerate(g.kinds):
                    if kind == FRAME:
                        n = c.pieces[kk][1]
                        batch.frames.append((fpos, n, g.slot(kk, j), g.m))
                        fpos = align_up(fpos + n)
                if c.tail[1]:
                    batch.tails.append((c.row, fpos, c.tail[1]))
                    fpos = align_up(fpos + c.tail[1])
        if not host_frames:
            for c in sparse:
                for (_off, n), out, m in zip(c.pieces, c.slots, _sparse_sizes(c), strict=False):
                    batch.frames.append((fpos, n, out, m))
                    fpos = align_up(fpos + n)
        if fpos > pos:
            add_range(batch.copy_ranges, pos, fpos - pos)
        batch.used = fpos
        batch.packed_start = pos
        if not self.direct:
            self.stager.ensure(fpos)
        return batch

    def _fill(self, batch: Batch) -> None:
        """Copy every piece into the pinned slot (host-decoding frames when no nvCOMP)."""
        from ..codecs import zstd_frames

        h = batch.host.numpy()
        frames = iter(batch.frames)
        tails = iter(batch.tails)
        jobs: list[tuple[Any, int, int, int, bytes]] = []  # (piece, dst, n, decode-to m or -1, id)
        for g in batch.groups:
            for j, c in enumerate(g.chunks):
                src = memoryview(c.fallback) if c.fallback is not None else c.blob
                for kk, kind in enumerate(c.kinds):
                    off, n = c.pieces[kk]
                    piece = src[off : off + n]
                    if kind == FRAME and self.frames is not None:
                        fsrc, fn, _out, _m = next(frames)
                        jobs.append((piece, fsrc, fn, -1, c.cid))
                    elif kind == FRAME:
                        jobs.append((piece, g.slot(kk, j), g.m, g.m, c.cid))
                    else:
                        jobs.append((piece, g.slot(kk, j), n, -1, c.cid))
                if c.tail[1]:
                    _row, tdst, tn = next(tails)
                    jobs.append((src[c.tail[0] : c.tail[0] + tn], tdst, tn, -1, c.cid))
        for c in batch.sparse:  # after the groups: the order _layout packed the frames in
            for (off, n), out, m in zip(c.pieces, c.slots, _sparse_sizes(c), strict=False):
                piece = c.blob[off : off + n]
                if self.frames is not None:
                    fsrc, fn, _out, _m = next(frames)
                    jobs.append((piece, fsrc, fn, -1, c.cid))
                else:
                    jobs.append((piece, out, m, m, c.cid))

        def one(job: tuple[Any, int, int, int, bytes]) -> None:
            piece, dst, n, m, cid = job
            if m >= 0:
                try:
                    raw = zstd_frames.decompress_exact(piece, m)
                except zstd_frames.FrameError as exc:
                    raise corrupt(cid, str(exc)) from exc
                h[dst : dst + m] = np.frombuffer(raw, np.uint8)
            else:
                h[dst : dst + n] = np.frombuffer(piece, np.uint8)

        def group(sl: slice) -> None:
            for job in jobs[sl]:
                one(job)

        for _ in self._pool("stage").map(group, slices(len(jobs), self.workers)):
            pass
        self.stats.frames += len(batch.frames)

    # -- device work (caller's thread) -------------------------------------------------
