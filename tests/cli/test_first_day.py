"""A newcomer's first day (issue 12), through the real command line: stores
recognised as stores, hints that fit the front end, a demo that touches no
real store, prefixes, where the store came from, ``--json`` on every command
and for errors, and the summaries of commands over several items."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from apollo_cas.store import Store

CHANGED = "model.layers.1.self_attn.q_proj.weight"
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "apollo_cas.cli.main"]


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    return res


def as_json(res: subprocess.CompletedProcess[str]):
    return json.loads(ok(res).stdout)


def one_error(res: subprocess.CompletedProcess[str], code: int) -> str:
    """Failed with ``code`` and exactly one ``error:`` line on stderr; returns it."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def models(make_model):
    a = make_model(layers=2, hidden=128, seed=0)
    b = dict(a)
    b[CHANGED] = a[CHANGED].clone()
    b[CHANGED][0, :4] += 1  # a few elements: the block is stored as a small XOR delta
    c = dict(b)
    c[CHANGED] = b[CHANGED].clone()
    c[CHANGED][1, :4] += 1
    return a, b, c


@pytest.fixture(scope="module")
def files(models, fast_mkdtemp, write_safetensors):
    d = fast_mkdtemp("first-day-files")
    for name, m in zip("abc", models, strict=True):
        write_safetensors(m, d / f"{name}.safetensors")
    (d / "notes.txt").write_text("these are not weights\n")
    data = (d / "a.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return d


def save(run_cli, store, *sources, **kw):
    args = ["save", *sources, "--store", store, "--block-size", "64K"]
    return run_cli(*args, *kw.pop("extra", ()), **kw)


@pytest.fixture(scope="module")
def three_built(files, fast_mkdtemp, run_cli):
    """A store with a (tagged base), b, c saved in that order; returns (store, ids)."""
    store = fast_mkdtemp("first-day-store") / "store"
    ids = []
    for i, name in enumerate("abc"):
        extra = ["--tag", "base"] if i == 0 else []
        r = as_json(save(run_cli, store, files / f"{name}.safetensors", extra=[*extra, "--json"]))
        ids.append(r["checkpoint"])
    return store, ids


@pytest.fixture
def three(three_built, fast_tmp_dir):
    """A private copy of :func:`three_built` (commands may change it)."""
    src, ids = three_built
    dst = fast_tmp_dir / "store"
    shutil.copytree(src, dst, symlinks=True)
    return dst, ids


# ---------------------------------------------------------------------------
# a store is recognised as a store


def test_apollo_checkpoint_list_of_a_store_reports_no_broken_checkpoints(files, seed_root, run_cli):
    root = seed_root.root
    ok(run_cli("save", files / "a.safetensors", "--checkpoint-dir", root))  # DIR becomes the store
    res = ok(run_cli("list", "--checkpoint-dir", root, prog="apollo-checkpoint"))
    for own in ("chunks", "manifests", "refs", "locks"):
        assert own not in res.stderr and own not in res.stdout, res
    assert "← latest" in res.stdout
    # the same directory named as a source and as the store: no "skipped DIR/chunks"
    res = ok(run_cli("save", root, "--store", root))
    assert "chunks" not in res.stderr and "manifests" not in res.stderr, res.stderr


def test_apollo_checkpoint_list_of_a_plain_store(three, run_cli):
    store, ids = three
    res = ok(run_cli("list", "--checkpoint-dir", store, prog="apollo-checkpoint"))
    assert res.stderr == ""
    assert all(i[:12] in res.stdout for i in ids)


def test_a_store_named_as_a_source_is_a_usage_error(three, tmp_path, run_cli, snapshot):
    store, _ = three
    other = tmp_path / "other"
    before = snapshot(store)
    err = one_error(run_cli("save", store, "--store", other), 2)
    assert "is an apollo_cas store" in err and "--store" in err
    assert snapshot(store) == before and not other.exists()


@pytest.fixture
def seed_root(models, fast_tmp_dir, write_seed):
    return write_seed(fast_tmp_dir / "checkpoints", list(models[:2]))


# ---------------------------------------------------------------------------
# hints fit the front end


def _handles_file(path: Path, pid: int) -> Path:
    """A handles file as reduce_tensor writes it, for a made-up CUDA tensor of ``pid``."""
    shape = (4, 8)
    args = (
        torch.nn.Parameter,
        torch.Size(shape),
        (8, 1),
        0,
        torch.storage.TypedStorage,
        torch.bfloat16,
        0,
        b"\x01c" + b"\x07" * 64,
        64,
        0,
        True,
        f"/torch_{pid}_12345_0".encode(),
        0,
        b"",
        False,
    )
    torch.save({"model.norm.weight": {"handle": (rebuild_cuda_tensor, args)}}, path)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _options_named(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))


