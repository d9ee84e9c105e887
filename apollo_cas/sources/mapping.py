"""In-process tensors: a ``state_dict()`` or any mapping of tensors / numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from .. import dtypes
from ..errors import UnsupportedSource
from ..layout import check_tensor_name
from ..manifest import SourceInfo
from .base import Source, SourceTensor, by_unique_name


class BufferTensor(SourceTensor):
    """A tensor whose bytes are a host buffer (a uint8 numpy view)."""

    def __init__(
        self,
        name: str,
        dtype: dtypes.DType,
        shape: tuple[int, ...],
        data: np.ndarray,
        keepalive: Any = None,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self._data: memoryview = data.reshape(-1).view(np.uint8).data
        self.nbytes = len(self._data)
        self._keepalive = keepalive  # the tensor owning the memory

    def read(self, offset: int, length: int) -> memoryview:
        return self._data[offset : offset + length]


def tensor_from_object(name: str, value: Any) -> SourceTensor:
    """Wrap a CPU torch tensor or numpy array without copying it (unless non-contiguous)."""
    check_tensor_name(name)
    if isinstance(value, np.ndarray):
        dt = dtypes.lookup(value.dtype.name, f"tensor {name}")
        arr = np.ascontiguousarray(value)
        return BufferTensor(name, dt, tuple(arr.shape), arr, arr)
    torch_type = type(value).__module__.split(".")[0] == "torch"
    if torch_type and hasattr(value, "dtype") and hasattr(value, "is_cuda"):
        import torch

        t: torch.Tensor = value.detach()
        _check_plain(name, t)
        dt = dtypes.from_torch(t.dtype, f"tensor {name}")
        if t.device.type != "cpu":
            # Off-CPU tensors outside the device path: one copy, bounded by the tensor.
            t = t.to("cpu")
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return BufferTensor(name, dt, tuple(t.shape), raw, t)
    raise UnsupportedSource(
        f"value of {name!r} is a {type(value).__name__}, not a tensor or numpy array",
        "pass a mapping of tensor names to torch tensors or numpy arrays",
    )


def _check_plain(name: str, t: torch.Tensor) -> None:
    """Only dense tensors with data have bytes to store: sparse, nested and meta
    tensors (a ``.pt`` may hold any of them) are refused by name."""
    import torch

    if t.layout != torch.strided or t.is_nested:
        raise UnsupportedSource(
            f"tensor {name!r} is {str(t.layout).replace('torch.', '')}, not a dense tensor",
            "save its dense form (tensor.to_dense()) instead",
        )
    if t.device.type == "meta":
        raise UnsupportedSource(
            f"tensor {name!r} is a meta tensor: it has a shape but no data",
            "save the materialised weights, not a model built on the meta device",
        )


class MappingSource(Source):
    """Tensors passed from Python, e.g. ``model.state_dict()``."""

    def __init__(self, mapping: Mapping[str, Any], info: SourceInfo | None = None) -> None:
        self.info = info or SourceInfo(kind="mapping")
        self._tensors = [
            tensor_from_object(k, v) for k, v in by_unique_name(mapping.items(), "the mapping")
        ]

    def tensors(self) -> Sequence[SourceTensor]:
        return self._tensors
