"""Codec 4 (sparse delta): round trips, when it is chosen, and damage."""

from __future__ import annotations

import numpy as np
import pytest
from codec_helpers import f32_to_bf16
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apollo_cas import codecs
from apollo_cas.codecs import envelope, sparse
from apollo_cas.errors import CorruptChunk
from apollo_cas.hashing import digest


def _changed(base: bytes, w: int, positions: list[int], values: list[int]) -> bytes:
    a = np.frombuffer(base, dtype=np.uint8).copy()
    v = a.view(f"<u{w}") if w > 1 else a
    for p, x in zip(positions, values, strict=False):
        v[p % len(v)] ^= np.array(x, dtype=np.uint64).astype(v.dtype)
    return a.tobytes()


@st.composite
def sparse_pairs(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    w = draw(st.sampled_from(sparse.WIDTHS))
    m = draw(st.integers(1, 3000))
    base = draw(st.binary(min_size=m * w, max_size=m * w))
    k = draw(st.integers(0, max(1, m // 8)))
    positions = draw(st.lists(st.integers(0, m - 1), min_size=k, max_size=k))
    values = draw(st.lists(st.integers(1, 2 ** (8 * w) - 1), min_size=k, max_size=k))
    return base, _changed(base, w, positions, values), w


@settings(max_examples=200, deadline=None)
@given(pair=sparse_pairs(), level=st.sampled_from([1, 3]))
def test_roundtrip_of_the_sparse_encoding(pair: tuple[bytes, bytes, int], level: int) -> None:
    base, raw, w = pair
    x = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(base, np.uint8))
    got = sparse.encode(x, w, level, digest(base), 1)
    if got is None:  # more than MAX_FRACTION changed: not tried
        assert np.count_nonzero(x.view(f"<u{w}") if w > 1 else x) > sparse.MAX_FRACTION * (
            len(raw) // w
        )
        return
    params, pieces, n = got
    assert n == np.count_nonzero(x.view(f"<u{w}") if w > 1 else x)
    assert sparse.decode(params, memoryview(b"".join(pieces)), memoryview(base)) == raw


@settings(max_examples=150, deadline=None)
@given(pair=sparse_pairs())
# A block that compresses to almost nothing on its own (one changed element of zeros):
# with the sparse codec its 70-byte sparse delta is accepted outright (within
# DELTA_ACCEPT_FRACTION of raw), without it the 68-byte full chunk beats the planes XOR.
@example(pair=(bytes(500), b"\x01" + bytes(499), 2))
def test_encode_keeps_the_smaller_delta_and_decodes(pair: tuple[bytes, bytes, int]) -> None:
    base, raw, w = pair
    b = codecs.Base(digest(base), base, depth=2)
    on = codecs.encode(raw, codecs.CodecPolicy(max_delta_depth=8), w, base=b)
    off = codecs.encode(raw, codecs.CodecPolicy(max_delta_depth=8, sparse=False), w, base=b)
    env = envelope.unpack(on)
    accepted = len(env.params) + len(env.payload) <= codecs.DELTA_ACCEPT_FRACTION * len(raw)
    # Never larger, except where encode() keeps a small delta by design without
    # computing the full encoding (DELTA_ACCEPT_FRACTION), and then only when the
    # sparse-off result is that full encoding, not a smaller delta.
    assert len(on) <= len(off) or (
        accepted and env.codec == codecs.SPARSE and codecs.info(off)[0] not in ("delta", "sparse")
    ), (codecs.info(on), codecs.info(off))
    for blob in (on, off):
        assert codecs.decode(blob, "t", load_base=lambda h: base) == raw
    if codecs.info(on)[0] == "sparse":
        assert codecs.base_of(on) == digest(base).hex() and codecs.delta_depth(on) == 3
    assert codecs.info(off)[0] != "sparse"


def _bf16_step(n: int, frac: float, seed: int = 0) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(n).astype(np.float32) * 0.02
    m2 = m.copy()
    i = rng.choice(n, int(frac * n), replace=False)
    m2[i] *= 1.01
    return f32_to_bf16(m).tobytes(), f32_to_bf16(m2).tobytes()


def test_chosen_for_a_one_percent_step_and_smaller() -> None:
    a, b = _bf16_step(1 << 18, 0.01)
    base = codecs.Base(digest(a), a)
    on = codecs.encode(b, codecs.CodecPolicy(), 2, base=base)
    off = codecs.encode(b, codecs.CodecPolicy(sparse=False), 2, base=base)
    assert codecs.info(on)[0] == "sparse" and codecs.info(off)[0] == "delta"
    assert len(on) < 0.8 * len(off)  # measured 0.80% vs 1.33% of raw
    assert codecs.decode(on, load_base=lambda h: a) == b


def test_not_chosen_when_most_elements_changed() -> None:
    a, b = _bf16_step(1 << 16, 0.6)
    blob = codecs.encode(b, codecs.CodecPolicy(), 2, base=codecs.Base(digest(a), a))
    assert codecs.info(blob)[0] != "sparse"


def _sparse_blob() -> tuple[bytes, bytes, bytes]:
    a, b = _bf16_step(1 << 14, 0.01, seed=3)
    blob = codecs.encode(b, codecs.CodecPolicy(), 2, base=codecs.Base(digest(a), a))
    assert codecs.info(blob)[0] == "sparse"
    return a, b, blob


def test_every_damage_is_caught_by_decode_and_hash() -> None:
    a, b, blob = _sparse_blob()
    rng = np.random.default_rng(1)
    structural = 0
    for pos in rng.choice(np.arange(envelope.HEADER_SIZE, len(blob)), 200, replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = codecs.decode(bytes(bad), "chunk X", load_base=lambda h: a)
        except CorruptChunk as exc:
            assert "chunk X" in str(exc)
            structural += 1
            continue
        assert digest(out) != digest(b) or out == b
    assert structural > 50  # many flips break a frame or a header (raw literals do not)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p[:17] + bytes([3]) + p[18:], "element width 3"),
        (lambda p: p[:18] + (0xFFFFFFF0).to_bytes(4, "little") + p[22:], "changed elements"),
        (lambda p: p[:22] + (1 << 30).to_bytes(4, "little"), "runs past"),
        (lambda p: p[:16] + b"\0" + p[17:], "depth 0"),
        (lambda p: p[:-1], "parameters are"),
    ],
)
def test_damaged_parameters_are_named(damage, match: str) -> None:  # type: ignore[no-untyped-def]
    a, _b, blob = _sparse_blob()
    env = envelope.unpack(blob)
    bad = envelope.pack(codecs.SPARSE, env.raw_size, damage(bytes(env.params)), env.payload)
    with pytest.raises(CorruptChunk, match=f"chunk X: .*{match}"):
        codecs.decode(bad, "chunk X", load_base=lambda h: a)


def test_an_index_past_the_block_is_refused() -> None:
    a = bytes(64)
    x = np.zeros(64, dtype=np.uint8)
    x[-2:] = 1
    params, pieces, _n = sparse.encode(x, 2, 1, digest(a), 1) or (b"", [], 0)
    with pytest.raises(ValueError, match="past the block"):
        sparse.decode(params, memoryview(b"".join(pieces)), memoryview(bytes(32)))
