"""Saves and gc on stores whose delta bases loop: no endless walk, nothing wrong stored.

A manifest's ``bases`` is a cache of the chunks' own headers. Before, a loop
in the parent's ``bases`` made the next save spin forever finding the root of
a chain (``delta_bases.base_finder``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from manifest_lies import rewrite_latest

from apollo_cas.store import Store

BS = 4096


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8 * BS // 2, generator=g).to(torch.bfloat16)}


def _step(m: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = m["w"].float()
    return {"w": (w + 1e-3 * torch.randn(w.shape, generator=g) * w.abs()).to(torch.bfloat16)}


@pytest.fixture
def looping(fast_tmp_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A store whose latest manifest says two chunks are deltas of each other."""
    root = fast_tmp_dir / "s"
    w0 = _model(0)
    w1 = _step(w0, 1)
    with Store.open(root, create=True) as st:
        st.save(w0, block_size=BS)
        st.save(w1, block_size=BS)
        bases = st.manifest(st.resolve("latest")).bases
        assert bases, "the dense step should have stored deltas"
        d, r = next(iter(bases.items()))
        rewrite_latest(st, lambda m: replace(m, bases={**m.bases, r: d}))
    return root, w1


def test_a_save_after_a_bases_loop_finishes_and_restores(
    looping: tuple[Path, dict[str, torch.Tensor]],
    run_cli: Callable[..., Any],
    write_safetensors: Callable[..., Path],
    tmp_path: Path,
) -> None:
    root, w1 = looping
    w2 = {"w": w1["w"].clone()}
    w2["w"][: BS // 2] += 1  # the first block changes; the others are the parent's chunks
    src = write_safetensors(w2, tmp_path / "w2.safetensors")
    p = run_cli("save", src, "--store", root, "--block-size", BS, "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    with Store.open(root) as st:
        m = st.manifest(st.resolve("latest"))
        # The new manifest's bases follow the chunks' headers: no loop inherited.
        for start in m.bases:
            seen = {start}
            cur = m.bases.get(start)
            while cur is not None:
                assert cur not in seen
                seen.add(cur)
                cur = m.bases.get(cur)
        got = st.load()
    assert torch.equal(got["w"], w2["w"])


def test_a_save_of_a_dense_step_against_a_looping_parent(
    looping: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Every block changed: the looping chains are not offered as delta bases."""
    root, w1 = looping
    w2 = _step(w1, 2)
    st = Store.open(root)
    done: list[object] = []
    # On a thread, so that the endless walk this guards against fails the test.
    t = threading.Thread(target=lambda: done.append(st.save(w2, block_size=BS)), daemon=True)
    t.start()
    t.join(60)
    assert done, "the save did not finish within 60 s"
    assert torch.equal(st.load()["w"], w2["w"])


def test_a_dense_step_against_a_damaged_parent_chunk_restores_right(fast_tmp_dir: Path) -> None:
    """The parent's chunk under a block is damaged: the new block cannot be a delta
    against it (sparse or planes), so it is stored in full and restores bit-exactly."""
    from tests.damage import flip_last_byte

    root = fast_tmp_dir / "s"
    w0 = _model(0)
    w1 = _step(w0, 1)
    with Store.open(root, create=True) as st:
        st.save(w0, block_size=BS)
        victim = st.manifest(st.resolve("latest")).tensors[0].chunks[2]
        flip_last_byte(st, victim)  # its chunk object (format 1) or its pack range (2)
        st.save(w1, block_size=BS)
        m = st.manifest(st.resolve("latest"))
        assert victim not in m.chunk_ids()  # nothing of the new checkpoint needs it
        assert m.bases  # the other blocks are deltas
        assert torch.equal(st.load()["w"], w1["w"])
