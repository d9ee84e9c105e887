"""Chunk codecs: how a block's raw bytes become a stored chunk and back.

A codec is chosen per chunk and recorded in its envelope, so stores may mix
codecs freely and old chunks stay readable when defaults change. Payloads are
standard zstd frames (or raw bytes), so a GPU decoder can read them later.

Codec ids (stable; part of the store format):

====  ======  ==============================================================
id    name    payload
====  ======  ==============================================================
0     raw     the raw bytes (incompressible blocks)
1     zstd    one zstd frame of the raw bytes
====  ======  ==============================================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from ..errors import CorruptChunk, UsageError
from . import envelope

RAW = 0
ZSTD = 1
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd"}
CODEC_IDS = {v: k for k, v in CODEC_NAMES.items()}

#: Store a compressed payload only if it saves at least this fraction.
MIN_SAVING = 0.02


@dataclass(frozen=True)
class CodecPolicy:
    """How new chunks are encoded. Reading never depends on it."""

    codec: str = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        if self.codec not in CODEC_IDS and self.codec != "auto":
            raise UsageError(
                f"unknown codec {self.codec!r}",
                "choose one of: auto, " + ", ".join(sorted(CODEC_IDS)),
            )
        if not -7 <= self.level <= 22:
            raise UsageError(f"zstd level {self.level} out of range", "use -7..22")


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level, reused.
    cache = getattr(_tls, "c", None)
    if cache is None:
        cache = _tls.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


def zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    return _compressor(level).compress(data)


def zstd_decompress(data: bytes | memoryview, size: int) -> bytes:
    return _decompressor().decompress(data, max_output_size=size)


def encode(raw: bytes | memoryview, policy: CodecPolicy, itemsize: int = 1) -> bytes:
    """Encode one block into a stored chunk (envelope + payload)."""
    n = len(raw)
    if policy.codec == "raw" or n == 0:
        return envelope.pack(RAW, n, b"", raw)
    payload = zstd_compress(raw, policy.level)
    if len(payload) > n * (1 - MIN_SAVING):
        return envelope.pack(RAW, n, b"", raw)
    return envelope.pack(ZSTD, n, b"", payload)


def decode(
    blob: bytes | memoryview, name: str = "chunk", load_base: Callable[[str], bytes] | None = None
) -> bytes:
    """Decode a stored chunk to its raw bytes (the caller verifies the hash)."""
    env = envelope.unpack(blob, name)
    try:
        if env.codec == RAW:
            out = bytes(env.payload)
        elif env.codec == ZSTD:
            out = zstd_decompress(env.payload, env.raw_size)
        else:
            raise CorruptChunk(f"{name}: unknown codec id {env.codec}", "upgrade apollo_cas")
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"{name}: cannot decompress ({exc})", "run apollo-cas verify --read-data") from exc
    if len(out) != env.raw_size:
        raise CorruptChunk(
            f"{name}: decoded {len(out)} bytes, header says {env.raw_size}",
            "run apollo-cas verify --read-data",
        )
    return out


def base_of(blob: bytes | memoryview, name: str = "chunk") -> str | None:
    """The chunk id a delta-coded chunk depends on, or None."""
    envelope.unpack(blob, name)
    return None
