"""apollo_cas.formats.safetensors: a header it builds parses back to the same
tensors, 4 KiB aligned; the file names it gives match the patterns it gives;
the index round-trips; malformed files are refused with one error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas.errors import InvalidName, SourceError, UnsupportedSource
from apollo_cas.formats import safetensors as fmt

from .specs import Spec, names, specs

HERE = Path("m.safetensors")


metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


def parse(data: bytes, path: Path = HERE) -> tuple[list[fmt.HeaderEntry], int]:
    header, start = fmt.read_header(path, len(data), lambda o, n: data[o : o + n])
    return fmt.parse_entries(path, header, len(data) - start), start


@settings(max_examples=80, deadline=None)
@given(specs, metadata)
def test_built_header_parses_back_to_the_same_tensors(tensors: list[Spec], meta: dict[str, str]):
    head, offsets = fmt.header_bytes(tensors, meta)
    assert len(head) % fmt.ALIGN == 0  # the data starts on a 4 KiB boundary
    data = head + bytes(sum(t.nbytes for t in tensors))
    entries, start = parse(data)
    assert start == len(head)
    assert [(e.name, e.dtype.name, e.shape) for e in entries] == [
        (t.name, t.dtype, t.shape) for t in tensors
    ]
    assert [e.begin for e in entries] == offsets
    assert [e.end - e.begin for e in entries] == [t.nbytes for t in tensors]
    header, _ = fmt.read_header(HERE, len(data), lambda o, n: data[o : o + n])
    assert header[fmt.METADATA] == meta


def test_built_header_is_what_the_library_reads(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    np = pytest.importorskip("numpy")
    tensors = [Spec("a", "F32", (2, 3)), Spec("b", "I8", (5,))]
    head, _ = fmt.header_bytes(tensors, {"format": "pt"})
    values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(5, dtype=np.int8)}
    path = tmp_path / fmt.SINGLE
    path.write_bytes(head + values["a"].tobytes() + values["b"].tobytes())
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in values.items():
            assert (f.get_tensor(k) == v).all()


@given(st.integers(0, 998), st.integers(1, 999))
def test_shard_names_match_their_patterns(i: int, n: int):
    name = fmt.hf_shard_name(i, n)
    assert fmt.HF_SHARD.match(name) and fmt.HF_NAMES.match(name)
    assert fmt.HF_NAMES.match(fmt.SINGLE) and not fmt.HF_SHARD.match(fmt.SINGLE)
    part = fmt.vllm_shard_name(n, i)
    assert fmt.vllm_shard_pattern(n).match(part)
    assert not fmt.vllm_shard_pattern(n + 1).match(part)
    assert not fmt.HF_NAMES.match(part)


def test_shard_name_spelling():
    assert fmt.hf_shard_name(0, 2) == "model-00001-of-00002.safetensors"
    assert fmt.vllm_shard_name(1, 0) == "model-rank-1-part-0.safetensors"


@given(st.dictionaries(names, st.sampled_from(["a.safetensors", "b.safetensors"])), st.integers(0))
def test_index_round_trip(weight_map: dict[str, str], total: int):
    for indent in (None, 2):
        data = fmt.index_bytes(weight_map, total, indent=indent)
        assert fmt.parse_index(data, Path(fmt.INDEX)) == weight_map
        assert json.loads(data)["metadata"] == {"total_size": total}


@pytest.mark.parametrize("name", ["../x.safetensors", "a/b.safetensors", "a\\b", ".hidden"])
def test_shard_names_outside_the_directory_are_refused(name: str):
    with pytest.raises(UnsupportedSource, match="escapes the directory"):
        fmt.check_shard_name(Path(fmt.INDEX), name)
    assert fmt.check_shard_name(Path(fmt.INDEX), "model.safetensors") == "model.safetensors"


@pytest.mark.parametrize(
    "data", [b'{"metadata": {}}', b'{"weight_map": {"w": 1}}', b"[1]", b'{"weight_map": []}']
)
def test_index_without_weight_map_is_refused(data: bytes):
    with pytest.raises(UnsupportedSource, match="no weight_map"):
        fmt.parse_index(data, Path(fmt.INDEX))


def framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "bad header length"),
        (struct.pack("<Q", 10) + b"{}", "bad header length"),
        (framed(b"[1, 2]"), "not an object"),
        (framed(b'{"a": 1, "a": 2}'), "appears twice"),
        (framed(b"{" * 3), "unreadable safetensors header"),
        (framed(b"\xff\xfe"), "unreadable safetensors header"),
    ],
)
def test_malformed_files_are_refused(data: bytes, match: str):
    with pytest.raises(UnsupportedSource, match=match):
        parse(data)


def entry(dtype: str, shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("header", "size", "error", "match"),
    [
        ({"__metadata__": {"a": 1}}, 0, UnsupportedSource, "map of strings"),
        ({"w": {"dtype": "F32"}}, 4, UnsupportedSource, "malformed entry"),
        ({"w": entry("F32", [1], [0])}, 4, UnsupportedSource, "pair of integers"),
        ({"w": entry("float32", [1], [0, 4])}, 4, SourceError, "unsupported dtype"),
        ({"w": entry("F32", [2], [0, 4])}, 4, SourceError, "inconsistent offsets"),
        ({"w": entry("F32", [1], [4, 8])}, 8, SourceError, "leaves a gap at 0"),
        ({"w": entry("F32", [1], [0, 4])}, 8, SourceError, "trailing bytes"),
        (
            {"a": entry("F32", [2], [0, 8]), "b": entry("F32", [1], [4, 8])},
            8,
            SourceError,
            "overlaps",
        ),
        ({"a/b": entry("F32", [1], [0, 4])}, 4, InvalidName, "a/b"),
    ],
)
def test_entries_the_reference_parser_refuses(header, size, error, match):
    with pytest.raises(error, match=match):
        fmt.parse_entries(HERE, header, size)
