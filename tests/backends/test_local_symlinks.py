"""A hostile store (copied from an untrusted machine) may hold symlinks: the local
backend never follows one, and never echoes what an unexpected object holds
(issue 11, item 16). Through the real CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

SECRET = "root:SECRET-HASH-0123456789:19000:0:99999:7:::\n"


@pytest.fixture
def saved(tmp_path, tmp_store, run_cli, write_safetensors):
    src = write_safetensors(
        {"w": torch.arange(4096, dtype=torch.float32)}, tmp_path / "m.safetensors"
    )
    r = run_cli("save", src, "--store", tmp_store, "--tag", "t1")
    assert r.returncode == 0, r.stderr
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    return Path(tmp_store), secret


def _replace_with_link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(target, path)


def _refused(r) -> None:
    assert r.returncode != 0
    assert "SECRET" not in r.stderr and "SECRET" not in r.stdout
    assert "symlink" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("ref", ["refs/series/default", "refs/tags/t1"])
def test_ref_linked_out_of_the_store(saved, run_cli, ref):
    store, secret = saved
    _replace_with_link(store / ref, secret)
    _refused(run_cli("list", "--store", store))


def test_manifest_linked_out_of_the_store(saved, run_cli, tmp_path):
    store, _ = saved
    (m,) = (store / "manifests").iterdir()
    outside = tmp_path / "elsewhere"
    shutil.copy(m, outside)  # the right bytes, but not in the store
    _replace_with_link(m, outside)
    _refused(run_cli("restore", "--store", store, "--to", tmp_path / "out"))


def test_chunk_linked_out_of_the_store(saved, run_cli, tmp_path):
    store, _ = saved
    # A chunk object (format 1) or the pack holding the chunks (format 2).
    chunk = next(
        p
        for d in ("chunks", "packs")
        if (store / d).is_dir()
        for p in (store / d).rglob("*")
        if p.is_file()
    )
    outside = tmp_path / "chunk"
    shutil.copy(chunk, outside)
    _replace_with_link(chunk, outside)
    r = run_cli("restore", "--store", store, "--to", tmp_path / "out")
    _refused(r)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ref_directory_linked_out_of_the_store(saved, run_cli, tmp_path):
    store, _ = saved
    elsewhere = tmp_path / "tags"
    elsewhere.mkdir()
    (elsewhere / "evil").write_text(SECRET)
    _replace_with_link(store / "refs" / "tags", elsewhere)
    _refused(run_cli("list", "--store", store))
    # Writes do not go through it either.
    r = run_cli("tag", "latest", "t2", "--store", store)
    assert r.returncode != 0
    assert sorted(os.listdir(elsewhere)) == ["evil"]


def test_history_import_does_not_follow_a_dated_dir_out_of_its_root(
    tmp_path, tmp_store, run_cli, write_seed, make_model
):
    root = write_seed(tmp_path / "ckpts", [make_model(layers=1, hidden=16)])
    foreign = write_seed(tmp_path / "other", [make_model(layers=1, hidden=16, seed=5)])
    os.symlink(foreign.dirs[0], root.root / "2025-03-01-1300")
    r = run_cli("save", root.root, "--store", tmp_store, "--json")
    assert r.returncode == 0, r.stderr
    assert "2025-03-01-1300" in r.stderr and "symlink" in r.stderr
    listed = run_cli("list", "--store", tmp_store, "--json")
    assert listed.returncode == 0, listed.stderr
    assert str(foreign.dirs[0]) not in listed.stdout
    assert str(root.dirs[0]) in listed.stdout
