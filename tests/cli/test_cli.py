"""The command line through a real subprocess: every command, ``--json``, exit
codes, one-line errors, and a store left exactly as it was by a failed command."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from safetensors import safe_open

from apollo_cas.store import Store

CHANGED = "model.layers.1.self_attn.q_proj.weight"
SAVE_KEYS = {
    "checkpoint",
    "parent",
    "series",
    "unchanged",
    "seconds",
    "logical_bytes",
    "chunks",
    "new_chunks",
    "new_raw_bytes",
    "new_stored_bytes",
}
ROW_KEYS = {
    "id",
    "created",
    "series",
    "tags",
    "latest",
    "tensors",
    "logical_bytes",
    "new_chunks",
    "new_stored_bytes",
    "dedup_ratio",
    "source",
    "parent",
}
STATS_KEYS = {
    "checkpoints",
    "logical_bytes",
    "unique_chunks",
    "unique_raw_bytes",
    "stored_bytes",
    "stored_chunks",
    "unreferenced_chunks",
    "dedup_ratio",
    "compression_ratio",
    "total_ratio",
    "per_checkpoint",
}
DIFF_KEYS = {
    "a",
    "b",
    "tensors_total",
    "tensors_changed",
    "bytes_changed",
    "bytes_total",
    "changes",
}
CHANGE_KEYS = {"name", "status", "blocks_changed", "blocks_total", "bytes_changed", "nbytes"}


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res


def as_json(res: subprocess.CompletedProcess[str]):
    ok(res)
    return json.loads(res.stdout)  # stdout holds the result and nothing else


def fails(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command failed with ``code`` and one line on stderr naming ``words``."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 1:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    assert res.stdout == "", res.stdout
    return err


@pytest.fixture(scope="module")
def models(make_model):
    a = make_model(layers=2, hidden=128, seed=0)
    b = dict(a)
    b[CHANGED] = a[CHANGED] + 1
    return a, b


@pytest.fixture(scope="module")
def files(models, fast_mkdtemp, write_safetensors):
    d = fast_mkdtemp("cli-files")
    a, b = models
    write_safetensors(a, d / "a.safetensors")
    write_safetensors(b, d / "b.safetensors")
    (d / "notes.txt").write_text("these are not weights\n")
    data = (d / "a.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return d


@pytest.fixture(scope="module")
def populated(files, fast_mkdtemp, run_cli):
    """A store with a (tagged 'base', --meta step=1) then b, saved through the CLI."""
    store = fast_mkdtemp("cli-store") / "store"
    ra = as_json(
        run_cli(
            "save",
            files / "a.safetensors",
            "--store",
            store,
            "--tag",
            "base",
            "--meta",
            "step=1",
            "--block-size",
            "64K",
            "--json",
        )
    )
    rb = as_json(
        run_cli("save", files / "b.safetensors", "--store", store, "--block-size", "64K", "--json")
    )
    return store, ra["checkpoint"], rb["checkpoint"]


@pytest.fixture
def store_copy(populated, fast_tmp_dir):
    """A private copy of the populated store (for commands that may change it)."""
    src, a, b = populated
    dst = fast_tmp_dir / "store"
    shutil.copytree(src, dst, symlinks=True)
    return dst, a, b


def chunk_files(store: Path) -> list[Path]:
    return [p for p in (store / "chunks").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------
# the commands


def test_help_explains_every_command(run_cli):
    out = ok(run_cli("--help")).stdout
    for cmd in ("save", "restore", "list", "stats", "diff", "tag"):
        assert cmd in out
    text = ok(run_cli("save", "--help")).stdout
    for option in ("--store", "--json", "--tag", "--block-size", "--handles", "--checkpoint-dir"):
        assert option in text


def test_save_json_dedup_and_force(files, tmp_store, run_cli, snapshot):
    a, b = files / "a.safetensors", files / "b.safetensors"
    first = as_json(run_cli("save", a, "--store", tmp_store, "--block-size", "64K", "--json"))
    assert set(first) >= SAVE_KEYS
    assert first["unchanged"] is False and first["parent"] is None
    assert first["series"] == "default"
    assert first["new_chunks"] == first["chunks"] > 0
    assert len(first["checkpoint"]) == 32

    before = snapshot(tmp_store)
    res = run_cli("save", a, "--store", tmp_store, "--block-size", "64K", "--json")
    again = as_json(res)
    assert again["unchanged"] is True
    assert again["checkpoint"] == first["checkpoint"]
    assert again["new_chunks"] == 0
    assert snapshot(tmp_store) == before  # nothing written, no checkpoint added

    human = ok(run_cli("save", a, "--store", tmp_store, "--block-size", "64K"))
    assert "no changes" in human.stdout and human.stderr == ""

    changed = as_json(run_cli("save", b, "--store", tmp_store, "--block-size", "64K", "--json"))
    assert changed["parent"] == first["checkpoint"]
    assert changed["new_chunks"] == 1  # only the block of the changed q_proj

    forced = as_json(
        run_cli("save", a, "--store", tmp_store, "--block-size", "64K", "--force", "--json")
    )
    assert forced["unchanged"] is False and forced["new_chunks"] == 0
    assert forced["parent"] == changed["checkpoint"]

    human = ok(run_cli("save", b, "--store", tmp_store, "--block-size", "64K"))
    assert "saved" in human.stdout and human.stderr == ""
    with Store.open(tmp_store) as st:
        assert len(st.checkpoint_ids()) == 4


def test_list(populated, run_cli):
    store, a, b = populated
    rows = as_json(run_cli("list", "--store", store, "--json"))
    assert [r["id"] for r in rows] == [a, b]
    for r in rows:
        assert set(r) >= ROW_KEYS
    assert rows[0]["tags"] == ["base"] and rows[0]["latest"] is False
    assert rows[1]["latest"] is True and rows[1]["parent"] == a
    assert rows[0]["source"]["kind"] == "safetensors"
    assert rows[0]["source"]["metadata"] == {"step": "1"}
    assert rows[1]["new_chunks"] == 1
    text = ok(run_cli("list", "--store", store)).stdout
    assert a[:12] in text and b[:12] in text and "base" in text and "latest" in text


def test_stats(populated, run_cli, tensor_bytes, models):
    store, a, b = populated
    s = as_json(run_cli("stats", "--store", store, "--json"))
    assert set(s) >= STATS_KEYS
    size = sum(len(tensor_bytes(t)) for t in models[0].values())
    # Chunk objects (format 1) or packs (format 2): what the chunks cost on disk.
    objects = chunk_files(store) + [p for p in (store / "packs").rglob("*") if p.is_file()]
    assert s["checkpoints"] == 2
    assert s["logical_bytes"] == 2 * size
    assert s["stored_chunks"] == s["unique_chunks"]
    assert s["stored_bytes"] == sum(p.stat().st_size for p in objects)
    assert s["unreferenced_chunks"] == 0
    assert s["dedup_ratio"] > 1.9
    assert [r["id"] for r in s["per_checkpoint"]] == [a, b]

    one = as_json(run_cli("stats", "base", "--store", store, "--json"))
    assert set(one) >= ROW_KEYS and one["id"] == a
    text = ok(run_cli("stats", "--store", store)).stdout
    assert "dedup ratio" in text


def test_diff(populated, run_cli):
    store, a, b = populated
    d = as_json(run_cli("diff", "base", "latest", "--store", store, "--json"))
    assert set(d) >= DIFF_KEYS
    assert (d["a"], d["b"]) == (a, b)
    assert d["tensors_changed"] == 1
    (change,) = d["changes"]
    assert set(change) >= CHANGE_KEYS
    assert change["name"] == CHANGED and change["status"] == "changed"
    assert change["blocks_changed"] == 1
    text = ok(run_cli("diff", a[:8], b[:8], "--store", store)).stdout
    assert CHANGED in text and "1 of" in text


def test_restore(populated, run_cli, models, tmp_path, assert_same_tensors, tensor_bytes):
    store, a, b = populated
    out = as_json(
        run_cli("restore", "--store", store, "--to", tmp_path / "st", "--json")
    )  # default: latest, safetensors
    assert {"checkpoint", "files", "bytes", "seconds"} <= set(out)
    assert out["checkpoint"] == b
    assert out["files"] == [str(tmp_path / "st" / "model.safetensors")]
    with safe_open(out["files"][0], "pt") as f:
        assert_same_tensors({k: f.get_tensor(k) for k in f.keys()}, models[1])  # noqa: SIM118

    flat = as_json(
        run_cli(
            "restore",
            a[:10],
            "--store",
            store,
            "--to",
            tmp_path / "flat",
            "--format",
            "flat",
            "--json",
        )
    )
    assert [Path(p).name for p in flat["files"]] == ["weights.bin", "weights.json"]
    index = json.loads((tmp_path / "flat" / "weights.json").read_text())
    blob = (tmp_path / "flat" / "weights.bin").read_bytes()
    for name, t in models[0].items():
        e = index[name]
        assert e["dtype"] == "torch.bfloat16"
        assert blob[e["offset"] : e["offset"] + e["size"]] == tensor_bytes(t)

    text = ok(run_cli("restore", "base", "--store", store, "--to", tmp_path / "h"))
    assert text.stdout.startswith(f"restored {a[:12]}") and text.stderr == ""


def test_tag(store_copy, run_cli, snapshot):
    store, a, b = store_copy
    t = as_json(run_cli("tag", "latest", "release", "--store", store, "--json"))
    assert t == {"tag": "release", "checkpoint": b, "deleted": False}
    before = snapshot(store)
    fails(run_cli("tag", a, "release", "--store", store), 2, "already names", "--force")
    assert snapshot(store) == before
    moved = as_json(run_cli("tag", a[:8], "release", "--store", store, "--force", "--json"))
    assert moved["checkpoint"] == a
    ok(run_cli("tag", "-", "release", "--store", store, "--delete"))
    rows = as_json(run_cli("list", "--store", store, "--json"))
    assert [r["tags"] for r in rows] == [["base"], []]
    before = snapshot(store)
    fails(run_cli("tag", "-", "release", "--store", store, "--delete"), 1, "release")
    assert snapshot(store) == before


def test_store_from_environment(files, tmp_store, run_cli):
    env = {"APOLLO_CAS_STORE": tmp_store}
    r = as_json(run_cli("save", files / "a.safetensors", "--json", env=env))
    rows = as_json(run_cli("list", "--json", env=env))
    assert [x["id"] for x in rows] == [r["checkpoint"]]
    assert (Path(tmp_store) / "config").is_file()


def test_rank_and_metadata_are_recorded(files, tmp_store, run_cli):
    f = files / "a.safetensors"
    r = as_json(
        run_cli(
            "save",
            f,
            "--store",
            tmp_store,
            "--rank",
            "1",
            "--world-size",
            "2",
            "--meta",
            "run=exp7",
            "--meta",
            "step=300",
            "--json",
        )
    )
    (row,) = as_json(run_cli("list", "--store", tmp_store, "--json"))
    assert row["id"] == r["checkpoint"]
    src = row["source"]
    assert (src["kind"], src["rank"], src["world_size"]) == ("safetensors", 1, 2)
    assert src["location"] == str(f)
    assert src["metadata"] == {"run": "exp7", "step": "300"}
    assert "rank 1/2" in ok(run_cli("list", "--store", tmp_store)).stdout


def test_block_size_4096_is_honoured_with_a_warning(files, tmp_store, run_cli):
    res = run_cli(
        "save", files / "a.safetensors", "--store", tmp_store, "--block-size", "4096", "--json"
    )
    r = as_json(res)
    assert "warning" in res.stderr and "block size 4096" in res.stderr
    with Store.open(tmp_store) as st:
        assert st.manifest(r["checkpoint"]).block_size == 4096
    assert r["chunks"] > 100


def _run_on_a_terminal(args: list[str], no_progress: bool) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "APOLLO_CAS_NO_PROGRESS"}
    if no_progress:
        env["APOLLO_CAS_NO_PROGRESS"] = "1"
    master, slave = pty.openpty()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "apollo_cas.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    return p.returncode, p.stdout.decode(), err.decode(errors="replace")


def test_progress_goes_to_stderr_results_to_stdout(populated, tmp_path):
    store, _, b = populated
    code, out, err = _run_on_a_terminal(
        ["restore", "--store", str(store), "--to", str(tmp_path / "o")], no_progress=False
    )
    assert code == 0
    assert out.startswith(f"restored {b[:12]}") and "%" not in out
    assert "restore" in err and "%" in err  # a progress bar on the terminal
    code, out, err = _run_on_a_terminal(
        ["restore", "--store", str(store), "--to", str(tmp_path / "o")], no_progress=True
    )
    assert code == 0 and out.startswith("restored") and "%" not in err


# ---------------------------------------------------------------------------
# failures: exit 1, one line, store unchanged


ERROR_CASES = {
    "source-missing": (
        ["save", "{files}/nope.safetensors"],
        ["nope.safetensors", "does not exist"],
    ),
    "source-not-weights": (["save", "{files}/notes.txt"], ["notes.txt", "not a safetensors"]),
    "source-truncated": (["save", "{files}/truncated.safetensors"], ["truncated.safetensors"]),
    "second-source-bad": (
        ["save", "{files}/b.safetensors", "{files}/notes.txt"],
        ["notes.txt"],
    ),
    "restore-unknown-ref": (["restore", "nosuchtag", "--to", "{tmp}/out"], ["nosuchtag"]),
    "restore-unknown-id": (["restore", "abcdef12", "--to", "{tmp}/out"], ["abcdef12"]),
    "restore-to-a-file": (["restore", "--to", "{files}/notes.txt"], ["not a directory"]),
    "diff-unknown-ref": (["diff", "base", "nosuchtag"], ["nosuchtag"]),
    "stats-unknown-ref": (["stats", "nosuchtag"], ["nosuchtag"]),
    "tag-unknown-ref": (["tag", "nosuchtag", "newtag"], ["nosuchtag"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_exit_1_with_one_line_and_leave_the_store_alone(
    case, store_copy, files, tmp_path, run_cli, snapshot
):
    store, _, _ = store_copy
    args, words = ERROR_CASES[case]
    args = [a.format(files=files, tmp=tmp_path) for a in args]
    before = snapshot(store)
    fails(run_cli(*args, "--store", store), 1, *words)
    assert snapshot(store) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["restore", "--to", "{tmp}/out"],
        ["save", "{files}/a.safetensors"],
        ["save", "{files}/nope.safetensors"],
        ["save", "{files}/truncated.safetensors"],
    ],
    ids=["list", "restore", "save", "save-missing-source", "save-bad-source"],
)
def test_missing_store_is_an_error_and_is_not_created(args, files, tmp_path, run_cli):
    store = tmp_path / "no-store-here"
    args = [a.format(files=files, tmp=tmp_path) for a in args]
    res = run_cli(*args, "--store", store)
    if args[0] == "save" and args[1].endswith("a.safetensors"):
        ok(res)  # a store is created by its first save
        assert (store / "config").is_file()
        return
    fails(res, 1)
    assert not store.exists()  # a typo never makes a store, a failed save leaves none
    assert not (tmp_path / "out").exists()


def test_store_of_another_format_version(store_copy, files, tmp_path, run_cli, snapshot):
    store, _, _ = store_copy
    cfg = store / "config"
    d = msgpack.unpackb(cfg.read_bytes())
    d["format"] = 99
    cfg.write_bytes(msgpack.packb(d))
    before = snapshot(store)
    for args in (
        ["list"],
        ["save", files / "b.safetensors", "--force"],
        ["restore", "--to", tmp_path / "out"],
        ["tag", "latest", "x"],
    ):
        fails(run_cli(*args, "--store", store), 1, "format version 99")
    assert snapshot(store) == before
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# usage errors: exit 2, store unchanged

USAGE_CASES = {
    "no-store": (["list"], ["--store"]),
    "block-size-text": (
        ["save", "{files}/b.safetensors", "--block-size", "abc", "@S"],
        ["block size"],
    ),
    "block-size-small": (["save", "{files}/b.safetensors", "--block-size", "1000", "@S"], ["1000"]),
    "tag-escape": (["save", "{files}/b.safetensors", "--tag", "../x", "@S"], ["../x"]),
    "tag-hidden": (["tag", "latest", ".hidden", "@S"], [".hidden"]),
    "series-escape": (["save", "{files}/b.safetensors", "--series", "../../etc", "@S"], ["series"]),
    "meta-not-kv": (["save", "{files}/b.safetensors", "--meta", "novalue", "@S"], ["--meta"]),
    "nothing-to-save": (["save", "@S"], ["nothing to save"]),
    "bad-format": (["restore", "--to", "{tmp}/out", "--format", "npz", "@S"], ["npz"]),
    "unknown-option": (["list", "--frobnicate", "@S"], ["--frobnicate"]),
    "store-and-dir": (
        ["save", "{files}/b.safetensors", "--checkpoint-dir", "{tmp}/ck", "@S"],
        ["--checkpoint-dir"],
    ),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_usage_errors_exit_2_and_leave_the_store_alone(
    case, store_copy, files, tmp_path, run_cli, snapshot
):
    store, _, _ = store_copy
    args, words = USAGE_CASES[case]
    args = [
        x
        for a in args
        for x in (["--store", str(store)] if a == "@S" else [a.format(files=files, tmp=tmp_path)])
    ]
    before = snapshot(store)
    err = fails(run_cli(*args), 2, *words)
    assert snapshot(store) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()
    if case in ("block-size-small", "tag-escape", "series-escape", "no-store"):
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1


@pytest.mark.parametrize("bad", ["1000"])
def test_bad_block_size_on_a_new_store_creates_nothing(bad, files, tmp_path, run_cli):
    store = tmp_path / "new-store"
    fails(run_cli("save", files / "a.safetensors", "--store", store, "--block-size", bad), 2)
    assert not store.exists()


# ---------------------------------------------------------------------------
# the original tool's command line and checkpoint directories


@pytest.fixture
def seed_dir(models, fast_tmp_dir, write_seed):
    a, b = models
    c = dict(b)
    c["model.norm.weight"] = b["model.norm.weight"] * 2
    return write_seed(
        fast_tmp_dir / "checkpoints", [a, b, c], half_written=True, dangling_latest=True
    )


def seed_state(root: Path, snapshot) -> tuple[dict, str]:
    return snapshot(root), os.readlink(root / "latest")


def test_apollo_checkpoint_list_on_a_seed_directory(seed_dir, run_cli, snapshot):
    before = seed_state(seed_dir.root, snapshot)
    res = ok(run_cli("list", "--checkpoint-dir", seed_dir.root, prog="apollo-checkpoint"))
    for d in seed_dir.dirs:
        assert d.name in res.stdout
    for d in seed_dir.half_written:
        assert d.name not in res.stdout  # not shown as a checkpoint ...
        assert d.name in res.stderr  # ... but reported
    assert "latest" in res.stderr  # the dangling symlink
    assert seed_state(seed_dir.root, snapshot) == before  # list changes nothing


def test_apollo_checkpoint_list_without_a_directory(tmp_path, run_cli):
    res = ok(run_cli("list", "--checkpoint-dir", tmp_path / "none", prog="apollo-checkpoint"))
    assert res.stdout.strip() == "No checkpoints directory"
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("handles", ["missing", "safetensors", "garbage", "state-dict"])
def test_apollo_checkpoint_save_with_a_file_that_is_not_handles(
    handles, seed_dir, files, run_cli, snapshot, write_pt, models
):
    root = seed_dir.root
    if handles == "missing":
        f = root.parent / "vllm_weight_handles.pt"
    elif handles == "safetensors":
        f = files / "a.safetensors"
    elif handles == "garbage":
        f = root.parent / "garbage.pt"
        f.write_bytes(os.urandom(2000))
    else:
        f = write_pt({"w": torch.zeros(3)}, root.parent / "sd.pt")
    before = seed_state(root, snapshot)
    res = run_cli(
        "save",
        "--handles",
        f,
        "--checkpoint-dir",
        root,
        "--block-size",
        "4096",
        prog="apollo-checkpoint",
    )
    err = fails(res, 1, f.name)
    assert "handles" in err.lower() or "does not exist" in err
    assert seed_state(root, snapshot) == before  # nothing imported, nothing written


def test_save_with_checkpoint_dir_imports_the_history_once(
    seed_dir, files, run_cli, models, assert_same_tensors
):
    root = seed_dir.root
    res = run_cli("save", files / "a.safetensors", "--checkpoint-dir", root, "--json")
    results = as_json(res)
    assert len(results) == len(seed_dir.dirs) + 1  # the history, then the new save
    assert [r["unchanged"] for r in results] == [False] * 4
    for d in seed_dir.half_written:
        assert str(d) in res.stderr
    with Store.open(root) as st:
        cps = st.checkpoints()
        assert [c.manifest.created for c in cps[:3]] == seed_dir.timestamps
        assert [c.manifest.source.kind for c in cps] == ["seed"] * 3 + ["safetensors"]
        for c, m in zip(cps, [*seed_dir.models, models[0]], strict=True):
            assert_same_tensors(st.load(c.checkpoint_id), m)
        latest = st.latest()
    assert latest == results[-1]["checkpoint"]

    again = as_json(run_cli("save", files / "a.safetensors", "--checkpoint-dir", root, "--json"))
    assert again["unchanged"] is True and again["checkpoint"] == latest  # no second import

    listing = ok(run_cli("list", "--checkpoint-dir", root, prog="apollo-checkpoint")).stdout
    assert f"{latest[:12]}" in listing and "← latest" in listing
    assert "not yet imported" not in listing
    # the original directories are left in place
    assert all((d / "weights.bin").is_file() for d in seed_dir.dirs)


def test_save_of_a_seed_root_as_source(seed_dir, tmp_store, run_cli):
    results = as_json(run_cli("save", seed_dir.root, "--store", tmp_store, "--json"))
    assert len(results) == 3
    rows = as_json(run_cli("list", "--store", tmp_store, "--json"))
    assert [r["created"] for r in rows] == seed_dir.timestamps
    assert [r["source"]["location"] for r in rows] == [str(d) for d in seed_dir.dirs]
