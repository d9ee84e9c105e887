"""benchmarks/bench_gpu_restore.py at a tiny size on the CPU: both store formats run,
every load is bit-exact, and the JSON says which format and reader each figure is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu_restore.py"


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """The benchmark's main() on ``args`` (after --smoke), and the JSON it wrote."""
    spec = importlib.util.spec_from_file_location("bench_gpu_restore", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    mod.main(["--smoke", *args, "--dir", str(tmp_path / "w"), "--out", str(out)])
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_gpu_restore_bench_smoke_runs_both_formats(tmp_path: Path) -> None:
    res = run_bench(tmp_path)
    (size,) = res["sizes"].values()
    assert size["safetensors_load_file_seconds"] > 0
    assert list(size["formats"]) == ["2", "1"]
    for fmt, f in size["formats"].items():
        assert f["format"] == int(fmt)
        for key in ("load_full_first_call", "load_full", "load_dense_first_call", "load_dense"):
            assert f[key]["bit_exact"] is True, (fmt, key)
            assert f[key]["phases"]["stored_bytes_read"] > 0
        assert f["hot_every_block_back"]["bit_exact"] and f["hot_forward_dense"]["bit_exact"]
    assert size["formats"]["2"]["read_floor_packs"]["chunks"] > 0
    assert size["formats"]["1"]["read_floor_files"]["chunks"] > 0


def test_gpu_restore_bench_without_safetensors(tmp_path: Path) -> None:
    (size,) = run_bench(tmp_path, "--no-safetensors", "--formats", "2")["sizes"].values()
    assert "safetensors_load_file_seconds" not in size
    assert size["formats"]["2"]["load_dense"]["bit_exact"] is True
