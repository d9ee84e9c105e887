"""The device work of one piece of a dense step, in two implementations.

A piece is a run of parent rows (decoded by the restore pipeline) whose live blocks
have one element width. :class:`~apollo_cas.gpu.delta_save.GpuDeltaSaver` asks for:

1. :meth:`scan`: check that every live block still hashes to its recorded id (the
   verdict is read later), XOR the parent rows with the live blocks in place, and
   return to the host which byte planes of each row are not all zero and how many
   elements of each row changed (one round trip);
2. :meth:`extract`, once the host has chosen each row's encoding: codec 4's gap and
   value planes of the rows it takes, and the non-zero byte planes of the rows that
   need codec 3, packed for one device-to-host copy each.

:class:`TorchSteps` does it with :mod:`~apollo_cas.gpu.delta_ops` (any device: the CPU
path and tests). :class:`KernelSteps` does it on CUDA with the kernels of
:mod:`~apollo_cas.gpu.sparse_kernels`, hashing the live blocks where they lie: about 30
host calls per piece instead of about 130, each of which gives up the GIL (see that
module for the measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from . import delta_ops, sparse_kernels
from .delta_jobs import DeltaJob
from .staging import Uploads

Mark = Callable[[str], None]


@dataclass
class Scan:
    """What the host learns from a piece's first round trip."""

    verdict: Callable[[], None]  # raises CorruptChunk if a live block changed
    nonzero: list[int]  # (w * n) flags, plane-major: plane k of row r at k * n + r
    counts: list[int] | None  # changed elements of each row, when asked for


