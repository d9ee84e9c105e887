"""Stale handles: the exporting process gone or restarted, the file too old
(apollo_cas.sources.handles.owner)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.errors import StaleHandles  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.handles import owner  # noqa: E402
from tests.sources.handle_files import PID, dead_pid, handles_file  # noqa: E402

# ---------------------------------------------------------------------- stale handles


def test_dead_owner_is_stale(tmp_path: Path) -> None:
    hf = handles.read_handles(handles_file(tmp_path, pid=dead_pid()))
    with pytest.raises(StaleHandles, match="is gone"):
        handles.check_owner(hf)
    handles.check_owner(hf, check_pid=False)  # another pid namespace: age checks only


def test_live_owner_passes(tmp_path: Path) -> None:
    notes = handles.check_owner(handles.read_handles(handles_file(tmp_path)))
    assert notes["owner_pid"] == str(PID)


def test_file_older_than_owner_is_stale(tmp_path: Path) -> None:
    p = handles_file(tmp_path)
    start = owner.proc_start_epoch(PID)
    assert start is not None
    os.utime(p, (start - 3600, start - 3600))
    with pytest.raises(StaleHandles, match="pid was reused"):
        handles.check_owner(handles.read_handles(p))


def test_recorded_start_time_mismatch_is_stale(tmp_path: Path) -> None:
    p = handles_file(tmp_path, meta={"pid": PID, "pid_start": 1})
    with pytest.raises(StaleHandles, match="another process"):
        handles.check_owner(handles.read_handles(p))


def test_max_age(tmp_path: Path) -> None:
    p = handles_file(tmp_path)
    hf = handles.read_handles(p)
    handles.check_owner(hf, max_age=60)
    with pytest.raises(StaleHandles, match="allowed"):
        handles.check_owner(hf, max_age=60, now=time.time() + 3600)


def test_owner_alloc_conf_detection() -> None:
    assert owner.expandable("expandable_segments:True")
    assert owner.expandable("max_split_size_mb:128, expandable_segments : true")
    assert not owner.expandable("expandable_segments:False")
    assert not owner.expandable(None)
