"""What ``save`` reads: a source is a named set of tensors exposing raw bytes.

Sources hand out byte ranges, never typed arrays, so every dtype (bf16, fp8,
bool) travels the same way. CPU sources return zero-copy views (mmap'd files,
tensor storage). Device sources override :meth:`Source.block_digests` to hash
on the GPU and :meth:`Source.fetch` to copy only the blocks the store lacks
through pinned buffers.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..dtypes import DType
from ..errors import SourceError
from ..layout import check_tensor_name
from ..manifest import SourceInfo

if TYPE_CHECKING:
    from ..filesets import FileSet

S = TypeVar("S", bound="Source")
V = TypeVar("V")


def by_unique_name(items: Iterable[tuple[object, V]], where: str) -> list[tuple[str, V]]:
    """``(name, value)`` pairs sorted by name, where a name is ``str(key)``.

    Every source names its tensors through this: two keys that spell one name
    (``1`` and ``"1"``, a nested ``{"a": {"b": ..}}`` and a dotted ``"a.b"``)
    would otherwise leave one tensor silently in place of the other.
    """
    seen: dict[str, object] = {}
    out: list[tuple[str, V]] = []
    for key, value in items:
        name = str(key)
        if name in seen:
            raise SourceError(
                f"tensor name {name!r} appears twice in {where} (keys {seen[name]!r} and "
                f"{key!r}); one of the two would be lost",
                "rename one of them before saving",
            )
        check_tensor_name(name)
        seen[name] = key
        out.append((name, value))
    out.sort(key=lambda nv: nv[0])
    return out


@dataclass(frozen=True)
class BlockRequest:
    """One block to fetch: tensor index, byte offset and length inside that tensor."""

    tensor: int
    offset: int
    length: int


#: Blocks per batch of the default :meth:`Source.fetch_batches`: two batches in
#: flight keep 16 encoding threads busy at a bounded 128 blocks of copies.
COPIED_BATCH_ITEMS = 64


@dataclass
class FetchedBatch:
    """Fetched blocks, ``(request index, bytes)`` in request order, whose views stay
    valid until :meth:`release` (a device source refills their buffer after it)."""

    items: list[tuple[int, memoryview]]
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        """Done with every view of this batch (idempotent)."""
        done, self.on_release = self.on_release, None
        if done is not None:
            done()


class SourceTensor(abc.ABC):
    """One tensor of a source."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> memoryview:
        """Host bytes ``[offset, offset+length)`` of the tensor."""


class Source(abc.ABC):
    """A set of tensors to checkpoint."""

    info: SourceInfo
    #: When the weights were taken (epoch seconds), if the source knows; the
    #: seed importer keeps the original checkpoints' times.
    created: float | None = None
    #: Parts of the input that are not saved (a training checkpoint's optimizer
    #: state, its epoch counter), one phrase each; the CLI reports them on stderr.
    left_out: tuple[str, ...] = ()

    @abc.abstractmethod
    def tensors(self) -> Sequence[SourceTensor]:
        """The tensors, in the order they are stored (sorted by name)."""

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        """Chunk ids of every block of every tensor, if the source can compute them
        cheaper than reading the bytes (on the GPU). None means: read and hash."""
        return None

    def fetch(self, requests: Sequence[BlockRequest]) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(i, bytes)`` for ``requests[i]``. A yielded view is valid until
        the consumer asks for the next item plus one (double buffering), so the
        consumer must finish using it promptly or copy it."""
        ts = self.tensors()
        for i, r in enumerate(requests):
            yield i, ts[r.tensor].read(r.offset, r.length)

    def fetch_batches(self, requests: Sequence[BlockRequest]) -> Iterator[FetchedBatch]:
        """The blocks of :meth:`fetch` in batches whose views stay valid until each
        batch is released, so worker threads can encode them in place.

        This default copies the blocks out of :meth:`fetch` (whose views live only
        briefly) into batches of up to :data:`COPIED_BATCH_ITEMS`;
        :class:`~apollo_cas.sources.device.DeviceSource` hands out views of its pinned
        buffers instead. A consumer holds at most two batches at a time.
        """
        items: list[tuple[int, memoryview]] = []
        for i, view in self.fetch(requests):
            # numpy's copy releases the GIL where bytes(view) holds it.
            items.append((i, np.frombuffer(view, np.uint8).copy().data))
            if len(items) == COPIED_BATCH_ITEMS:
                yield FetchedBatch(items)
                items = []
        if items:
            yield FetchedBatch(items)

    def saved_files(self) -> FileSet | None:
        """What writes the files this source was read from again byte for byte
        (exact restore); None for tensors from memory, a GPU, handles or .pt."""
        return None

    def check_unchanged(self) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~apollo_cas.errors.SourceError` if the source's files
        changed while they were read; the store calls it before committing."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files, mappings and device resources."""

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
