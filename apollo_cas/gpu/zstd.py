"""zstd frames decoded in batches into buffers the caller owns: on the GPU (nvCOMP) or the host.

A :class:`FrameDecoder` takes one source buffer holding many zstd frames (each at an
offset, with a length) and one output buffer with an offset and a capacity per frame,
and fills every output. The restore pipeline (:mod:`apollo_cas.gpu.restore`) owns both
buffers: wrapping nvCOMP's own output arrays in torch tensors ended in a double free on
the next decode in a probe (docs/GPU_RESTORE.md), so nvCOMP only ever writes into torch
memory we allocated, carved with ``nvcomp.as_arrays(buffer, offsets, sizes)``.

* :class:`NvcompFrames`: nvCOMP 6 (``nvidia-nvcomp-cu13``, the ``[gpu]`` extra), RAW
  bitstream zstd, on the pipeline's CUDA stream. It decoded this store's exponent-plane
  frames at 61.6 GB/s of output in steady state on an H200 (../shared/BRIEF.md);
* :class:`HostFrames`: python-zstandard on the host, one frame per task on threads,
  writing into the same output buffer (a CPU tensor). It runs the very same batch
  layout in CI, which has neither a GPU nor nvCOMP.

Each frame's declared content size is checked against its slot on the host before it
is queued; its length is checked by the host decoder (``decompress_exact``), and on the
GPU every decoded block is hashed before it is handed out, so a frame nvCOMP
mis-decodes (short, damaged, or with bytes after it) cannot reach a tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["FrameDecoder", "HostFrames", "NvcompFrames", "nvcomp_available", "open_frames"]


class FrameDecoder(Protocol):
    """Decodes many zstd frames of ``src`` into slots of ``out`` (both 1-D uint8 tensors)."""

    #: True when src and out are CUDA tensors (the GPU decodes).
    on_device: bool

    def decode(
        self,
        src: Any,
        src_offsets: Sequence[int],
        src_sizes: Sequence[int],
        out: Any,
        out_offsets: Sequence[int],
        out_sizes: Sequence[int],
    ) -> Any:
        """Queue (or do) the decodes; returns an object to keep alive until they finish."""


class HostFrames:
    """zstd frames decoded on the host with python-zstandard, into a CPU tensor."""

    on_device = False

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)

    def decode(
        self,
        src: Any,
        src_offsets: Sequence[int],
        src_sizes: Sequence[int],
        out: Any,
        out_offsets: Sequence[int],
        out_sizes: Sequence[int],
    ) -> Any:
        from ..codecs import zstd_frames
        from ..parallel import bounded_map

        s = src.numpy()
        o = out.numpy()

        def one(i: int) -> None:
            frame = s[src_offsets[i] : src_offsets[i] + src_sizes[i]].data
            raw = zstd_frames.decompress_exact(frame, out_sizes[i])
            o[out_offsets[i] : out_offsets[i] + out_sizes[i]] = np.frombuffer(raw, np.uint8)

        for _ in bounded_map(one, range(len(src_offsets)), self.workers):
            pass
        return None


def nvcomp_available() -> bool:
    """True when nvCOMP's Python package imports and a CUDA device is present."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        from nvidia import nvcomp  # noqa: F401
    except Exception as exc:  # missing extra, or a broken install: decode on the host
        log.debug("nvCOMP unavailable: %s", exc)
        return False
    return True


class NvcompFrames:
    """nvCOMP's batched zstd decoder (RAW bitstream) on one CUDA stream.

    ``stream`` is a ``torch.cuda.Stream``: nvCOMP's work is queued on it, so it is
    ordered after the host-to-device copy of the frames and before the interleave
    that reads its outputs. A decode without a decompression configuration
    synchronises that stream to read the frames' sizes from the device, so the host
    waits there for every batch queued before it; the pipeline knows every frame's
    decoded size (its slot), so by default (``preconfigured``) the configuration is
    built on the host from those sizes and the call only queues work.
    """

    on_device = True
    #: The default of ``preconfigured`` (a benchmark compares both in one run).
    PRECONFIGURED = True

    def __init__(self, device: Any, stream: Any, *, preconfigured: bool | None = None) -> None:
        from nvidia import nvcomp

        self._nv = nvcomp
        self._stream = int(stream.cuda_stream)
        self._codec = nvcomp.Codec(
            algorithm="Zstd",
            bitstream_kind=nvcomp.BitstreamKind.RAW,
            device_id=int(device.index or 0),
            cuda_stream=self._stream,
        )
        self.preconfigured = self.PRECONFIGURED if preconfigured is None else preconfigured

    def decode(
        self,
        src: Any,
        src_offsets: Sequence[int],
        src_sizes: Sequence[int],
        out: Any,
        out_offsets: Sequence[int],
        out_sizes: Sequence[int],
    ) -> Any:
        nv = self._nv
        sizes = list(out_sizes)
        srcs = nv.as_arrays(src, list(src_offsets), list(src_sizes), cuda_stream=self._stream)
        outs = nv.as_arrays(out, list(out_offsets), sizes, cuda_stream=self._stream)
        if self.preconfigured:
            cfg = self._codec.decompression_config(self._codec.compression_config(sizes))
            result = self._codec.decode(srcs, out=outs, decompression_config=cfg)
            # Keep the batch descriptors and the configuration alive until the stream
            # has run the decode.
            return (srcs, outs, cfg, result)
        result = self._codec.decode(srcs, out=outs)
        return (srcs, outs, result)


def open_frames(device: Any, stream: Any, workers: int) -> FrameDecoder | None:
    """nvCOMP on ``device`` when it can run there; None (decode while staging) otherwise."""
    if device.type == "cuda" and nvcomp_available():
        try:
            return NvcompFrames(device, stream)
        except Exception as exc:
            log.warning("nvCOMP could not start (%s); decoding zstd on the CPU", exc)
    return None
