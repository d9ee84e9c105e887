"""A source that describes its tensors wrongly, as a buggy or hostile one would:
for tests of the checks behind every source."""

from __future__ import annotations

from collections.abc import Sequence

from apollo_cas import dtypes
from apollo_cas.manifest import SourceInfo
from apollo_cas.sources.base import Source, SourceTensor


class LyingTensor(SourceTensor):
    """A tensor whose shape does not describe its bytes (a buggy or hostile source)."""

    def __init__(self, name: str, shape: tuple[int, ...], data: bytes) -> None:
        self.name, self.dtype, self.shape = name, dtypes.BY_NAME["F32"], shape
        self._data = memoryview(data)
        self.nbytes = len(data)

    def read(self, offset: int, length: int) -> memoryview:
        return self._data[offset : offset + length]


class LyingSource(Source):
    def __init__(self, tensors: list[SourceTensor]) -> None:
        self.info = SourceInfo(kind="mapping")
        self._tensors = tensors

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors
