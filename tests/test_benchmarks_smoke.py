"""The comparison benchmark's building blocks at a tiny size (no restic or borg needed).

Checks that each update pattern of ``benchmarks/sequences.py`` changes what it
claims to change, that the original tool's re-implemented 4 KiB diff matches a
plain block-by-block comparison, that restores are verified against the right
digests, and that the targets are judged as issue 6 states them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from apollo_cas import examples

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SIZE = 2 << 20  # 2 MiB models: every pattern, in well under a second


@pytest.fixture(scope="module")
def bench() -> Iterator[tuple[ModuleType, ModuleType, ModuleType]]:
    """benchmarks/{sequences,tools,compare}.py, imported the way compare.py imports them."""
    sys.path.insert(0, str(BENCH))
    try:
        yield (
            importlib.import_module("sequences"),
            importlib.import_module("tools"),
            importlib.import_module("compare"),
        )
    finally:
        sys.path.remove(str(BENCH))


def _versions(seqs: ModuleType, dtype: str) -> dict[str, dict[str, np.ndarray]]:
    seq = seqs.generated(SIZE, dtype)
    out = {v.label: v.weights for v in seq.versions()}
    assert tuple(out) == seq.labels == ("full", "a", "b", "c", "d")
    return out


def _changed(prev: dict[str, np.ndarray], cur: dict[str, np.ndarray]) -> set[str]:
    assert prev.keys() == cur.keys()
    return {n for n in cur if prev[n].tobytes() != cur[n].tobytes()}


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_patterns_change_what_they_claim(bench: tuple[ModuleType, ...], dtype: str) -> None:
    seqs = bench[0]
    v = _versions(seqs, dtype)
    shape = examples.ModelShape.for_bytes(SIZE, 2 if dtype == "BF16" else 4)
    want_np = np.uint16 if dtype == "BF16" else np.float32
    assert all(a.dtype == want_np for w in v.values() for a in w.values())

    # (a) only q_proj / v_proj weights of the fine-tuned layers.
    layers = seqs.finetuned_layers(shape.layers)
    assert _changed(v["full"], v["a"]) == {
        f"model.layers.{n}.self_attn.{p}.weight" for n in layers for p in ("q_proj", "v_proj")
    }
    # (b) every norm and bias, nothing else.
    changed_b = _changed(v["a"], v["b"])
    assert changed_b == {n for n in v["b"] if seqs.is_norm_or_bias(n)}
    assert any(n.endswith(".bias") for n in changed_b) and any("norm" in n for n in changed_b)
    # (c) a dense step: every tensor; a few % of bf16 elements, ~all fp32 elements.
    stats = seqs.change_stats(v["b"], v["c"])
    assert _changed(v["b"], v["c"]) == set(v["c"])
    if dtype == "BF16":
        assert 0.01 < stats["elements"] < 0.15, stats
    else:
        assert stats["elements"] > 0.99, stats
    assert stats["blocks"] == 1.0
    # (d) identical bytes.
    assert _changed(v["c"], v["d"]) == set()
    assert seqs.change_stats(v["c"], v["d"])["elements"] == 0.0


def test_bf16_is_the_cast_of_the_examples_model(bench: tuple[ModuleType, ...]) -> None:
    """The fast torch cast equals examples.to_bf16_bits, so 'full' is examples.generate's model."""
    seqs = bench[0]
    shape = examples.ModelShape.for_bytes(SIZE, 2)
    full = next(iter(seqs.generated(SIZE, "BF16").versions())).weights
    ref = examples.generate(shape, "BF16")
    for name, arr in ref.items():
        np.testing.assert_array_equal(full[name], arr)
    x = np.random.default_rng(3).standard_normal(4097).astype(np.float32) * 3
    np.testing.assert_array_equal(seqs.cast(x, "BF16"), examples.to_bf16_bits(x))


def test_change_stats_counts_blocks(bench: tuple[ModuleType, ...]) -> None:
    seqs = bench[0]
    a = {"x": np.zeros(3 * 1024, np.float32), "y": np.zeros(1000, np.float32)}  # 12 KiB + 4000 B
    b = {"x": a["x"].copy(), "y": a["y"].copy()}
    b["x"][1500] = 1.0  # second 4 KiB block of x
    b["y"][999] = 1.0  # last element of y: flat bytes 12288 + 3996 -> flat block 3
    s = seqs.change_stats(a, b, block_size=4096, flat_block=4096)
    assert s["tensors"] == 2
    assert s["elements"] == pytest.approx(2 / 4072)
    assert s["blocks"] == pytest.approx(2 / 4)  # x has 3 blocks, y has 1
    assert s["flat_blocks"] == pytest.approx(2 / 4)  # 16288 bytes -> 4 flat blocks


def test_seed_diff_matches_block_by_block(bench: tuple[ModuleType, ...]) -> None:
    tools = bench[1]
    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, 70_000 + 123, dtype=np.uint8)
    new = old.copy()
    for pos in (0, 4095, 4096, 20_000, 20_001, 70_100):
        new[pos] ^= 1
    bs = 4096
    naive = [
        i for i in range(0, len(old), bs) if old[i : i + bs].tobytes() != new[i : i + bs].tobytes()
    ]
    ranges = tools.diff_blocks(old.tobytes(), new.tobytes(), bs)
    covered = [i for s, e in ranges for i in range(s, e, bs)]
    assert covered == naive
    assert ranges[0] == (0, 2 * bs)  # contiguous changed blocks merge into one range
    assert ranges[-1][1] == len(old)  # the short last block
    assert tools.diff_blocks(old.tobytes(), old.tobytes(), bs) == []


def test_seed_method_keeps_or_deletes_and_reads_back(
    bench: tuple[ModuleType, ...], tmp_path: Path
) -> None:
    tools = bench[1]
    w = {"a.weight": torch.randn(64, 64).to(torch.bfloat16), "b.bias": torch.randn(64)}
    ck = tmp_path / "ck"
    assert tools._seed_save(w, ck, 1)["kept"] is True
    assert tools._seed_save(w, ck, 2) == {"kept": False, "changed_bytes": 0}
    w2 = dict(w, **{"b.bias": w["b.bias"] + 1})
    r = tools._seed_save(w2, ck, 3)
    assert r["kept"] is True and 0 < r["changed_bytes"] <= 4096
    back = tools._seed_load(ck)
    assert tools.digest_torch(back) == tools.digest_torch(w2)
    assert back["a.weight"].dtype == torch.bfloat16
    assert len([d for d in ck.iterdir() if d.is_dir() and not d.is_symlink()]) == 2


def test_digests_agree_across_representations(
    bench: tuple[ModuleType, ...], tmp_path: Path
) -> None:
    """numpy bf16 bit patterns, torch bf16 tensors and a safetensors file digest alike."""
    seqs, tools = bench[0], bench[1]
    w = next(iter(seqs.generated(SIZE, "BF16").versions())).weights
    path = tmp_path / "m.safetensors"
    examples.write_safetensors(w, str(path), "BF16")
    loaded = tools.load_source(path)
    assert loaded["model.norm.weight"].dtype == torch.bfloat16
    assert tools.digest_arrays(w) == tools.digest_torch(loaded) == tools.digest_safetensors(path)


