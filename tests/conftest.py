"""Shared fixtures: a fresh store, a generated transformer-shaped model, writers
for every source format users have (safetensors, ``.pt``, the original tool's
checkpoint directories), and ``run_cli`` for the real command line.

Fixtures that build things return plain functions, so a test can make as many
models / files as it needs. Helpers that hypothesis tests need without
fixtures live in :mod:`tests.helpers`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import helpers


@pytest.fixture
def tmp_store(tmp_path: Path) -> str:
    """Path of a store directory that does not exist yet (created by the first save)."""
    return str(tmp_path / "store")


@pytest.fixture
def make_model() -> Callable[..., dict]:
    """``make_model(layers=2, hidden=64, vocab=96, dtype=torch.bfloat16, seed=0)``:
    a dict of tensors shaped like a small decoder-only transformer."""
    return helpers.make_model


@pytest.fixture
def write_safetensors() -> Callable[..., Path]:
    """``write_safetensors(tensors, path, shards=None)``: one file, or ``shards``
    files plus ``model.safetensors.index.json`` in directory ``path``."""
    return helpers.write_safetensors


@pytest.fixture
def write_pt() -> Callable[..., Path]:
    """``write_pt(tensors, path)``: a ``torch.save`` state_dict."""
    return helpers.write_pt


@pytest.fixture
def write_seed() -> Callable[..., helpers.SeedRoot]:
    """``write_seed(root, models, half_written=False, dangling_latest=False)``: the
    original tool's checkpoint directory (timestamped dirs, ``latest`` symlink)."""
    return helpers.write_seed_root


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if k != "APOLLO_CAS_STORE"}
    full["APOLLO_CAS_NO_PROGRESS"] = "1"
    full.pop("APOLLO_CAS_DEBUG", None)
    if env:
        full.update(env)
    return full


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, env=None, prog="apollo-cas")``: run the real command line in
    a subprocess (``APOLLO_CAS_NO_PROGRESS=1``; ``APOLLO_CAS_STORE`` unset unless
    ``env`` sets it). ``prog="apollo-checkpoint"`` runs the compatibility entry point."""

    def run(*args: object, env: dict[str, str] | None = None, prog: str = "apollo-cas",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if prog == "apollo-cas":
            cmd = [sys.executable, "-m", "apollo_cas.cli.main"]
        elif prog == "apollo-checkpoint":
            cmd = [sys.executable, "-c", "from apollo_cas.cli.seed_compat import main; main()"]
        else:
            raise ValueError(prog)
        return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True,
                              env=_cli_env(env), timeout=timeout, check=False)

    return run


@pytest.fixture
def snapshot() -> Callable[[str | Path], dict[str, bytes]]:
    """``snapshot(dir)``: every file under ``dir`` with its bytes (to prove a failed
    command left a store as it was)."""
    return helpers.snapshot
