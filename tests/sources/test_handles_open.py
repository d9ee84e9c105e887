"""Handles opened end to end (apollo_cas.sources.handles.ipc and .source).

CI has no GPU: the tests pass ``ipc=`` a :class:`~apollo_cas.sources.handles.CudaIpc`
whose ``rebuild`` returns CPU tensors (never in production, where the real one
opens CUDA IPC memory).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.errors import SourceError, StaleHandles, UsageError  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from tests.sources.handle_files import PID, CpuIpc, FailingIpc, dead_pid, handles_file  # noqa: E402

# ------------------------------------------------------------------- end to end (CPU)


@pytest.fixture
def cpu_ipc() -> CpuIpc:
    """Replace the CUDA rebuild with CPU tensors filled from the handle's shape."""
    return CpuIpc()


def test_open_handles_end_to_end(tmp_path: Path, cpu_ipc: CpuIpc) -> None:
    p = handles_file(tmp_path, meta={"rank": 1, "world_size": 4, "pid": PID})
    src = handles.open_handles(p, ipc=cpu_ipc)
    assert isinstance(src, DeviceSource)
    assert src.info.kind == "handles" and src.info.location == str(p)
    assert (src.info.rank, src.info.world_size) == (1, 4)
    assert src.info.metadata["device_map"] == "0:0"
    assert src.info.metadata["owner_pid"] == str(PID)
    names = [t.name for t in src.tensors()]
    assert names == sorted(cpu_ipc.made)
    for t in src.tensors():
        raw = cpu_ipc.made[t.name].reshape(-1).view(torch.uint8).numpy().tobytes()
        assert bytes(t.read(0, t.nbytes)) == raw
    assert src.block_digests(256) is None  # CPU tensors: the pipeline hashes
    from apollo_cas.sources.base import BlockRequest

    got = dict(src.fetch([BlockRequest(0, 0, 16), BlockRequest(1, 2, 4)]))
    t0 = src.tensors()[0]
    assert bytes(got[0]) == bytes(t0.read(0, 16))


def test_rank_options(tmp_path: Path, cpu_ipc: CpuIpc) -> None:
    p = handles_file(tmp_path)
    src = handles.open_handles(p, rank=2, world_size=8, ipc=cpu_ipc)
    assert (src.info.rank, src.info.world_size) == (2, 8)
    p2 = handles_file(tmp_path, meta={"rank": 1, "world_size": 2}, name="h2.pt")
    with pytest.raises(UsageError, match="rank 1"):
        handles.open_handles(p2, rank=0, ipc=cpu_ipc)
    with pytest.raises(UsageError, match="outside"):
        handles.open_handles(p, rank=3, world_size=2, ipc=cpu_ipc)


def test_open_through_source_detection(tmp_path: Path, cpu_ipc: CpuIpc) -> None:
    from apollo_cas.sources import detect_kind, open_path

    p = handles_file(tmp_path)
    assert detect_kind(p) == "handles"
    src = open_path(p, ipc=cpu_ipc)
    assert src.info.kind == "handles" and len(src.tensors()) == 2


def test_open_failure_is_stale_with_hints(tmp_path: Path) -> None:
    with pytest.raises(StaleHandles) as ei:
        handles.open_handles(handles_file(tmp_path), ipc=FailingIpc())
    msg = str(ei.value)
    assert "invalid resource handle" in msg and "exited" in msg and "\n" not in msg
    with pytest.raises(StaleHandles, match="expandable_segments"):
        handles.open_handles(handles_file(tmp_path, kind=b"e"), ipc=FailingIpc())


def test_dead_owner_refused_before_opening(tmp_path: Path, cpu_ipc: CpuIpc) -> None:
    with pytest.raises(StaleHandles):
        handles.open_handles(handles_file(tmp_path, pid=dead_pid()), ipc=cpu_ipc)
    assert cpu_ipc.made == {}


def test_write_handles_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a CUDA tensor"):
        handles.write_handles(tmp_path / "h.pt", {"w": torch.ones(2)})
    assert not (tmp_path / "h.pt").exists()


def test_callers_names_stay_importable_from_the_package() -> None:
    """The CLI, the vLLM extension and the benchmarks import these from
    ``apollo_cas.sources.handles``; the split into modules must keep them there."""
    wanted = {
        "CudaIpc",
        "HandleEntry",
        "HandlesFile",
        "HandlesSource",  # what open_handles returns; Store.save stale-checks it
        "META_KEY",
        "MAX_FILE_BYTES",
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
    }
    assert set(handles.__all__) == wanted
    for name in wanted:
        assert hasattr(handles, name), name
