"""The server side: export CUDA tensors as a handles file.

:func:`write_handles` is what a server (or the vLLM worker extension,
:mod:`apollo_cas.integrations.vllm`) runs to share its weights; :func:`export_meta`
is the ``__meta__`` it adds, which lets readers detect a restarted server
(:mod:`.owner`) and remap devices (:mod:`.devices`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ... import fsio, procinfo
from ...errors import SourceError
from ...layout import check_tensor_name
from .format import META_FORMAT, META_KEY
from .ipc import gpu_uuid
from .owner import proc_start_ticks

__all__ = ["export_meta", "write_handles"]


def _self_gpu_uuids(devices: Sequence[int]) -> dict[str, str]:
    # Metadata is best effort: a GPU whose UUID torch cannot tell is left out.
    return {str(d): "GPU-" + u for d in devices if (u := gpu_uuid(d))}


def export_meta(
    devices: Sequence[int], *, rank: int | None = None, world_size: int | None = None
) -> dict[str, Any]:
    """The ``__meta__`` dict of this process. Plain str/int/float/None values only:
    anything else (``torch.__version__`` is a ``TorchVersion``) would be a global
    that the reader's allowlist refuses."""
    return {
        "format": META_FORMAT,
        "pid": os.getpid(),
        "pid_start": proc_start_ticks(os.getpid()),
        "created": time.time(),
        "hostname": socket.gethostname(),
        "boot_id": procinfo.current().boot_id,
        "pid_ns": procinfo.current().pid_ns,
        "rank": None if rank is None else int(rank),
        "world_size": None if world_size is None else int(world_size),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_uuids": _self_gpu_uuids(devices),
        "torch": str(torch.__version__),
    }


def write_handles(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    include_meta: bool = True,
) -> None:
    """Export CUDA tensors as a handles file (what the server side runs).

    The file is written under a temporary name, fsynced and renamed, mode 0600:
    whoever can open it can read and overwrite the weights. With
    ``include_meta`` it carries ``__meta__`` (pid and start time, rank, world
    size, GPU UUIDs, CUDA_VISIBLE_DEVICES), which lets readers detect a restarted
    server and remap devices; the original Rust tool cannot read such a file
    (it expects every key to hold a handle): pass ``include_meta=False`` while it
    still runs beside apollo_cas. The calling process must keep the tensors alive.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    obj: dict[str, Any] = {}
    devices = set()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            raise SourceError(
                f"tensor {name!r} is not a CUDA tensor",
                "handles share GPU memory; save CPU tensors directly",
            )
        check_tensor_name(name)
        obj[name] = {"handle": reduce_tensor(t.detach())}
        devices.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if include_meta:
        obj[META_KEY] = export_meta(sorted(devices), rank=rank, world_size=world_size)
    # Mode 0600: whoever can open the file can read and overwrite the weights.
    fsio.atomic_write(Path(path), lambda f: torch.save(obj, f), mode=0o600)
