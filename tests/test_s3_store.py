"""The same store-level suite on a directory and on S3 (a real SeaweedFS server).

Every test takes ``location``, parametrized over ``local`` (a fresh directory on
tmpfs) and ``s3`` (a fresh ``s3://apollo-test/t-<random>`` prefix on the server
that tests/s3server.py starts; its endpoint and keys are in the environment, so
CLI subprocesses reach it too). Tests go through the public Python API and the
real ``apollo-cas`` command line in subprocesses, never into backend internals,
except to damage a store on purpose or count its objects.

Covered: bit-exact round trips (bf16, sizes off the block grid, a 0-d tensor),
dedup (an unchanged save adds nothing; a one-block change writes one chunk),
tags and series, compare-and-swap of ``latest`` under three concurrent CLI
saves, gc with retention then restore of what it kept, ``verify --read-data``
before and after a chunk is deleted, three ranks saving one multi-rank
checkpoint concurrently and restoring per rank and all together, and a fleet:
two hosts' series deduplicating against each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from apollo_cas import Store
from apollo_cas.backends import open_backend
from apollo_cas.gc import gc
from apollo_cas.retention import RetentionPolicy

BLOCK = 65536  # small blocks: several chunks per tensor, odd tails, cheap saves

Cli = Callable[..., subprocess.CompletedProcess[str]]
Tensors = dict[str, torch.Tensor]


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, fast_tmp_dir: Path) -> str:
    """An empty store location on the backend named by the parameter."""
    if request.param == "local":
        return str(fast_tmp_dir / "store")
    # Requested lazily, so the local half runs (and the S3 half skips or fails
    # as tests/s3server.py documents) without the server.
    return str(request.getfixturevalue("s3_location"))


@pytest.fixture
def model(make_model: Callable[..., Tensors]) -> Tensors:
    """A small bf16 transformer (odd mlp width) plus tensors off the block grid."""
    w = make_model(layers=2, hidden=64, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    # 1.44 MB of bf16 in rows of 1031 elements: 23 blocks, the last one short.
    w["big.weight"] = (torch.randn((700, 1031), generator=gen) * 0.02).to(torch.bfloat16)
    w["odd.bytes"] = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=gen)
    w["scalar"] = torch.tensor(3.25, dtype=torch.float32)
    return w


def changed(w: Mapping[str, torch.Tensor], row: int, name: str = "big.weight") -> Tensors:
    """``w`` with one row of ``name`` changed: inside exactly one 64 KiB block."""
    out = dict(w)
    t = w[name].clone()
    t[row] = t[row] + 1.0
    out[name] = t
    return out


def store_keys(location: str, prefix: str = "") -> set[str]:
    """Every object of the store except lock objects (which come and go)."""
    return {k for k in open_backend(location).list(prefix) if not k.startswith("locks/")}


def stored_chunks(location: str) -> set[str]:
    """The chunk ids present: chunk objects (format 1) or what the indexes list (format 2)."""
    with Store.open(location) as st:
        return {c.hex() for c in st.inventory.ids()}


def cli_popen(*args: object) -> subprocess.Popen[str]:
    """Start the real command line without waiting (for concurrent writers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("APOLLO_CAS_STORE", "APOLLO_CAS_DEBUG")}
    env["APOLLO_CAS_NO_PROGRESS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "apollo_cas.cli.main", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_all(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Wait for every process; all must exit 0. Returns their ``--json`` results."""
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [err for _, err in outs]
    return [json.loads(out) for out, _ in outs]


def ok(run_cli: Cli, *args: object) -> subprocess.CompletedProcess[str]:
    p = run_cli(*args)
    assert p.returncode == 0, f"apollo-cas {' '.join(map(str, args))}: {p.stderr}"
    return p


def cli_save(run_cli: Cli, *args: object) -> dict[str, Any]:
    """``apollo-cas save ARGS --json`` (64 KiB blocks), which must succeed; its result."""
    return json.loads(ok(run_cli, "save", *args, "--block-size", BLOCK, "--json").stdout)


def read_safetensors(path: Path) -> Tensors:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


def flat_tensor_bytes(directory: Path) -> dict[str, bytes]:
    """Each tensor's bytes out of a flat ``weights.bin`` + ``weights.json``."""
    index = json.loads((directory / "weights.json").read_text())
    data = (directory / "weights.bin").read_bytes()
    return {n: data[e["offset"] : e["offset"] + e["size"]] for n, e in index.items()}


def parent_chain(st: Store, cid: str | None) -> list[str]:
    out = []
    while cid is not None:
        out.append(cid)
        cid = st.manifest(cid).parent
    return out


# ---------------------------------------------------------------------------


def test_round_trip_bf16_odd_sizes(
    location: str,
    model: Tensors,
    tmp_path: Path,
    run_cli: Cli,
    write_safetensors: Callable[..., Path],
    assert_same_tensors: Callable[..., None],
    tensor_bytes: Callable[[torch.Tensor], bytes],
) -> None:
    with Store.open(location, create=True) as st:
        res = st.save(model, block_size=BLOCK)
        assert res.stats.new_chunks == res.stats.chunks > 23
        assert_same_tensors(st.load(), model)
        st.restore("latest", tmp_path / "flat", format="flat")
    assert flat_tensor_bytes(tmp_path / "flat") == {n: tensor_bytes(t) for n, t in model.items()}
    # The command line reads what the API wrote...
    ok(run_cli, "restore", "--store", location, "--to", tmp_path / "st")
    assert_same_tensors(read_safetensors(tmp_path / "st" / "model.safetensors"), model)
    # ...and a CLI save of the same weights from a file stores nothing new.
    src = write_safetensors(model, tmp_path / "model.safetensors")
    assert cli_save(run_cli, src, "--store", location, "--series", "cli")["new_chunks"] == 0


def test_dedup_unchanged_adds_nothing_small_change_writes_its_blocks(
    location: str,
    model: Tensors,
    tmp_path: Path,
    run_cli: Cli,
    write_safetensors: Callable[..., Path],
) -> None:
    src = write_safetensors(model, tmp_path / "model.safetensors")
    first = cli_save(run_cli, src, "--store", location)
    before = store_keys(location)
    again = cli_save(run_cli, src, "--store", location)
    assert again["unchanged"] and again["new_chunks"] == 0
    assert again["checkpoint"] == first["checkpoint"]
    assert store_keys(location) == before  # not one object more
    # One row of one tensor: one block, so one chunk and one manifest.
    with Store.open(location) as st:
        res = st.save(changed(model, 300), block_size=BLOCK)
    assert res.stats.new_chunks == 1 and res.parent == first["checkpoint"]
    added = store_keys(location) - before
    # The series ref existed already: it changed, it was not added. Format 2:
    # one pack and its index instead of one chunk object.
    kinds = sorted(k.split("/")[0] for k in added)
    assert kinds in (["chunks", "manifests"], ["index", "manifests", "packs"])


def test_tags_and_series(
    location: str,
    model: Tensors,
    tmp_path: Path,
    run_cli: Cli,
    assert_same_tensors: Callable[..., None],
) -> None:
    v2 = changed(model, 5)
    with Store.open(location, create=True) as st:
        a = st.save(model, series="run-a", block_size=BLOCK).checkpoint_id
        b = st.save(v2, series="run-b", block_size=BLOCK).checkpoint_id
        assert a and b and a != b
        assert st.series() == {"run-a": a, "run-b": b}
    ok(run_cli, "tag", a[:10], "release-1", "--store", location)  # a unique id prefix
    with Store.open(location) as st:
        by_id = {c.checkpoint_id: c for c in st.checkpoints()}
    assert by_id[a].tags == ("release-1",) and by_id[a].latest_of == ("run-a",)
    assert by_id[b].tags == () and by_id[b].latest_of == ("run-b",)
    # A tag never moves silently (a refusal, one line naming what it points at).
    refused = run_cli("tag", b, "release-1", "--store", location)
    assert refused.returncode != 0 and "already names" in refused.stderr
    with Store.open(location) as st:
        assert st.tags() == {"release-1": a}
        assert st.resolve("latest@run-b") == b
        assert_same_tensors(st.load("release-1"), model)
        assert_same_tensors(st.load("latest", series="run-b"), v2)


def test_concurrent_cli_saves_lose_no_checkpoint(
    location: str,
    model: Tensors,
    tmp_path: Path,
    write_safetensors: Callable[..., Path],
    assert_same_tensors: Callable[..., None],
) -> None:
    """Three saves into one series at once: ``latest`` moves by compare-and-swap, so
    each lands as its own checkpoint on one unbroken parent chain."""
    with Store.open(location, create=True) as st:
        base = st.save(model, block_size=BLOCK).checkpoint_id
    versions = [changed(model, 100 * (i + 1)) for i in range(3)]
    srcs = [write_safetensors(v, tmp_path / f"v{i}.safetensors") for i, v in enumerate(versions)]
    results = wait_all(
        [cli_popen("save", s, "--store", location, "--block-size", BLOCK, "--json") for s in srcs]
    )
    ids = [r["checkpoint"] for r in results]
    assert len(set(ids)) == 3 and not any(r["unchanged"] for r in results)
    with Store.open(location) as st:
        chain = parent_chain(st, st.latest())
        assert chain[-1] == base and sorted(chain[:-1]) == sorted(ids)
        assert sorted(st.checkpoint_ids()) == sorted([base, *ids])  # no orphan manifest
        for cid, v in zip(ids, versions, strict=True):
            assert_same_tensors(st.load(cid), v)


def test_gc_retention_then_restore_what_was_kept(
    location: str,
    model: Tensors,
    tmp_path: Path,
    run_cli: Cli,
    assert_same_tensors: Callable[..., None],
) -> None:
    versions = [changed(model, 40 * k) for k in range(5)]
    with Store.open(location, create=True) as st:
        ids = [str(st.save(v, block_size=BLOCK).checkpoint_id) for v in versions]
        st.tag(ids[0], "pinned")
    out = ok(
        run_cli, "gc", "--store", location, "--keep-last", "2", "--grace", "0s",
        "--max-unused", "0", "--json",
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert sorted(report["forgotten"]) == sorted(ids[1:3])
    assert report["chunks_deleted"] >= 2  # the forgotten versions' own blocks
    with Store.open(location) as st:
        assert sorted(st.checkpoint_ids()) == sorted([ids[0], ids[3], ids[4]])
        for k in (0, 3, 4):
            assert_same_tensors(st.load(ids[k]), versions[k])
        needed = {c.hex() for cid in st.checkpoint_ids() for c in st.manifest(cid).chunk_ids()}
    # Exactly the chunks the kept checkpoints need (delta bases included) remain.
    assert stored_chunks(location) == needed


def test_verify_read_data_then_a_deleted_chunk_is_damage(
    location: str, model: Tensors, tmp_path: Path, run_cli: Cli
) -> None:
    with Store.open(location, create=True) as st:
        cid = st.save(model, block_size=BLOCK).checkpoint_id
        assert cid
        victim = next(iter(st.manifest(cid).chunk_ids())).hex()
    assert run_cli("verify", "--store", location, "--read-data").returncode == 0
    # Its object: the chunk itself (format 1) or the pack holding it (format 2).
    with Store.open(location) as st:
        key = st.chunks.locate(bytes.fromhex(victim)).key
        lost = {c.hex() for c in st.inventory.ids() if st.chunks.locate(c).key == key}
    open_backend(location).delete(key)
    p = run_cli("verify", "--store", location, "--read-data", "--json")
    assert p.returncode == 3, p.stderr
    report = json.loads(p.stdout)
    assert not report["ok"] and victim in json.dumps(report["damaged_chunks"])
    assert cid in report["broken_checkpoints"]
    # A restore never hands out wrong weights: one error line naming the chunk.
    r = run_cli("restore", "--store", location, "--to", tmp_path / "out")
    assert r.returncode == 1 and any(c in r.stderr for c in lost)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ranks_save_one_group_concurrently(
    location: str,
    tmp_path: Path,
    run_cli: Cli,
    write_safetensors: Callable[..., Path],
    tensor_bytes: Callable[[torch.Tensor], bytes],
) -> None:
    """Three tensor-parallel ranks, three processes, one store, one group."""
    world = 3
    gen = torch.Generator().manual_seed(3)
    shared = (torch.randn(300, 257, generator=gen) * 0.02).to(torch.bfloat16)
    ranks = [
        {
            "qkv_proj.weight": (torch.randn(256, 129, generator=gen)).to(torch.bfloat16),
            "norm.weight": shared,
        }
        for _ in range(world)
    ]
    srcs = [write_safetensors(w, tmp_path / f"rank{r}.safetensors") for r, w in enumerate(ranks)]
    group = ["--group", "step-1", "--world-size", world, "--block-size", BLOCK, "--json"]
    wait_all(
        [cli_popen("save", srcs[r], "--store", location, "--rank", r, *group) for r in range(3)]
    )
    with Store.open(location) as st:
        g = st.group("step-1")
        assert g.complete and sorted(g.members) == [0, 1, 2]
        assert set(st.series()) == {f"default.rank{r}" for r in range(world)}
        per_rank = [st.manifest(cid).chunk_ids() for cid in g.members.values()]
    # The tensor all ranks share is stored once.
    union = set().union(*per_rank)
    assert len(union) < sum(map(len, per_rank))
    assert len(stored_chunks(location)) == len(union)

    def rank_bytes(path: Path) -> dict[str, bytes]:
        return {n: tensor_bytes(t) for n, t in read_safetensors(path).items()}

    want = [{n: tensor_bytes(t) for n, t in w.items()} for w in ranks]
    restore = ["restore", "--store", location, "--group", "step-1"]
    ok(run_cli, *restore, "--rank", 1, "--to", tmp_path / "one")
    assert os.listdir(tmp_path / "one") == ["model-rank-1-part-0.safetensors"]
    assert rank_bytes(tmp_path / "one" / "model-rank-1-part-0.safetensors") == want[1]
    ok(run_cli, *restore, "--to", tmp_path / "all")
    for r in range(world):
        assert rank_bytes(tmp_path / "all" / f"model-rank-{r}-part-0.safetensors") == want[r]


def test_fleet_hosts_deduplicate_against_each_other(
    location: str,
    model: Tensors,
    tmp_path: Path,
    run_cli: Cli,
    write_safetensors: Callable[..., Path],
    assert_same_tensors: Callable[..., None],
) -> None:
    """Two servers of a fleet, one series each: the second host's identical save
    writes no chunk, and each host keeps its own ``latest``."""
    src = write_safetensors(model, tmp_path / "model.safetensors")
    a = cli_save(run_cli, src, "--store", location, "--series", "host-a")
    chunks = stored_chunks(location)
    b = cli_save(run_cli, src, "--store", location, "--series", "host-b")
    assert a["new_chunks"] == len(chunks) > 0
    assert b["new_chunks"] == 0 and b["new_stored_bytes"] == 0 and not b["unchanged"]
    assert stored_chunks(location) == chunks
    # host-b moves on by one block, host-a stays: each series' latest is its own.
    with Store.open(location) as st:
        res = st.save(changed(model, 1), series="host-b", block_size=BLOCK)
        assert res.stats.new_chunks == 1 and res.parent == b["checkpoint"]
        assert st.series() == {"host-a": a["checkpoint"], "host-b": res.checkpoint_id}
    # gc keeps every host's latest.
    with Store.open(location) as st:
        gc(st, RetentionPolicy(keep_last=1), grace=0)
        assert_same_tensors(st.load("latest", series="host-a"), model)
        assert_same_tensors(st.load("latest", series="host-b"), changed(model, 1))
