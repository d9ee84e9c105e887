"""Framed byte planes (codec 2, flags 1; docs/CODECS.md): planes cut into zstd frames
of ``CodecPolicy.plane_frame_bytes`` decoded bytes, for GPU decoders."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas import codecs
from apollo_cas.codecs import batch, envelope, planes, zstd_frames
from apollo_cas.errors import CorruptChunk, UsageError
from apollo_cas.hashing import digest
from tests.codecs.codec_helpers import weights

KiB = 1 << 10
F = 64 * KiB


def framed(frame_bytes: int = F, **kw: object) -> codecs.CodecPolicy:
    return codecs.CodecPolicy(plane_frame_bytes=frame_bytes, **kw)  # type: ignore[arg-type]


def decode(blob: bytes) -> bytes:
    return bytes(codecs.decode(blob))


def encode(raw: bytes, policy: codecs.CodecPolicy, itemsize: int) -> bytes:
    return bytes(codecs.encode(raw, policy, itemsize))


def test_a_long_plane_is_cut_into_frames_of_f_bytes() -> None:
    raw = weights(1 << 19, "bf16")  # one 1 MiB block: planes of 512 KiB
    blob = encode(raw, framed(), 2)
    env = envelope.unpack(blob)
    assert env.codec == codecs.PLANES and env.params[1] == planes.FRAMED
    m = len(raw) // 2
    w, layout, frames = planes.parse_params(env.params, m)
    assert w == 2
    assert layout[0] == (planes.PLANE_RAW, m)  # the mantissa plane stays raw
    assert layout[1][0] == planes.PLANE_FRAMES
    assert len(frames[1]) == m // F and sum(frames[1]) == layout[1][1]
    assert planes.frame_size_of(env.params) == F
    assert decode(blob) == raw
    # Frame j of the exponent plane is a zstd frame of exactly F bytes of it.
    pay = bytes(env.payload)
    start = m + sum(frames[1][:3])
    exp = np.frombuffer(raw, np.uint8)[1::2]
    got = zstd_frames.decompress_exact(pay[start : start + frames[1][3]], F)
    assert got == exp[3 * F : 4 * F].tobytes()


def test_frames_cost_little_and_zero_means_one_frame_per_plane() -> None:
    raw = weights(1 << 19, "bf16")
    one = encode(raw, codecs.CodecPolicy(), 2)
    assert one == encode(raw, framed(0), 2)
    assert envelope.unpack(one).params[1] == 0
    cut = encode(raw, framed(128 * KiB), 2)
    assert len(one) < len(cut) < 1.01 * len(one)


def test_a_plane_no_longer_than_f_is_one_frame_and_unflagged() -> None:
    raw = weights(1 << 15, "bf16")  # 64 KiB: planes of 32 KiB
    assert encode(raw, framed(), 2) == encode(raw, codecs.CodecPolicy(), 2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700 * KiB),
    itemsize=st.sampled_from([2, 4, 8]),
    frame_bytes=st.sampled_from([F, 68 * KiB, 128 * KiB]),
    kind=st.sampled_from(["weights", "zeros", "random"]),
    seed=st.integers(0, 99),
)
def test_round_trip_and_batch_encoder_agree(
    n: int, itemsize: int, frame_bytes: int, kind: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        raw = bytes(n)
    elif kind == "random":
        raw = rng.integers(0, 256, n, np.uint8).tobytes()
    else:
        raw = (rng.normal(size=n // 4 + 1) * 0.02).astype(np.float32).tobytes()[:n]
    policy = framed(frame_bytes, codec="planes")
    blob = encode(raw, policy, itemsize)
    assert decode(blob) == raw
    assert [bytes(b) for b in batch.encode_many([(raw, itemsize)], policy)] == [blob]


def test_deltas_frame_their_inner_planes() -> None:
    base = weights(1 << 19, "bf16", seed=1)
    a = np.frombuffer(base, np.uint16).copy()
    a[::3] ^= 1  # a third of the elements change their last mantissa bit
    raw = a.tobytes()
    base_chunk = codecs.Base(digest(base), base, 0)
    blob = bytes(codecs.encode(raw, framed(sparse=False), 2, base_chunk))
    env = envelope.unpack(blob)
    assert env.codec == codecs.DELTA
    _base, _depth, inner, iparams = codecs.delta.parse_params(env.params)
    assert inner == codecs.PLANES and iparams[1] == planes.FRAMED
    got = codecs.decode(blob, "delta", lambda hex_id: base)
    assert bytes(got) == raw


@pytest.mark.parametrize("bad", [1, 4096, 60 * KiB, 64 * KiB + 16, -F])
def test_a_bad_frame_size_is_a_usage_error(bad: int) -> None:
    with pytest.raises(UsageError, match="plane frames"):
        framed(bad)


@pytest.mark.parametrize("bad", [True, 1.5, "64KiB", None])
def test_a_frame_size_of_the_wrong_type_is_a_usage_error(bad: object) -> None:
    with pytest.raises(UsageError, match="plane_frame_bytes"):
        framed(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- damaged parameters


def _framed_blob() -> tuple[bytes, bytes]:
    raw = weights(1 << 18, "bf16", seed=3)  # planes of 256 KiB: 4 frames of 64 KiB
    return raw, encode(raw, framed(), 2)


def _with_params(blob: bytes, params: bytes) -> bytes:
    env = envelope.unpack(blob)
    return bytes(envelope.pack(env.codec, env.raw_size, params, bytes(env.payload)))


def _table_at(w: int) -> int:
    return planes.params_size(w) + 4


def _damages() -> dict[str, bytes]:
    _raw, blob = _framed_blob()
    p = bytearray(envelope.unpack(blob).params)
    w = p[0]
    fixed = planes.params_size(w)
    out = {}
    q = bytearray(p)
    q[fixed : fixed + 4] = struct.pack("<I", 60 * KiB)  # not a multiple of 4096
    out["frame size"] = bytes(q)
    q = bytearray(p)
    q[fixed : fixed + 4] = struct.pack("<I", 128 * KiB)  # table count no longer matches
    out["frame count"] = bytes(q)
    q = bytearray(p)
    t = _table_at(w)
    a, b = struct.unpack_from("<II", q, t)
    struct.pack_into("<II", q, t, a + 1, b)  # lengths no longer sum to the plane's
    out["lengths"] = bytes(q)
    out["truncated table"] = bytes(p[:-4])
    out["no frame size"] = bytes(p[:fixed])
    q = bytearray(p)
    q[1] = 0  # kind 2 without the flag
    out["kind without flag"] = bytes(q)
    q = bytearray(p)
    q[1] = 2
    out["unknown flag"] = bytes(q)
    return out


@pytest.mark.parametrize("what", sorted(_damages()))
def test_damaged_framed_parameters_are_refused(what: str) -> None:
    _raw, blob = _framed_blob()
    bad = _with_params(blob, _damages()[what])
    with pytest.raises(CorruptChunk):
        codecs.decode(bad)


def test_a_frame_declaring_another_size_is_refused() -> None:
    raw = weights(4 * F + 2500, "bf16", seed=4)  # planes of 5 frames, the last short
    blob = encode(raw, framed(), 2)
    env = envelope.unpack(blob)
    m = len(raw) // 2
    _w, layout, frames = planes.parse_params(env.params, m)
    k = next(k for k, (kind, _n) in enumerate(layout) if kind == planes.PLANE_FRAMES)
    lengths = list(frames[k])
    assert len(lengths) == 5
    pay = bytes(env.payload)
    start = sum(n for _kind, n in layout[:k])
    cuts = np.cumsum([start, *lengths]).tolist()
    pieces = [pay[a:b] for a, b in itertools.pairwise(cuts)]
    # The short last frame first, the first last, the lengths table swapped to match:
    # every length adds up, but two frames declare the wrong share of the plane.
    pieces[0], pieces[-1] = pieces[-1], pieces[0]
    lengths[0], lengths[-1] = lengths[-1], lengths[0]
    params = bytearray(env.params)
    struct.pack_into(f"<{len(lengths)}I", params, _table_at(2), *lengths)
    body = pay[:start] + b"".join(pieces) + pay[cuts[-1] :]
    bad = bytes(envelope.pack(env.codec, env.raw_size, bytes(params), body))
    with pytest.raises(CorruptChunk, match=r"declares|frame"):
        codecs.decode(bad)
