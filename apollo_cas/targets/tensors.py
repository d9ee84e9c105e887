"""Tensors in memory or on a GPU, decoded in parallel straight into their buffers.

On a GPU, :func:`load_tensors_pipeline` decodes on the device (the GPU restore
pipeline, docs/GPU_RESTORE.md). Otherwise two paths, chosen by the
:class:`~apollo_cas.decoding.Decoder`:

* threads (small checkpoints, few cores): chunks are decoded into host buffers
  (pinned when the target is a GPU) and copied to the device;
* worker processes (large checkpoints): workers ``pwrite`` verified chunks into
  one file in ``/dev/shm`` that this process maps; each tensor is handed to the
  GPU as soon as its last chunk lands, so copies overlap decoding. For a CPU
  target the tensors are views of that mapping (no copy at all).
"""

from __future__ import annotations

import bisect
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import dtypes, fsio
from ..decoding import Decoder, Output
from ..manifest import Manifest, TensorEntry
from ..parallel import bounded_map
from .assemble import block_length

if TYPE_CHECKING:
    import torch

    from ..gpu.restore import RestorePipeline

SHM_DIR = "/dev/shm"
#: The shared file's name, by the rule of :func:`fsio.temp_path`
#: (``apollo-load-<writer>-<rand>-tensors``): one a killed load leaves behind
#: names its writer.
SHM_PREFIX = "apollo-load-"
_ALIGN = 64  # every tensor starts 64-byte aligned in the shared file


def load_tensors(
    decoder: Decoder,
    manifest: Manifest,
    device: str | None = None,
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``manifest`` (or those in ``names``) as torch tensors."""
    entries = [t for t in manifest.tensors if names is None or t.name in names]
    total = sum(t.nbytes + _ALIGN for t in entries)
    if decoder.processes and _shm_has_room(total):
        return _load_via_shm(decoder, entries, manifest.block_size, device, total)
    return _load_via_threads(decoder, entries, manifest.block_size, device)


def _torch_dtype(t: TensorEntry) -> torch.dtype:
    import torch

    dt: torch.dtype = getattr(torch, dtypes.lookup(t.dtype).torch_name)
    return dt


def _load_via_threads(
    decoder: Decoder, entries: list[TensorEntry], bs: int, device: str | None
) -> dict[str, torch.Tensor]:
    import torch

    on_gpu = device is not None and str(device).startswith("cuda")
    hosts = [torch.empty(t.nbytes, dtype=torch.uint8, pin_memory=on_gpu) for t in entries]
    views = [h.numpy() for h in hosts]

    def task(job: tuple[int, int, bytes]) -> None:
        ti, i, cid = job
        data = decoder.read_chunk(cid, block_length(entries[ti], i, bs))
        views[ti][i * bs : i * bs + len(data)] = np.frombuffer(data, dtype=np.uint8)

    jobs = ((ti, i, c) for ti, t in enumerate(entries) for i, c in enumerate(t.chunks))
    for _ in bounded_map(task, jobs, decoder.workers):
        pass
    out: dict[str, torch.Tensor] = {}
    for t, h in zip(entries, hosts, strict=True):
        dt = _torch_dtype(t)
        tensor = h.view(dt).reshape(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dt)
        if device is not None:
            tensor = tensor.to(device, non_blocking=on_gpu)
        out[t.name] = tensor
    if on_gpu:
        torch.cuda.synchronize()
    return out


def _shm_has_room(nbytes: int) -> bool:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize > nbytes * 1.1


def _load_via_shm(
    decoder: Decoder, entries: list[TensorEntry], bs: int, device: str | None, total: int
) -> dict[str, torch.Tensor]:
    import torch

    offsets, pos = [], 0
    for t in entries:
        offsets.append(pos)
        pos += t.nbytes + (-t.nbytes % _ALIGN)
    final = Path(SHM_DIR) / "tensors"
    shared = fsio.Temporary(final, path=fsio.temp_path(final, SHM_PREFIX), mode=0o600)
    try:
        os.ftruncate(shared.fd, max(pos, 1))
        mm = mmap.mmap(shared.fd, max(pos, 1))
    except BaseException:
        shared.discard()
        raise
    shared.close()
    path = str(shared.path)
    out: dict[str, torch.Tensor] = {}
    remaining = [t.nbytes for t in entries]
    ready: queue.Queue[int | None] = queue.Queue()
    failed: list[BaseException] = []

    def tensor_at(ti: int) -> torch.Tensor:
        t = entries[ti]
        dt = _torch_dtype(t)
        if not t.nbytes:
            return torch.empty(t.shape, dtype=dt)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=offsets[ti])
        return raw.view(dt).reshape(t.shape)

    def copier() -> None:
        # Hands each finished tensor to the GPU while workers decode the rest.
        while (ti := ready.get()) is not None:
            try:
                out[entries[ti].name] = tensor_at(ti).to(device)
            except BaseException as exc:
                failed.append(exc)

    def on_done(_out: int, offset: int, n: int) -> None:
        ti = bisect.bisect_right(offsets, offset) - 1
        remaining[ti] -= n
        if remaining[ti] == 0 and device is not None:
            ready.put(ti)

    thread = threading.Thread(target=copier, daemon=True) if device is not None else None
    if thread:
        thread.start()
    jobs = (
        (0, offsets[ti] + i * bs, c, block_length(t, i, bs))
        for ti, t in enumerate(entries)
        for i, c in enumerate(t.chunks)
    )
    try:
        decoder.write([Output(-1, path)], jobs, on_done=on_done)
    finally:
        shared.discard()  # the mapping stays valid; the memory goes with the last view
        if thread:
            ready.put(None)
            thread.join()
    if failed:
        raise failed[0]
    for ti, t in enumerate(entries):
        if t.name not in out:
            out[t.name] = (
                tensor_at(ti) if device is None or not t.nbytes else tensor_at(ti).to(device)
            )
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return {t.name: out[t.name] for t in entries}


def load_tensors_pipeline(
    pipeline: RestorePipeline,
    manifest: Manifest,
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``manifest`` (or those in ``names``) on the pipeline's device.

    The GPU restore pipeline (:mod:`apollo_cas.gpu.restore`) decodes and verifies every
    block on the device before it lands in its tensor; nothing is returned unless every
    block verified (a failure raises CorruptChunk naming the chunk).
    """
    import torch

    from ..gpu.restore import places_of

    entries = [t for t in manifest.tensors if names is None or t.name in names]
    dests = [torch.empty(t.nbytes, dtype=torch.uint8, device=pipeline.device) for t in entries]
    pipeline.run(places_of(entries, manifest.block_size), dests)
    out: dict[str, torch.Tensor] = {}
    for t, d in zip(entries, dests, strict=True):
        dt = _torch_dtype(t)
        out[t.name] = (
            d.view(dt).reshape(t.shape)
            if t.nbytes
            else torch.empty(t.shape, dtype=dt, device=pipeline.device)
        )
    return out