COMPAT_OPTIONS = {"--handles", "--checkpoint-dir", "--block-size"}


def test_apollo_checkpoint_hints_suggest_only_its_own_options(files, tmp_path, run_cli):
    dead = _handles_file(tmp_path / "dead.pt", _dead_pid())
    for f in (dead, files / "notes.txt"):
        res = run_cli(
            "save", "--handles", f, "--checkpoint-dir", tmp_path / "ck", prog="apollo-checkpoint"
        )
        err = one_error(res, 1)
        foreign = _options_named(err) - COMPAT_OPTIONS
        # an option apollo-checkpoint lacks appears only as part of the apollo-cas command
        # that has it
        for opt in foreign:
            assert f"apollo-checkpoint has no {opt}" in err or "apollo-cas save" in err, err
        assert not (tmp_path / "ck").exists()
    # apollo-cas itself offers the option plainly
    err = one_error(run_cli("save", "--handles", dead, "--store", tmp_path / "s"), 1)
    assert "pass --no-owner-check" in err and "has no" not in err


# ---------------------------------------------------------------------------
# the demo


def test_demo_refuses_a_real_store_and_leaves_it_alone(three, run_cli, snapshot):
    store, _ = three
    before = snapshot(store)
    err = one_error(run_cli("demo", "--store", store, "--size", "9MiB"), 1)
    assert "not the demo's" in err
    assert snapshot(store) == before


def test_demo_refuses_a_non_empty_directory(tmp_path, run_cli):
    (tmp_path / "mine.txt").write_text("x")
    err = one_error(run_cli("demo", "--store", tmp_path, "--size", "9MiB"), 1)
    assert "not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_demo_sizes_below_the_minimum_are_refused_with_it(run_cli):
    err = one_error(run_cli("demo", "--size", "10"), 2)
    assert "smallest example model" in err and "8.0 MiB" in err


def test_demo_json_at_the_smallest_size_shows_changes_and_cleans_up(tmp_path, run_cli):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = as_json(run_cli("demo", "--size", "8424960", "--json", env={"TMPDIR": str(tmp)}))
    assert [s["unchanged"] for s in out["saves"]] == [False, False, False, True]
    assert all(s["new_chunks"] > 0 for s in out["saves"][1:3])
    assert out["diff"]["tensors_changed"] == 4
    assert out["restore"]["bit_exact"] is True
    assert list(tmp.iterdir()) == []  # nothing left behind in the temporary directory
    # a demo store can be run into again
    st = tmp_path / "demo-store"
    ok(run_cli("demo", "--size", "9MiB", "--store", st))
    again = as_json(run_cli("demo", "--size", "9MiB", "--store", st, "--json"))
    assert again["kept"] is True and (st / "config").is_file()


# ---------------------------------------------------------------------------
# refs, names and the store's location


def test_any_unique_prefix_resolves(three, run_cli):
    store, ids = three
    k = next(k for k in range(1, 33) if sum(i.startswith(ids[1][:k]) for i in ids) == 1)
    assert k <= 3  # the data is fixed: this store's ids differ early
    row = as_json(run_cli("stats", ids[1][:k], "--store", store, "--json"))
    assert row["id"] == ids[1]


def test_tag_names_in_ref_syntax_are_refused(three, files, run_cli, snapshot):
    store, _ = three
    before = snapshot(store)
    err = one_error(run_cli("tag", "latest", "latest@foo", "--store", store), 2)
    assert "latest@foo" in err
    err = one_error(save(run_cli, store, files / "a.safetensors", extra=["--tag", "latest@x"]), 2)
    assert snapshot(store) == before


