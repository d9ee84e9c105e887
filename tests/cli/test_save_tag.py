"""``save --tag NAME`` never moves an existing tag (``apollo-cas tag`` needs
``--force`` for that): it refuses before anything is saved (issue 11, item 4)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def two_models(tmp_path, write_safetensors):
    a = {"w": torch.arange(2048, dtype=torch.float32)}
    b = {"w": torch.arange(2048, dtype=torch.float32) + 1}
    return (
        write_safetensors(a, tmp_path / "a" / "model.safetensors"),
        write_safetensors(b, tmp_path / "b" / "model.safetensors"),
    )


def _state(run_cli, store):
    r = run_cli("list", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_save_tag_refuses_to_move_an_existing_tag(tmp_store, run_cli, two_models):
    a, b = two_models
    assert run_cli("save", a, "--store", tmp_store, "--tag", "release").returncode == 0
    assert run_cli("save", b, "--store", tmp_store).returncode == 0
    before = _state(run_cli, tmp_store)
    r = run_cli("save", a, "--store", tmp_store, "--tag", "release")  # a new checkpoint
    assert r.returncode == 1
    assert (
        r.stderr.startswith("error: tag 'release' already names")
        and "nothing was saved" in r.stderr
    )
    assert r.stderr.count("\n") == 1
    assert _state(run_cli, tmp_store) == before  # no checkpoint added, latest and tag unmoved


def test_save_tag_refuses_even_when_it_names_the_latest(tmp_store, run_cli, two_models):
    """The tag names the parent, and this save adds a checkpoint: still a move."""
    a, b = two_models
    assert run_cli("save", a, "--store", tmp_store, "--tag", "release").returncode == 0
    before = _state(run_cli, tmp_store)
    r = run_cli("save", b, "--store", tmp_store, "--tag", "release")
    assert r.returncode == 1, r.stderr
    assert _state(run_cli, tmp_store) == before


def test_save_tag_of_an_unchanged_save_is_a_no_op(tmp_store, run_cli, two_models):
    a, _ = two_models
    assert run_cli("save", a, "--store", tmp_store, "--tag", "release").returncode == 0
    before = _state(run_cli, tmp_store)
    r = run_cli("save", a, "--store", tmp_store, "--tag", "release")
    assert r.returncode == 0, r.stderr
    assert _state(run_cli, tmp_store) == before


def test_save_tag_with_several_sources_saves_none_of_them(tmp_store, run_cli, two_models, tmp_path):
    a, b = two_models
    assert run_cli("save", a, "--store", tmp_store, "--tag", "release").returncode == 0
    assert run_cli("save", b, "--store", tmp_store).returncode == 0  # tag now names the parent
    before = _state(run_cli, tmp_store)
    r = run_cli("save", a, b, "--store", tmp_store, "--tag", "release", "--force")
    assert r.returncode == 1, r.stderr
    assert _state(run_cli, tmp_store) == before


def test_tag_command_still_moves_with_force(tmp_store, run_cli, two_models):
    a, b = two_models
    assert run_cli("save", a, "--store", tmp_store, "--tag", "release").returncode == 0
    assert run_cli("save", b, "--store", tmp_store).returncode == 0
    assert run_cli("tag", "latest", "release", "--store", tmp_store).returncode != 0
    assert run_cli("tag", "latest", "release", "--force", "--store", tmp_store).returncode == 0
