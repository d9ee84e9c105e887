"""Handles files crafted on the CPU for the tests of apollo_cas.sources.handles.

CI has no GPU: ``torch.save`` pickles ``rebuild_cuda_tensor`` by reference and the
15 arguments are made up; :class:`CpuIpc` opens such handles as CPU tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from apollo_cas.sources import handles

PID = os.getpid()


def handle_args(
    shape: tuple[int, ...] = (4, 8),
    dtype: Any = None,
    *,
    device: int = 0,
    pid: int = PID,
    kind: bytes = b"c",
    storage_bytes: int | None = None,
    offset: int = 0,
    cls: Any = None,
) -> tuple[Any, ...]:
    """The 15 arguments reduce_tensor gives for a contiguous CUDA tensor."""
    dtype = dtype or torch.bfloat16
    n = 1
    for s in shape:
        n *= s
    stride = tuple(int(torch.empty(shape).stride(i)) for i in range(len(shape)))
    nbytes = n * dtype.itemsize
    return (
        cls or torch.nn.Parameter,
        torch.Size(shape),
        stride,
        offset,
        torch.storage.TypedStorage,
        dtype,
        device,
        b"\x01" + kind + b"\x07" * 64,
        storage_bytes if storage_bytes is not None else nbytes + offset * dtype.itemsize,
        0,
        True,
        f"/torch_{pid}_12345_0".encode(),
        0,
        b"",
        False,
    )


def write(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def handles_file(
    tmp_path: Path,
    tensors: dict[str, tuple[int, ...]] | None = None,
    meta: dict[str, Any] | None = None,
    name: str = "handles.pt",
    **kw: Any,
) -> Path:
    tensors = tensors or {"model.layers.0.qkv_proj.weight": (6, 8), "model.norm.weight": (8,)}
    obj: dict[str, Any] = {
        n: {"handle": (rebuild_cuda_tensor, handle_args(s, **kw))} for n, s in tensors.items()
    }
    if meta is not None:
        obj[handles.META_KEY] = meta
    return write(tmp_path / name, obj)


def dead_pid() -> int:
    """A pid whose process has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class CpuIpc(handles.CudaIpc):
    """One local GPU, and handles opened as CPU tensors filled from their shape."""

    def __init__(self) -> None:
        self.made: dict[str, torch.Tensor] = {}

    def local_gpus(self) -> list[str]:
        return ["aaaa"]

    def rebuild(self, e: handles.HandleEntry, device: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(self.made) + 1)
        t = torch.randn(e.size, generator=g).to(e.dtype)
        self.made[e.name] = t
        return t


class FailingIpc(CpuIpc):
    """Every handle fails to open, as a CUDA error would."""

    def rebuild(self, e: handles.HandleEntry, device: int) -> torch.Tensor:
        raise RuntimeError("CUDA error: invalid resource handle\nmore lines")
