"""benchmarks/bench_dense_gpu.py at a tiny size on CPU tensors: the same code the H200 runs.

Checks that both paths run from the same parent, that the GPU path's dense save is
decoded bit-exactly by today's reader, and that it stores no more than the CPU path.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_dense_gpu_small_on_cpu(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("bench_dense_gpu")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "dense.json"
    argv = ["bench_dense_gpu.py", "--device", "cpu", "--sizes", "12MiB"]
    argv += ["--batch-bytes", "4MiB,1MiB,1MiB"]  # a size twice: its first run a warm-up
    argv += ["--dir", str(tmp_path / "work"), "--out", str(out)]
    old = sys.argv
    sys.argv = argv
    try:
        bench.main()
    finally:
        sys.argv = old
    (run,) = json.loads(out.read_text())["runs"]
    gpu, cpu = run["dense_gpu"], run["dense_cpu"]
    assert gpu["sample_decodes_bit_exact"] and run["dense_gpu_step2"]["sample_decodes_bit_exact"]
    assert run["dense_gpu_step2"]["gpu_delta"]["blocks"] == gpu["gpu_delta"]["blocks"]
    assert gpu["gpu_delta"]["blocks"] > 0 and gpu["gpu_delta"]["fallback_blocks"] == 0
    assert gpu["new_chunks"] == cpu["new_chunks"] == gpu["chunks"]
    assert gpu["stored_bytes"] == cpu["stored_bytes"]  # the same chunks, byte for byte
    # The second batch size saved the same step from the same parent: the same chunks.
    small = run["dense_gpu_batch_1MiB"]
    assert small["batch_bytes"] == 1 << 20 and small["sample_decodes_bit_exact"]
    assert small["stored_bytes"] == gpu["stored_bytes"]
    assert small["gpu_delta"]["batches"] > gpu["gpu_delta"]["batches"]
    assert run["dense_gpu_batch_1MiB_again"]["stored_bytes"] == gpu["stored_bytes"]
    assert {"gather", "check", "xor_planes", "to_host"} <= set(gpu["gpu_delta"]["steps"])
    assert set(gpu["gpu_delta"]["steps_host"]) >= set(gpu["gpu_delta"]["steps"])
    assert not (tmp_path / "work").exists()
