"""apollo_cas.formats.flat: an index it writes reads back to the same entries
(in the tool's order, with its spellings), the meta file's timestamp comes back,
and a damaged index is refused with one error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas import dtypes
from apollo_cas.errors import InvalidName, SourceError, UnsupportedSource
from apollo_cas.formats import flat

from .specs import Spec, names, specs

INDEX = Path(flat.INDEX)
WEIGHTS = Path(flat.WEIGHTS)


def read_back(data: bytes, weights_size: int) -> list[flat.Entry]:
    return flat.parse_index(flat.loads_index(data, INDEX), INDEX, WEIGHTS, weights_size)


@settings(max_examples=80, deadline=None)
@given(specs, st.sampled_from([None, flat.TOOL_INDENT, flat.RESTORE_INDENT]))
def test_written_index_reads_back(tensors: list[Spec], indent: int | None):
    laid_out = flat.layout(tensors)
    entries = [e for _, e in laid_out]
    assert [t.name for t, _ in laid_out] == sorted(t.name for t in tensors)
    offset = 0
    for t, e in laid_out:  # back to back in sorted-name order
        assert (e.offset, e.size, e.shape) == (offset, t.nbytes, t.shape)
        offset += t.nbytes
    got = read_back(flat.dumps_index(entries, indent=indent), offset)
    assert got == entries
    for e, raw in zip(entries, json.loads(flat.dumps_index(entries)).values(), strict=True):
        assert list(raw) == ["offset", "size", "shape", "dtype"]
        assert raw["dtype"] == e.dtype.torch_str  # "torch.bfloat16", as the tool wrote it


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=64), max_size=8))
def test_written_weights_hold_each_tensor_at_its_entry(blobs: dict[str, bytes]):
    u8 = dtypes.BY_NAME["U8"]
    f = io.BytesIO()
    entries = flat.write_weights(f, blobs, lambda b: (u8, (len(b),), b))
    data = f.getvalue()
    assert [e.name for e in entries] == sorted(blobs)
    assert len(data) == sum(len(b) for b in blobs.values())
    for e in read_back(flat.dumps_index(entries, indent=flat.TOOL_INDENT), len(data)):
        assert data[e.offset : e.offset + e.size] == blobs[e.name]
    meta = json.loads(flat.dumps_meta("2025-03-01-1200", entries))
    assert meta == {
        "timestamp": "2025-03-01-1200",
        "n_params": len(blobs),
        "total_bytes": len(data),
    }
    assert flat.meta_timestamp(flat.dumps_meta("2025-03-01-1200", entries), "m") == (
        "2025-03-01-1200"
    )


def test_entries_come_back_in_the_index_order():
    f32 = dtypes.BY_NAME["F32"]
    entries = [flat.Entry("b", 0, 4, (1,), f32), flat.Entry("a", 4, 4, (1,), f32)]
    assert [e.name for e in read_back(flat.dumps_index(entries), 8)] == ["b", "a"]


def test_any_accepted_dtype_spelling_is_read():
    data = json.dumps({"w": {"offset": 0, "size": 2, "shape": [1], "dtype": "torch.half"}})
    (e,) = read_back(data.encode(), 2)
    assert e.dtype is dtypes.BY_NAME["F16"]


def one(entry: object) -> bytes:
    return json.dumps({"w": entry}).encode()


@pytest.mark.parametrize(
    ("data", "size", "error", "match"),
    [
        (b"[1]", 0, UnsupportedSource, "not a name -> entry map"),
        (b'{"w": {}, "w": {}}', 0, UnsupportedSource, "appears twice"),
        (b"{" * 3, 0, UnsupportedSource, "unreadable index"),
        (one([1]), 0, UnsupportedSource, "malformed entry for 'w'"),
        (one({"offset": 0, "size": 4, "shape": [1]}), 4, UnsupportedSource, "malformed"),
        (
            one({"offset": -1, "size": 4, "shape": [1], "dtype": "F32"}),
            4,
            UnsupportedSource,
            "integers >= 0",
        ),
        (
            one({"offset": 0, "size": 4, "shape": [1], "dtype": "torch.complex64"}),
            4,
            SourceError,
            "unsupported dtype",
        ),
        (
            one({"offset": 0, "size": 4, "shape": [2], "dtype": "F32"}),
            4,
            SourceError,
            "needs 8 bytes",
        ),
        (
            one({"offset": 4, "size": 4, "shape": [1], "dtype": "F32"}),
            4,
            SourceError,
            "half-written checkpoint",
        ),
        (
            json.dumps(
                {"__metadata__": {"offset": 0, "size": 0, "shape": [0], "dtype": "U8"}}
            ).encode(),
            0,
            InvalidName,
            "reserved",
        ),
    ],
)
def test_damaged_index_is_refused(data: bytes, size: int, error: type, match: str):
    with pytest.raises(error, match=match):
        read_back(data, size)


def test_meta_without_timestamp():
    assert flat.meta_timestamp(b'{"n_params": 1}', "m") is None
    assert flat.meta_timestamp(b"[]", "m") is None
    with pytest.raises(UnsupportedSource, match="meta file"):
        flat.meta_timestamp(b"{", "m")