class PieceSteps(Protocol):
    """The two stages of a piece's device work (see the module doc)."""

    def scan(
        self,
        batch: Sequence[DeltaJob],
        rows: torch.Tensor,
        w: int,
        ws: int,
        counts: bool,
        mark: Mark,
    ) -> Scan: ...

    def extract(
        self,
        rows: torch.Tensor,
        w: int,
        ws: int,
        taken: Sequence[int],
        counts: Sequence[int],
        keep: Sequence[int],
        mark: Mark,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed planes (len(keep), m), codec 4's planes of the rows taken)``."""
        ...


@dataclass
class Buffers:
    """Device scratch shared by both implementations (sizes: see GpuDeltaSaver.run)."""

    live: torch.Tensor  # gathered live rows (TorchSteps)
    planes: torch.Tensor  # XOR rows split into byte planes
    packed: torch.Tensor  # the kept planes, packed
    sidx: torch.Tensor  # changed elements' indices (both: KernelSteps between its passes)
    sval: torch.Tensor  # and values (TorchSteps)
    splanes: torch.Tensor  # codec 4's planes of the rows taken


class TorchSteps:
    """The piece's steps as torch operations (:mod:`~apollo_cas.gpu.delta_ops`)."""

    def __init__(
        self,
        live: Sequence[torch.Tensor],
        block_size: int,
        kernel: ModuleType | None,
        uploads: Uploads,
        bufs: Buffers,
    ) -> None:
        self.live = live
        self.bs = block_size
        self.kernel = kernel
        self.uploads = uploads
        self.bufs = bufs
        self._q: torch.Tensor | None = None

    def scan(
        self,
        batch: Sequence[DeltaJob],
        rows: torch.Tensor,
        w: int,
        ws: int,
        counts: bool,
        mark: Mark,
    ) -> Scan:
        bs, n = self.bs, len(batch)
        l2 = self.bufs.live[: n * bs].view(n, bs)
        runs = delta_ops.row_runs([(j.tensor, j.offset) for j in batch], bs)
        delta_ops.gather_rows(self.live, runs, l2, bs)
        mark("gather")
        verdict = delta_ops.check_rows(l2, [j.cid for j in batch], bs, self.kernel, self.uploads)
        mark("check")
        delta_ops.xor_rows_(rows, l2)
        self._q = q = delta_ops.split_planes(rows, w, self.bufs.planes)
        nz = delta_ops.nonzero_planes(q).flatten()
        mark("xor_planes")
        # One round trip for all the host decides on; each further one idled the
        # device (17 GB dense step, H200: ~8 per piece before).
        small = [nz.to(torch.int64)]
        if counts:
            small.append(delta_ops.changed_elements(rows, ws))
        got = torch.cat(small).cpu().tolist()
        mark("count")
        return Scan(verdict, got[: w * n], got[w * n :] if counts else None)

    def extract(
        self,
        rows: torch.Tensor,
        w: int,
        ws: int,
        taken: Sequence[int],
        counts: Sequence[int],
        keep: Sequence[int],
        mark: Mark,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.bufs
        n = int(rows.shape[0])
        take = [False] * n
        for r in taken:
            take[r] = True
        delta_ops.sparse_rows(rows, ws, take, b.sidx, b.sval, counts)
        taken_counts = [counts[r] for r in taken]
        planes = delta_ops.sparse_planes(b.sidx, b.sval, taken_counts, ws, b.splanes, self.uploads)
        mark("sparse_rows")
        assert self._q is not None
        keep_d = self.uploads.from_numpy(np.asarray(keep, dtype=np.int64), rows.device)
        packed = delta_ops.pack_planes(self._q, keep_d, b.packed)
        mark("pack")
        return packed, planes


class KernelSteps:
    """The piece's steps as two Triton kernels on CUDA (:mod:`sparse_kernels`).

    Live blocks are read where they lie, addressed from one 16-byte aligned live
    tensor: a piece whose blocks are not all 16-byte aligned from there (or whose
    plane width is neither its element width nor 1) is for :class:`TorchSteps`
    (:meth:`usable`).

    Every tensor view, buffer and table a piece needs is made once here, not per
    piece: each torch call gives up the GIL, and with the parent's readers and the
    encoders running, taking it back is most of what the device thread spends a piece
    on (see :mod:`~apollo_cas.gpu.sparse_kernels`). ``parent``: the ``(rows, block_size)``
    scratch the pieces' rows are slices of (others are viewed per piece).
    """

    def __init__(
        self,
        live: Sequence[torch.Tensor],
        block_size: int,
        kernel: ModuleType,
        rows: int,
        device: torch.device,
        bufs: Buffers,
        parent: torch.Tensor | None = None,
    ) -> None:
        self.bs = block_size
        self.kernel = kernel
        self.bufs = bufs
        self.device = device
        self.rows = rows
        # Any aligned tensor serves as the base: offsets may be negative.
        aligned = [v for v in live if v.numel() >= 8 and v.data_ptr() % 16 == 0]
        self.base = min(aligned, key=lambda v: v.data_ptr()) if aligned else None
        base_ptr = self.base.data_ptr() if self.base is not None else 0
        self.starts = [v.data_ptr() - base_ptr for v in live]
        self.cuda = device.type == "cuda"  # else CPU tensors, under TRITON_INTERPRET=1 (tests)
        t = max(sparse_kernels.tiles(block_size // ws) for ws in (1, 2, 4, 8))
        # What comes back after the scan, in one copy: the live blocks' digests (the
        # kernel's int64 halves, compared with the ids on the host), then the statistics.
        n_back = 2 * rows + rows * t * sparse_kernels.STAT_FIELDS
        self.back = torch.empty(n_back, dtype=torch.int64, device=device)
        self.back_host = torch.empty(n_back, dtype=torch.int64, pin_memory=self.cuda)
        self.back_np = self.back_host.numpy()
        self.digests = self.back[: 2 * rows].view(rows, 2)
        # Tables to the device: offsets and 16-byte units of the live blocks, then the
        # taken rows and kept planes. Rewritten once per stage, after the stage before
        # has synchronised, so no event guards them.
        n_tables = 3 * (rows * 8 + 64)
        self.tables = torch.empty(n_tables, dtype=torch.int64, pin_memory=self.cuda)
        self.tables_np = self.tables.numpy()
        self.tables_dev = torch.empty(n_tables, dtype=torch.int64, device=device)
        self.tables3 = self.tables_dev.view(-1, 3)
        self.words = self.base[:8].view(torch.int64) if self.base is not None else None
        self.parent = parent
        self._views: dict[tuple[Any, ...], torch.Tensor] = {}
        self._stats: torch.Tensor | None = None

    def _view(self, key: tuple[Any, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = make()
        return v

    def _typed(self, rows: torch.Tensor, ws: int) -> torch.Tensor:
        """``rows`` as ``(n, m)`` elements of ``ws`` bytes: a slice of a view made once
        where ``rows`` are whole rows of the parent scratch (pointer arithmetic, no
        torch call), else a view of its own."""
        typed = sparse_kernels.INT_TYPES[ws]
        n = int(rows.shape[0])
        p = self.parent
        if p is not None:
            row_bytes = int(p.shape[1])
            off = rows.data_ptr() - p.data_ptr()
            r0 = off // row_bytes
            if off % row_bytes == 0 and 0 <= r0 <= int(p.shape[0]) - n:
                return self._view(("parent", ws), lambda: p.view(typed))[r0 : r0 + n]
        return rows.view(typed)

    def usable(self, batch: Sequence[DeltaJob], w: int, ws: int) -> bool:
        if self.base is None or self.bs % 8 or w not in (1, ws):
            return False
        return all((self.starts[j.tensor] + j.offset) % 16 == 0 for j in batch)

    def _upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """int64 tables to the device through the pinned table buffer, in one copy;
        each starts at a multiple of 3 elements (so the first may be viewed as rows of 3)."""
        pos, starts = 0, []
        for a in arrays:
            k = int(a.size)
            starts.append((pos, k))
            self.tables_np[pos : pos + k] = a.reshape(-1)
            pos += -(-k // 3) * 3
        self.tables_dev[:pos].copy_(self.tables[:pos], non_blocking=self.cuda)
        return [self.tables_dev[a : a + k] for a, k in starts]

    def scan(
        self,
        batch: Sequence[DeltaJob],
        rows: torch.Tensor,
        w: int,
        ws: int,
        counts: bool,
        mark: Mark,
    ) -> Scan:
        n = len(batch)
        base = self.base
        assert base is not None
        byte = np.fromiter((self.starts[j.tensor] + j.offset for j in batch), np.int64, n)
        # Ids as the kernel's halves (two big-endian int64 each): compared as they come,
        # without the byte flip of the canonical form (a host call saved is a GIL
        # hand-over saved: see sparse_kernels).
        ids = np.frombuffer(b"".join(j.cid for j in batch), dtype=">i8").reshape(n, 2)
        offsets, units = self._upload([byte // ws, byte // 16])
        # Compared on the host once the statistics are back, not by three more device
        # operations: each torch call gives up the GIL, and taking it back is what
        # this thread waits on (the check was ~9 ms of a ~27 ms piece; H200,
        # 2026-12-04 session 2, runs 2-4).
        self.kernel.digests_at(
            base, units, self.bs, canonical=False, out=self.digests[:n], words=self.words
        )
        mark("check")
        t = sparse_kernels.tiles(self.bs // ws)
        k = n * t * sparse_kernels.STAT_FIELDS
        r2 = 2 * self.rows
        stats_view = self._view(
            ("stats", n, t),
            lambda: self.back[r2 : r2 + k].view(n, t, sparse_kernels.STAT_FIELDS),
        )
        live = self._view(("live", ws), lambda: base[:8].view(sparse_kernels.INT_TYPES[ws]))
        typed = self._typed(rows, ws)
        self._stats = sparse_kernels.xor_stats(typed, live, offsets, ws, stats_view)
        mark("xor_planes")
        self.back_host[: r2 + k].copy_(self.back[: r2 + k], non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        host = self.back_np[r2 : r2 + k].reshape(n, t, sparse_kernels.STAT_FIELDS)
        per_row, flags = sparse_kernels.row_summary(host, w, ws)
        bad = np.flatnonzero((self.back_np[: 2 * n].reshape(n, 2) != ids).any(axis=1)).tolist()
        mark("count")
        cids = [j.cid for j in batch]
        return Scan(
            lambda: delta_ops.raise_for(bad, cids),
            flags.reshape(-1).astype(int).tolist(),
            per_row.tolist(),
        )

    def extract(
        self,
        rows: torch.Tensor,
        w: int,
        ws: int,
        taken: Sequence[int],
        counts: Sequence[int],
        keep: Sequence[int],
        mark: Mark,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.bufs
        assert self._stats is not None
        bs = int(rows.shape[1])
        m = bs // w
        taken_counts = [counts[r] for r in taken]
        table = sparse_kernels.row_table(list(taken), taken_counts)
        _, keep_d = self._upload([table, np.asarray(keep, dtype=np.int64)])
        sparse_kernels.sparse_extract(
            self._typed(rows, ws),
            self._stats,
            self.tables3[: len(taken)],
            ws,
            b.splanes,
            taken_counts,
            b.sidx,
        )
        used = (4 + ws) * sum(taken_counts)
        mark("sparse_rows")
        if keep:
            q = delta_ops.split_planes(rows, w, b.planes)
            packed = delta_ops.pack_planes(q, keep_d, b.packed)
        else:
            packed = self._view(("none", m), lambda: b.packed[:0].view(0, m))
        mark("pack")
        return packed, b.splanes[:used]
