"""zstd contexts, one per thread, and strict frame decoding.

zstd compression and decompression contexts are not thread-safe, and building
one costs more than compressing a small block, so each thread keeps its own,
keyed by level. python-zstandard releases the GIL while it works, so threads
compress in parallel.

Two compressor families:

* ``compress(data, level)``: zstd at ``level`` with the library's parameters.
* ``compress_plane(data, level)``: for levels 1..9, zstd level 1 with
  ``min_match=7`` and ``hash_log=6``; other levels as the library sets them. Byte planes of floats are close to
  i.i.d. bytes of low entropy (the exponent plane) or none (mantissa planes):
  their value lies in the literal entropy coder, and the short matches a normal
  match finder turns up by chance cost more bits than they save. Measured on
  1 MiB exponent planes of bf16 weights at level 1: ratio 2.71 -> 2.89 and
  0.28 -> 0.97 GB/s; runs of zeros (delta planes) still compress as well.
  The frames are ordinary zstd frames either way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import zstandard

#: Levels at or above this use zstd's own parameters for planes too (their
#: optimal parsers already price matches against literals).
_PLANE_TUNED_BELOW = 10

_tls = threading.local()


def _cache(attr: str) -> dict[int, zstandard.ZstdCompressor]:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, attr, None)
    if cache is None:
        cache = {}
        setattr(_tls, attr, cache)
    return cache


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (library parameters)."""
    cache = _cache("c")
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for byte planes at ``level`` (see module doc).

    Levels 1..9 all map to the tuned fast parameters: on byte planes zstd's
    own levels 2..9 find more chance matches and compress *worse* than the
    tuned level 1 (measured 1.45x vs 1.49x on bf16), at a fraction of the speed.
    Levels 10 and up (optimal parsing) and levels below 1 keep zstd's parameters.
    """
    cache = _cache("p")
    c = cache.get(level)
    if c is None:
        if 1 <= level < _PLANE_TUNED_BELOW:
            params = zstandard.ZstdCompressionParameters.from_level(1, min_match=7, hash_log=6)
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=level)
        cache[level] = c
    return c


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """One zstd frame of ``data`` (content size recorded in the frame header)."""
    return compressor(level).compress(data)


def compress_plane(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """One zstd frame of a byte plane (see module doc for the parameters)."""
    return plane_compressor(level).compress(data)


def compress_planes(planes: Sequence[Any], level: int) -> list[memoryview]:
    """:func:`compress_plane` of every plane, byte for byte, in one call.

    One call into python-zstandard (``multi_compress_to_buffer``, on this
    thread) instead of one per plane (``planes``: arrays or buffers, each
    contiguous): the GIL is released once for all of
    them, where 16 encoding threads compressing plane by plane re-took it
    after every frame and starved the threads that write packs (a full save
    of 17 GB: h200_2026-12-04/run1). The views share one buffer, alive as
    long as any view is. Falls back to a call per plane where the library
    lacks the call (its cffi backend).
    """
    c = plane_compressor(level)
    views = [memoryview(p).cast("B") for p in planes]
    many = getattr(c, "multi_compress_to_buffer", None)
    if many is None or not views:
        return [memoryview(c.compress(v)) for v in views]
    out = many(views, threads=1)
    return [memoryview(out[i]) for i in range(len(planes))]


class FrameError(ValueError):
    """A zstd frame that is damaged or not exactly the expected size."""


_BLOCK_RAW, _BLOCK_RLE, _BLOCK_COMPRESSED = 0, 1, 2


def frame_size(frame: bytes | bytearray | memoryview) -> int:
    """Length in bytes of the zstd frame at the start of ``frame``.

    Walks the 3-byte block headers (one per 128 KiB of output at most, so a few
    per chunk); python-zstandard has no call for this, and its ``decompress``
    silently ignores bytes after the frame.
    """
    view = memoryview(frame)
    try:
        pos = zstandard.frame_header_size(view)
    except zstandard.ZstdError as exc:
        raise FrameError(f"bad zstd frame header ({exc})") from exc
    checksum = bool(view[4] & 0x04)
    end = len(view)
    while True:
        if pos + 3 > end:
            raise FrameError("zstd frame is truncated")
        head = view[pos] | (view[pos + 1] << 8) | (view[pos + 2] << 16)
        pos += 3
        kind = (head >> 1) & 3
        size = head >> 3
        if kind == _BLOCK_RLE:
            pos += 1
        elif kind in (_BLOCK_RAW, _BLOCK_COMPRESSED):
            pos += size
        else:
            raise FrameError("reserved zstd block type")
        if head & 1:
            break
    return pos + (4 if checksum else 0)


def decompress_exact(frame: bytes | bytearray | memoryview, size: int) -> bytes:
    """Decode one zstd frame that must fill exactly ``frame`` and give ``size`` bytes.

    The frame header's content size is checked *before* decoding, so a damaged
    header cannot make us allocate gigabytes; bytes after the frame and a short
    frame are errors too.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FrameError(f"bad zstd frame header ({exc})") from exc
    if declared != size:
        raise FrameError(f"zstd frame declares {declared} bytes, expected {size}")
    length = frame_size(frame)
    if length != len(frame):
        what = (
            "truncated" if length > len(frame) else f"followed by {len(frame) - length} stray bytes"
        )
        raise FrameError(f"zstd frame is {what}")
    try:
        out = decompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"cannot decompress ({exc})") from exc
    if len(out) != size:
        raise FrameError(f"zstd frame gave {len(out)} bytes, expected {size}")
    return out
