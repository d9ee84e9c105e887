"""A chunk of the wrong length for its place is an error on every restore path.

A chunk id names its raw bytes, so such a chunk exists only where a manifest
names a chunk for the wrong place (a lying or buggy writer); before, a short
chunk restored as zeros (``Store.load`` returned uninitialised memory) and a
long one overwrote the next block. Each path now passes the length its place
needs to ``ChunkStore.read``, which refuses the chunk naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from manifest_lies import chunk_of, rewrite_latest, swap_chunk

from apollo_cas.errors import CorruptChunk
from apollo_cas.store import Store

BS = 4096


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "a": rng.integers(0, 256, BS + 100, dtype=np.uint8),  # last block: 100 bytes
        "b": rng.integers(0, 256, 2 * BS, dtype=np.uint8),
        "c": rng.integers(0, 256, 3 * BS, dtype=np.uint8),
    }


@pytest.fixture(params=["short", "long"])
def lying(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, bytes]:
    """A store whose latest names, for one block, a chunk of another length."""
    st = Store.open(tmp_path / "s", create=True, workers=2)
    st.save(_weights(), block_size=BS)
    small, big = chunk_of(st, "a", 1), chunk_of(st, "c", 0)
    if request.param == "short":  # b's first 4096-byte block names a 100-byte chunk
        rewrite_latest(st, lambda m: swap_chunk(m, ("b", 0), small))
        return st, small
    rewrite_latest(st, lambda m: swap_chunk(m, ("a", 1), big))  # 100-byte place, 4096 chunk
    return st, big


@pytest.mark.parametrize("processes", ["0", "1"])
@pytest.mark.parametrize("fmt", ["flat", "safetensors"])
def test_restore_refuses_and_writes_nothing(
    lying: tuple[Store, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    processes: str,
) -> None:
    st, bad = lying
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", processes)
    out = tmp_path / "out"
    with pytest.raises(CorruptChunk, match=f"chunk {bad.hex()} is \\d+ bytes, its place needs"):
        st.restore("latest", out, format=fmt)
    assert [p.name for p in out.iterdir()] == []


@pytest.mark.parametrize("processes", ["0", "1"])
def test_load_refuses(
    lying: tuple[Store, bytes], monkeypatch: pytest.MonkeyPatch, processes: str
) -> None:
    st, bad = lying
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", processes)
    with pytest.raises(CorruptChunk, match=bad.hex()):
        st.load()


def test_live_restore_refuses(lying: tuple[Store, bytes]) -> None:
    import torch

    from apollo_cas.targets.live import restore_live

    st, bad = lying
    m = st.manifest(st.resolve("latest"))
    live = {k: torch.zeros(v.shape[0], dtype=torch.uint8) for k, v in _weights().items()}
    with pytest.raises(CorruptChunk, match=bad.hex()):
        restore_live(live, m, st.read_chunk, workers=2)


def test_the_right_place_still_restores(tmp_path: Path) -> None:
    """The same chunk, where it belongs, is fine: the check is per place."""
    st = Store.open(tmp_path / "s", create=True, workers=2)
    w = _weights()
    st.save(w, block_size=BS)
    got = st.load()
    for k, v in w.items():
        assert got[k].numpy().tobytes() == v.tobytes()
