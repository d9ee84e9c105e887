"""codecs.batch.encode_many: the same chunks as codecs.encode, block for block."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas import codecs
from apollo_cas.codecs import batch, zstd_frames


def block(kind: str, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytes(n)
    if kind == "random":
        return rng.integers(0, 256, n, np.uint8).tobytes()
    # weights: bf16 / fp32 of small normals, cut to n bytes (tails included)
    w = (rng.normal(size=n // 4 + 1) * 0.02).astype(np.float32)
    return w.tobytes()[:n]


blocks = st.lists(
    st.tuples(
        st.sampled_from(["zeros", "random", "weights"]),
        st.integers(0, 6000),
        st.sampled_from([1, 2, 4, 8]),
        st.integers(0, 1000),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    items=blocks,
    codec=st.sampled_from(codecs.POLICY_CODECS),
    level=st.sampled_from([1, 3, -1, 12]),
)
def test_encode_many_makes_exactly_the_chunks_encode_makes(
    items: list[tuple[str, int, int, int]], codec: str, level: int
) -> None:
    policy = codecs.CodecPolicy(codec=codec, level=level)
    data = [(block(kind, n, seed), w) for kind, n, w, seed in items]
    got = batch.encode_many(data, policy)
    want = [codecs.encode(raw, policy, w) for raw, w in data]
    assert [bytes(g) for g in got] == [bytes(x) for x in want]
    for g, (raw, _) in zip(got, data, strict=True):
        assert bytes(codecs.decode(g)) == raw


def test_one_call_compresses_every_plane_like_compress_plane() -> None:
    rng = np.random.default_rng(1)
    planes = [rng.integers(0, k + 1, 70_000, np.uint8) for k in range(5)]
    frames = zstd_frames.compress_planes(planes, 1)
    assert [bytes(f) for f in frames] == [zstd_frames.compress_plane(p, 1) for p in planes]
    assert zstd_frames.compress_planes([], 1) == []


@pytest.mark.parametrize("itemsize", [2, 4])
def test_a_batch_of_model_blocks_is_plane_coded(itemsize: int) -> None:
    """The batch really takes the planes path (not the per-block fallback) for the
    blocks a full save of weights has."""
    policy = codecs.CodecPolicy()
    data = [(block("weights", 1 << 16, s), itemsize) for s in range(4)]
    for g in batch.encode_many(data, policy):
        assert codecs.envelope.unpack(g).codec == codecs.PLANES
