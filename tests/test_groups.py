"""Multi-rank checkpoints: per-rank series, group records, restore per rank or all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from apollo_cas import SourceInfo, Store
from apollo_cas.errors import RefNotFound, UsageError
from apollo_cas.sources import open_mapping


def rank_source(rank: int, world: int, value: float) -> object:
    weights = {
        "qkv_proj.weight": torch.full((64, 32), value + rank, dtype=torch.bfloat16),
        "norm.weight": torch.ones(32),
    }
    return open_mapping(weights, SourceInfo(kind="mapping", rank=rank, world_size=world))


def test_ranks_get_their_own_series_and_join_one_group(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "s", create=True)
    ids = {r: st.save(rank_source(r, 2, 1.0), group="step-1").checkpoint_id for r in (0, 1)}
    assert set(st.series()) == {"default.rank0", "default.rank1"}
    (g,) = st.groups()
    assert g.complete and g.members == ids and g.world_size == 2
    # The shared norm tensor is stored once across ranks.
    assert st.manifest(ids[1]).stats.new_chunks == 1


def test_group_restore_writes_vllm_rank_layout(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "s", create=True)
    for r in (0, 1):
        st.save(rank_source(r, 2, 5.0), group="g")
    out = tmp_path / "out"
    st.restore_group("g", out)
    for r in (0, 1):
        with safe_open(str(out / f"model-rank-{r}-part-0.safetensors"), "pt") as f:
            assert torch.equal(
                f.get_tensor("qkv_proj.weight"), torch.full((64, 32), 5.0 + r, dtype=torch.bfloat16)
            )
    flat = tmp_path / "flat"
    st.restore_group("g", flat, format="flat", rank=1)
    assert (
        json.loads((flat / "rank-1" / "weights.json").read_text())["norm.weight"]["dtype"]
        == "torch.float32"
    )
    assert not (flat / "rank-0").exists()


def test_incomplete_group_and_bad_arguments(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "s", create=True)
    st.save(rank_source(0, 3, 0.0), group="g")
    assert not st.group("g").complete
    with pytest.raises(RefNotFound, match="incomplete"):
        st.restore_group("g", tmp_path / "o")
    st.restore_group("g", tmp_path / "o", rank=0)  # the rank that exists restores
    with pytest.raises(UsageError, match="world size"):
        st.save(rank_source(1, 2, 0.0), group="g")
    with pytest.raises(UsageError, match="--rank"):
        st.save({"x": torch.ones(2)}, group="g2")
    with pytest.raises(RefNotFound):
        st.group("nope")


def test_concurrent_rank_processes_all_join(tmp_path: Path) -> None:
    """Ranks saving at the same time from separate processes: no lost member."""
    store = tmp_path / "s"
    world = 3
    for r in range(world):
        torch.save(
            {"w": torch.full((4096,), float(r)), "shared": torch.ones(4096)}, tmp_path / f"r{r}.pt"
        )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apollo_cas.cli.main",
                "save",
                str(tmp_path / f"r{r}.pt"),
                "--store",
                str(store),
                "--rank",
                str(r),
                "--world-size",
                str(world),
                "--group",
                "step-7",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    g = Store.open(store).group("step-7")
    assert g.complete and len(set(g.members.values())) == world
