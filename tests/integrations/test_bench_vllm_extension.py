"""benchmarks/bench_vllm_extension.py runs end to end at a tiny size on the CPU."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_runs_small_on_cpu(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("bench_vllm_extension")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "r.json"
    args = ["--size", "4MiB", "--device", "cpu", "--dir", str(tmp_path / "w"), "--out", str(out)]
    args += ["--incremental", "2", "--seconds", "0.3", "--interval", "0.1", "--matmul", "64"]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["full_save"]["ok"] and res["full_save"]["module_attributes"] > 0
    assert [r["new_chunks"] > 0 for r in res["incremental_saves"]] == [True, True]
    assert res["periodic"]["save_failures"] == 0
