"""The handles source: a :class:`~apollo_cas.sources.device.DeviceSource` over a server's live weights.

What ``apollo-cas save --handles`` (``--source-kind handles``) and
``restore --live`` open. The tensors come from :func:`.ipc.open_handle_tensors`;
this adds the tensor-parallel rank and world size (options, else the file's
metadata) and the notes of the opening (owner pid, device map, handle kind) to
the source's :class:`~apollo_cas.manifest.SourceInfo`, which the manifest records.

The source carries its own staleness check (:class:`HandlesSource`): the owner
checks run when it is opened, and the comparison with the series' previous
checkpoint runs inside every ``Store.save`` of it, so a Python caller's
``store.save(open_handles(path))`` is refused exactly as ``apollo-cas save
--handles`` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...errors import UsageError
from ...manifest import Manifest, SourceInfo
from ..device import DEFAULT_BUFFER_BYTES, DEFAULT_STREAMS, DeviceSource
from ..previous import check_against
from .ipc import CudaIpc, open_handle_tensors

__all__ = ["HandlesSource", "open_handles"]


class HandlesSource(DeviceSource):
    """The live tensors behind a handles file. Handles that outlived the
    server's weights (it reloaded or reallocated them) point at bytes that are
    not the model, and only the previous checkpoint shows it: every save of
    this source compares against it first (a
    :class:`~apollo_cas.sources.previous.ChecksPrevious`)."""

    def check_previous(self, manifest: Manifest | None, *, force: bool) -> None:
        check_against(manifest, self, force=force)


def _meta_int(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def open_handles(
    path: str | Path,
    info: SourceInfo | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device_map: Mapping[int, int] | str | None = None,
    max_age: float | None = None,
    check_owner_pid: bool = True,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    streams: int = DEFAULT_STREAMS,
    ipc: CudaIpc | None = None,
) -> HandlesSource:
    """A :class:`DeviceSource` over the live tensors of a handles file.

    ``rank`` / ``world_size`` (the CLI's ``--rank`` / ``--world-size``) override
    the file's metadata and are recorded in the manifest: handles of vLLM's own
    parameters carry its internal, tensor-parallel-sharded names, which only make
    sense with them. See :func:`open_handle_tensors` for the other options.
    ``Store.save`` of the result refuses it if it no longer matches the series'
    previous checkpoint (:class:`HandlesSource`).
    """
    tensors, hf, notes = open_handle_tensors(
        path,
        device_map=device_map,
        max_age=max_age,
        check_owner_pid=check_owner_pid,
        ipc=ipc,
    )
    meta_rank, meta_ws = _meta_int(hf.meta, "rank"), _meta_int(hf.meta, "world_size")
    for what, given, recorded in (("rank", rank, meta_rank), ("world size", world_size, meta_ws)):
        if given is not None and recorded is not None and given != recorded:
            raise UsageError(
                f"{hf.path} was exported by {what} {recorded}, not {given}",
                f"drop the {what} option or pass the right handles file",
            )
    rank = rank if rank is not None else meta_rank
    world_size = world_size if world_size is not None else meta_ws
    if rank is not None and (rank < 0 or (world_size is not None and rank >= world_size)):
        raise UsageError(
            f"rank {rank} is outside world size {world_size}", "pass 0 <= --rank < --world-size"
        )
    base = info or SourceInfo(kind="handles", location=str(hf.path))
    info = replace(
        base,
        location=base.location or str(hf.path),
        rank=rank,
        world_size=world_size,
        metadata={**base.metadata, **notes},
    )
    return HandlesSource(tensors, info, buffer_bytes=buffer_bytes, streams=streams)
