"""apollo_cas.formats.strict_json: what Python's json would let through and the
formats do not (a key twice, nesting no real file has, bytes that are not UTF-8
JSON) is one UnsupportedSource naming the file and what was read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apollo_cas.errors import UnsupportedSource
from apollo_cas.formats import strict_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_ordinary_json_reads_as_json_does(value: object):
    assert strict_json.loads(json.dumps(value), "f", "header") == value
    assert strict_json.loads(json.dumps(value).encode(), "f", "header") == value


def test_duplicate_key_is_refused_at_any_depth():
    with pytest.raises(UnsupportedSource, match=r"f: key 'w' appears twice in its header"):
        strict_json.loads(b'{"w": 1, "w": 2}', "f", "header")
    with pytest.raises(UnsupportedSource, match="key 'x' appears twice"):
        strict_json.loads(b'{"a": [{"x": 1, "x": 1}]}', "f", "header")


def test_duplicate_key_hint():
    with pytest.raises(UnsupportedSource) as exc:
        strict_json.loads(b'{"w": 1, "w": 2}', "f", "index")
    assert exc.value.hint == "re-export the file; one of the two entries would be lost"
    with pytest.raises(UnsupportedSource) as exc:
        strict_json.loads(b'{"w": 1, "w": 2}', "f", "index", "skip it")
    assert exc.value.hint == "skip it"


def test_deep_nesting_is_refused():
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(UnsupportedSource, match="f: header is nested too deeply to be real"):
        strict_json.loads(deep, "f", "header")


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b"{", b"", b"{'a': 1}", b"[1,]"])
def test_not_json_is_refused(data: bytes):
    with pytest.raises(UnsupportedSource, match=r"f: unreadable header \(not JSON: "):
        strict_json.loads(data, "f", "header")
