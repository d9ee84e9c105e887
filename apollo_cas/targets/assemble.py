"""Parallel reassembly: every chunk decoded and verified on the pool, then
written at its final offset, so restore runs at the speed of the disk and
memory stays at a few blocks per thread."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..manifest import Manifest, TensorEntry
from ..parallel import bounded_map


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes go: file (index into a list of outputs) and offset."""

    tensor: TensorEntry
    output: int
    offset: int


def chunk_jobs(placements: Iterable[Placement], block_size: int) -> Iterator[tuple[int, int, bytes]]:
    """(output, offset, chunk id) for every chunk of every placed tensor."""
    for p in placements:
        for i, cid in enumerate(p.tensor.chunks):
            yield p.output, p.offset + i * block_size, cid


def write_chunks(
    read_chunk: Callable[[bytes], bytes],
    fds: list[int],
    placements: Iterable[Placement],
    block_size: int,
    workers: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Decode every chunk and ``pwrite`` it into place; returns bytes written."""

    def task(job: tuple[int, int, bytes]) -> int:
        out, offset, cid = job
        data = read_chunk(cid)
        view = memoryview(data)
        while view:
            n = os.pwrite(fds[out], view, offset)
            view, offset = view[n:], offset + n
        return len(data)

    total = 0
    for n in bounded_map(task, chunk_jobs(placements, block_size), workers):
        total += n
        if progress:
            progress(n)
    return total


def total_bytes(manifest: Manifest) -> int:
    return sum(t.nbytes for t in manifest.tensors)
