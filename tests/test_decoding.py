"""Restore decoding on worker processes gives the same bytes and the same errors as threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from damage import flip_last_byte

from apollo_cas import Store
from apollo_cas.errors import CorruptChunk


def _store(tmp_path: Path, fmt: int = 1) -> Store:
    rng = np.random.default_rng(0)
    st = Store.open(tmp_path / "s", create=True, workers=2, format=fmt)
    st.save(
        {f"t{i}": rng.standard_normal(40_000 + i).astype(np.float32) for i in range(4)},
        block_size=16384,
    )
    return st


@pytest.mark.parametrize("store_format", [1, 2])
@pytest.mark.parametrize("fmt", ["flat", "safetensors"])
def test_processes_restore_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, store_format: int
) -> None:
    st = _store(tmp_path, store_format)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "0")
    a = st.restore("latest", tmp_path / "threads", format=fmt)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    assert st.decoder(1).processes
    b = st.restore("latest", tmp_path / "procs", format=fmt)
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    for x, y in zip(a, b, strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes()


def test_worker_errors_reach_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    cid = st.manifest(st.resolve("latest")).tensors[2].chunks[1].hex()
    flip_last_byte(st, bytes.fromhex(cid))
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    with pytest.raises(CorruptChunk, match=cid):
        st.restore("latest", tmp_path / "out", format="flat")
    assert not (tmp_path / "out" / "weights.bin").exists()


def test_memory_stores_stay_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    st = Store.open("memory://x", create=True)
    assert not st.decoder(1 << 40).processes


@pytest.mark.parametrize("device", [None, "cpu"])
def test_load_through_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str | None
) -> None:
    import torch

    st = _store(tmp_path)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "0")
    ref = st.load()
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    got = st.load(device=device)
    assert list(got) == list(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype
