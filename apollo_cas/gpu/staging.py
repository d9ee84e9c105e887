"""Pinned, double-buffered staging between host and GPU, both ways.

One home for what a save of live weights (device to host: :class:`~apollo_cas.sources.
device.DeviceSource.fetch`), a hot restore (host to device: :mod:`apollo_cas.targets.live`)
and the GPU restore pipeline (:mod:`apollo_cas.gpu.restore`) all need:

* a few reusable host buffers, pinned when CUDA is present: pageable copies run at
  ~1.3 GB/s device-to-host on an H100 against ~54 GB/s pinned (measured), and pinning
  costs ~20 ms per GiB, so buffers are allocated once and reused, never per chunk;
* a slot is handed out only when every copy that used it last has finished (CUDA
  events recorded on the streams that used it), so filling slot k+1 on the host
  overlaps the copy out of slot k;
* a side stream per device for the copies, ordered after the work already queued on
  that device's current stream.

Host memory is ``slots x capacity`` and never grows with the model. On a machine
without CUDA the same class hands out ordinary (unpinned) CPU tensors, so CI runs the
same bookkeeping.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

__all__ = ["Stager", "Uploads"]


class Stager:
    """``slots`` reusable host buffers of ``capacity`` bytes, plus per-device copy streams.

    ``pin`` defaults to whether CUDA is available. Use :meth:`acquire` to get slot
    ``k % slots`` (it waits for the copies recorded on that slot by :meth:`release`),
    and :meth:`drain` before dropping the stager or reusing buffers elsewhere.
    """

    def __init__(self, capacity: int = 0, *, slots: int = 2, pin: bool | None = None) -> None:
        if slots < 1:
            raise ValueError("a stager needs at least one slot")
        self.slots = slots
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: list[torch.Tensor] = []
        self._events: list[list[Any]] = [[] for _ in range(slots)]
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()
        if capacity:
            self.ensure(capacity)

    @property
    def capacity(self) -> int:
        """Bytes per slot (0 before the first :meth:`ensure`)."""
        return int(self._buffers[0].numel()) if self._buffers else 0

    @property
    def host_bytes(self) -> int:
        """Host memory held: ``slots x capacity``."""
        return self.capacity * len(self._buffers)

    def ensure(self, capacity: int) -> None:
        """Make every slot hold at least ``capacity`` bytes (reallocates only to grow)."""
        if self._buffers and self.capacity >= capacity:
            return
        self.drain()
        size = max(1, int(capacity))
        self._buffers = [
            torch.empty(size, dtype=torch.uint8, pin_memory=self.pin) for _ in range(self.slots)
        ]

    def acquire(self, k: int) -> torch.Tensor:
        """Slot ``k % slots``, once every copy recorded on it has completed."""
        slot = k % self.slots
        for ev in self._events[slot]:
            ev.synchronize()
        self._events[slot] = []
        return self._buffers[slot]

    def release(self, k: int, streams: Any = ()) -> None:
        """Record that copies into or out of slot ``k % slots`` were queued on ``streams``."""
        slot = k % self.slots
        for s in streams:
            ev = torch.cuda.Event()
            ev.record(s)
            self._events[slot].append(ev)

    def drain(self) -> None:
        """Wait for every copy recorded on any slot."""
        for evs in self._events:
            for ev in evs:
                ev.synchronize()
        self._events = [[] for _ in range(self.slots)]

    def copy_stream(self, device: torch.device | int) -> Any:
        """This stager's side stream on ``device``, ordered after its current stream's work.

        Call once per batch of copies: every call makes the side stream wait for what
        is queued on the device's current stream by then (so a copy out of live weights
        sees writes queued before it, and a copy into them lands after).
        """
        idx = device if isinstance(device, int) else device_index(device)
        with self._lock:
            s = self._streams.get(idx)
            if s is None:
                s = torch.cuda.Stream(device=idx)
                self._streams[idx] = s
        s.wait_stream(torch.cuda.current_stream(idx))
        return s

    def join_streams(self) -> None:
        """Make every device's current stream wait for this stager's copies."""
        for idx, s in self._streams.items():
            torch.cuda.current_stream(idx).wait_stream(s)

    def close(self) -> None:
        """Wait for copies in flight, then drop the buffers and streams."""
        self.drain()
        self._buffers = []
        self._streams = {}


class Uploads:
    """Small host tables (chunk ids to compare, copy tables) sent to the device through
    ``slots`` reusable pinned buffers, round robin.

    ``Tensor.pin_memory()`` per table cost 2.9 ms of host time on average in the
    profile of a 17.1 GB dense step on the H200 (128 calls, 377 ms on the device
    thread; benchmarks/results/h200_2026-12-03/dense_profile.json), more than the
    kernels they fed; a pageable copy would make the stream wait. A buffer is
    rewritten only once the copy out of it has completed (a CUDA event), which with
    a few slots is long past. One thread uses an instance.
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._arrays: list[np.ndarray | None] = [None] * slots  # numpy views of _bufs
        self._events: list[Any] = [None] * slots
        self._next = 0
        #: host seconds spent waiting for a buffer's previous copy to complete: a
        #: caller that sends more tables per round than there are slots waits for
        #: the device here, and stops running ahead of it
        self.waited_s = 0.0

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A copy of the CPU tensor ``host`` on ``device``, queued on its current stream
        (``host`` itself where ``device`` is the CPU)."""
        if device.type != "cuda":
            return host.to(device)
        return self.from_numpy(host.contiguous().numpy(), device)

    def from_numpy(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """A copy of ``arr`` on ``device`` (on CUDA queued on its current stream).

        The host side is numpy (into the pinned buffer's array view): six torch calls
        per table instead of thirteen. Each torch call gives up the GIL, and under a
        dense step's load taking it back cost the calling thread ~1-2 ms (py-spy on
        the H200, benchmarks/results/h200_2026-12-03c)."""
        if device.type != "cuda":
            return torch.from_numpy(np.array(arr))
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        n = int(raw.size)
        k = self._next
        self._next = (k + 1) % self.slots
        ev = self._events[k]
        if ev is not None and not ev.query():
            t0 = time.perf_counter()
            ev.synchronize()
            self.waited_s += time.perf_counter() - t0
        buf = self._arrays[k]
        if buf is None or buf.size < n:
            old = 0 if buf is None else int(buf.size)
            pinned = torch.empty(max(n, 2 * old, 4096), dtype=torch.uint8, pin_memory=True)
            self._bufs[k] = pinned
            buf = self._arrays[k] = pinned.numpy()
        buf[:n] = raw
        # A view of pinned memory: the copy below stays asynchronous.
        src = torch.from_numpy(buf[:n].view(arr.dtype).reshape(arr.shape))
        out = torch.empty(arr.shape, dtype=src.dtype, device=device)
        out.copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[k] = ev
        return out


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()
