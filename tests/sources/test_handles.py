"""The handles file reader: allowlisted unpickling, validation, stale-handle checks.

CI has no GPU, so handle files are crafted on the CPU: ``torch.save`` pickles
``rebuild_cuda_tensor`` by reference, and the arguments are made up. Opening
them end to end passes ``ipc=`` a :class:`~apollo_cas.sources.handles.CudaIpc`
whose ``rebuild`` returns CPU tensors (never in production, where the real one
opens CUDA IPC memory).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import rebuild_cuda_tensor  # noqa: E402

from apollo_cas.errors import (  # noqa: E402
    ApolloError,
    SourceError,
    SourceNotFound,
    StaleHandles,
    UnsafePickle,
    UnsupportedDtype,
    UnsupportedSource,
    UsageError,
)
from apollo_cas.manifest import Manifest, SourceInfo, TensorEntry  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from apollo_cas.sources.handles import format as handles_format  # noqa: E402
from apollo_cas.sources.handles import owner  # noqa: E402
from apollo_cas.sources.mapping import MappingSource  # noqa: E402

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


# --------------------------------------------------------------------------- parsing


def test_reads_reduce_tensor_layout(tmp_path: Path) -> None:
    hf = handles.read_handles(handles_file(tmp_path))
    assert [e.name for e in hf.entries] == ["model.layers.0.qkv_proj.weight", "model.norm.weight"]
    e = hf.entries[0]
    assert e.size == (6, 8) and e.stride == (8, 1) and e.dtype == torch.bfloat16
    assert e.nbytes == 96 and e.device == 0 and e.owner_pid == PID
    assert e.handle_kind == "cudaMalloc"
    assert hf.owner_pids == [PID]


def test_load_never_calls_the_real_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing.reductions as red

    def boom(*a: object) -> None:
        raise AssertionError("rebuild_cuda_tensor ran during load")

    p = handles_file(tmp_path)
    monkeypatch.setattr(red, "rebuild_cuda_tensor", boom)
    hf = handles.read_handles(p)
    assert len(hf.entries) == 2


def test_allowlist_is_two_names() -> None:
    names = sorted(name for _, name in handles.allowlist())  # type: ignore[misc]
    assert names == ["builtins.bytes", "torch.multiprocessing.reductions.rebuild_cuda_tensor"]


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.cmd,))


def test_pickle_that_runs_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = write(tmp_path / "evil.pt", {"w": {"handle": _Evil(f"touch {marker}")}})
    with pytest.raises(UnsafePickle) as ei:
        handles.read_handles(p)
    assert not marker.exists()
    msg = str(ei.value)
    assert str(p) in msg and "system" in msg and "\n" not in msg


class _CallsRebuild:
    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_cuda_tensor, handle_args())


def test_pickle_that_calls_the_rebuild_function_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path / "call.pt", {"w": _CallsRebuild()})
    with pytest.raises(UnsafePickle, match="called while unpickling"):
        handles.read_handles(p)


class _Eval:
    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, ("__import__('os').getpid()",))


class _BigBytes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (bytes, (10**12,))


class _Dunder:
    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, ("abc", "upper"))


@pytest.mark.parametrize("payload", [_Eval(), _BigBytes(), _Dunder()])
def test_other_code_paths_are_refused(tmp_path: Path, payload: object) -> None:
    p = write(tmp_path / "x.pt", {"w": {"handle": payload}})
    with pytest.raises(UnsafePickle):
        handles.read_handles(p)


def test_plain_pickle_with_global_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps({"w": {"handle": _Evil("true")}}, protocol=2))
    with pytest.raises(ApolloError) as ei:
        handles.read_handles(p)
    assert isinstance(ei.value, (UnsafePickle, UnsupportedSource))


def test_cpu_tensor_handles_are_refused(tmp_path: Path) -> None:
    from torch.multiprocessing.reductions import reduce_tensor

    p = write(tmp_path / "cpu.pt", {"w": {"handle": reduce_tensor(torch.ones(3))}})
    with pytest.raises(UnsafePickle, match="rebuild_tensor"):
        handles.read_handles(p)


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1, 2, 3], "not a dict"),
        ({"w": {"nothandle": 1}}, "not a CUDA tensor handle"),
        ({"w": torch.ones(2)}, "not a CUDA tensor handle"),
        ({"w": {"handle": torch.ones(2)}}, "not a .rebuild_func, args. pair"),
        ({}, "no tensor handles"),
        ({"__meta__": {"pid": 1}}, "no tensor handles"),
        ({"__meta__": [1]}, "not a dict"),
        ({"a/b": {"handle": (rebuild_cuda_tensor, handle_args())}}, "not a CUDA tensor handle"),
        ({"w": {"handle": (rebuild_cuda_tensor, handle_args()[:-1])}}, "expected 15"),
        ({"w": {"handle": (rebuild_cuda_tensor, handle_args(storage_bytes=10))}}, "overruns"),
        (
            {"w": {"handle": (rebuild_cuda_tensor, handle_args(offset=2, storage_bytes=64))}},
            "overruns",
        ),
        ({"w": {"handle": (rebuild_cuda_tensor, handle_args(device=-1))}}, "device index"),
        ({"w": {"handle": (rebuild_cuda_tensor, handle_args(cls=torch.Size))}}, "tensor class"),
    ],
)
def test_foreign_content_is_unsupported(tmp_path: Path, obj: object, match: str) -> None:
    p = write(tmp_path / "f.pt", obj)
    with pytest.raises(UnsupportedSource, match=match):
        handles.read_handles(p)


def test_unsupported_dtype(tmp_path: Path) -> None:
    p = write(
        tmp_path / "c.pt",
        {"w": {"handle": (rebuild_cuda_tensor, handle_args(dtype=torch.complex64))}},
    )
    with pytest.raises(UnsupportedDtype):
        handles.read_handles(p)


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"PK\x03\x04garbage", b"\x80\x02}q"])
def test_foreign_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "foreign.pt"
    p.write_bytes(content)
    with pytest.raises(UnsupportedSource) as ei:
        handles.read_handles(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound):
        handles.read_handles(tmp_path / "nope.pt")
    with pytest.raises(UnsupportedSource, match="regular file"):
        handles.read_handles(tmp_path)


def test_huge_file_is_not_a_handles_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handles_format, "MAX_FILE_BYTES", 100)
    with pytest.raises(UnsupportedSource, match="state_dict"):
        handles.read_handles(handles_file(tmp_path))


def test_reserved_keys_are_ignored_and_meta_read(tmp_path: Path) -> None:
    obj = {
        "w": {"handle": (rebuild_cuda_tensor, handle_args()), "extra": 1},
        "__future__": {"x": 1},
        "__meta__": {"rank": 1, "world_size": 2},
    }
    hf = handles.read_handles(write(tmp_path / "m.pt", obj))
    assert [e.name for e in hf.entries] == ["w"]
    assert hf.meta == {"rank": 1, "world_size": 2}


def test_exported_meta_loads_with_the_allowlist(tmp_path: Path) -> None:
    meta = handles.export_meta([0], rank=1, world_size=2)
    hf = handles.read_handles(handles_file(tmp_path, meta=meta))
    assert (
        hf.meta["pid"] == PID
        and hf.meta["rank"] == 1
        and hf.meta["torch"] == str(torch.__version__)
    )
    assert hf.meta["pid_start"] == owner.proc_start_ticks(PID)
    handles.check_owner(hf)


def test_expandable_segment_handle_is_recognised(tmp_path: Path) -> None:
    hf = handles.read_handles(handles_file(tmp_path, kind=b"e"))
    assert {e.handle_kind for e in hf.entries} == {"expandable_segment"}


# ---------------------------------------------------------------------- stale handles


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_owner_is_stale(tmp_path: Path) -> None:
    hf = handles.read_handles(handles_file(tmp_path, pid=_dead_pid()))
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


# ---------------------------------------------------------------------- device mapping

UUIDS = ["aaaa", "bbbb", "cccc", "dddd"]


def test_map_devices_rules() -> None:
    md = handles.map_devices
    assert md([0, 1], {}, None, UUIDS, None) == ({0: 0, 1: 1}, "same index (no metadata)")
    assert md([0], {}, {0: 3}, UUIDS, None)[0] == {0: 3}
    by_uuid = {"device_uuids": {"0": "GPU-cccc", "1": "GPU-AAAA"}}
    assert md([0, 1], by_uuid, None, UUIDS, "2,0") == ({0: 2, 1: 0}, "GPU UUID")
    # The server saw GPUs 2,3 as 0,1; we see them all.
    assert md([1], {"cuda_visible_devices": "2,3"}, None, UUIDS, None)[0] == {1: 3}
    # ... or we see 3,2.
    assert md([0], {"cuda_visible_devices": "2,3"}, None, UUIDS, "3,2")[0] == {0: 1}
    assert md([0], {"cuda_visible_devices": "1"}, None, UUIDS, "1")[0] == {0: 0}
    assert md([0], {"cuda_visible_devices": "GPU-dddd"}, None, UUIDS, None)[0] == {0: 3}


def test_map_devices_refusals() -> None:
    md = handles.map_devices
    with pytest.raises(StaleHandles, match="sees 1 GPU"):
        md([2], {}, None, UUIDS[:1], None)
    with pytest.raises(StaleHandles, match="not visible"):
        md([0], {"device_uuids": {"0": "GPU-eeee"}}, None, UUIDS, None)
    with pytest.raises(StaleHandles, match="not visible"):
        md([0], {"cuda_visible_devices": "3"}, None, UUIDS, "0,1")
    with pytest.raises(UsageError, match="no entry"):
        md([0, 1], {}, {0: 0}, UUIDS, None)
    with pytest.raises(StaleHandles):
        md([0], {}, {0: 9}, UUIDS, None)


def test_parse_device_map() -> None:
    assert handles.parse_device_map("0:2, 1:3") == {0: 2, 1: 3}
    with pytest.raises(UsageError):
        handles.parse_device_map("0=2")


# ------------------------------------------------------------------- end to end (CPU)


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
    def rebuild(self, e: handles.HandleEntry, device: int) -> torch.Tensor:
        raise RuntimeError("CUDA error: invalid resource handle\nmore lines")


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
        handles.open_handles(handles_file(tmp_path, pid=_dead_pid()), ipc=cpu_ipc)
    assert cpu_ipc.made == {}


def test_write_handles_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a CUDA tensor"):
        handles.write_handles(tmp_path / "h.pt", {"w": torch.ones(2)})
    assert not (tmp_path / "h.pt").exists()


# ------------------------------------------------------------------- check_against


def _manifest(tensors: dict[str, torch.Tensor], rank: int | None = None) -> Manifest:
    entries = tuple(
        TensorEntry(
            n,
            "BF16" if t.dtype == torch.bfloat16 else "F32",
            tuple(t.shape),
            t.numel() * t.element_size(),
            (b"\0" * 16,) * max(1, -(-t.numel() // 512)),
        )
        for n, t in sorted(tensors.items())
    )
    return Manifest(
        series="default",
        created=0.0,
        block_size=1024,
        tensors=entries,
        source=SourceInfo(kind="handles", rank=rank, world_size=2 if rank is not None else None),
    )


def test_check_against() -> None:
    a = {"w": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(4)}
    m = _manifest(a)
    handles.check_against(None, MappingSource(a))
    handles.check_against(m, MappingSource(a))
    b = {"w": torch.zeros(8, 4, dtype=torch.bfloat16), "c": torch.zeros(4)}
    src = DeviceSource(b, SourceInfo(kind="handles", location="/tmp/h.pt"))
    with pytest.raises(StaleHandles) as ei:
        handles.check_against(m, src)
    msg = str(ei.value)
    assert "'b' is gone" in msg and "'c' is new" in msg and "(4, 4) -> (8, 4)" in msg
    with pytest.raises(SourceError) as ei2:
        handles.check_against(m, MappingSource(b))
    assert not isinstance(ei2.value, StaleHandles)
    handles.check_against(m, src, force=True)
    dt = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    assert handles.differences(m, MappingSource(dt)) == ["'w' dtype BF16 -> F32"]


def test_check_against_rank() -> None:
    a = {"w": torch.zeros(4)}
    m = _manifest(a, rank=0)
    src = DeviceSource(a, SourceInfo(kind="handles", rank=1, world_size=2))
    assert handles.differences(m, src) == ["rank 0 -> 1"]
