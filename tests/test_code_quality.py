"""Lint, format and type checks run with the tests, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by .[dev]")
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", "apollo_cas", "tests", "benchmarks")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", "apollo_cas", "tests", "benchmarks")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_package() -> None:
    pytest.importorskip("mypy")
    res = _run(sys.executable, "-m", "mypy", "apollo_cas")
    assert res.returncode == 0, res.stdout + res.stderr


def test_public_api_is_curated() -> None:
    import apollo_cas

    assert sorted(apollo_cas.__all__) == sorted(set(apollo_cas.__all__))
    for name in apollo_cas.__all__:
        assert hasattr(apollo_cas, name), name


def test_cli_start_up_does_not_import_torch() -> None:
    """list/stats/gc/verify must not pay torch's ~1.4 s import."""
    code = "import sys, apollo_cas.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """`.ci/run`'s last command is the README's step 2, word for word."""
    readme = (ROOT / "README.md").read_text().splitlines()
    step = readme.index("# 2. run the tests")
    readme_cmd = readme[step + 1].split("&&")[-1].strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_cmds = [ln for ln in ci if ln and not ln.startswith("#")]
    assert readme_cmd.startswith("python -m pytest"), readme_cmd
    assert ci_cmds[-1] == readme_cmd