def test_targets_are_judged_as_stated(bench: tuple[ModuleType, ...]) -> None:
    compare = bench[2]

    def saves(secs: list[float], sizes: list[int]) -> list[dict[str, object]]:
        return [
            {"label": lab, "seconds": s, "bytes_on_disk": b}
            for lab, s, b in zip(("full", "a", "c"), secs, sizes, strict=True)
        ]

    small, dense = {"blocks": 0.02}, {"blocks": 1.0}
    results = {
        "sequences": [
            {
                "name": "s",
                "versions": [{"changes": None}, {"changes": small}, {"changes": dense}],
                "tools": {
                    "apollo-cli": {
                        "saves": saves([1, 1, 1], [10, 11, 20]),
                        "restore": {"warm": {"seconds": 1}},
                    },
                    "restic": {
                        "saves": saves([2, 4, 2], [12, 13, 19]),
                        "restore": {"warm": {"seconds": 3}},
                    },
                },
            }
        ]
    }
    rows = compare.evaluate(results)
    by = {(r["target"], r.get("step")): r for r in rows}
    assert by[("bytes", None)]["met"] is False  # 19 < 20 after the last save
    assert by[("save", "full")]["met"] is True  # 2x, 1x needed
    assert by[("save", "a")]["need"] == 5.0 and by[("save", "a")]["met"] is False  # 4x < 5x
    assert by[("save", "c")]["need"] == 1.0  # dense: only "faster" is required
    assert by[("restore", None)]["ratio"] == 3.0 and by[("restore", None)]["met"] is True
    assert "| save | s | restic |" in "\n".join(compare.target_lines(rows))


def run_script(tmp_path: Path, script: str, *args: str, work_dir: bool = True) -> Any:
    """Run ``benchmarks/<script>`` in a subprocess with a work dir (``--dir``, unless
    ``work_dir`` is false) and a JSON output under ``tmp_path``; the JSON it wrote."""
    import json
    import subprocess

    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / script), *args]
    if work_dir:
        cmd += ["--dir", str(tmp_path / "w")]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_packs_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_packs.py at a tiny size (no S3): both formats, every save, the
    read figures and the gc figures are written, and format 2 writes few objects."""
    got = run_script(tmp_path, "bench_packs.py", "--size", "4MiB", "--no-s3")
    runs = {run["format"]: run for run in got["local"]}
    assert set(runs) == {1, 2}
    for run in runs.values():
        assert [s["save"] for s in run["saves"]] == ["full", "0.5% changed", "dense step"]
        reads = run["reads"]
        assert reads["read_path_gb_s"] > 0 and reads["one_file_same_bytes_gb_s"] > 0
        assert reads["stored_bytes"] > 0
        assert run["gc_keep_last_1"]["reclaimed_fraction_of_unreachable"] >= 0.95
    full2 = runs[2]["saves"][0]
    assert full2["objects_written"] <= full2["target_objects"]


def test_probe_restore_threads_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_restore_threads.py on a tiny CPU model: every variant's load is
    bit-exact and reports each host thread's figures."""
    got = run_script(tmp_path, "probe_restore_threads.py", "--smoke")
    assert {load["checkpoint"] for load in got["loads"]} == {"full", "dense"}
    for load in got["loads"]:
        assert load["bit_exact"] is True
        assert load["threads"]["main_cpu_s"] > 0 and load["threads"]["read_cpu_s"] > 0
    assert got["dense_saves"] and all(s["stored_bytes"] > 0 for s in got["dense_saves"])


