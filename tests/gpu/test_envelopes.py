"""The vectorised envelope parse agrees with the one-by-one parse (parse_chunk)."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas import codecs
from apollo_cas.errors import CorruptChunk
from apollo_cas.gpu.chunkplan import parse_chunk
from apollo_cas.gpu.envelopes import HEAD, frame_content_sizes, parse_planes
from apollo_cas.hashing import digest as chunk_id


def bf16_block(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n // 2) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes() + b"\x07" * (n % 2)


def arena_of(blobs: list[bytes]) -> tuple[np.ndarray, list[int]]:
    offs, pos = [], 0
    for b in blobs:
        offs.append(pos)
        pos += len(b) + 64
    arena = np.zeros(pos + 64, np.uint8)
    for o, b in zip(offs, blobs, strict=True):
        arena[o : o + len(b)] = np.frombuffer(b, np.uint8)
    return arena, offs


def fields(c: object) -> tuple[object, ...]:
    return tuple(getattr(c, k) for k in ("cid", "size", "w", "kinds", "pieces", "tail"))


def fast(blobs: list[bytes], sizes: list[int]) -> list[object]:
    arena, offs = arena_of(blobs)
    views = [arena[o : o + len(b)].data for o, b in zip(offs, blobs, strict=True)]
    cids = [bytes([i]) * 16 for i in range(len(blobs))]
    return parse_planes(arena, offs, [len(b) for b in blobs], views, cids, sizes)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(2, 9000)), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None)
def test_plans_equal_parse_chunk(specs: list[tuple[int, int]]) -> None:
    raws = [bf16_block(seed, n) for seed, n in specs]
    blobs = [codecs.encode(r, codecs.CodecPolicy(), 2) for r in raws]
    sizes = [len(r) for r in raws]
    got = fast(blobs, sizes)
    for i, (b, size) in enumerate(zip(blobs, sizes, strict=True)):
        want = parse_chunk(b, bytes([i]) * 16, size)
        if got[i] is None:  # not byte planes (e.g. stored raw): left to parse_chunk
            assert want is None or want.kinds == (0,) or want.w != 2
            assert size < 2048  # bf16 blocks of this size are always planes
            continue
        assert want is not None and fields(got[i]) == fields(want)


@given(st.integers(0, HEAD - 1), st.integers(1, 255), st.integers(0, 1000))
@settings(max_examples=150, deadline=None)
def test_a_damaged_header_is_never_taken(pos: int, flip: int, seed: int) -> None:
    """A flipped byte in the envelope or planes header: the fast parse takes the chunk
    only if the one-by-one parse takes it too, with the same plan."""
    raw = bf16_block(seed, 4096)
    blob = bytearray(codecs.encode(raw, codecs.CodecPolicy(), 2))
    blob[pos] ^= flip
    got = fast([bytes(blob)], [len(raw)])[0]
    if got is None:
        return
    want = parse_chunk(bytes(blob), bytes(16), len(raw))
    assert want is not None and fields(got) == fields(want)


def test_wrong_size_or_declared_size_is_left_to_parse_chunk() -> None:
    raw = bf16_block(1, 4096)
    blob = codecs.encode(raw, codecs.CodecPolicy(), 2)
    assert fast([blob], [4096])[0] is not None
    assert fast([blob], [4094])[0] is None  # its place needs another size
    with pytest.raises(CorruptChunk, match="its place needs"):
        parse_chunk(blob, chunk_id(raw), 4094)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 300, 65535, 65536 + 300, 1 << 20])
@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("with_size", [True, False])
def test_frame_content_sizes_match_zstandard(n: int, level: int, with_size: bool) -> None:
    data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
    frame = zstandard.ZstdCompressor(level=level, write_content_size=with_size).compress(data)
    head = np.frombuffer(frame[:18].ljust(18, b"\0"), np.uint8)[None, :]
    declared = zstandard.frame_content_size(frame)
    assert frame_content_sizes(head).tolist() == [declared if declared >= 0 else -1]
    assert frame_content_sizes(np.zeros((1, 18), np.uint8)).tolist() == [-1]  # no magic
