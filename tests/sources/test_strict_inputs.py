"""Every source is as strict as its format: hostile headers, indexes and
state_dicts are refused with one clear error, never saved half-right and never
an internal error (issue 11, items 3, 6, 8 and 12)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from apollo_cas import dtypes
from apollo_cas.errors import ApolloError, InvalidName, SourceError, UnsupportedSource
from apollo_cas.sources import open_mapping, open_path
from apollo_cas.sources.seed import SeedSource


def raw_safetensors(path: Path, header: bytes | object, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def f32(shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


# -- the shared shape rule -----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([-2, -2], 16),  # negative dims whose product matches
        ([-1], -4),
        ([2**64, 0], 0),  # a dimension no manifest can hold
        ([2**62, 4], 2**66),  # too many bytes
        ("12", 8),  # a string is not a shape
        ([True, 2], 8),  # nor are booleans
        ([2.0], 8),  # nor floats
        ([2], 12),  # product mismatch
    ],
)
def test_check_shape_refuses(shape, nbytes):
    with pytest.raises(SourceError):
        dtypes.check_shape(shape, dtypes.BY_NAME["F32"], nbytes, "here")


def test_check_shape_accepts_scalars_and_empty_tensors():
    f32t = dtypes.BY_NAME["F32"]
    assert dtypes.check_shape([], f32t, 4, "here") == ()
    assert dtypes.check_shape([0, 5], f32t, 0, "here") == (0, 5)
    assert dtypes.check_shape((3, 2), f32t, 24, "here") == (3, 2)


# -- safetensors: the reference parser's rules ------------------------------------

BAD_HEADERS = {
    "string-shape": ({"w": f32("12", [0, 8])}, 8),
    "bool-shape": ({"w": f32([True, True], [0, 4])}, 4),
    "float-offsets": ({"w": f32([1], [0.0, 4.0])}, 4),
    "negative-dims": ({"w": f32([-1, -2], [0, 8])}, 8),
    "huge-dim": ({"w": f32([2**64, 0], [0, 0])}, 0),
    "overlap": ({"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, 12),
    "same-range": ({"a": f32([2], [0, 8]), "b": f32([2], [0, 8])}, 8),
    "gap-at-start": ({"w": f32([1], [4, 8])}, 8),
    "trailing-bytes": ({"w": f32([1], [0, 4])}, 8),
    "metadata-not-strings": ({"__metadata__": {"a": 1}, "w": f32([1], [0, 4])}, 4),
    "offsets-not-a-pair": ({"w": f32([1], [0, 4, 8])}, 4),
    "lowercase-dtype": ({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, 4),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_safetensors_header_is_as_strict_as_the_format(tmp_path, case):
    header, size = BAD_HEADERS[case]
    f = raw_safetensors(tmp_path / "x.safetensors", header, bytes(size))
    with pytest.raises(SourceError):
        open_path(f).close()


def test_safetensors_duplicate_keys_are_refused(tmp_path):
    h = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
    h += b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    f = raw_safetensors(tmp_path / "x.safetensors", h, bytes(8))
    with pytest.raises(UnsupportedSource, match="twice"):
        open_path(f).close()


def test_safetensors_deeply_nested_header(tmp_path):
    h = b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    f = raw_safetensors(tmp_path / "x.safetensors", h)
    with pytest.raises(UnsupportedSource, match="nested"):
        open_path(f).close()


def test_safetensors_real_files_still_load(tmp_path, write_safetensors, tensor_bytes):
    t = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.empty(0, 3, dtype=torch.bfloat16),
        "c": torch.tensor(1.5, dtype=torch.float64),
    }
    f = write_safetensors(t, tmp_path / "m.safetensors")
    with open_path(f) as src:
        got = {x.name: (x.shape, bytes(x.read(0, x.nbytes))) for x in src.tensors()}
    assert got == {k: (tuple(v.shape), tensor_bytes(v)) for k, v in t.items()}


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, write_safetensors):
    """The index is the contract of a sharded checkpoint: a tensor it lists that
    no shard holds must not disappear without a word."""
    index = write_safetensors({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "m", shards=2)
    d = json.loads(index.read_text())
    d["weight_map"]["c"] = d["weight_map"]["a"]
    index.write_text(json.dumps(d))
    with pytest.raises(SourceError, match="'c'"):
        open_path(index).close()


# -- the reserved name ------------------------------------------------------------


def test_metadata_is_not_a_tensor_name(tmp_path, write_pt):
    t = torch.ones(2)
    with pytest.raises(InvalidName, match="__metadata__"):
        open_mapping({"__metadata__": t})
    with pytest.raises(InvalidName, match="__metadata__"):
        open_path(write_pt({"__metadata__": t, "b": t}, tmp_path / "m.pt")).close()
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(8))
    entry = {"offset": 0, "size": 8, "shape": [2], "dtype": "torch.float32"}
    (d / "weights.json").write_text(json.dumps({"__metadata__": entry}))
    with pytest.raises(InvalidName, match="__metadata__"):
        SeedSource(d).close()


# -- seed weights.json ------------------------------------------------------------

BAD_SEED = {
    "negative-size-and-shape": {"offset": 0, "size": -8, "shape": [-2], "dtype": "torch.float32"},
    "negative-dims": {"offset": 0, "size": 8, "shape": [-1, -2], "dtype": "torch.float32"},
    "huge-dim": {"offset": 0, "size": 0, "shape": [2**64, 0], "dtype": "torch.float32"},
    "string-shape": {"offset": 0, "size": 8, "shape": "2", "dtype": "torch.float32"},
    "float-size": {"offset": 0, "size": 8.0, "shape": [2], "dtype": "torch.float32"},
    "bool-offset": {"offset": False, "size": 8, "shape": [2], "dtype": "torch.float32"},
}


@pytest.mark.parametrize("case", sorted(BAD_SEED))
def test_seed_index_entries_are_checked(tmp_path, case):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(16))
    (d / "weights.json").write_text(json.dumps({"w": BAD_SEED[case]}))
    with pytest.raises(SourceError):
        SeedSource(d).close()


def test_seed_index_with_a_duplicate_name(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(16))
    e = '{"offset": 0, "size": 8, "shape": [2], "dtype": "torch.float32"}'
    (d / "weights.json").write_text(f'{{"w": {e}, "w": {e}}}')
    with pytest.raises(SourceError, match="twice"):
        SeedSource(d).close()


# -- names that collide -------------------------------------------------------------


def test_mapping_keys_that_collide_as_strings():
    with pytest.raises(SourceError, match="'1'"):
        open_mapping({1: torch.ones(1), "1": torch.zeros(1)})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "obj",
    [
        {"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)},
        {1: torch.ones(1), "1": torch.zeros(1)},
        {"model": {"x": torch.ones(1)}, "model.x": torch.zeros(1)},
    ],
    ids=["nested-vs-dotted", "int-vs-str", "wrapper-vs-dotted"],
)
def test_pt_names_that_collide_are_an_error(tmp_path, obj):
    f = tmp_path / "m.pt"
    torch.save(obj, f)
    with pytest.raises(SourceError, match="twice"):
        open_path(f).close()


def test_pt_wrapper_with_siblings_keeps_every_tensor(tmp_path):
    """A wrapper key is unwrapped only when it is the whole content: its siblings
    must not vanish."""
    f = tmp_path / "m.pt"
    torch.save({"model": {"x": torch.ones(1)}, "lm_head.weight": torch.zeros(2)}, f)
    with open_path(f) as src:
        assert sorted(t.name for t in src.tensors()) == ["lm_head.weight", "model.x"]


def test_pt_wrapper_alone_is_unwrapped(tmp_path):
    f = tmp_path / "m.pt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "epoch": 3}, f)
    with open_path(f) as src:
        # Non-tensor siblings (an epoch counter) are bookkeeping, not weights.
        assert [t.name for t in src.tensors()] == ["x"]


# -- .pt content that is not plain tensors ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        torch.eye(3).to_sparse(),
        torch.eye(3).to_sparse_csr(),
        torch.empty(3, device="meta"),
    ],
    ids=["sparse-coo", "sparse-csr", "meta"],
)
def test_pt_with_tensors_that_have_no_plain_bytes(tmp_path, value):
    f = tmp_path / "m.pt"
    torch.save({"w": value, "b": torch.ones(1)}, f)
    with pytest.raises(UnsupportedSource, match="'w'"):
        open_path(f).close()


def test_mapping_with_tensors_that_have_no_plain_bytes():
    with pytest.raises(UnsupportedSource, match="'w'"):
        open_mapping({"w": torch.empty(2, device="meta")})
    with pytest.raises(SourceError, match="tensor w"):
        open_mapping({"w": np.array(["a", "b"])})


def test_text_file_given_as_pt(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("just some text\n" * 10)
    with pytest.raises(UnsupportedSource):
        open_path(f, "pt").close()


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04garbage", b"\x80\x02junk"])
def test_garbage_given_as_pt_is_one_clear_error(tmp_path, content):
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(ApolloError):
        open_path(f, "pt").close()


def test_deeply_nested_seed_meta_file_is_ignored(tmp_path, write_seed_checkpoint):
    d = write_seed_checkpoint(tmp_path / "2025-03-01-1200", {"w": torch.ones(2)})
    (d / "checkpoint-meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with SeedSource(d) as src:  # the time comes from the directory name instead
        assert src.created == 1740830400.0


def test_deeply_nested_seed_index(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(4))
    (d / "weights.json").write_text('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UnsupportedSource, match="nested"):
        SeedSource(d).close()
