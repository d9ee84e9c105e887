"""Damaged chunks: decode raises CorruptChunk naming the chunk, never returns wrong bytes silently.

decode itself cannot see a flipped bit inside a raw plane or a raw payload
(there is nothing to check it against); the store hashes every decoded chunk.
So the tests split what decode must catch (structure: header, parameters,
frame boundaries, sizes) from what the decode + hash pair must catch (any
damage at all).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from codec_helpers import MemStore, dense_step, f32_to_bf16, weights

from apollo_cas import codecs
from apollo_cas.codecs import delta, envelope
from apollo_cas.errors import CorruptChunk, CorruptObject, FormatVersionError, ObjectNotFound
from apollo_cas.hashing import digest

_HEAD = struct.Struct("<4sBBHQI")


def samples() -> dict[str, tuple[bytes, bytes, bytes | None]]:
    """name -> (raw block, stored chunk, base raw or None), one per codec kind."""
    bf = weights(3000, "bf16") + b"\x07"  # odd tail
    fp = weights(1500, "fp32")
    master = np.frombuffer(weights(3000, "fp32", seed=9), np.float32)
    b0 = f32_to_bf16(master).tobytes()
    b1 = f32_to_bf16(dense_step(master, 1, scale=1e-3)).tobytes()
    out = {
        "raw": (bf, codecs.encode(bf, codecs.CodecPolicy(codec="raw"), 2), None),
        "zstd": (bf, codecs.encode(bf, codecs.CodecPolicy(codec="zstd"), 2), None),
        "planes-bf16": (bf, codecs.encode(bf, codecs.CodecPolicy(codec="planes"), 2), None),
        "planes-fp32": (fp, codecs.encode(fp, codecs.CodecPolicy(codec="planes"), 4), None),
        "delta": (
            b1,
            codecs.encode(b1, codecs.CodecPolicy(), 2, base=codecs.Base(digest(b0), b0)),
            b0,
        ),
    }
    kinds = {k: codecs.info(v[1])[0] for k, v in out.items()}
    assert kinds == {
        "raw": "raw",
        "zstd": "zstd",
        "planes-bf16": "planes",
        "planes-fp32": "planes",
        "delta": "delta",
    }
    return out


SAMPLES = samples()


def decode(blob: bytes, base: bytes | None) -> bytes:
    """Decode with a loader that, like a store, knows only the one base chunk."""
    if base is None:
        return codecs.decode(blob, "chunk T")
    known = digest(base).hex()

    def load(h: str) -> bytes:
        if h != known:
            raise ObjectNotFound(f"chunk {h} not found")
        return base

    return codecs.decode(blob, "chunk T", load_base=load)


def header_len(blob: bytes) -> int:
    return envelope.HEADER_SIZE + len(envelope.unpack(blob).params)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_truncation_is_always_caught(kind: str) -> None:
    _raw, blob, base = SAMPLES[kind]
    cuts = set(range(0, header_len(blob) + 4)) | set(range(0, len(blob), 37)) | {len(blob) - 1}
    for cut in sorted(cuts):
        with pytest.raises(CorruptChunk, match="chunk T"):
            decode(blob[:cut], base)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_trailing_bytes_are_caught(kind: str) -> None:
    _raw, blob, base = SAMPLES[kind]
    for junk in (b"\0", b"junk", bytes(100)):
        with pytest.raises(CorruptChunk, match="chunk T"):
            decode(blob + junk, base)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_header_and_parameter_flips_are_caught(kind: str) -> None:
    """Every single-bit flip in the envelope and codec parameters raises.

    Two fields carry no information decode can check: the reserved envelope
    bytes 6-7 and a delta's depth (a hint for the writer); flipping them must
    still give the right bytes.
    """
    raw, blob, base = SAMPLES[kind]
    harmless = {6, 7}
    if kind == "delta":
        harmless.add(envelope.HEADER_SIZE + 16)
    for pos in range(header_len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            if pos in harmless:
                try:
                    assert decode(bytes(bad), base) == raw
                except CorruptChunk:
                    assert pos == envelope.HEADER_SIZE + 16  # depth 0 is invalid
                continue
            with pytest.raises((CorruptChunk, FormatVersionError)):
                decode(bytes(bad), base)


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_payload_flips_never_give_wrong_bytes_through_the_store(kind: str) -> None:
    """decode + hash (what the store does) turns any payload damage into CorruptChunk."""
    raw, blob, base = SAMPLES[kind]
    store = MemStore()
    if base is not None:
        store.put(base, codecs.CodecPolicy(), 2)
    cid = digest(raw)
    start = header_len(blob)
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(start, len(blob), 60).tolist()) | {start, len(blob) - 1})
    caught_by_decode = 0
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = decode(bytes(bad), base)
        except CorruptChunk:
            caught_by_decode += 1
        else:
            assert len(out) == len(raw)  # decode never returns a block of another size
        store.blobs[cid] = bytes(bad)
        try:
            assert store.read(cid) == raw  # possible only if the flip changed nothing
        except CorruptChunk as exc:
            assert cid.hex() in str(exc)
    if kind in ("zstd",):
        assert caught_by_decode > 0  # frame structure catches some flips by itself


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_wrong_raw_size_is_caught(kind: str) -> None:
    _raw, blob, base = SAMPLES[kind]
    magic, ver, codec, res, size, plen = _HEAD.unpack_from(blob)
    for wrong in (size - 1, size + 1, size * 2, size // 2, 0, 1 << 60):
        if wrong == size:
            continue
        bad = _HEAD.pack(magic, ver, codec, res, wrong, plen) + blob[_HEAD.size :]
        with pytest.raises(CorruptChunk, match="chunk T"):
            decode(bad, base)


def test_unknown_codec_id() -> None:
    _raw, blob, _ = SAMPLES["zstd"]
    bad = blob[:5] + bytes([9]) + blob[6:]
    with pytest.raises(CorruptChunk, match="chunk T: unknown codec id 9"):
        decode(bad, None)
    with pytest.raises(CorruptChunk, match="unknown codec id 9"):
        codecs.info(bad)
    with pytest.raises(CorruptChunk, match="unknown codec id 9"):
        codecs.base_of(bad)


def test_bad_magic_and_version() -> None:
    _raw, blob, _ = SAMPLES["planes-bf16"]
    with pytest.raises(CorruptChunk, match="bad magic"):
        decode(b"XPCK" + blob[4:], None)
    with pytest.raises(FormatVersionError):
        decode(blob[:4] + bytes([2]) + blob[5:], None)


def test_delta_with_nested_delta_inner_is_rejected() -> None:
    _raw, blob, base = SAMPLES["delta"]
    env = envelope.unpack(blob)
    base_id, depth, _inner, iparams = delta.parse_params(env.params)
    params = delta.pack_params(base_id, depth, codecs.DELTA, bytes(iparams))
    bad = envelope.pack(codecs.DELTA, env.raw_size, params, env.payload)
    with pytest.raises(CorruptChunk, match="cannot be nested"):
        decode(bad, base)


def test_corrupt_errors_are_corrupt_objects() -> None:
    """Callers (verify) catch CorruptObject; CorruptChunk is one."""
    _raw, blob, _ = SAMPLES["raw"]
    with pytest.raises(CorruptObject):
        decode(blob[:-1], None)
