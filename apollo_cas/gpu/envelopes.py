"""The envelopes of many stored chunks parsed at once (numpy), for the GPU restore.

The pipeline parses every chunk's envelope on the host before anything is decoded
(:func:`~apollo_cas.gpu.chunkplan.parse_chunk`): about 10 us of Python per chunk on
the CI machine, under the GIL, by the read threads. Once the reads stopped waiting at
a barrier per batch, the GIL became the limit of a warm load: py-spy of 17.1 GB loads
on the H200 found the read threads holding it ~0.65 s per load, mostly parsing, and
the thread that feeds the device waiting to take it back
(benchmarks/results/h200_2026-12-03e/README.md, run 3). Nearly every chunk of a
checkpoint of floats is the same shape: byte planes (codec 2) of 2-byte elements, one
plane a zstd frame and one raw. :func:`parse_planes` checks a whole group of such
chunks with a few vector operations on their first bytes, and leaves every other
chunk (other codecs, widths, anything that does not pass) to ``parse_chunk``.

An earlier version was reverted (46a936c) because, while the reads waited at every
batch's end, it did not pay on the H200; the pipeline takes ``vector_parse=False`` so
one run can compare both.

What is checked, per chunk, as ``parse_chunk`` does: magic, envelope version,
codec, reserved bytes, the raw size against the size its place needs, the parameter
length, width and flags, each plane's kind, each raw plane's length, that planes
and tail fill the payload, and each zstd frame's magic and declared content size
(the plane length). Not walked on the host: the frame's blocks. A frame that is
truncated or followed by stray bytes but declares the right size decodes to wrong
bytes or fails in the decoder, and the block's XXH3-128 check (always run, before
any block is placed) names the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..codecs import PLANES, envelope, planes
from .chunkplan import COPY, FRAME, ChunkPlan

__all__ = ["HEAD", "parse_planes"]

#: Envelope header + planes parameters for w = 2: the fixed prefix read per chunk.
HEAD = envelope.HEADER_SIZE + planes.params_size(2)  # 20 + 12
#: The zstd frame header bytes read per zstd plane (magic, descriptor, up to 14 more).
FRAME_HEAD = 18
_ZSTD_MAGIC = np.frombuffer(b"\x28\xb5\x2f\xfd", np.uint8)
_MAGIC = np.frombuffer(envelope.MAGIC, np.uint8)
_KIND = {planes.PLANE_RAW: COPY, planes.PLANE_ZSTD: FRAME}


def _u32(b: np.ndarray, at: int) -> np.ndarray:
    return b[:, at : at + 4].copy().view("<u4")[:, 0].astype(np.int64)


def _u64(b: np.ndarray, at: int) -> np.ndarray:
    return b[:, at : at + 8].copy().view("<u8")[:, 0].astype(np.int64)


def frame_content_sizes(heads: np.ndarray) -> np.ndarray:
    """Declared content size of the zstd frame starting each row of ``heads`` (n x 18
    bytes), or -1 where the row is no frame or declares none (RFC 8878, 3.1.1.1)."""
    n = len(heads)
    out = np.full(n, -1, dtype=np.int64)
    if not n:
        return out
    ok = (heads[:, :4] == _ZSTD_MAGIC).all(axis=1)
    fhd = heads[:, 4].astype(np.int64)
    fcs_flag = fhd >> 6
    single = (fhd >> 5) & 1
    ok &= ((fhd >> 3) & 1) == 0  # reserved bit
    did = np.array([0, 1, 2, 4])[fhd & 3]
    at = 5 + (1 - single) + did
    size_bytes = np.where(fcs_flag == 0, single, np.array([1, 2, 4, 8])[fcs_flag])
    ok &= size_bytes > 0
    cols = np.arange(8)
    idx = np.minimum(at[:, None] + cols[None, :], heads.shape[1] - 1)
    raw = np.take_along_axis(heads, idx, axis=1).astype(np.uint64)
    raw = np.where(cols[None, :] < size_bytes[:, None], raw, np.uint64(0))
    value = (raw << (np.uint64(8) * cols.astype(np.uint64))[None, :]).sum(axis=1)
    value = value.astype(np.int64) + np.where(size_bytes == 2, 256, 0)
    out[ok] = value[ok]
    return out


def parse_planes(
    arena: np.ndarray,
    offsets: Sequence[int | None],
    lengths: Sequence[int],
    blobs: Sequence[Any],
    cids: Sequence[bytes],
    sizes: Sequence[int],
) -> list[ChunkPlan | None]:
    """Plans of the chunks that are 2-byte byte planes, checked together; None for the
    rest (the caller parses those one by one).

    ``arena`` holds the stored bytes; chunk i is ``lengths[i]`` bytes at
    ``offsets[i]`` of it (None: not in the arena) and ``blobs[i]`` is its view.
    """
    n = len(cids)
    out: list[ChunkPlan | None] = [None] * n
    sel = [i for i in range(n) if offsets[i] is not None and lengths[i] >= HEAD]
    if not sel:
        return out
    off = np.array([offsets[i] for i in sel], dtype=np.int64)
    ln = np.array([lengths[i] for i in sel], dtype=np.int64)
    size = np.array([sizes[i] for i in sel], dtype=np.int64)
    h = arena[off[:, None] + np.arange(HEAD)[None, :]]
    ok = (h[:, :4] == _MAGIC).all(axis=1)
    ok &= h[:, 4] == envelope.ENVELOPE_VERSION
    ok &= h[:, 5] == PLANES
    ok &= (h[:, 6] == 0) & (h[:, 7] == 0)
    ok &= _u64(h, 8) == size
    ok &= _u32(h, 16) == planes.params_size(2)
    ok &= (h[:, 20] == 2) & (h[:, 21] == 0)
    k0, k1 = h[:, 22].astype(np.int64), h[:, 27].astype(np.int64)
    l0, l1 = _u32(h, 23), _u32(h, 28)
    m, tail = size // 2, size % 2
    ok &= m > 0
    for k, length in ((k0, l0), (k1, l1)):
        ok &= (k == planes.PLANE_RAW) | (k == planes.PLANE_ZSTD)
        ok &= (k != planes.PLANE_RAW) | (length == m)
    ok &= l0 + l1 + tail == ln - HEAD
    # zstd planes: the frame's magic and declared size, read where the frame starts.
    for k, start, length in ((k0, HEAD, l0), (k1, HEAD + l0, l1)):
        z = np.flatnonzero(ok & (k == planes.PLANE_ZSTD))
        if not len(z):
            continue
        fine = length[z] >= FRAME_HEAD
        z_ok = z[fine]
        at = off[z_ok] + (start if isinstance(start, int) else start[z_ok])
        idx = np.minimum(at[:, None] + np.arange(FRAME_HEAD)[None, :], len(arena) - 1)
        declared = frame_content_sizes(arena[idx])
        ok[z[~fine]] = False
        ok[z_ok] &= declared == m[z_ok]
    kinds0, kinds1 = k0.tolist(), k1.tolist()
    l0s, l1s, tails, oks = l0.tolist(), l1.tolist(), tail.tolist(), ok.tolist()
    for j, i in enumerate(sel):
        if not oks[j]:
            continue
        a, b = l0s[j], l1s[j]
        c = ChunkPlan(cids[i], sizes[i], blob=blobs[i])
        c.w = 2
        c.kinds = (_KIND[kinds0[j]], _KIND[kinds1[j]])
        c.pieces = [(HEAD, a), (HEAD + a, b)]
        c.tail = (HEAD + a + b, tails[j])
        out[i] = c
    return out