def test_probe_pack_reads_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_pack_reads.py at a tiny size: every row read every stored byte."""
    got = run_script(
        tmp_path,
        "probe_pack_reads.py",
        "--size",
        "8MiB",
        "--threads",
        "2",
        "--windows",
        "16",
        "--repeat",
        "1",
    )
    rows = got["rows"]
    assert {"one_file_t2", "packs_whole_t2", "reader_w16_numpy_t2", "locate_w16_t2"} <= set(rows)
    whole = rows["packs_whole_t2"]["bytes"]
    assert rows["one_file_t2"]["bytes"] == whole > 0
    # the reader returns the chunks' bytes (the packs less their trailers)
    assert 0.9 * whole < rows["reader_w16_numpy_newpool_t2"]["bytes"] <= whole


def test_probe_restore_kernels_refuses_to_run_without_cuda(tmp_path: Path) -> None:
    import subprocess

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cmd = [sys.executable, str(BENCH / "probe_restore_kernels.py"), "--dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr


def test_bench_cold_restore_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_cold_restore.py on a tiny CPU model: the floors, cold and warm
    loads (bit-exact), safetensors beside them and both CPU restore targets."""
    got = run_script(
        tmp_path,
        "bench_cold_restore.py",
        *("--size", "8MiB", "--device", "cpu", "--threads", "2"),
        *("--cpu-target", str(tmp_path / "t"), "--arenas", "2"),
    )
    assert got["evict_method"] in ("drop_caches", "fadvise")
    assert got["floor_packs_cold"]["bytes"] == got["stored_pack_bytes"] > 0
    assert got["load_cold"]["bit_exact"] and got["load_warm"]["bit_exact"]
    assert got["load_cold_2_arenas"]["bit_exact"] and got["load_warm_2_arenas"]["bit_exact"]
    assert got["safetensors_cold_seconds"] > 0 and got["cold_load_over_disk_read"] > 0
    assert {"safetensors", "flat"} <= set(got["cpu_restore"])
    assert not (tmp_path / "w").exists() and not any((tmp_path / "t").iterdir())


