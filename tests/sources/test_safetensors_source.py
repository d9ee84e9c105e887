"""safetensors sources: one file, shards with an index, a directory; bad files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from apollo_cas.errors import (
    InvalidName,
    SourceError,
    UnsupportedDtype,
    UnsupportedSource,
)
from apollo_cas.sources import open_path
from apollo_cas.store import Store


def read_all(path, kind=None) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with open_path(path, kind) as src:
        assert src.info.kind == "safetensors"
        return {t.name: (t.dtype.name, t.shape, bytes(t.read(0, t.nbytes))) for t in src.tensors()}


def expected(tensors, tensor_bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from apollo_cas import dtypes

    return {
        k: (dtypes.from_torch(v.dtype).name, tuple(v.shape), tensor_bytes(v))
        for k, v in tensors.items()
    }


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.fixture
def model(make_model):
    m = make_model(layers=2, hidden=32)
    m["extra.scalar"] = torch.tensor(2.5, dtype=torch.float64)
    m["extra.empty"] = torch.empty(0, 4, dtype=torch.float16)
    m["extra.fp8"] = torch.randn(33).to(torch.float8_e5m2)
    m["extra.mask"] = torch.tensor([True, False, True])
    return m


def test_single_file(tmp_path, model, write_safetensors, tensor_bytes):
    f = write_safetensors(model, tmp_path / "model.safetensors")
    got = read_all(f)
    assert got == expected(model, tensor_bytes)
    assert list(got) == sorted(model)  # tensors come sorted by name


def test_file_without_extension_is_detected(tmp_path, model, write_safetensors, tensor_bytes):
    f = write_safetensors(model, tmp_path / "weights")
    assert read_all(f) == expected(model, tensor_bytes)


@pytest.mark.parametrize("via", ["dir", "index"])
def test_sharded_with_index(tmp_path, model, write_safetensors, tensor_bytes, via):
    index = write_safetensors(model, tmp_path / "ckpt", shards=3)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == 3
    (tmp_path / "ckpt" / "stray.safetensors").write_bytes(b"not listed in the index")
    got = read_all(tmp_path / "ckpt" if via == "dir" else index)
    assert got == expected(model, tensor_bytes)


def test_directory_of_files_without_index(tmp_path, model, write_safetensors, tensor_bytes):
    names = sorted(model)
    write_safetensors({k: model[k] for k in names[:5]}, tmp_path / "d" / "a.safetensors")
    write_safetensors({k: model[k] for k in names[5:]}, tmp_path / "d" / "b.safetensors")
    assert read_all(tmp_path / "d") == expected(model, tensor_bytes)


def test_store_round_trip_from_shards(tmp_path, model, write_safetensors, assert_same_tensors):
    write_safetensors(model, tmp_path / "ckpt", shards=2)
    with Store.open(tmp_path / "store", create=True) as st, open_path(tmp_path / "ckpt") as src:
        r = st.save(src, block_size=4096)
        assert r.manifest.source.kind == "safetensors"
        assert r.manifest.source.location == str(tmp_path / "ckpt")
        assert_same_tensors(st.load(), model)


def test_index_naming_a_missing_shard(tmp_path, model, write_safetensors):
    write_safetensors(model, tmp_path / "ckpt", shards=2)
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match=r"model-00002-of-00002\.safetensors.*does not exist"):
        open_path(tmp_path / "ckpt")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/x.safetensors", ".hidden"])
def test_index_naming_a_shard_outside_the_directory(tmp_path, shard):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(UnsupportedSource, match="escapes"):
        open_path(d)


def test_index_without_weight_map(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UnsupportedSource, match="not a safetensors index"):
        open_path(d)


def test_tensor_in_two_shards(tmp_path, write_safetensors):
    d = tmp_path / "d"
    write_safetensors({"w": torch.zeros(2)}, d / "a.safetensors")
    write_safetensors({"w": torch.ones(2)}, d / "b.safetensors")
    with pytest.raises(SourceError, match="appears twice"):
        open_path(d)


def _one_line(exc: BaseException, path: Path) -> str:
    text = str(exc)
    assert "\n" not in text
    assert str(path) in text
    return text


def test_truncated_data(tmp_path, model, write_safetensors):
    f = write_safetensors(model, tmp_path / "m.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(SourceError, match="truncated") as e:
        open_path(f)
    _one_line(e.value, f)


def test_truncated_header(tmp_path, model, write_safetensors):
    f = write_safetensors(model, tmp_path / "m.safetensors")
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(UnsupportedSource, match="not a safetensors file") as e:
        open_path(f)
    _one_line(e.value, f)


@pytest.mark.parametrize(
    "content", [b"", b"abc", os.urandom(3000), b"\x10" + bytes(7) + b"[1,2,3]"]
)
def test_garbage_named_safetensors(tmp_path, content):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(content)
    with pytest.raises(UnsupportedSource) as e:
        open_path(f)
    assert "safetensors" in _one_line(e.value, f)


def test_header_not_an_object(tmp_path):
    f = raw_file(tmp_path / "x.safetensors", [1, 2])
    with pytest.raises(UnsupportedSource, match="not an object"):
        open_path(f)


def test_malformed_entry(tmp_path):
    f = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, bytes(4))
    with pytest.raises(UnsupportedSource, match="malformed entry for 'w'"):
        open_path(f)


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [([1], [8, 4]), ([1], [0, 8]), ([1], [-4, 0]), ([2], [4, 12])],
    ids=["reversed", "wrong-length", "negative", "past-end"],
)
def test_inconsistent_offsets(tmp_path, shape, offsets):
    f = raw_file(
        tmp_path / "x.safetensors",
        {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
        bytes(8),
    )
    with pytest.raises(SourceError, match="inconsistent offsets"):
        open_path(f)


def test_unknown_dtype(tmp_path):
    f = raw_file(
        tmp_path / "x.safetensors",
        {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
        bytes(8),
    )
    with pytest.raises(UnsupportedDtype, match="'C64'"):
        open_path(f)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x\x00y"])
def test_tensor_name_that_would_escape(tmp_path, name):
    f = raw_file(
        tmp_path / "x.safetensors",
        {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        bytes(4),
    )
    with pytest.raises(InvalidName):
        open_path(f)


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedSource, match="holds no safetensors files"):
        open_path(tmp_path / "empty")
