"""The original tool's CUDA IPC handles file, read without running its pickle.

The file is ``torch.save`` of ``{name: {"handle": (rebuild_func, args)}}`` where
the pair is ``torch.multiprocessing.reductions.reduce_tensor(tensor)`` of a CUDA
tensor, written by a live vLLM server (docs/HANDLES.md). One module per job:

* :mod:`.unpickling` — ``torch.load(weights_only=True)`` with an allowlist of two
  inert stand-ins; any other global stops the load before anything runs;
* :mod:`.format` — the format: every handle's arguments type- and range-checked
  (:func:`read_handles`, :class:`HandlesFile`, :class:`HandleEntry`); no CUDA;
* :mod:`.owner` — stale handles: owner process gone or restarted, file too old
  (:func:`check_owner`);
* :mod:`.devices` — the server's device indices mapped to this process's GPUs
  (:func:`map_devices`, :func:`parse_device_map`);
* :mod:`.ipc` — the device side: handles opened over CUDA IPC
  (:func:`open_handle_tensors`, :class:`CudaIpc`);
* :mod:`.source` — the Source: :func:`open_handles`, a :class:`HandlesSource`
  (a :class:`~apollo_cas.sources.device.DeviceSource` over the live weights,
  checked against the series' previous checkpoint by every ``Store.save``);
* :mod:`.export` — the server side: :func:`write_handles`, :func:`export_meta`.

:func:`check_against` (names, dtypes and shapes against the series' previous
checkpoint; stale handles when a handles source differs) lives in
:mod:`apollo_cas.sources.previous` and is importable from here. docs/HANDLES.md lists what cannot be detected.
"""

from __future__ import annotations

from ..previous import check_against, differences
from .devices import map_devices, parse_device_map
from .export import export_meta, write_handles
from .format import MAX_FILE_BYTES, META_KEY, HandleEntry, HandlesFile, read_handles
from .ipc import CudaIpc, open_handle_tensors
from .owner import check_owner
from .source import HandlesSource, open_handles
from .unpickling import allowlist

__all__ = [
    "MAX_FILE_BYTES",
    "META_KEY",
    "CudaIpc",
    "HandleEntry",
    "HandlesFile",
    "HandlesSource",
    "allowlist",
    "check_against",
    "check_owner",
    "differences",
    "export_meta",
    "map_devices",
    "open_handle_tensors",
    "open_handles",
    "parse_device_map",
    "read_handles",
    "write_handles",
]
