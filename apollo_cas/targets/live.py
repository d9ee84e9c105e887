"""Hot restore: write a checkpoint back into live tensors, only where they differ.

Rolls a running server back without restarting it: the tensors behind a
handles file (``apollo_cas.sources.handles.open_handle_tensors``) or tensors
passed in-process are compared block by block with a checkpoint, and only
blocks whose XXH3-128 differs from the manifest's chunk id are written.

**Serving must be paused while this runs.** Blocks are written one after
another; a request served in between sees a mix of old and restored weights.
Nothing here can pause the server — the caller must (and the report repeats it).

Steps, for CUDA tensors:

1. refuse (:class:`~apollo_cas.errors.TargetError`, nothing written) unless the
   names, dtypes and shapes match the manifest exactly and every tensor is
   contiguous (a write must land in the live memory, not in a copy);
2. hash every block on the device (the Triton kernel; only digests cross PCIe);
3. for each differing block, read the chunk (``read_chunk``: verified raw
   bytes, e.g. ``Store.read_chunk``) into one of two pinned buffers on worker
   threads, and copy it host-to-device on a side stream while the other buffer
   fills; host memory is bounded by ``2 x buffer_bytes``;
4. re-hash every block on the device and compare with the manifest: a mismatch
   is an error that says the weights are now in an undefined state.

CPU tensors (tests, CPU serving) take the same steps with xxhash and direct
writes into the tensors' memory.

:func:`restore_into` (``Store.restore_into``, ``restore --live``) does the same through
the GPU restore pipeline (:mod:`apollo_cas.gpu.restore`): chunks are copied to the GPU
compressed, decoded and verified there, and only verified blocks are written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import dtypes
from ..decoding import ReadFn
from ..errors import TargetError
from ..gpu.blocks import byte_view, tensor_digests
from ..gpu.staging import Stager, device_index
from ..manifest import Manifest, TensorEntry
from ..parallel import bounded_map, default_workers

if TYPE_CHECKING:
    from ..gpu.restore import RestorePipeline

#: Size of each of the two pinned buffers a hot restore streams through.
DEFAULT_BUFFER_BYTES = 256 << 20

SERVING_NOTICE = (
    "serving must be paused during a hot restore: requests served while it runs see "
    "half-restored weights"
)

__all__ = ["SERVING_NOTICE", "LiveRestoreReport", "restore_into", "restore_live"]


@dataclass(frozen=True)
class LiveRestoreReport:
    """What a hot restore did. ``notice`` is the serving warning, for the CLI to print."""

    tensors: int
    blocks_checked: int
    blocks_written: int
    bytes_written: int
    seconds: float
    hash_seconds: float
    write_seconds: float
    verify_seconds: float
    device: str
    verified: bool
    dry_run: bool = False
    notice: str = SERVING_NOTICE

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)

    @classmethod
    def of(
        cls,
        views: Sequence[torch.Tensor],
        entries: Sequence[TensorEntry],
        written: tuple[int, int],
        started: float,
        phases: tuple[float, float, float],
        verified: bool,
        dry_run: bool,
    ) -> LiveRestoreReport:
        """The report of a hot restore into ``views`` (of manifest ``entries``) that
        began at ``started``: ``written`` (blocks, bytes; none on a dry run) and the
        ``phases`` (hash, write, verify seconds)."""
        blocks, nbytes = written
        return cls(
            tensors=len(entries),
            blocks_checked=sum(len(e.chunks) for e in entries),
            blocks_written=blocks,
            bytes_written=0 if dry_run else nbytes,
            seconds=time.perf_counter() - started,
            hash_seconds=phases[0],
            write_seconds=phases[1],
            verify_seconds=phases[2],
            device=",".join(sorted({str(v.device) for v in views}) or ["cpu"]),
            verified=verified,
            dry_run=dry_run,
        )


def restore_live(
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    read_chunk: ReadFn,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    workers: int | None = None,
    verify: bool = True,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LiveRestoreReport:
    """Write into ``tensors`` the blocks of ``manifest`` they differ in, then verify.

    Serving must be paused while this runs (see the module docstring).
    ``read_chunk(chunk_id, size)`` returns a chunk's raw, verified bytes and
    refuses one that is not ``size`` long (``Store.read_chunk``). With
    ``dry_run`` only the comparison runs and ``blocks_written`` counts the blocks
    that would be written. Raises :class:`TargetError` on any mismatch of names,
    dtypes or shapes (before writing anything), on a chunk of the wrong length,
    and when the verification after writing fails.
    """
    t0 = time.perf_counter()
    workers = workers or default_workers()
    bs = manifest.block_size
    pairs = _match(tensors, manifest)
    views = [byte_view(t) for _, t in pairs]
    entries = [e for e, _ in pairs]

    t_hash = time.perf_counter()
    live = _digests(views, entries, bs, buffer_bytes)
    hash_s = time.perf_counter() - t_hash

    todo = [
        (ti, bi)
        for ti, e in enumerate(entries)
        for bi, cid in enumerate(e.chunks)
        if live[ti][bi] != cid
    ]
    nbytes = sum(min(bs, entries[ti].nbytes - bi * bs) for ti, bi in todo)
    write_s = verify_s = 0.0
    verified = False
    if not dry_run:
        t_write = time.perf_counter()
        BlockWrites(views, entries, bs, read_chunk, buffer_bytes, workers, progress).write(todo)
        write_s = time.perf_counter() - t_write
        if verify:
            t_verify = time.perf_counter()
            after = _digests(views, entries, bs, buffer_bytes)
            bad = [
                (e.name, bi)
                for ti, e in enumerate(entries)
                for bi, cid in enumerate(e.chunks)
                if after[ti][bi] != cid
            ]
            verify_s = time.perf_counter() - t_verify
            if bad:
                name, bi = bad[0]
                raise TargetError(
                    f"hot restore verification failed: {len(bad)} block(s) differ from the "
                    f"checkpoint after writing (first: {name!r} block {bi})",
                    "the live weights are in an undefined state: pause serving and run the "
                    "hot restore again, or restart the server from a restored file",
                )
            verified = True
    return LiveRestoreReport.of(
        views, entries, (len(todo), nbytes), t0, (hash_s, write_s, verify_s), verified, dry_run
    )


# ---------------------------------------------------------------------------- checks


def _match(
    tensors: Mapping[str, torch.Tensor], manifest: Manifest
) -> list[tuple[TensorEntry, torch.Tensor]]:
    """Pair manifest entries with live tensors; refuse any difference before writing."""
    want = {e.name: e for e in manifest.tensors}
    problems: list[str] = []
    for name in sorted(want.keys() - tensors.keys()):
        problems.append(f"{name!r} is missing from the live tensors")
    for name in sorted(tensors.keys() - want.keys()):
        problems.append(f"{name!r} is not in the checkpoint")
    pairs: list[tuple[TensorEntry, torch.Tensor]] = []
    for name in sorted(want.keys() & tensors.keys()):
        e, t = want[name], tensors[name]
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name!r} is a {type(t).__name__}, not a tensor")
            continue
        try:
            live_dt = dtypes.from_torch(t.dtype).name
        except Exception:
            live_dt = str(t.dtype)
        if live_dt != dtypes.lookup(e.dtype).name:
            problems.append(f"{name!r} dtype is {live_dt} live, {e.dtype} in the checkpoint")
        elif tuple(t.shape) != tuple(e.shape):
            problems.append(
                f"{name!r} shape is {tuple(t.shape)} live, {tuple(e.shape)} in the checkpoint"
            )
        elif not t.is_contiguous():
            problems.append(f"{name!r} is not contiguous (a write would not reach its memory)")
        elif t.numel() * t.element_size() != e.nbytes:
            problems.append(f"{name!r} has {t.numel() * t.element_size()} bytes, not {e.nbytes}")
        else:
            pairs.append((e, t))
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise TargetError(
            f"live tensors do not match checkpoint {manifest.checkpoint_id()[:12]}: "
            + "; ".join(problems[:3])
            + more,
            "nothing was written; hot restore needs the same model layout (a restarted or "
            "resharded server needs a restore to file instead)",
        )
    return pairs


# --------------------------------------------------------------------------- hashing


def _digests(
    views: Sequence[torch.Tensor], entries: Sequence[TensorEntry], bs: int, buffer_bytes: int
) -> list[list[bytes]]:
    """Per tensor, per block ids of the live bytes: on each GPU, else on the host."""
    return tensor_digests(views, bs)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class BlockWrites:
    """Blocks of a checkpoint written into live tensors: their byte ``views`` and
    manifest ``entries`` (in the same order), the block size ``bs``, where the
    chunks come from (``read_chunk``), the size of each of the two pinned buffers
    of the device path, the threads that read chunks, and ``progress`` (bytes)."""

    views: Sequence[torch.Tensor]
    entries: Sequence[TensorEntry]
    bs: int
    read_chunk: ReadFn
    buffer_bytes: int
    workers: int
    progress: Callable[[int], None] | None = None

    def chunk(self, ti: int, bi: int, length: int) -> bytes:
        """Block ``bi`` of tensor ``ti``: its chunk's raw bytes, ``length`` long."""
        e = self.entries[ti]
        cid = e.chunks[bi]
        data = self.read_chunk(cid, length)
        if len(data) != length:
            raise TargetError(
                f"chunk {cid.hex()} of {e.name!r} has {len(data)} bytes, expected {length}",
                "run apollo-cas verify on the store; nothing after this block was written",
            )
        return data

    def write(self, todo: Sequence[tuple[int, int]]) -> None:
        """Write blocks ``todo`` ((tensor, block) pairs): CPU tensors directly,
        device tensors through the pinned buffers (:meth:`write_device`)."""
        views, bs = self.views, self.bs
        host = [(ti, bi) for ti, bi in todo if views[ti].device.type == "cpu"]
        dev = [(ti, bi) for ti, bi in todo if views[ti].device.type != "cpu"]
        if host:
            arrays = {ti: views[ti].numpy() for ti, _ in host}

            def write_host(job: tuple[int, int]) -> int:
                ti, bi = job
                off = bi * bs
                n = min(bs, self.entries[ti].nbytes - off)
                arrays[ti][off : off + n] = np.frombuffer(self.chunk(ti, bi, n), dtype=np.uint8)
                return n

            for n in bounded_map(write_host, host, self.workers):
                if self.progress:
                    self.progress(n)
        if dev:
            self.write_device(dev)

    def write_device(self, todo: Sequence[tuple[int, int]]) -> None:
        """Chunks -> pinned buffer (threads) -> device (side stream), two buffers in turn."""
        views, entries, bs = self.views, self.entries, self.bs
        total = sum(min(bs, entries[ti].nbytes - bi * bs) for ti, bi in todo)
        cap = max(bs, min(self.buffer_bytes, -(-total // 2)))
        # Batches of whole blocks, each fitting one buffer.
        batches: list[list[tuple[int, int, int, int]]] = []  # (ti, bi, length, buffer offset)
        cur: list[tuple[int, int, int, int]] = []
        used = 0
        for ti, bi in todo:
            n = min(bs, entries[ti].nbytes - bi * bs)
            if cur and used + n > cap:
                batches.append(cur)
                cur, used = [], 0
            cur.append((ti, bi, n, used))
            used += n
        if cur:
            batches.append(cur)
        stager = Stager(cap, slots=2)
        arrays = [stager.acquire(k).numpy() for k in range(2)]

        try:
            for k, batch in enumerate(batches):
                buf = stager.acquire(k)  # the copy out of this slot (batch k-2) is done
                arr = arrays[k % 2]

                def fill(job: tuple[int, int, int, int], arr: np.ndarray = arr) -> int:
                    ti, bi, n, dst = job
                    arr[dst : dst + n] = np.frombuffer(self.chunk(ti, bi, n), dtype=np.uint8)
                    return n

                for _ in bounded_map(fill, batch, self.workers):
                    pass
                used_streams: dict[int, Any] = {}
                for ti, bi, n, dst in coalesce(batch, bs):
                    if views[ti].device.type == "cpu":  # tests drive this path on the CPU
                        views[ti][bi * bs : bi * bs + n].copy_(buf[dst : dst + n])
                        continue
                    idx = device_index(views[ti].device)
                    s = used_streams.get(idx)
                    if s is None:
                        # Our copies come after anything already queued on that device.
                        s = used_streams[idx] = stager.copy_stream(idx)
                    with torch.cuda.stream(s):
                        off = bi * bs
                        views[ti][off : off + n].copy_(buf[dst : dst + n], non_blocking=True)
                stager.release(k, used_streams.values())
                if self.progress:
                    self.progress(sum(n for _, _, n, _ in batch))
        finally:
            stager.drain()
            if stager.pin:
                # Later work on the current streams (our verification) sees the writes.
                stager.join_streams()
                torch.cuda.synchronize()
            stager.close()


def coalesce(
    batch: Sequence[tuple[int, int, int, int]], bs: int
) -> list[tuple[int, int, int, int]]:
    """Merge runs of consecutive blocks of one tensor (adjacent in the buffer) into one copy.

    Returns (tensor index, first block, length, buffer offset).
    """
    out: list[tuple[int, int, int, int]] = []
    for ti, bi, n, dst in batch:
        if out:
            pti, pbi, pn, pdst = out[-1]
            if pti == ti and pbi * bs + pn == bi * bs and pdst + pn == dst:
                out[-1] = (pti, pbi, pn + n, pdst)
                continue
        out.append((ti, bi, n, dst))
    return out


# ------------------------------------------------------------------ through the pipeline


def restore_into(
    pipeline: RestorePipeline,
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    *,
    only_changed: bool = True,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LiveRestoreReport:
    """Write ``manifest`` into the caller's ``tensors`` in place, through the restore pipeline.

    Refuses any difference of names, dtypes, shapes or contiguity before writing
    (:class:`TargetError`). The live blocks are hashed first (on the GPU: ~7 ms for
    17 GB); with ``only_changed`` only blocks whose id differs are restored, otherwise
    every block is. Live blocks that already hold a delta's base serve as that base
    on the device, so rolling forward one dense step reads only the deltas. Every
    restored block is decoded and verified on the device before it is written
    (CorruptChunk names a bad chunk; blocks of earlier batches are then already
    written: pause serving, and run it again or restore another checkpoint).
    """
    from ..gpu.restore import places_of

    t0 = time.perf_counter()
    bs = manifest.block_size
    pairs = _match(tensors, manifest)
    views = [byte_view(t) for _, t in pairs]
    entries = [e for e, _ in pairs]
    t_hash = time.perf_counter()
    live = tensor_digests(views, bs)
    hash_s = time.perf_counter() - t_hash
    same = {
        (ti, bi)
        for ti, e in enumerate(entries)
        for bi, cid in enumerate(e.chunks)
        if live[ti][bi] == cid
    }
    places = places_of(entries, bs, same if only_changed else None)
    index = {(p.dest, p.offset // bs): i for i, p in enumerate(places)}
    blocks: dict[bytes, tuple[int, int, int]] = {}
    for ti, ds in enumerate(live):
        for bi, d in enumerate(ds):
            q = index.get((ti, bi), -1)
            old = blocks.get(d)
            if old is None or (old[2] >= 0 and (q < 0 or q > old[2])):
                blocks[d] = (ti, bi * bs, q)  # prefer a block that is never overwritten
    nbytes = sum(p.size for p in places)
    write_s = 0.0
    if not dry_run and places:
        t_write = time.perf_counter()
        pipeline.run(places, views, live=blocks, progress=progress)
        write_s = time.perf_counter() - t_write
    return LiveRestoreReport.of(
        views,
        entries,
        (len(places), nbytes),
        t0,
        (hash_s, write_s, pipeline.stats.verify_s),
        not dry_run,
        dry_run,
    )
