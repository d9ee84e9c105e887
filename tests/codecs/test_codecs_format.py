"""The stored format as docs/CODECS.md describes it, read by an independent decoder.

``reference_decode`` uses only struct, zstandard and plain Python, following
the byte layouts in the documentation, never apollo_cas's decoding code: if
the writer drifts from the document, these tests fail.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import zstandard
from codec_helpers import weights

from apollo_cas import codecs
from apollo_cas.errors import UsageError
from apollo_cas.hashing import digest


def reference_decode(blob: bytes, load_base: Callable[[str], bytes] | None = None) -> bytes:
    magic, version, codec, reserved, raw_size, plen = struct.unpack_from("<4sBBHQI", blob)
    assert magic == b"APCK" and version == 1 and reserved == 0
    params, payload = blob[20 : 20 + plen], blob[20 + plen :]
    return _body(codec, params, payload, raw_size, load_base)


def _body(
    codec: int,
    params: bytes,
    payload: bytes,
    raw_size: int,
    load_base: Callable[[str], bytes] | None,
) -> bytes:
    if codec == 0:
        assert params == b"" and len(payload) == raw_size
        return payload
    if codec == 1:
        assert params == b""
        return zstandard.ZstdDecompressor().decompress(payload)
    if codec == 2:
        w, flags = params[0], params[1]
        assert w in (2, 4, 8) and flags == 0 and len(params) == 2 + 5 * w
        m = raw_size // w
        pos = 0
        planes = []
        for k in range(w):
            kind, length = struct.unpack_from("<BI", params, 2 + 5 * k)
            piece = payload[pos : pos + length]
            pos += length
            plane = piece if kind == 0 else zstandard.ZstdDecompressor().decompress(piece)
            assert len(plane) == m
            planes.append(plane)
        out = bytearray(raw_size)
        for k in range(w):
            out[k : m * w : w] = planes[k]  # byte k of every element
        out[m * w :] = payload[pos:]
        assert len(payload) - pos == raw_size % w
        return bytes(out)
    if codec == 3:
        base_id, depth, inner = params[:16], params[16], params[17]
        assert depth >= 1 and inner in (0, 1, 2) and load_base is not None
        base = load_base(base_id.hex())
        assert len(base) == raw_size and digest(base) == base_id
        x = _body(inner, params[18:], payload, raw_size, None)
        return bytes(a ^ b for a, b in zip(x, base, strict=True))
    raise AssertionError(f"codec {codec}")


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("codec", codecs.POLICY_CODECS)
def test_independent_reader_agrees(itemsize: int, codec: str) -> None:
    raw = weights(700, "fp32") + b"\x01\x02\x03"  # odd length: a tail for every width
    blob = codecs.encode(raw, codecs.CodecPolicy(codec=codec), itemsize)
    assert reference_decode(blob) == raw


def test_independent_reader_agrees_on_deltas() -> None:
    v0 = weights(2048, "bf16") + b"\x09"
    v1 = bytearray(v0)
    for i in range(0, len(v1), 97):
        v1[i] ^= 0x01
    for codec, itemsize in (("auto", 2), ("zstd", 2), ("auto", 1)):
        blob = codecs.encode(
            bytes(v1),
            codecs.CodecPolicy(codec=codec, sparse=False),
            itemsize,
            base=codecs.Base(digest(v0), v0, depth=2),
        )
        assert codecs.info(blob)[0] == "delta"
        assert blob[20 + 16] == 3  # depth byte
        assert reference_decode(blob, lambda h: v0) == bytes(v1)


def test_planes_layout_bytes() -> None:
    """Byte by byte for one small fp32 block: w, flags, then (kind, u32 length) per plane."""
    raw = bytes(range(4)) * 64 + b"\xaa"  # 64 elements 00 01 02 03 and a 1-byte tail
    blob = codecs.encode(raw, codecs.CodecPolicy(codec="planes"), 4)
    assert blob[:4] == b"APCK" and blob[4] == 1 and blob[5] == 2
    assert struct.unpack_from("<Q", blob, 8)[0] == len(raw)
    plen = struct.unpack_from("<I", blob, 16)[0]
    assert plen == 2 + 5 * 4
    params = blob[20 : 20 + plen]
    assert params[:2] == b"\x04\x00"
    payload = blob[20 + plen :]
    assert payload[-1:] == b"\xaa"
    pos = 0
    for k in range(4):
        kind, length = struct.unpack_from("<BI", params, 2 + 5 * k)
        assert kind == 1  # constant planes compress
        plane = zstandard.ZstdDecompressor().decompress(payload[pos : pos + length])
        assert plane == bytes([k]) * 64
        pos += length


def test_payload_pieces_are_standard_zstd_frames() -> None:
    """Each compressed plane is one whole frame with its content size (for nvCOMP)."""
    raw = weights(1 << 15, "bf16")
    blob = codecs.encode(raw, codecs.CodecPolicy(), 2)
    plen = struct.unpack_from("<I", blob, 16)[0]
    params, payload = blob[20 : 20 + plen], blob[20 + plen :]
    kind, length = struct.unpack_from("<BI", params, 2 + 5)
    frame = payload[len(raw) // 2 : len(raw) // 2 + length]
    assert kind == 1
    assert zstandard.frame_content_size(frame) == len(raw) // 2
    assert frame[:4] == b"\x28\xb5\x2f\xfd"


def test_policy_defaults_and_validation() -> None:
    p = codecs.CodecPolicy()
    assert (p.codec, p.level, p.delta) == ("auto", 1, True)
    assert p.max_delta_depth == codecs.DEFAULT_MAX_DELTA_DEPTH
    assert p.delta_max_ratio == codecs.DELTA_MAX_RATIO
    for bad in (
        {"codec": "delta"},
        {"codec": "lz4"},
        {"level": 23},
        {"level": -8},
        {"max_delta_depth": -1},
        {"max_delta_depth": 256},
        {"delta_max_ratio": 0.0},
        {"delta_max_ratio": 1.5},
    ):
        with pytest.raises(UsageError):
            codecs.CodecPolicy(**bad)  # type: ignore[arg-type]
    # positional use as the store's first author wrote it keeps working
    assert codecs.CodecPolicy("zstd", 3) == codecs.CodecPolicy(codec="zstd", level=3)
    with pytest.raises(AttributeError):
        p.level = 2  # type: ignore[misc]


def test_levels_change_the_encoding_not_the_reading() -> None:
    raw = weights(1 << 14, "fp32")
    for level in (-3, 1, 3, 9, 12):
        for codec in ("zstd", "planes"):
            blob = codecs.encode(raw, codecs.CodecPolicy(codec=codec, level=level), 4)
            assert codecs.decode(blob) == raw
            assert reference_decode(blob) == raw


@pytest.mark.parametrize("size", [0, 1000, (64 << 10) - 40, 64 << 10, 700_000])
def test_envelope_pack_is_the_parts_back_to_back(size: int) -> None:
    """Small chunks are joined, large ones assembled by numpy (which releases the
    GIL): either way the bytes are header, parameters and pieces in order."""
    from apollo_cas.codecs import envelope

    rng = __import__("random").Random(size)
    pieces = [rng.randbytes(size // 3), memoryview(rng.randbytes(size - size // 3))]
    blob = envelope.pack(2, 123_456, b"params", *pieces)
    head = struct.pack("<4sBBHQI", b"APCK", 1, 2, 0, 123_456, 6)
    assert bytes(blob) == head + b"params" + b"".join(bytes(p) for p in pieces)
    env = envelope.unpack(blob)
    assert (env.codec, env.raw_size, bytes(env.params)) == (2, 123_456, b"params")
    assert bytes(env.payload) == b"".join(bytes(p) for p in pieces)
