"""The device side: the tensors behind a handles file, opened over CUDA IPC.

:func:`open_handle_tensors` reads and checks the file (:mod:`.format`), refuses a
stale owner (:mod:`.owner`), maps the server's devices to this process's
(:mod:`.devices`) and only then opens each handle, with apollo_cas's own call of
``rebuild_cuda_tensor``: its own tensor class, no autograd, the device index
remapped. CUDA errors while opening become :class:`~apollo_cas.errors.StaleHandles`
with the likely causes. The opened tensors share the server's memory.

The two things that need a GPU — which GPUs this process sees, and opening one
handle — are the methods of :class:`CudaIpc`; ``open_handle_tensors(ipc=...)``
takes another one where there is no CUDA (the tests open handles as CPU tensors).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import StaleHandles
from .devices import map_devices, norm_uuid, parse_device_map
from .format import HandleEntry, HandlesFile, read_handles
from .owner import check_owner, expandable

__all__ = ["CudaIpc", "gpu_uuid", "open_handle_tensors"]


def gpu_uuid(index: int) -> str:
    """The normalised UUID of local GPU ``index``; ``""`` where torch cannot tell."""
    try:
        return norm_uuid(str(torch.cuda.get_device_properties(index).uuid))
    except Exception:  # metadata and matching are best effort: an unknown UUID matches none
        return ""


class CudaIpc:
    """Opening handles on this process's GPUs, through CUDA IPC."""

    def local_gpus(self) -> list[str]:
        """UUIDs (normalised) of the GPUs this process sees, by local index."""
        if not torch.cuda.is_available():
            return []
        return [gpu_uuid(i) for i in range(torch.cuda.device_count())]

    def rebuild(self, e: HandleEntry, device: int) -> torch.Tensor:
        """Open one handle on local ``device``."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        # Our own tensor class and requires_grad=False: a plain tensor over the shared
        # memory, whatever class the exporter had.
        return rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size(e.size),
            e.stride,
            e.tensor_offset,
            e.storage_cls,
            e.dtype,
            device,
            e.storage_handle,
            e.storage_size_bytes,
            e.storage_offset_bytes,
            False,
            e.ref_counter_handle,
            e.ref_counter_offset,
            e.event_handle,
            e.event_sync_required,
        )


def _open_error(
    hf: HandlesFile, e: HandleEntry, device: int, exc: Exception, notes: Mapping[str, str]
) -> StaleHandles:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    causes = [
        "the exporting process exited or freed the tensors",
        "this process runs on another machine, container or IPC namespace",
        "the GPU differs (check CUDA_VISIBLE_DEVICES or pass a device map)",
        "this process is the exporter itself (pass its state_dict in-process instead)",
    ]
    if e.handle_kind == "expandable_segment" or expandable(notes.get("owner_alloc_conf")):
        causes.insert(
            0,
            "the server allocates with expandable_segments:True in "
            "PYTORCH_CUDA_ALLOC_CONF, whose memory CUDA IPC can only share "
            "with pidfd_getfd rights (same user, ptrace allowed); restart it "
            "without expandable_segments",
        )
    return StaleHandles(
        f"{hf.path}: cannot open the handle of {e.name!r} on GPU {device}: {first}",
        "likely causes: " + "; ".join(causes),
    )


def open_handle_tensors(
    path: str | Path,
    *,
    device_map: Mapping[int, int] | str | None = None,
    max_age: float | None = None,
    check_owner_pid: bool = True,
    ipc: CudaIpc | None = None,
) -> tuple[dict[str, torch.Tensor], HandlesFile, dict[str, str]]:
    """The live tensors behind a handles file, opened on this process's GPUs.

    Returns ``(tensors, parsed file, notes)``. The tensors share the server's
    memory: writing them (hot restore) changes the served weights. They stay
    valid while they are referenced and the server keeps the memory. ``ipc``
    opens them (by default :class:`CudaIpc`).
    """
    ipc = ipc or CudaIpc()
    hf = read_handles(path)
    notes = check_owner(hf, max_age=max_age, check_pid=check_owner_pid)
    if isinstance(device_map, str):
        device_map = parse_device_map(device_map)
    kinds = sorted({e.handle_kind for e in hf.entries})
    notes["handle_kind"] = ",".join(kinds)
    mapping, rule = map_devices(
        [e.device for e in hf.entries],
        hf.meta,
        device_map,
        ipc.local_gpus(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    notes["device_map"] = ",".join(f"{o}:{loc}" for o, loc in sorted(mapping.items()))
    notes["device_rule"] = rule
    out: dict[str, torch.Tensor] = {}
    for e in hf.entries:
        dev = mapping[e.device]
        try:
            t = ipc.rebuild(e, dev)
        except Exception as exc:  # CUDA errors surface as RuntimeError / torch.AcceleratorError
            raise _open_error(hf, e, dev, exc, notes) from None
        if tuple(t.shape) != e.size or t.dtype != e.dtype:
            raise StaleHandles(
                f"{hf.path}: handle of {e.name!r} opened as {tuple(t.shape)} "
                f"{t.dtype}, expected {e.size} {e.dtype}",
                "re-export the handles from the running server",
            )
        out[e.name] = t
    return out, hf, notes
