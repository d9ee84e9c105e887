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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .. import dtypes
from ..decoding import ReadFn
from ..errors import TargetError
from ..manifest import Manifest, TensorEntry
from ..parallel import bounded_map, default_workers
from ..sources.base import BlockRequest
from ..sources.device import (
    DEFAULT_BUFFER_BYTES,
    DeviceSource,
    byte_view,
    device_block_digests,
    host_block_digests,
    kernel_accepts,
)

SERVING_NOTICE = (
    "serving must be paused during a hot restore: requests served while it runs see "
    "half-restored weights"
)

__all__ = ["SERVING_NOTICE", "LiveRestoreReport", "restore_live"]


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
    checked = sum(len(e.chunks) for e in entries)
    devices = sorted({str(v.device) for v in views}) or ["cpu"]

    write_s = verify_s = 0.0
    verified = False
    if not dry_run:
        t_write = time.perf_counter()
        _write(views, entries, todo, bs, read_chunk, buffer_bytes, workers, progress)
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
    return LiveRestoreReport(
        tensors=len(entries),
        blocks_checked=checked,
        blocks_written=len(todo),
        bytes_written=0 if dry_run else nbytes,
        seconds=time.perf_counter() - t0,
        hash_seconds=hash_s,
        write_seconds=write_s,
        verify_seconds=verify_s,
        device=",".join(devices),
        verified=verified,
        dry_run=dry_run,
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
    out: list[list[bytes]] = [[] for _ in views]
    by_dev: dict[str, list[int]] = {}
    for i, v in enumerate(views):
        by_dev.setdefault(str(v.device), []).append(i)
    gpu_ok = any(d != "cpu" for d in by_dev) and kernel_accepts(bs)
    for dev, idx in by_dev.items():
        sub = [views[i] for i in idx]
        if dev == "cpu":
            ds = host_block_digests([v.numpy().data for v in sub], bs)
        elif gpu_ok:
            with torch.cuda.device(sub[0].device):
                ds = device_block_digests(sub, bs)
        else:
            ds = _digests_via_host(sub, [entries[i].name for i in idx], bs, buffer_bytes)
        for i, d in zip(idx, ds, strict=True):
            out[i] = d
    return out


def _digests_via_host(
    views: Sequence[torch.Tensor], names: Sequence[str], bs: int, buffer_bytes: int
) -> list[list[bytes]]:
    """Device bytes hashed on the host, streamed through pinned buffers (no kernel here)."""
    import xxhash

    src = DeviceSource(dict(zip(names, views, strict=True)), buffer_bytes=buffer_bytes)
    order = {t.name: i for i, t in enumerate(src.tensors())}
    reqs = [
        BlockRequest(order[n], o, min(bs, int(v.numel()) - o))
        for n, v in zip(names, views, strict=True)
        for o in range(0, int(v.numel()), bs)
    ]
    out: dict[int, list[bytes]] = {}
    for i, mv in src.fetch(reqs):
        out.setdefault(reqs[i].tensor, []).append(xxhash.xxh3_128_digest(mv))
    src.close()
    return [out.get(order[n], []) for n in names]


# --------------------------------------------------------------------------- writing


def _chunk(read_chunk: ReadFn, cid: bytes, length: int, name: str) -> bytes:
    data = read_chunk(cid, length)
    if len(data) != length:
        raise TargetError(
            f"chunk {cid.hex()} of {name!r} has {len(data)} bytes, expected {length}",
            "run apollo-cas verify on the store; nothing after this block was written",
        )
    return data


def _write(
    views: Sequence[torch.Tensor],
    entries: Sequence[TensorEntry],
    todo: Sequence[tuple[int, int]],
    bs: int,
    read_chunk: ReadFn,
    buffer_bytes: int,
    workers: int,
    progress: Callable[[int], None] | None,
) -> None:
    host = [(ti, bi) for ti, bi in todo if views[ti].device.type == "cpu"]
    dev = [(ti, bi) for ti, bi in todo if views[ti].device.type != "cpu"]
    if host:
        arrays = {ti: views[ti].numpy() for ti, _ in host}

        def write_host(job: tuple[int, int]) -> int:
            ti, bi = job
            e = entries[ti]
            off = bi * bs
            n = min(bs, e.nbytes - off)
            arrays[ti][off : off + n] = np.frombuffer(
                _chunk(read_chunk, e.chunks[bi], n, e.name), dtype=np.uint8
            )
            return n

        for n in bounded_map(write_host, host, workers):
            if progress:
                progress(n)
    if dev:
        _write_device(views, entries, dev, bs, read_chunk, buffer_bytes, workers, progress)


def _write_device(
    views: Sequence[torch.Tensor],
    entries: Sequence[TensorEntry],
    todo: Sequence[tuple[int, int]],
    bs: int,
    read_chunk: ReadFn,
    buffer_bytes: int,
    workers: int,
    progress: Callable[[int], None] | None,
) -> None:
    """Chunks -> pinned buffer (threads) -> device (side stream), two buffers in turn."""
    total = sum(min(bs, entries[ti].nbytes - bi * bs) for ti, bi in todo)
    cap = max(bs, min(buffer_bytes, -(-total // 2)))
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
    pin = torch.cuda.is_available()  # False only when tests drive this path on the CPU
    bufs = [torch.empty(cap, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    arrays = [b.numpy() for b in bufs]
    streams: dict[int, Any] = {}
    events: list[list[Any]] = [[], []]

    def stream_for(device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        s = streams.get(idx)
        if s is None:
            s = torch.cuda.Stream(device=idx)
            # Our copies come after anything already queued on that device.
            s.wait_stream(torch.cuda.current_stream(idx))
            streams[idx] = s
        return s

    try:
        for k, batch in enumerate(batches):
            slot = k % 2
            for ev in events[slot]:  # the copy out of this buffer (batch k-2) is done
                ev.synchronize()
            events[slot] = []
            arr = arrays[slot]

            def fill(job: tuple[int, int, int, int], arr: np.ndarray = arr) -> int:
                ti, bi, n, dst = job
                e = entries[ti]
                arr[dst : dst + n] = np.frombuffer(
                    _chunk(read_chunk, e.chunks[bi], n, e.name), dtype=np.uint8
                )
                return n

            for _ in bounded_map(fill, batch, workers):
                pass
            used_streams: dict[int, Any] = {}
            for ti, bi, n, dst in _coalesce(batch, bs):
                if views[ti].device.type == "cpu":  # tests drive this path on the CPU
                    views[ti][bi * bs : bi * bs + n].copy_(bufs[slot][dst : dst + n])
                    continue
                s = stream_for(views[ti].device)
                used_streams[id(s)] = s
                with torch.cuda.stream(s):
                    off = bi * bs
                    views[ti][off : off + n].copy_(bufs[slot][dst : dst + n], non_blocking=True)
            for s in used_streams.values():
                ev = torch.cuda.Event()
                ev.record(s)
                events[slot].append(ev)
            if progress:
                progress(sum(n for _, _, n, _ in batch))
    finally:
        for evs in events:
            for ev in evs:
                ev.synchronize()
        # Later work on the current streams (our verification) sees the writes.
        for idx, s in streams.items():
            torch.cuda.current_stream(idx).wait_stream(s)
            torch.cuda.synchronize(idx)


def _coalesce(
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
