"""The on-disk files apollo_cas reads and writes for users, one module per format.

* :mod:`.flat`: the original tool's checkpoint directory (``weights.bin`` +
  ``weights.json`` + ``checkpoint-meta.json``): the index schema, reading and
  validating it, writing it, and where each tensor lies in ``weights.bin``;
* :mod:`.safetensors`: the safetensors header (parsed with the reference
  parser's strictness, built for streamed writes, 4 KiB aligned), the shard and
  index file names, the index file;
* :mod:`.strict_json`: the JSON rules both embed (no duplicate keys, no deep
  nesting).

Sources read through these modules, targets write through them, and the
examples, tests and benchmarks use the same functions, so a rule of a format
is written once. Nothing here opens a store or imports torch.
"""

from __future__ import annotations

from typing import Protocol


class TensorLike(Protocol):
    """What a writer needs of a tensor (a manifest's TensorEntry has it): the
    dtype in any spelling :func:`apollo_cas.dtypes.lookup` accepts."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
