"""Restore to the original tool's flat ``weights.bin`` + ``weights.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from damage import flip_last_byte

from apollo_cas.errors import CorruptChunk, TargetError
from apollo_cas.sources.seed import SeedSource
from apollo_cas.store import Store

from .failures import Boom, failing_after

BS = 4096


@pytest.fixture
def saved(tmp_store, make_model):
    model = make_model(layers=2, hidden=64)
    model["extra.fp8"] = torch.randn(4099).to(torch.float8_e4m3fn)
    model["extra.flag"] = torch.tensor(True)
    model["extra.empty"] = torch.empty(0, dtype=torch.int32)
    st = Store.open(tmp_store, create=True)
    r = st.save(model, block_size=BS)
    yield st, r.checkpoint_id, model
    st.close()


def test_same_bytes_and_index_as_the_original_tool(saved, tmp_path, write_seed_checkpoint):
    st, cid, model = saved
    ref = write_seed_checkpoint(tmp_path / "reference", model)
    paths = st.restore(cid, tmp_path / "out", format="flat")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["weights.bin", "weights.json"]
    out = tmp_path / "out"
    assert (out / "weights.bin").read_bytes() == (ref / "weights.bin").read_bytes()
    index = json.loads((out / "weights.json").read_text())
    assert index == json.loads((ref / "weights.json").read_text())
    assert sorted(out.iterdir()) == [out / "weights.bin", out / "weights.json"]  # no leftovers


def test_index_entries(saved, tmp_path, tensor_bytes):
    st, cid, model = saved
    st.restore(cid, tmp_path / "out", format="flat")
    index = json.loads((tmp_path / "out" / "weights.json").read_text())
    blob = (tmp_path / "out" / "weights.bin").read_bytes()
    assert list(index) == sorted(model)  # back to back in sorted-name order
    offset = 0
    for name in sorted(model):
        e = index[name]
        assert set(e) == {"offset", "size", "shape", "dtype"}
        assert e["offset"] == offset
        assert e["size"] == len(tensor_bytes(model[name]))
        assert e["shape"] == list(model[name].shape)
        assert e["dtype"] == str(model[name].dtype)  # "torch.bfloat16", "torch.float8_e4m3fn"
        assert blob[offset : offset + e["size"]] == tensor_bytes(model[name])
        offset += e["size"]
    assert offset == len(blob)
    assert index["extra.flag"]["shape"] == []


def test_flat_output_is_a_valid_source_again(saved, tmp_path):
    st, cid, _ = saved
    st.restore(cid, tmp_path / "2025-01-01-0000", format="flat")
    with SeedSource(tmp_path / "2025-01-01-0000") as src:
        r = st.save(src, block_size=BS)
    assert r.unchanged and r.checkpoint_id == cid  # same bytes, same chunks


def test_restore_replaces_an_older_restore(saved, tmp_path, make_model, tensor_bytes):
    st, cid, model = saved
    old = st.save(make_model(layers=1, seed=9), block_size=BS).checkpoint_id
    out = tmp_path / "out"
    st.restore(old, out, format="flat")
    st.restore(cid, out, format="flat")
    index = json.loads((out / "weights.json").read_text())
    assert sorted(index) == sorted(model)
    assert (out / "weights.bin").stat().st_size == sum(len(tensor_bytes(t)) for t in model.values())


@pytest.mark.parametrize("after", [0, 3])
def test_failed_restore_leaves_no_output_and_old_files_untouched(
    saved, tmp_path, monkeypatch, make_model, snapshot, after
):
    st, cid, _ = saved
    out = tmp_path / "out"
    old = st.save(make_model(layers=1, seed=9), block_size=BS).checkpoint_id
    st.restore(old, out, format="flat")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    monkeypatch.setattr(st, "reader", failing_after(st, after))
    with pytest.raises(Boom):
        st.restore(cid, out, format="flat")
    assert snapshot(out) == before  # no new file, no temp file, old ones intact


def test_failed_first_restore_creates_nothing_that_looks_valid(saved, tmp_path, monkeypatch):
    st, cid, _ = saved
    monkeypatch.setattr(st, "reader", failing_after(st, 2))
    with pytest.raises(Boom):
        st.restore(cid, tmp_path / "fresh", format="flat")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_corrupt_chunk_fails_the_restore_naming_it(saved, tmp_path):
    st, cid, _ = saved
    victim = st.manifest(cid).tensors[3].chunks[0].hex()
    flip_last_byte(st, bytes.fromhex(victim))
    with pytest.raises(CorruptChunk, match=victim):
        st.restore(cid, tmp_path / "out", format="flat")
    assert not (tmp_path / "out" / "weights.json").exists()
    assert not (tmp_path / "out" / "weights.bin").exists()


def test_target_that_is_a_file(saved, tmp_path):
    st, cid, _ = saved
    (tmp_path / "file").write_text("x")
    with pytest.raises(TargetError, match="not a directory"):
        st.restore(cid, tmp_path / "file", format="flat")


def test_weights_json_is_written_after_weights_bin(saved, tmp_path, monkeypatch, make_model):
    """If weights.bin cannot be put in place, no weights.json describes it (the
    old one is gone too: it would describe the wrong bytes)."""
    from apollo_cas.targets import files as files_mod

    st, cid, _ = saved
    out = tmp_path / "out"
    old = st.save(make_model(layers=1, seed=9), block_size=BS).checkpoint_id
    st.restore(old, out, format="flat")

    def commit(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_mod.PendingFile, "commit", commit)
    with pytest.raises(Exception, match="space"):
        st.restore(cid, out, format="flat")
    assert not (out / "weights.json").exists()


def test_restore_reclaims_temporaries_of_killed_restores(tmp_path: Path) -> None:
    """A killed restore's preallocated temporary is removed by the next restore."""
    import subprocess
    import sys

    from apollo_cas import Store
    from apollo_cas.targets.files import TMP_PREFIX

    st = Store.open(tmp_path / "s", create=True)
    st.save({"w": np.arange(1000, dtype=np.float32)})
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = out / f"{TMP_PREFIX}{dead}-abcd1234-weights.bin"
    stale.write_bytes(b"x" * 4096)
    mine = out / f"{TMP_PREFIX}{os.getpid()}-abcd1234-weights.bin"  # a live process's
    mine.write_bytes(b"y")
    st.restore("latest", out, format="flat")
    assert not stale.exists() and mine.exists()
