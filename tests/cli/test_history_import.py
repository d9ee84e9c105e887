"""Importing the original tool's checkpoints never moves ``latest`` back in time,
and an interrupted history import resumes (issue 11, item 5). Through the CLI."""

from __future__ import annotations

import json
import os

import pytest

from apollo_cas.sources.seed import SeedSource
from apollo_cas.store import Store


def _list(run_cli, store) -> list[dict]:
    r = run_cli("list", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _latest(rows: list[dict]) -> dict:
    (row,) = [r for r in rows if r["latest"]]
    return row


@pytest.fixture
def history(tmp_path, write_seed, make_model):
    models = [make_model(layers=1, hidden=32, seed=s) for s in range(3)]
    return write_seed(tmp_path / "ckpts", models)


@pytest.fixture
def live(tmp_path, write_safetensors, make_model):
    """Weights saved now: newer than every checkpoint of the history (2025)."""
    return write_safetensors(make_model(layers=1, hidden=32, seed=9), tmp_path / "live.safetensors")


def test_importing_an_older_checkpoint_keeps_latest(
    history, live, tmp_store, run_cli, tmp_path, assert_same_tensors
):
    assert run_cli("save", live, "--store", tmp_store).returncode == 0
    newest = _latest(_list(run_cli, tmp_store))
    r = run_cli("save", history.dirs[0], "--store", tmp_store)
    assert r.returncode == 0, r.stderr
    rows = _list(run_cli, tmp_store)
    assert len(rows) == 2
    assert _latest(rows)["id"] == newest["id"]
    # The next restore hands back the newest weights, not the imported ones.
    out = tmp_path / "out"
    assert run_cli("restore", "--store", tmp_store, "--to", out).returncode == 0
    from safetensors.torch import load_file

    (restored,) = out.glob("*.safetensors")  # the saved file's own name (exact restore)
    assert_same_tensors(load_file(restored), load_file(live))


def test_importing_a_history_older_than_latest_keeps_latest(history, live, tmp_store, run_cli):
    assert run_cli("save", live, "--store", tmp_store).returncode == 0
    newest = _latest(_list(run_cli, tmp_store))
    r = run_cli("save", history.root, "--store", tmp_store)
    assert r.returncode == 0, r.stderr
    rows = _list(run_cli, tmp_store)
    assert len(rows) == 4
    assert _latest(rows)["id"] == newest["id"]
    assert [r["created"] for r in rows[:3]] == history.timestamps  # in time order
    # Each imported one follows the one before it in time.
    assert [r["parent"] for r in rows[:3]] == [None, rows[0]["id"], rows[1]["id"]]


def test_an_interrupted_first_import_resumes(history, live, run_cli):
    """The first use of --checkpoint-dir imported one checkpoint, then died: the
    next save imports the rest, once, and latest ends at the new save."""
    root = history.root
    with Store.open(root, create=True) as st, SeedSource(history.dirs[0]) as src:
        st.save(src, block_size=1 << 20)
    r = run_cli("save", live, "--checkpoint-dir", root, "--json")
    assert r.returncode == 0, r.stderr
    rows = _list(run_cli, root)
    seeds = [row for row in rows if row["source"]["kind"] == "seed"]
    assert [row["source"]["location"] for row in seeds] == [str(d) for d in history.dirs]
    assert _latest(rows)["source"]["kind"] == "safetensors"
    # Once more: nothing imported twice.
    again = run_cli("save", live, "--checkpoint-dir", root, "--json")
    assert again.returncode == 0, again.stderr
    assert len(_list(run_cli, root)) == len(rows)


def test_a_history_import_run_twice_records_each_checkpoint_once(history, tmp_store, run_cli):
    for _ in range(2):
        assert run_cli("save", history.root, "--store", tmp_store).returncode == 0
    assert len(_list(run_cli, tmp_store)) == 3


def test_a_checkpoint_without_a_recorded_time_is_not_newer_than_now(
    tmp_path, live, tmp_store, run_cli, write_seed_checkpoint, make_model
):
    """No meta file and a directory name that is no time: its index's mtime is
    its time, not the moment of the import."""
    d = write_seed_checkpoint(tmp_path / "exported", make_model(layers=1, seed=4))
    (d / "checkpoint-meta.json").unlink()
    os.utime(d / "weights.json", (1e9, 1e9))
    assert run_cli("save", live, "--store", tmp_store).returncode == 0
    newest = _latest(_list(run_cli, tmp_store))
    assert run_cli("save", d, "--store", tmp_store).returncode == 0
    rows = _list(run_cli, tmp_store)
    assert _latest(rows)["id"] == newest["id"]
    assert min(r["created"] for r in rows) == 1e9


def test_a_live_save_moves_latest_even_behind_a_skewed_clock(tmp_store):
    """Only a time the source recorded can be older than latest: a save stamped
    by this host's clock is the newest, whatever another host's clock said."""
    import time

    import numpy as np

    with Store.open(tmp_store, create=True) as st:
        st.save({"w": np.zeros(4, dtype=np.float32)}, created=time.time() + 3600)
        r = st.save({"w": np.ones(4, dtype=np.float32)})
        assert st.latest() == r.checkpoint_id