def test_errors_name_the_environment_variable_when_it_set_the_store(tmp_path, run_cli):
    env = {"APOLLO_CAS_STORE": str(tmp_path / "nope")}
    err = one_error(run_cli("list", env=env), 1)
    assert "$APOLLO_CAS_STORE" in err and "--store" not in err
    err = one_error(run_cli("list", "--store", tmp_path / "nope"), 1)
    assert "--store" in err and "APOLLO_CAS_STORE" not in err


def test_store_naming_a_file(files, run_cli):
    err = one_error(run_cli("list", "--store", files / "notes.txt"), 1)
    assert "is a file, not an apollo_cas store" in err and "directory" in err
    err = one_error(
        run_cli(
            "save", files / "a.safetensors", env={"APOLLO_CAS_STORE": str(files / "notes.txt")}
        ),
        1,
    )
    assert "$APOLLO_CAS_STORE" in err


def test_text_or_random_file_as_handles_is_not_a_handles_file(files, tmp_path, run_cli):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(range(215, 256)) * 100)
    for f in (files / "notes.txt", rnd):
        err = one_error(run_cli("save", "--handles", f, "--store", tmp_path / "s"), 1)
        assert "is not a handles file" in err and "refused to load" not in err, err


def test_no_gpu_error_does_not_print_none(tmp_path, run_cli):
    f = _handles_file(tmp_path / "live.pt", os.getpid())  # this test process: alive
    err = one_error(run_cli("save", "--handles", f, "--store", tmp_path / "s"), 1)
    assert "GPU" in err and "=None" not in err, err


# ---------------------------------------------------------------------------
# --json everywhere, errors under --json, exit codes


COMMANDS = ["save", "restore", "list", "stats", "diff", "gc", "verify", "tag", "forget", "unlock"]


def test_every_command_has_json(run_cli):
    for cmd in [*COMMANDS, "demo"]:
        assert "--json" in ok(run_cli(cmd, "--help")).stdout, cmd


@pytest.mark.parametrize(
    "args,code,kind",
    [
        (["restore", "nosuchtag", "--to", "{tmp}/out"], 1, "RefNotFound"),
        (["list", "--store", "{tmp}/missing"], 1, "StoreNotFound"),
        (["list", "--frobnicate"], 2, "UsageError"),
        (["tag", "latest", "a/b"], 2, "InvalidName"),
        (["tag", "{a}", "base"], 1, "Refused"),
        (["forget", "base"], 1, "Refused"),
    ],
    ids=["not-found", "no-store", "bad-option", "bad-name", "tag-taken", "forget-tagged"],
)
def test_errors_under_json(three, tmp_path, run_cli, args, code, kind):
    store, ids = three
    args = [a.format(tmp=tmp_path, a=ids[1]) for a in args]
    if "--store" not in args:
        args += ["--store", str(store)]
    res = run_cli(*args, "--json")
    assert res.returncode == code, res
    doc = json.loads(res.stdout)  # one JSON document on stdout
    assert doc["error"]["type"] == kind and doc["error"]["exit_code"] == code
    assert doc["error"]["message"] and res.stderr.strip()  # and the line on stderr
    if kind != "UsageError":
        assert len(res.stderr.strip().splitlines()) == 1


def test_help_and_readme_give_the_exit_code_table(run_cli):
    text = ok(run_cli("--help")).stdout
    readme = (ROOT / "README.md").read_text()
    for code in ("0 success", "1 error", "2 usage", "3 verify", "143"):
        assert code in text, code
    for code in ("0 success", "1 error", "2 usage error", "3 `verify`", "143"):
        assert code in readme, code


def test_readme_command_summary_lists_every_option(run_cli):
    readme = (ROOT / "README.md").read_text()
    summary = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert "latest@SERIES" in summary
    for cmd in [*COMMANDS, "demo"]:
        options = ok(run_cli(cmd, "--help")).stdout.split("Options:", 1)[1]
        for opt in _options_named(options) - {"--help"}:
            lines = " ".join(
                ln for ln in summary.split("apollo-cas ")[1:] if ln.startswith(cmd + " ")
            )
            assert opt in lines, (cmd, opt)


