"""Stale handles: is the process that exported a handles file still the one serving?

Handles go stale when the server exits, restarts or reallocates its weights.
:func:`check_owner` refuses, before anything is opened, what can be seen from
here: the owner process gone, its pid reused by a younger process (its start
time recorded in ``__meta__``, or later than the file), the file older than
``--max-handles-age``. An exporter that recorded another host, boot or pid
namespace is not judged by its pid (:mod:`apollo_cas.procinfo`). It also notes
whether the owner allocates with ``expandable_segments``, whose memory CUDA IPC
opens only with extra rights (the opening errors name it). docs/HANDLES.md lists
what cannot be detected.
"""

from __future__ import annotations

import os
import re
import time

from ... import frontend, procinfo
from ...errors import StaleHandles
from .format import HandlesFile

__all__ = ["check_owner", "expandable", "proc_start_epoch", "proc_start_ticks"]


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (/proc/<pid>/stat field 22)."""
    ticks = procinfo.proc_start(pid)
    return int(ticks) if ticks.isdigit() else None


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def proc_start_epoch(pid: int) -> float | None:
    """Start time of ``pid`` as a Unix time (to compare with the file's mtime)."""
    ticks, boot = proc_start_ticks(pid), _boot_time()
    if ticks is None or boot is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _owner_alloc_conf(pid: int) -> str | None:
    """The owner's PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF, when readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        for key in (b"PYTORCH_CUDA_ALLOC_CONF=", b"PYTORCH_ALLOC_CONF="):
            if item.startswith(key):
                return item[len(key) :].decode(errors="replace")
    return None


def expandable(conf: str | None) -> bool:
    """Whether an allocator config turns ``expandable_segments`` on."""
    return bool(conf) and re.search(r"expandable_segments\s*:\s*true", conf or "", re.I) is not None


def _foreign_owner(hf: HandlesFile) -> bool:
    """Whether the exporter recorded a host, boot or pid namespace other than ours:
    its pid means nothing here (files without these fields are judged by pid)."""
    m = hf.meta
    boot, ns, pid = m.get("boot_id"), m.get("pid_ns"), m.get("pid")
    if not (isinstance(boot, str) and isinstance(ns, str) and isinstance(pid, int)):
        return False
    start = m.get("pid_start")
    holder = procinfo.Holder(str(m.get("hostname", "")), boot, ns, pid, str(start or ""))
    return procinfo.judge(holder) == procinfo.FOREIGN


_CLOCK_SLACK = 2.0  # seconds: mtime and /proc start times have different resolutions


def check_owner(
    hf: HandlesFile,
    *,
    max_age: float | None = None,
    check_pid: bool = True,
    now: float | None = None,
) -> dict[str, str]:
    """Refuse a handles file whose owner is gone, whose pid was reused, or that is too old.

    Returns notes for the source's metadata. With ``check_pid=False`` (the server
    runs in another pid namespace, e.g. another container) only the age is checked.
    """
    now = time.time() if now is None else now
    notes: dict[str, str] = {
        "handles_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hf.mtime))
    }
    if max_age is not None and now - hf.mtime > max_age:
        raise StaleHandles(
            f"{hf.path} was written {now - hf.mtime:.0f} s ago, more than the allowed {max_age:.0f} s",
            frontend.offer(
                "--max-handles-age",
                "the server may have reloaded its weights since; re-export the handles, "
                "or raise --max-handles-age",
            ),
        )
    pids = hf.owner_pids
    if pids:
        notes["owner_pid"] = ",".join(str(p) for p in pids)
    if not check_pid or not os.path.isdir("/proc/self") or _foreign_owner(hf):
        return notes
    for pid in pids:
        if not procinfo.pid_alive(pid):
            raise StaleHandles(
                f"{hf.path}: the process that exported these handles (pid {pid}) is gone, "
                "and its GPU memory with it",
                frontend.offer(
                    "--no-owner-check",
                    "restart the export from the running server; if the server runs in another "
                    "container (pid namespace), pass --no-owner-check",
                ),
            )
        start = proc_start_epoch(pid)
        recorded = hf.meta.get("pid_start")
        ticks = proc_start_ticks(pid)
        if isinstance(recorded, int) and ticks is not None and recorded != ticks:
            raise StaleHandles(
                f"{hf.path}: pid {pid} now belongs to another process than the one that "
                "exported the handles",
                "the server restarted: re-export the handles from the running server",
            )
        if start is not None and start > hf.mtime + _CLOCK_SLACK:
            raise StaleHandles(
                f"{hf.path} is older than its owner process (pid {pid} started "
                f"{start - hf.mtime:.0f} s after the file was written): the pid was reused",
                "the server restarted: re-export the handles from the running server",
            )
        conf = _owner_alloc_conf(pid)
        if expandable(conf):
            notes["owner_alloc_conf"] = conf or ""
    return notes
