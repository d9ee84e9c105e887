"""Reassembly: every chunk decoded and verified in parallel (threads or worker
processes, see :mod:`apollo_cas.decoding`), then written at its final offset,
so restore runs at the speed of the disk and memory stays at a few blocks per
worker."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..decoding import Decoder, Job, Output
from ..manifest import Manifest, TensorEntry


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes go: file (index into a list of outputs) and offset."""

    tensor: TensorEntry
    output: int
    offset: int


def block_length(tensor: TensorEntry, index: int, block_size: int) -> int:
    """Length of block ``index`` of ``tensor``: the size its chunk must decode to."""
    return min(block_size, tensor.nbytes - index * block_size)


def chunk_jobs(placements: Iterable[Placement], block_size: int) -> Iterator[Job]:
    """(output, offset, chunk id, length) for every chunk of every placed tensor."""
    for p in placements:
        for i, cid in enumerate(p.tensor.chunks):
            yield p.output, p.offset + i * block_size, cid, block_length(p.tensor, i, block_size)


def jobs_by_output(
    placements: Iterable[Placement], outputs: int, block_size: int
) -> list[Iterator[Job]]:
    """:func:`chunk_jobs` split by output file, each in the placements' order.

    Only the placements (one per tensor) are grouped; each output's jobs (one
    per chunk) are still generated as the decoder asks for them.
    """
    groups: list[list[Placement]] = [[] for _ in range(outputs)]
    for p in placements:
        groups[p.output].append(p)
    return [chunk_jobs(g, block_size) for g in groups]


def write_chunks(
    decoder: Decoder,
    outputs: list[Output],
    placements: Iterable[Placement],
    block_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Decode every chunk of the placed tensors into ``outputs``; returns bytes written.

    The outputs are filled side by side, not one after another: workers in
    one file wait on each other (see :func:`apollo_cas.decoding.interleave_outputs`).
    """
    jobs = jobs_by_output(placements, len(outputs), block_size)
    return decoder.write_each(outputs, jobs, progress)


def total_bytes(manifest: Manifest) -> int:
    return sum(t.nbytes for t in manifest.tensors)
