"""ChunkStore.read: sizes checked before and after decoding, delta chains bounded.

The seam every restore path uses: ``read(chunk_id, size)`` refuses a chunk whose
envelope claims another length than its place needs *before* decompressing
(a 200 KB chunk may claim gigabytes), and one that decodes to another length
after; a delta chain that loops or runs past ``delta.MAX_DEPTH`` is a
``CorruptChunk`` naming the chunks, never a ``RecursionError``.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import numpy as np
import pytest

from apollo_cas import codecs
from apollo_cas.chunkstore import ChunkStore
from apollo_cas.codecs import chain, delta, envelope
from apollo_cas.errors import CorruptChunk
from apollo_cas.hashing import digest
from apollo_cas.layout import chunk_key
from apollo_cas.store import MAX_BLOCK_SIZE, Store


def rle_zstd_frame(total: int) -> bytes:
    """A valid zstd frame of ``total`` zero bytes made of 128 KiB RLE blocks: 4 bytes
    per block, so 512 MiB fit in 16 KiB (what a hostile chunk can claim)."""
    block = 1 << 17
    assert total % block == 0
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out.append(0b11100000)  # 8-byte content size, single segment
    out += struct.pack("<Q", total)
    n = total // block
    for i in range(n):
        head = (block << 3) | (1 << 1) | int(i == n - 1)
        out += head.to_bytes(3, "little") + b"\0"
    return bytes(out)


def chunkstore() -> ChunkStore:
    """A format-1 store: these tests plant hand-made envelopes (loops, huge claims)
    as chunk objects under ``chunks/``; the checks under test (codecs.chain) are the
    same for an envelope read from a pack (``ChunkStore.decode``)."""
    return Store.open("memory://reads", create=True, format=1).chunks


def test_rle_frame_is_a_real_zstd_frame() -> None:
    import zstandard

    assert zstandard.ZstdDecompressor().decompress(rle_zstd_frame(1 << 18)) == bytes(1 << 18)


def test_read_checks_the_size_its_place_needs() -> None:
    cs = chunkstore()
    raw = np.arange(3000, dtype=np.uint16).tobytes()
    cid = cs.put_block(raw, 2).chunk_id
    assert cs.read(cid, len(raw)) == raw
    assert cs.read(cid) == raw
    for wrong in (len(raw) - 1, len(raw) + 1, 4096, 0):
        with pytest.raises(
            CorruptChunk, match=f"chunk {cid.hex()} is {len(raw)} bytes.*needs {wrong}"
        ):
            cs.read(cid, wrong)


@pytest.mark.parametrize("size", [4096, None])
def test_a_huge_claim_is_refused_before_decompressing(size: int | None) -> None:
    """A 16 KiB chunk claiming 512 MiB: with the size its place needs, and without
    one (never above the largest block size), nothing near the claim is allocated."""
    cs = chunkstore()
    claim = 512 << 20
    assert claim > MAX_BLOCK_SIZE == chain.MAX_RAW_SIZE
    blob = envelope.pack(codecs.ZSTD, claim, b"", rle_zstd_frame(claim))
    assert len(blob) < 20_000
    cid = digest(b"some block")
    cs.backend.put(chunk_key(cid.hex()), blob)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunk, match=f"chunk {cid.hex()}.*{claim} bytes") as err:
            cs.read(cid, size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"read allocated {peak} bytes for a {len(blob)}-byte chunk"
    assert "verify" in (err.value.hint or "")


def _delta_blob(raw: bytes, base_raw: bytes) -> bytes:
    blob = codecs.encode(raw, codecs.CodecPolicy(), 2, base=codecs.Base(digest(base_raw), base_raw))
    assert codecs.base_of(blob) == digest(base_raw).hex()
    return blob


def _versions(n: int, size: int = 4096) -> list[bytes]:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 16, size // 2, dtype=np.uint16)
    out = []
    for i in range(n):
        x = x.copy()
        x[i % len(x)] ^= 1
        out.append(x.tobytes())
    return out


def test_a_delta_loop_is_a_clear_error_naming_the_chunks() -> None:
    """x is a delta of y and y a delta of x: RecursionError before, now CorruptChunk."""
    cs = chunkstore()
    x, y = _versions(2)
    cx, cy = digest(x), digest(y)
    cs.backend.put(chunk_key(cx.hex()), _delta_blob(x, y))
    cs.backend.put(chunk_key(cy.hex()), _delta_blob(y, x))
    for start, other in ((cx, cy), (cy, cx)):
        with pytest.raises(CorruptChunk, match="loop") as err:
            cs.read(start, len(x))
        assert start.hex() in str(err.value) and other.hex() in str(err.value)
    # a chunk that is a delta of itself
    cs.backend.put(chunk_key(cx.hex()), _delta_blob(x, x))
    with pytest.raises(CorruptChunk, match="loop"):
        cs.read(cx)


def test_a_chain_longer_than_the_format_allows_is_refused() -> None:
    """Depth bytes are informational: the reader counts links itself."""
    cs = chunkstore()
    vs = _versions(delta.MAX_DEPTH + 40)
    cs.backend.put(chunk_key(digest(vs[0]).hex()), codecs.encode(vs[0], codecs.CodecPolicy(), 2))
    for prev, cur in itertools.pairwise(vs):
        cs.backend.put(chunk_key(digest(cur).hex()), _delta_blob(cur, prev))
    assert cs.read(digest(vs[delta.MAX_DEPTH]), 4096) == vs[delta.MAX_DEPTH]  # 255 links: fine
    with pytest.raises(CorruptChunk, match=f"longer than {delta.MAX_DEPTH}") as err:
        cs.read(digest(vs[-1]), 4096)
    assert digest(vs[-1]).hex() in str(err.value)


def test_a_base_of_another_length_is_refused_before_decoding() -> None:
    cs = chunkstore()
    x, y = _versions(2)
    short = y[:2048]
    # x claims to be a delta of `short` (whose own envelope says 2048 bytes)
    blob = bytearray(_delta_blob(x, y))
    env = envelope.unpack(bytes(blob))
    params = bytearray(env.params)
    params[:16] = digest(short)
    bad = envelope.pack(codecs.DELTA, env.raw_size, bytes(params), bytes(env.payload))
    cs.backend.put(chunk_key(digest(x).hex()), bad)
    cs.put_block(short, 2)
    with pytest.raises(CorruptChunk, match=f"delta base chunk {digest(short).hex()}.*2048"):
        cs.read(digest(x), len(x))


def test_missing_and_damaged_bases_still_name_both_chunks() -> None:
    cs = chunkstore()
    x, y = _versions(2)
    cs.backend.put(chunk_key(digest(x).hex()), _delta_blob(x, y))
    with pytest.raises(
        CorruptChunk,
        match=f"chunk {digest(x).hex()}: its delta base chunk {digest(y).hex()} is missing",
    ):
        cs.read(digest(x))
    cs.backend.put(chunk_key(digest(y).hex()), codecs.encode(x, codecs.CodecPolicy(), 2))
    with pytest.raises(
        CorruptChunk, match=f"its delta base chunk {digest(y).hex()} cannot be read"
    ):
        cs.read(digest(x))
