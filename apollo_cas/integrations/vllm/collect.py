"""The tensors of a served model: parameters, buffers and tensor-valued attributes.

``named_parameters()`` is not the whole state of a vLLM model. Quantization
methods store scales as plain tensor attributes after loading (for example an
attention layer's ``_k_scale`` / ``_v_scale``, an fp8 layer's ``input_scale``,
an NVFP4 layer's ``weight_global_scale``), which are neither parameters nor
buffers; a checkpoint without them restores weights whose scales are whatever
the new server computed. :func:`collect_tensors` therefore walks every
submodule's ``__dict__`` for direct ``torch.Tensor`` attributes as well.
Tensors inside lists or dicts (vLLM's per-layer ``kv_cache`` list) are not
taken: they are the KV cache, not weights.

The same memory under two names (tied embeddings, an attribute that aliases
a parameter) is stored once, under the first name in sorted order; the others
are recorded as aliases.

The model of a vLLM worker is ``worker.model_runner.model``, which with CUDA
graphs is a ``CUDAGraphWrapper`` (or ``UBatchWrapper``) around the real
module; :func:`unwrap_model` takes ``unwrap()`` / ``runnable`` /
``_orig_mod`` (torch.compile) until it reaches the ``nn.Module`` whose names
are the parameter names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Collected", "collect_tensors", "unwrap_model"]

#: Wrapper attributes that lead to the wrapped model, in the order tried.
_WRAPPER_ATTRS = ("runnable", "_orig_mod", "module")
_MAX_UNWRAP = 8


def unwrap_model(model: Any) -> torch.nn.Module:
    """The ``nn.Module`` inside vLLM's CUDA-graph / micro-batch / compile wrappers."""
    m = model
    for _ in range(_MAX_UNWRAP):
        if not isinstance(m, torch.nn.Module):
            inner = m.unwrap() if callable(getattr(m, "unwrap", None)) else None
            if inner is None:
                inner = next(
                    (getattr(m, a) for a in _WRAPPER_ATTRS if getattr(m, a, None) is not None),
                    None,
                )
            if inner is None:
                break
            m = inner
            continue
        # torch.compile's OptimizedModule is an nn.Module whose names carry "_orig_mod.".
        orig = m.__dict__.get("_orig_mod") or m._modules.get("_orig_mod")
        if isinstance(orig, torch.nn.Module):
            m = orig
            continue
        return m
    raise TypeError(
        f"{type(model).__name__} is not a torch.nn.Module and wraps none "
        "(expected worker.model_runner.model)"
    )


@dataclass
class Collected:
    """What :func:`collect_tensors` found."""

    #: name -> tensor (plain ``torch.Tensor`` views sharing the live memory)
    tensors: dict[str, torch.Tensor]
    #: names that are module attributes, not parameters or buffers
    attributes: list[str] = field(default_factory=list)
    #: alias name -> the stored name with the same memory
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over the same memory (vLLM's parameter subclasses, no autograd)."""
    t = t.detach()
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def collect_tensors(
    model: Any,
    *,
    include_buffers: bool = True,
    include_attributes: bool = True,
    exclude: str | None = None,
) -> Collected:
    """Every tensor of ``model`` (unwrapped) that a checkpoint must hold.

    ``exclude`` is a regular expression matched (``re.search``) against names;
    matching tensors are left out. Meta tensors (no memory) are skipped.
    """
    module = unwrap_model(model)
    pattern = re.compile(exclude) if exclude else None
    found: list[tuple[str, torch.Tensor, bool]] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        found.append((name, p, False))
    if include_buffers:
        for name, b in module.named_buffers(remove_duplicate=False):
            found.append((name, b, False))
    if include_attributes:
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for attr, value in vars(sub).items():
                if isinstance(value, torch.Tensor) and not attr.startswith("__"):
                    found.append((f"{prefix}.{attr}" if prefix else attr, value, True))
    out = Collected(tensors={})
    by_key: dict[tuple[Any, ...], str] = {}
    seen: set[str] = set()
    for name, t, is_attr in sorted(found, key=lambda x: x[0]):
        if name in seen or t.device.type == "meta" or (pattern and pattern.search(name)):
            continue
        seen.add(name)
        k = _key(t)
        first = by_key.get(k) if t.numel() else None
        if first is not None:
            out.aliases[name] = first
            continue
        by_key[k] = name
        out.tensors[name] = _plain(t)
        if is_attr:
            out.attributes.append(name)
    return out