def test_readme_shows_the_comparison_plot_before_the_tables():
    readme = (ROOT / "README.md").read_text()
    assert "benchmarks/results/compare.png" in readme
    assert readme.index("compare.png") < readme.index("## Measured")


# ---------------------------------------------------------------------------
# list, stats and gc explain themselves


def test_list_separates_dedup_from_compression(three, run_cli):
    store, _ = three
    rows = as_json(run_cli("list", "--store", store, "--json"))
    first = rows[0]
    assert first["new_raw_bytes"] == first["logical_bytes"]  # every block was new ...
    assert first["dedup_ratio"] == 1.0  # ... so no dedup, whatever the compression
    assert first["compression_ratio"] > 1.0
    for r in rows:
        assert r["dedup_ratio"] == pytest.approx(r["logical_bytes"] / r["new_raw_bytes"])
        assert r["compression_ratio"] == pytest.approx(r["new_raw_bytes"] / r["new_stored_bytes"])
    header = ok(run_cli("list", "--store", store)).stdout.splitlines()[0].split()
    assert header[4:9] == ["SIZE", "NEW", "STORED", "DEDUP", "COMPR"]


def test_gc_dry_run_lists_what_it_keeps_and_why_and_stats_explains_delta_bases(
    three, run_cli, snapshot
):
    store, ids = three
    ok(run_cli("tag", "--delete", "base", "--store", store))  # tag --delete needs no dummy REF
    before = snapshot(store)
    dry = ok(run_cli("gc", "--keep-last", "1", "--dry-run", "--store", store)).stdout
    assert "KEPT BY" in dry and f"{ids[2][:12]}" in dry and "last 1" in dry
    assert "latest of default" in dry
    assert snapshot(store) == before
    res = ok(run_cli("gc", "--keep-last", "1", "--store", store))
    assert "XOR deltas" in res.stderr  # why little was freed
    s = as_json(run_cli("stats", "--store", store, "--json"))
    assert s["base_only_chunks"] >= 1 and s["base_only_stored_bytes"] > 0
    assert s["compression_ratio"] > 1.0  # no longer dragged below 1 by base-only chunks
    assert s["deduplicated_bytes"] <= s["compressed_bytes"]
    text = ok(run_cli("stats", "--store", store)).stdout
    assert "delta bases" in text and "compressed" in text and "deduplicated" in text


# ---------------------------------------------------------------------------
# saying what happened


def test_first_save_says_it_created_the_store_and_refuses_a_foreign_directory(
    files, tmp_path, run_cli
):
    new = tmp_path / "new-store"
    res = ok(run_cli("save", files / "a.safetensors", "--store", new))
    assert f"created store at {new}" in res.stderr
    res = ok(run_cli("save", files / "b.safetensors", "--store", new))
    assert "created" not in res.stderr
    busy = tmp_path / "home"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    err = one_error(run_cli("save", files / "a.safetensors", "--store", busy), 1)
    assert "not empty" in err and "--force" in err
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]
    ok(run_cli("save", files / "a.safetensors", "--store", busy, "--force"))
    assert (busy / "config").is_file()
    # what an interrupted first save leaves (its chunks, no config) is no one's files
    half = tmp_path / "half"
    (half / "chunks" / "ab").mkdir(parents=True)
    ok(run_cli("save", files / "a.safetensors", "--store", half))


def test_restore_says_what_it_replaced(three, tmp_path, run_cli):
    store, _ = three
    out = tmp_path / "out"
    first = ok(run_cli("restore", "--store", store, "--to", out, "--format", "flat"))
    assert "replaced" not in first.stderr
    (out / "weights.bin").chmod(0o444)
    res = as_json(run_cli("restore", "--store", store, "--to", out, "--format", "flat", "--json"))
    assert sorted(Path(p).name for p in res["replaced"]) == ["weights.bin", "weights.json"]
    text = ok(run_cli("restore", "--store", store, "--to", out, "--format", "flat"))
    assert f"replaced {out / 'weights.bin'}" in text.stderr


