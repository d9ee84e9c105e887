"""A source against the series' previous checkpoint (apollo_cas.sources.previous)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.errors import SourceError, StaleHandles  # noqa: E402
from apollo_cas.manifest import Manifest, SourceInfo, TensorEntry  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from apollo_cas.sources.mapping import MappingSource  # noqa: E402

# ------------------------------------------------------------------- check_against


def _manifest(tensors: dict[str, torch.Tensor], rank: int | None = None) -> Manifest:
    entries = tuple(
        TensorEntry(
            n,
            "BF16" if t.dtype == torch.bfloat16 else "F32",
            tuple(t.shape),
            t.numel() * t.element_size(),
            (b"\0" * 16,) * max(1, -(-t.numel() // 512)),
        )
        for n, t in sorted(tensors.items())
    )
    return Manifest(
        series="default",
        created=0.0,
        block_size=1024,
        tensors=entries,
        source=SourceInfo(kind="handles", rank=rank, world_size=2 if rank is not None else None),
    )


def test_check_against() -> None:
    a = {"w": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(4)}
    m = _manifest(a)
    handles.check_against(None, MappingSource(a))
    handles.check_against(m, MappingSource(a))
    b = {"w": torch.zeros(8, 4, dtype=torch.bfloat16), "c": torch.zeros(4)}
    src = DeviceSource(b, SourceInfo(kind="handles", location="/tmp/h.pt"))
    with pytest.raises(StaleHandles) as ei:
        handles.check_against(m, src)
    msg = str(ei.value)
    assert "'b' is gone" in msg and "'c' is new" in msg and "(4, 4) -> (8, 4)" in msg
    with pytest.raises(SourceError) as ei2:
        handles.check_against(m, MappingSource(b))
    assert not isinstance(ei2.value, StaleHandles)
    handles.check_against(m, src, force=True)
    dt = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    assert handles.differences(m, MappingSource(dt)) == ["'w' dtype BF16 -> F32"]


def test_check_against_rank() -> None:
    a = {"w": torch.zeros(4)}
    m = _manifest(a, rank=0)
    src = DeviceSource(a, SourceInfo(kind="handles", rank=1, world_size=2))
    assert handles.differences(m, src) == ["rank 0 -> 1"]
