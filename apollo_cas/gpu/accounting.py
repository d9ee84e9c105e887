"""What the GPU restore pipeline may hold and what one run did: its memory bound, its
batch size and its phase figures (also the GPU delta save's figures' format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .chunkplan import ALIGN, align_up
from .readers import PAD

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "LOAD_BATCH_BYTES",
    "RestoreStats",
    "checked_batch_bytes",
    "memory_bound",
    "rounded",
]


def rounded(stats: Any) -> dict[str, Any]:
    """A stats dataclass as a dict, seconds rounded to 10 us (the JSON benchmarks write)."""
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in vars(stats).items()}


#: Raw bytes decoded per batch. 256 MiB is ~256 1 MiB blocks (a few hundred zstd frames
#: per nvCOMP call) and keeps pinned memory at ~1 GiB at most: the default where the
#: pipeline shares a GPU with its user (hot restore into a server's live tensors).
DEFAULT_BATCH_BYTES = 256 << 20
#: Batches of ``Store.load`` (a whole checkpoint into new GPU memory). A warm load of
#: 17.1 GB on the H200 (2026-12-02, benchmarks/results/h200_2026-12-02b_restore/):
#: 1.79 s at 256 MiB, 1.48 s at 512 MiB, 1.12-1.18 s at 1 GiB, 1.13 s at 2 GiB. nvCOMP
#: decodes 1,024 frames per call about 3x as fast as 256 (38.8 against 13.1 GB/s of
#: output), and the host's fixed cost per batch (~8 ms on the feeding thread) is paid
#: 17 times instead of 65. Holds 2.15 GB pinned (4 GiB at most) and 4.5 GB of device
#: scratch (6.7 GB for a checkpoint of deltas), measured at 17.1 and 53.6 GB alike.
LOAD_BATCH_BYTES = 1 << 30


def checked_batch_bytes(value: Any, name: str = "batch_bytes") -> int | None:
    """A caller's batch size: None (the default) or a positive whole number of bytes;
    anything else is a UsageError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(
            f"{name} must be a positive number of bytes, got {value!r}",
            "pass an int such as 1 << 30 (1 GiB), or leave it out for the default",
        )
    return value


#: Host arenas of the restore pipeline. With two, the read thread of a cold load of
#: 17.1 GB from the H200 host's disk spent 2.02 s of 7.25 s waiting for a free arena
#: (batch k+2 waits until batch k is on the device; results/h200_2026-12-02c); a
#: third lets reads run a batch further ahead, for one more arena of pinned memory
#: (about 2x ``batch_bytes``). The same-run timings of two against three so far put the
#: first load of the process first, which pays one-time set-up (9.3-9.7 s against
#: 5.7-6.9 s for the second, whichever count it had): bench_cold_restore now warms up first.
DEFAULT_ARENAS = 3


def memory_bound(
    batch_bytes: int,
    block_size: int,
    max_depth: int = 4,
    *,
    direct: bool = False,
    arenas: int = DEFAULT_ARENAS,
) -> dict[str, int]:
    """Upper bounds of the memory the pipeline holds, in bytes, for delta chains of at
    most ``max_depth`` (the store's ``CodecPolicy.max_delta_depth``, 4 by default).

    A batch holds at most ``batch_bytes`` of places, and each of them at most
    ``max_depth`` bases. A staging slot holds every plane slot of its chunks (raw size:
    the device decodes frames into them) plus the packed frames (at most raw size
    again), plus alignment per chunk. Pinned: two slots. Device: one staging mirror and
    two buffers of decoded rows (every device step runs on one stream; batch k+1 is
    decoded before batch k's verdict is read and its rows placed). Host arenas (not
    pinned): ``arenas`` (the pipeline's, :data:`DEFAULT_ARENAS` by default) of about twice
    ``batch_bytes``; a reader without room in them returns bytes of its own instead.

    ``direct`` (the mode with a frame decoder, nvCOMP on a GPU): no staging slots; the
    arenas are the pinned memory, and the device holds two mirrors of arenas, the
    staging layout, two buffers of decoded rows, and a copy of each stored chunk that did not fit
    in the arena (deep delta chains: at most the batch's stored bytes beyond it).

    Sparse deltas (codec 4) add index temporaries on the device for at most
    :data:`~apollo_cas.gpu.sparse_steps.SUB_ELEMENTS` changed elements at a time
    (about 160 MiB), transient and not counted here.
    """
    rows = (max_depth + 1) * (batch_bytes // block_size + 1)
    slot = 2 * (max_depth + 1) * batch_bytes + rows * 16 * ALIGN
    arena = 2 * batch_bytes + (2 * batch_bytes // block_size + 2) * 256 + PAD
    row_bytes = 2 * rows * align_up(block_size, 64)  # two buffers of rows
    if direct:
        stored = (max_depth + 1) * batch_bytes + rows * (256 + PAD)
        return {
            "pinned_host": arenas * arena,
            "device_scratch": slot + row_bytes + 2 * arena + max(0, stored - arena + PAD),
            "host_arenas": 0,
        }
    return {
        "pinned_host": 2 * slot,
        "device_scratch": slot + row_bytes,
        "host_arenas": arenas * arena,
    }


@dataclass
class RestoreStats:
    """Phase times of one run (seconds; device phases from CUDA events, summed)."""

    places: int = 0
    chunks_decoded: int = 0
    bases_decoded: int = 0
    cpu_fallback_chunks: int = 0
    raw_bytes: int = 0
    stored_bytes_read: int = 0
    h2d_bytes: int = 0
    batches: int = 0
    frames: int = 0
    gpu_frames: bool = False
    read_s: float = 0.0
    stage_s: float = 0.0
    wait_s: float = 0.0
    #: host wall seconds of the read thread waiting for a free arena (the device side
    #: has not queued, or not finished copying, the batch two back)
    arena_wait_s: float = 0.0
    #: host wall seconds of the thread feeding the device: queueing each batch's device
    #: steps, and reading verdicts and placing (``wait_s`` is its wait for the stager)
    queue_s: float = 0.0
    finish_s: float = 0.0
    #: CPU seconds (``time.thread_time``) of the feeding thread, and summed over the
    #: read and stage threads: with the wall times above they say whether a thread
    #: worked or waited for the GIL
    main_cpu_s: float = 0.0
    read_cpu_s: float = 0.0
    stage_cpu_s: float = 0.0
    #: host wall seconds of the feeding thread waiting for a free pinned upload buffer
    #: (part of ``queue_s`` and ``finish_s``): the device had not yet copied an earlier
    #: batch's table out of it
    upload_wait_s: float = 0.0
    copy_s: float = 0.0
    decode_s: float = 0.0
    interleave_s: float = 0.0
    verify_s: float = 0.0
    place_s: float = 0.0
    seconds: float = 0.0
    pinned_bytes: int = 0
    device_scratch_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return rounded(self)