def test_training_checkpoint_notes_what_was_left_out(tmp_path, run_cli, write_pt):
    pt = tmp_path / "train.pt"
    torch.save(
        {
            "model": {"w": torch.ones(4)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": []},
            "epoch": 3,
        },
        pt,
    )
    res = ok(run_cli("save", pt, "--store", tmp_path / "s"))
    # The optimizer holds tensors, so the wrapper is not the whole content and
    # nothing with tensors is dropped (issue 11, item 3): it is saved under its
    # prefix; what is not a tensor is named as left out.
    assert "epoch" in res.stderr and "not saved" in res.stderr
    from apollo_cas import Store

    with Store.open(tmp_path / "s") as st:
        names = {t.name for t in st.manifest(st.resolve("latest")).tensors}
    assert names == {"model.w", "optimizer.state.0.exp_avg"}


def test_several_sources_one_bad_saves_the_others_and_summarises(files, tmp_path, run_cli):
    store = tmp_path / "s"
    a, t, b = files / "a.safetensors", files / "truncated.safetensors", files / "b.safetensors"
    res = run_cli("save", a, t, b, "--store", store)
    assert res.returncode == 1
    assert "saved" in res.stdout and str(a) in res.stdout and str(b) in res.stdout
    err = res.stderr.splitlines()
    assert any(ln.startswith("failed: ") and "truncated" in ln for ln in err), res.stderr
    assert err[-1].startswith("error: 1 of 3 sources failed") and str(b) in err[-1]
    with Store.open(store) as st:
        assert len(st.checkpoint_ids()) == 2
    doc = json.loads(run_cli("save", a, t, "--store", tmp_path / "s2", "--json").stdout)
    assert [r["unchanged"] for r in doc["results"]] == [False]
    assert doc["failed"][0]["source"] == str(t) and doc["error"]["exit_code"] == 1


def test_forget_of_several_refs_goes_past_a_bad_one(three, run_cli):
    store, ids = three
    res = run_cli("forget", "nosuchref", ids[1][:12], "--store", store)
    assert res.returncode == 1
    assert f"forgot {ids[1][:12]}" in res.stdout
    assert res.stderr.splitlines()[-1].startswith("error: 1 of 2 refs failed (nosuchref)")
    with Store.open(store) as st:
        assert ids[1] not in st.checkpoint_ids()


def test_save_checkpoint_dir_without_source_imports(seed_root, run_cli):
    res = run_cli("save", "--checkpoint-dir", seed_root.root, "--json")
    results = as_json(res)
    assert len(results) == len(seed_root.dirs)
    assert f"created store at {seed_root.root}" in res.stderr
    again = ok(run_cli("save", "--checkpoint-dir", seed_root.root))
    assert "nothing new to import" in again.stdout


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Linux: ``SigCgt`` in its status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_prints_one_line_exits_143_and_releases_its_lock(three, files, run_cli):
    store, _ = three
    # An exclusive lock of this (live) process makes the save wait: a quiet moment
    # to deliver SIGTERM in, whatever the machine's speed.
    with Store.open(store) as st, st.locks.hold("exclusive", "test holds the store"):
        before = sorted(p.name for p in (store / "locks").iterdir())
        env = {k: v for k, v in os.environ.items() if k != "APOLLO_CAS_STORE"}
        p = subprocess.Popen(
            [*CLI, "save", str(files / "b.safetensors"), "--store", str(store), "--force"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        # Deliver it once the save is waiting: its SIGTERM handler is installed (the
        # kernel lists the signal as caught; before that a signal kills Python without a
        # word) and a lock attempt came and went in locks/ (start-up takes a second or
        # two; on a loaded machine much longer, and its lock wait gives up after 60 s).
        deadline = time.time() + 50
        while time.time() < deadline and p.poll() is None and not catches_sigterm(p.pid):
            time.sleep(0.01)
        seen_by = time.time() + 5
        while time.time() < seen_by and p.poll() is None:
            if set(os.listdir(store / "locks")) - set(before):
                break
            time.sleep(0.002)
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 143, (p.returncode, out, err)
        assert err.strip().startswith("terminated") and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in (store / "locks").iterdir()) == before
