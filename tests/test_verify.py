"""verify: every kind of damage is found, named, and traced to what it breaks."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from apollo_cas import layout
from apollo_cas.errors import FormatVersionError, UsageError
from apollo_cas.hashing import digest_hex
from apollo_cas.manifest import SourceInfo
from apollo_cas.sources import open_mapping
from apollo_cas.store import Store
from apollo_cas.verify import parse_subset, verify

BS = 4096


@pytest.fixture(autouse=True)
def format_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests damage chunk objects, so their stores are format 1 (the CLI
    subprocesses read the same setting); tests/test_packs.py damages packs."""
    monkeypatch.setenv("APOLLO_CAS_FORMAT", "1")


def weights(seed: int, n_blocks: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.integers(0, 256, n_blocks * BS, dtype=np.uint8),
        "head": rng.integers(0, 256, BS + 100, dtype=np.uint8),
    }


def chunk_path(root: str, cid: bytes) -> Path:
    return Path(root) / layout.chunk_key(cid.hex())


def objects(root: str) -> dict[str, bytes]:
    """The store's objects, locks aside (verify takes and drops a shared lock)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and "locks" not in p.parts and not p.name.startswith(".refs")
    }


@pytest.fixture
def two(tmp_store: str) -> tuple[str, str, str]:
    """A store with checkpoints a (tagged 'old') and b (latest); no block shared."""
    with Store.open(tmp_store, create=True) as st:
        a = st.save(weights(1), block_size=BS, tag="old").checkpoint_id or ""
        b = st.save(weights(2), block_size=BS).checkpoint_id or ""
    return tmp_store, a, b


def first_chunk(root: str, cid: str, tensor: str = "embed") -> bytes:
    with Store.open(root) as st:
        m = st.manifest(cid)
        t = m.tensor(tensor)
        assert t is not None
        return t.chunks[0]


def run_verify(root: str, **kw: Any) -> Any:
    with Store.open(root) as st:
        return verify(st, **kw)


# ---------------------------------------------------------------------------


def test_a_healthy_store(two: tuple[str, str, str], run_cli: Callable[..., Any]) -> None:
    root, _a, _b = two
    r = run_verify(root, read_data=True)
    assert r.ok and r.manifests_checked == 2 and r.refs_checked == 2
    assert r.chunks_read == r.chunks_referenced == 12
    assert r.bytes_read == 2 * (4 * BS + BS + 100)
    assert r.config["format"] == 1
    p = run_cli("verify", "--store", root, "--read-data")
    assert p.returncode == 0, p.stderr
    assert "healthy" in p.stdout
    p = run_cli("verify", "--store", root, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True


def test_missing_chunk(two: tuple[str, str, str], run_cli: Callable[..., Any]) -> None:
    root, a, _b = two
    cid = first_chunk(root, a)
    chunk_path(root, cid).unlink()
    before = objects(root)
    r = run_verify(root)  # existence alone finds it
    assert not r.ok
    [d] = r.damaged_chunks
    assert d.chunk == cid.hex() and d.reason == "missing"
    assert d.breaks == {a: ["embed"]}
    assert r.broken_checkpoints == {a: ["tag old"]}
    p = run_cli("verify", "--store", root, "--json")
    assert p.returncode == 3
    out = json.loads(p.stdout)
    assert out["ok"] is False
    assert out["damaged_chunks"][0]["checkpoints"] == [a]
    assert out["damaged_chunks"][0]["tensors"] == ["embed"]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    p = run_cli("verify", "--store", root)
    assert p.returncode == 3
    assert f"damaged chunk {cid.hex()}" in p.stdout and "embed" in p.stdout
    assert objects(root) == before  # verify changes nothing
    # The other checkpoint is intact and restores; the damaged one fails clearly.
    p = run_cli(
        "restore", "latest", "--store", root, "--to", Path(root).parent / "out", "--format", "flat"
    )
    assert p.returncode == 0, p.stderr
    p = run_cli("restore", "old", "--store", root, "--to", Path(root).parent / "out2")
    assert p.returncode == 1 and cid.hex() in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "empty", "swap"])
def test_damaged_chunk_content_is_found_by_read_data(
    two: tuple[str, str, str], damage: str
) -> None:
    root, a, b = two
    victim = first_chunk(root, b, "head")
    path = chunk_path(root, victim)
    raw = path.read_bytes()
    if damage == "bitflip":
        flipped = bytearray(raw)
        flipped[len(flipped) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid chunk under another chunk's name: content does not match the name
        shutil.copyfile(chunk_path(root, first_chunk(root, a)), path)
    assert run_verify(root).ok  # existence only: not detectable without reading
    r = run_verify(root, read_data=True)
    assert not r.ok
    [d] = r.damaged_chunks
    assert d.chunk == victim.hex()
    assert d.breaks == {b: ["head"]}
    assert r.broken_checkpoints == {b: ["latest@default"]}
    if damage == "swap":
        assert "does not hash to its name" in d.reason


def test_damage_in_a_delta_base_breaks_its_dependents(tmp_store: str) -> None:
    with Store.open(tmp_store, create=True) as st:
        w = weights(3, n_blocks=6)
        a = st.save(w, block_size=BS).checkpoint_id or ""
        w2 = {k: v.copy() for k, v in w.items()}
        w2["embed"][::BS] ^= 1  # one byte per block: deltas pay
        b = st.save(w2, block_size=BS).checkpoint_id or ""
        bases = st.manifest(b).bases
    if not bases:
        pytest.skip("this codec policy stored no deltas")
    base = next(iter(bases.values()))
    chunk_path(tmp_store, base).unlink()
    r = run_verify(tmp_store, read_data=True)
    assert not r.ok
    by_chunk = {d.chunk: d for d in r.damaged_chunks}
    assert by_chunk[base.hex()].reason == "missing"
    # The base belongs to a, and b's delta on it cannot be decoded either.
    assert set(by_chunk[base.hex()].breaks) == {a, b}
    assert set(r.broken_checkpoints) == {a, b}


def test_corrupted_manifest(two: tuple[str, str, str], run_cli: Callable[..., Any]) -> None:
    root, a, _b = two
    p = Path(root) / layout.manifest_key(a)
    raw = bytearray(p.read_bytes())
    raw[10] ^= 0xFF
    p.write_bytes(bytes(raw))
    r = run_verify(root, read_data=True)
    assert not r.ok
    [m] = r.damaged_manifests
    assert m.checkpoint == a and "corrupt" in m.reason and m.refs == ["tag old"]
    [ref] = r.damaged_refs
    assert ref.ref == "tag old" and ref.target == a
    assert r.damaged_chunks == []  # b's chunks are fine
    p2 = run_cli("verify", "--store", root)
    assert p2.returncode == 3 and f"damaged manifest {a}" in p2.stdout


def test_manifest_named_by_a_ref_but_missing(
    two: tuple[str, str, str], run_cli: Callable[..., Any]
) -> None:
    root, _a, b = two
    (Path(root) / layout.manifest_key(b)).unlink()
    r = run_verify(root)
    assert not r.ok
    [ref] = r.damaged_refs
    assert ref.ref == "latest@default" and ref.target == b and "missing" in ref.reason
    assert r.broken_checkpoints == {b: ["latest@default"]}
    assert run_cli("verify", "--store", root).returncode == 3


def test_a_ref_that_is_not_an_id(two: tuple[str, str, str]) -> None:
    root, _a, _b = two
    (Path(root) / layout.tag_key("old")).write_bytes(b"../../etc/passwd\n")
    r = run_verify(root)
    assert not r.ok
    [ref] = r.damaged_refs
    assert ref.ref == "tag old" and "not a checkpoint id" in ref.reason


def test_unknown_store_format_version(
    two: tuple[str, str, str], run_cli: Callable[..., Any]
) -> None:
    root, _a, _b = two
    cfg = msgpack.unpackb((Path(root) / "config").read_bytes())
    cfg["format"] = 99
    (Path(root) / "config").write_bytes(msgpack.packb(cfg))
    before = objects(root)
    with pytest.raises(FormatVersionError, match="format version 99"):
        Store.open(root)
    p = run_cli("verify", "--store", root, "--read-data")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "format version 99" in p.stderr
    assert "release" in p.stderr  # says what to do
    assert run_cli("gc", "--store", root, "--keep-last", "1").returncode == 1
    assert objects(root) == before


def test_manifest_of_an_unknown_format_version_is_reported(two: tuple[str, str, str]) -> None:
    root, a, _b = two
    d = msgpack.unpackb(
        (Path(root) / layout.manifest_key(a)).read_bytes(), raw=False, strict_map_key=False
    )
    d["format"] = 7
    data = msgpack.packb(d, use_bin_type=True)
    cid = digest_hex(data)
    (Path(root) / layout.manifest_key(cid)).write_bytes(data)
    (Path(root) / layout.tag_key("future")).write_bytes(cid.encode())
    r = run_verify(root)
    assert not r.ok
    [m] = r.damaged_manifests
    assert m.checkpoint == cid and "format version 7" in m.reason and m.refs == ["tag future"]


def test_leftovers_of_an_interrupted_save_are_not_damage(
    two: tuple[str, str, str], run_cli: Callable[..., Any]
) -> None:
    root, _a, _b = two
    # What a killed save leaves: a half-written temporary, whole chunks that no
    # manifest names yet, and its lock.
    d = Path(root) / "chunks" / "00"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".tmp-99999-0badf00d-00aa"
    tmp.write_bytes(b"\x00" * 100)
    os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    with Store.open(root) as st:
        orphan = st.chunks.put_block(b"\x07" * BS).chunk_id
    dead = "s-" + "deadbeef" * 4
    (Path(root) / "locks" / dead).write_text(
        json.dumps(
            {
                "lock_id": dead,
                "kind": "shared",
                "host": os.uname().nodename,
                "pid": 2**22 + 7,
                "start": "1",
                "created": time.time() - 60,
                "expires": time.time() + 600,
                "purpose": "save default",
            }
        )
    )
    r = run_verify(root, read_data=True)
    assert r.ok and r.unreferenced_chunks == 1
    p = run_cli("verify", "--store", root)
    assert p.returncode == 0 and "1 unreferenced chunk" in p.stdout
    p = run_cli("gc", "--store", root, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["chunks_deleted"] == 1 and out["temporaries_removed"] == 1
    assert not tmp.exists() and not chunk_path(root, orphan).exists()
    assert not (Path(root) / "locks" / dead).exists()  # the dead process's lock
    assert run_verify(root, read_data=True).ok


def test_read_data_subset(two: tuple[str, str, str], run_cli: Callable[..., Any]) -> None:
    root, _a, _b = two
    assert run_verify(root, subset=1).chunks_read == 1
    assert run_verify(root, subset=0.5).chunks_read == 6
    assert run_verify(root, subset=1.0).chunks_read == 12
    assert run_verify(root, subset=100).chunks_read == 12
    p = run_cli("verify", "--store", root, "--read-data-subset", "25%", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["chunks_read"] == 3
    p = run_cli("verify", "--store", root, "--read-data-subset", "lots")
    assert p.returncode == 2 and "10%" in p.stderr


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.1), ("100%", 1.0), ("0.25", 0.25), ("500", 500), ("1", 1)]
)
def test_parse_subset(text: str, value: float) -> None:
    assert parse_subset(text) == value


@pytest.mark.parametrize("text", ["0", "0%", "150%", "-3", "1.5", "x", ""])
def test_parse_subset_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_subset(text)


def test_group_member_missing_is_damage(tmp_store: str) -> None:
    with Store.open(tmp_store, create=True) as st:
        if "group" not in Store.save.__code__.co_varnames:
            pytest.skip("this store has no multi-rank groups")
        ids = []
        for rank in range(2):
            src = open_mapping(weights(rank), SourceInfo(kind="mapping", rank=rank, world_size=2))
            ids.append(st.save(src, block_size=BS, group="g").checkpoint_id or "")
        assert verify(st).ok
    # Rank 1 saved again: its series moved on, the group still names the old one.
    with Store.open(tmp_store) as st:
        src = open_mapping(weights(9), SourceInfo(kind="mapping", rank=1, world_size=2))
        st.save(src, block_size=BS)
    (Path(tmp_store) / layout.manifest_key(ids[1])).unlink()
    r = run_verify(tmp_store)
    assert not r.ok
    assert [d.ref for d in r.damaged_refs] == ["group default/g rank 1"]
