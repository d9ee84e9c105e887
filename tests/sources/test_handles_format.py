"""The handles file's format: arguments checked, foreign files refused, metadata
read (apollo_cas.sources.handles.format). Files are crafted on the CPU: ``torch.save``
pickles ``rebuild_cuda_tensor`` by reference, and the arguments are made up."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import rebuild_cuda_tensor  # noqa: E402

from apollo_cas.errors import SourceNotFound, UnsupportedDtype, UnsupportedSource  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.handles import format as handles_format  # noqa: E402
from apollo_cas.sources.handles import owner  # noqa: E402
from tests.sources.handle_files import PID, handle_args, handles_file, write  # noqa: E402

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
