"""Tensors in memory or on a GPU, decoded in parallel straight into their buffers.

For a GPU target the bytes land in pinned host memory, tensor by tensor, and
are copied to the device asynchronously, so decoding the next tensor overlaps
the copy of the previous one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .. import dtypes
from ..manifest import Manifest
from ..parallel import bounded_map

if TYPE_CHECKING:
    import torch


def load_tensors(
    read_chunk: Callable[[bytes], bytes],
    manifest: Manifest,
    workers: int,
    device: str | None = None,
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``manifest`` (or those in ``names``) as torch tensors."""
    import torch

    bs = manifest.block_size
    entries = [t for t in manifest.tensors if names is None or t.name in names]
    on_gpu = device is not None and str(device).startswith("cuda")
    hosts: list[torch.Tensor] = []
    for t in entries:
        hosts.append(torch.empty(t.nbytes, dtype=torch.uint8, pin_memory=on_gpu))
    views = [h.numpy() for h in hosts]

    def task(job: tuple[int, int, bytes]) -> None:
        ti, i, cid = job
        data = read_chunk(cid)
        views[ti][i * bs : i * bs + len(data)] = np.frombuffer(data, dtype=np.uint8)

    jobs = ((ti, i, c) for ti, t in enumerate(entries) for i, c in enumerate(t.chunks))
    for _ in bounded_map(task, jobs, workers):
        pass
    out: dict[str, torch.Tensor] = {}
    for t, h in zip(entries, hosts):
        dt = getattr(torch, dtypes.lookup(t.dtype).torch_name)
        tensor = h.view(dt).reshape(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dt)
        if device is not None:
            tensor = tensor.to(device, non_blocking=on_gpu)
        out[t.name] = tensor
    if on_gpu:
        torch.cuda.synchronize()
    return out