def test_bench_gpu_hash_loads_the_kernel_modules_without_the_package(tmp_path: Path) -> None:
    """On a bare GPU box (torch and triton only) bench_gpu_hash.py loads xxh3_kernel and
    the xxh3_device it imports by path; the digests still match xxhash."""
    pytest.importorskip("triton")
    import os
    import subprocess

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_gpu_hash as b; "
        "m = b.load_kernel_by_path(); import torch, xxhash; "
        "d = torch.arange(1000, dtype=torch.int32).view(torch.uint8); "
        "got = [bytes(r.numpy()) for r in m.block_digests(d, 256)]; "
        "want = [xxhash.xxh3_128_digest(bytes(d[i:i + 256].numpy())) for i in range(0, 4000, 256)]; "
        "assert got == want, 'digests differ'; "
        "assert m.__name__ == 'apollo_cas_gpu_kernels.xxh3_kernel', m.__name__; "
        "print('ok')"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_probe_full_save_smoke_on_cpu(tmp_path: Path) -> None:
    """The full-save probe warms up first (its own store, removed) and samples the save."""
    import json
    import subprocess

    out = tmp_path / "probe.json"
    args = ["--size", "8MiB", "--device", "cpu", "--dir", str(tmp_path / "w"), "--out", str(out)]
    p = subprocess.run(
        [sys.executable, str(BENCH / "probe_full_save.py"), *args], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["warm_up_seconds"] is not None and got["wall_s"] > 0
    assert got["stored_bytes"] > 0 and "MainThread" in got["thread_cpu_s"]
    assert not (tmp_path / "w").exists()


def test_probe_dense_threads_steps_compare_alike(tmp_path: Path) -> None:
    """Every step of the dense-step probe starts from the full save's weights, so each
    A/B row stores about what the warm-up stored (stepping on from the last step, the
    deltas grew every step and later rows ran with more work than earlier ones)."""
    import json
    import subprocess

    out = tmp_path / "probe.json"
    args = ["--size", "8MiB", "--device", "cpu", "--modes", "plain", "--kernel-ab"]
    args += ["--rounds", "1", "--switch-intervals", "0.005", "--dir", str(tmp_path / "w")]
    p = subprocess.run(
        [sys.executable, str(BENCH / "probe_dense_threads.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    rows = [got["warm_up"], got["plain"], *got["switch_intervals"], *got["kernel_ab"]]
    assert len(rows) == 5 and all(r["error"] is None for r in rows)
    first = rows[0]["stored_bytes"]
    assert first > 0
    assert all(abs(r["stored_bytes"] - first) < 0.05 * first for r in rows), rows
    assert [r["kernels"] for r in got["kernel_ab"]] == [True, False]
    assert not (tmp_path / "w").exists()


def test_cpu_restore_ab_runs_each_tree_and_format(tmp_path: Path) -> None:
    """bench_cpu_restore_ab with this checkout twice at a tiny size: every tree and
    format has its rounds, and the figures are positive."""
    import json
    import subprocess

    out = tmp_path / "ab.json"
    here = str(BENCH.parent)
    args = ["--trees", f"{here},{here}", "--size", "4MiB", "--rounds", "1"]
    args += ["--dir", str(tmp_path / "w"), "--out", str(out)]
    p = subprocess.run(
        [sys.executable, str(BENCH / "bench_cpu_restore_ab.py"), *args],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    (tree,) = got["trees"]  # the same checkout twice is one tree
    assert tree == here and set(got["trees"][tree]) == {"flat", "safetensors"}
    for fmt in got["trees"][tree].values():
        assert len(fmt["runs"]) == 2 and fmt["wall_median_s"] > 0 and fmt["gb_per_s"] > 0
    assert not (tmp_path / "w").exists()


def test_cpu_restore_ab_refuses_a_tree_that_is_not_a_checkout(tmp_path: Path) -> None:
    import subprocess

    p = subprocess.run(
        [sys.executable, str(BENCH / "bench_cpu_restore_ab.py"), "--trees", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "is not a checkout of apollo_cas" in p.stderr, p.stderr


def _bench_restore(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    import json
    import os
    import subprocess

    out = tmp_path / "restore.json"
    cmd = [sys.executable, str(BENCH / "bench_restore.py"), "--dir", str(tmp_path / "w")]
    p = subprocess.run(
        [*cmd, "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (tmp_path / "w").exists()
    return json.loads(out.read_text())


@pytest.mark.parametrize("processes", ["0", "1"], ids=["threads", "processes"])
def test_bench_restore_puts_one_shard_beside_several(tmp_path: Path, processes: str) -> None:
    """--only-shards --max-shard-size: one row per size, in the order given, each
    with its shard count and one wall time per round."""
    got = _bench_restore(
        tmp_path,
        *["--size", "4MiB", "--only-shards", "--max-shard-size", "1TB,1MiB", "--shard-rounds", "2"],
        env={"APOLLO_CAS_PROCESSES": processes},
    )
    rows = got["safetensors_by_shard_size"]
    assert [r["max_shard_size"] for r in rows] == ["1TB", "1MiB"]
    assert rows[0]["shards"] == 1 and rows[1]["shards"] > 2
    for r in rows:
        assert len(r["walls_s"]) == 2 and r["best_gb_s"] > 0
        assert r["bytes"] == got["logical_bytes"]
        assert r["processes"] is (processes == "1")
    assert "read_chunk_full_gb_s" not in got  # --only-shards skips the thread scaling


def test_bench_restore_runs_every_stage_on_a_packed_store(tmp_path: Path) -> None:
    """The whole benchmark at a tiny size, shard sizes included: its chunk reads
    find chunks in packs (the default store format)."""
    got = _bench_restore(
        tmp_path, *["--size", "2MiB", "--max-shard-size", "512KiB", "--shard-rounds", "1"]
    )
    assert got["safetensors_by_shard_size"][0]["shards"] > 1
    for key in ("read_chunk_full_gb_s", "read_chunk_delta_processes_gb_s", "stage_file_read_gb_s"):
        assert all(v > 0 for v in got[key].values()), key
    assert got["restore_flat_delta_gb_s"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--max-shard-size", "1MiB,lots"], "not a positive size"),
        (["--max-shard-size", "0"], "not a positive size"),
        (["--only-shards"], "needs --max-shard-size"),
    ],
)
def test_bench_restore_refuses_bad_shard_options(args: list[str], match: str) -> None:
    import subprocess

    p = subprocess.run(
        [sys.executable, str(BENCH / "bench_restore.py"), *args], capture_output=True, text=True
    )
    assert p.returncode == 2 and match in p.stderr, p.stderr


def test_probe_cpu_restore_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_cpu_restore.py at a tiny size: every decoder (processes writing
    mapped or with pwrite, threads) restores both forms, each form's bytes alike across
    decoders, with the workers' CPU where they are processes."""
    got = run_script(
        tmp_path,
        "probe_cpu_restore.py",
        "--size",
        "4MiB",
        "--workers",
        "2",
        "--rounds",
        "1",
        "--shard-size",
        "1MiB",
        "--decoders",
        "processes,processes-pwrite,threads",
    )
    rows = {(r["format"], r["decoder"]): r for r in got["restores"]}
    decoders = ("processes", "processes-pwrite", "threads")
    assert set(rows) == {(f, d) for f in ("flat", "safetensors") for d in decoders}
    assert rows["flat", "processes-pwrite"]["workers_cpu_user_s"] > 0
    assert rows["safetensors", "threads"]["files"] > 2  # shards and their index
    assert rows["flat", "processes"]["workers_cpu_user_s"] > 0
    assert rows["flat", "threads"]["workers_cpu_user_s"] == 0
    assert got["start_up"][0]["workers"] == 2 and got["start_up"][0]["wall_s"] > 0


def test_probe_shm_writes_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_shm_writes.py with 2 MiB per process: every mode writes every byte,
    and only the fallocated mode spends time allocating first."""
    got = run_script(tmp_path, "probe_shm_writes.py", "--procs", "2", "--per-proc", str(2 << 20))
    runs = {row["mode"]: row for row in got["runs"]}
    assert "one-file-fallocated-mmap" in runs and "own-file-pwrite" in runs and len(runs) == 7
    assert all(row["writers_sys_s"] + row["writers_user_s"] > 0 for row in runs.values())
    assert all(row["bytes"] == 4 << 20 for row in runs.values())
    assert runs["one-file-fallocated-mmap"]["fallocate_s"] > 0
    assert runs["one-file-mmap"]["fallocate_s"] == 0


def test_probe_frame_sizes_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_frame_sizes.py at 4 MiB on the CPU: each frame size cuts the
    planes into the frames it should, and every frame size stores within 1% of one
    frame per plane (the frames decode: the probe decompresses them exactly)."""
    got = run_script(
        tmp_path,
        "probe_frame_sizes.py",
        "--size",
        "4MiB",
        "--frame-sizes",
        "512KiB,64KiB",
        "--threads",
        "2",
        work_dir=False,
    )
    rows = {(r["planes"], r["frame_bytes"]): r for r in got["runs"]}
    assert len(rows) == 4
    for (_, frame), row in rows.items():
        assert row["frames"] >= row["raw_bytes"] / frame
        assert 0.99 < row["stored_vs_first"] < 1.01
    full = [r for (kind, _), r in rows.items() if kind.startswith("full")]
    assert full[1]["frames"] > full[0]["frames"]


def test_probe_dense_threads_parent_batch_ab_smoke(tmp_path: Path) -> None:
    """benchmarks/probe_dense_threads.py on the CPU: the parent-batch A/B's steps run the
    GPU delta path's code (no error) at each setting, 0 being the default. (At this size
    no setting exceeds a piece; tests/gpu/test_delta_save.py tests batches that do.)"""
    got = run_script(
        tmp_path,
        "probe_dense_threads.py",
        "--size",
        "8MiB",
        "--device",
        "cpu",
        "--modes",
        "plain",
        "--rounds",
        "1",
        "--parent-batch-ab",
        "0,4MiB",
    )
    rows = got["variants"]
    assert [r["parent_batch_bytes"] for r in rows] == [None, 4 << 20]
    for r in rows:
        assert r["error"] is None and r["stored_bytes"] > 0
