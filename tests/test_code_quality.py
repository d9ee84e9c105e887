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


def test_a_restore_worker_imports_only_the_chunk_reader() -> None:
    """A restore starts one decode worker process per core; each imports what reads
    chunks, not the whole API (the store, the save path): ``apollo_cas`` imports its
    public names on first use."""
    code = (
        "import sys, apollo_cas.decode_worker; "
        "print(sorted(m for m in ('apollo_cas.store', 'apollo_cas.saving', "
        "'apollo_cas.restoring', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """`.ci/run`'s last command is the README's step 2, word for word."""
    readme = (ROOT / "README.md").read_text().splitlines()
    step = readme.index("# 2. run the tests")
    readme_cmd = readme[step + 1].split("&&")[-1].strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_cmds = [ln for ln in ci if ln and not ln.startswith("#")]
    assert readme_cmd.startswith("python -m pytest"), readme_cmd
    assert ci_cmds[-1] == readme_cmd


def _package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, anywhere in
    its body (lazy imports inside functions included)."""
    import ast

    pkg = ROOT / "apollo_cas"
    names = {}
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in names}
    for mod, path in names.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[mod] |= {t for t in targets if t in names and t != mod}
    return edges


def test_no_import_circle_in_the_package() -> None:
    """No module of apollo_cas reaches itself through imports, lazy ones included (a
    circle is what made store, decoding and targets hard to change one at a time).
    A package's ``__init__`` importing its own modules does not count."""
    edges = _package_imports()
    for mod in edges:
        edges[mod] = {t for t in edges[mod] if not mod.startswith(t + ".")}

    def reach(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            cur, path = stack.pop()
            for nxt in edges[cur]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for m in sorted(edges) if (c := reach(m)) is not None]
    assert not circles, f"import circle: {' -> '.join(circles[0])}"
