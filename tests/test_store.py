"""The store through its Python API: round trips, dedup, series, refs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import torch
import xxhash
from safetensors import safe_open

from apollo_cas import dtypes, layout
from apollo_cas.errors import (
    AmbiguousRef,
    FormatVersionError,
    InvalidName,
    RefNotFound,
    StoreNotFound,
    UnsupportedDtype,
    UsageError,
)
from apollo_cas.manifest import Manifest, SourceInfo
from apollo_cas.sources import open_mapping
from apollo_cas.store import Store

BS = 4096
ALL_DTYPES = sorted(dtypes.BY_NAME)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, dtypes.BY_NAME[name].torch_name)


def odd_tensors(name: str, random_tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every awkward size for one dtype: empty, 0-d, one element, off the block
    grid, exactly on it, and several blocks plus a tail."""
    dt = torch_dtype(name)
    item = dtypes.BY_NAME[name].itemsize
    gen = torch.Generator().manual_seed(seed)
    per_block = BS // item
    return {
        f"{name}.empty": torch.empty(0, dtype=dt),
        f"{name}.empty2d": torch.empty(3, 0, dtype=dt),
        f"{name}.scalar": random_tensor((), dt, gen),
        f"{name}.one": random_tensor((1,), dt, gen),
        f"{name}.tail": random_tensor((per_block + 3,), dt, gen),
        f"{name}.exact": random_tensor((2, per_block), dt, gen),
        f"{name}.multi": random_tensor((5, per_block // 2 + 1), dt, gen),
    }


def chunk_files(store: str) -> set[str]:
    """Ids (hex) of every chunk stored at ``store``, in either format (chunk files, or
    chunks in packs as the index lists them); never empty."""
    with Store.open(store) as st:
        got = {cid.hex() for cid in st.inventory.ids()}
    assert got, f"no chunks in {store}"
    return got


def manifest_files(store: str) -> set[str]:
    return {p.name for p in (Path(store) / "manifests").glob("*")}


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_every_dtype_round_trips_load_flat_and_safetensors(
    name, tmp_store, tmp_path, random_tensor, assert_same_tensors, tensor_bytes
):
    tensors = odd_tensors(name, random_tensor)
    with Store.open(tmp_store, create=True) as st:
        r = st.save(tensors, block_size=BS)
        assert not r.unchanged and r.checkpoint_id
        m = st.manifest(r.checkpoint_id)
        assert {t.name: t.dtype for t in m.tensors} == dict.fromkeys(tensors, name)
        assert_same_tensors(st.load(r.checkpoint_id), tensors)

        flat = tmp_path / "flat"
        st.restore(r.checkpoint_id, flat, format="flat")
        index = json.loads((flat / "weights.json").read_text())
        blob = (flat / "weights.bin").read_bytes()
        for k, t in tensors.items():
            e = index[k]
            assert e["dtype"] == str(t.dtype)  # the original tool's "torch.xxx" spelling
            assert e["shape"] == list(t.shape)
            assert blob[e["offset"] : e["offset"] + e["size"]] == tensor_bytes(t)

        out = tmp_path / "st"
        st.restore(r.checkpoint_id, out, format="safetensors")
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert_same_tensors({k: f.get_tensor(k) for k in f.keys()}, tensors)  # noqa: SIM118


def test_one_byte_and_numpy_values(tmp_store, tensor_bytes):
    import numpy as np

    arrays = {"one": np.array([7], dtype=np.uint8), "f64": np.arange(5, dtype=np.float64)}
    with Store.open(tmp_store, create=True) as st:
        r = st.save(arrays, block_size=BS)
        assert r.stats.logical_bytes == 1 + 40
        got = st.load()
    assert tensor_bytes(got["one"]) == b"\x07"
    assert got["f64"].dtype == torch.float64
    assert got["f64"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_model_round_trip_default_block_size(tmp_store, make_model, assert_same_tensors):
    model = make_model(layers=3, hidden=96)
    with Store.open(tmp_store, create=True) as st:
        r = st.save(model)
        assert r.manifest.block_size == 1 << 20
        assert_same_tensors(st.load(), model)


def test_unsupported_dtype_is_a_clear_error(tmp_store):
    with (
        Store.open(tmp_store, create=True) as st,
        pytest.raises(UnsupportedDtype, match="complex64"),
    ):
        st.save({"z": torch.zeros(3, dtype=torch.complex64)})
    assert not (Path(tmp_store) / "manifests").exists()


def test_chunks_are_named_by_xxh3_128_of_raw_blocks(tmp_store, random_tensor, tensor_bytes):
    t = random_tensor((3 * BS + 100,), torch.uint8, torch.Generator().manual_seed(1))
    with Store.open(tmp_store, create=True, format=1) as st:  # chunk objects
        r = st.save({"t": t}, block_size=BS)
    raw = tensor_bytes(t)
    want = [xxhash.xxh3_128_digest(raw[o : o + BS]) for o in range(0, len(raw), BS)]
    assert list(r.manifest.tensors[0].chunks) == want
    assert chunk_files(tmp_store) == {c.hex() for c in want}
    for c in want:
        assert (Path(tmp_store) / "chunks" / c.hex()[:2] / c.hex()).is_file()


def test_invalid_block_size_is_a_usage_error(tmp_store):
    with Store.open(tmp_store, create=True) as st:
        for bs in (0, 1000, 4095, 4096 + 100, 1 << 30):
            with pytest.raises(UsageError, match="block size"):
                st.save({"a": torch.zeros(4)}, block_size=bs)
        assert st.checkpoint_ids() == []


# ---------------------------------------------------------------------------
# dedup


def test_identical_save_adds_nothing_and_force_adds_a_checkpoint(tmp_store, make_model):
    model = make_model()
    with Store.open(tmp_store, create=True) as st:
        first = st.save(model, block_size=BS)
        chunks, manifests = chunk_files(tmp_store), manifest_files(tmp_store)
        again = st.save(model, block_size=BS)
        assert again.unchanged
        assert again.checkpoint_id == first.checkpoint_id
        assert again.stats.new_chunks == 0 and again.stats.new_stored_bytes == 0
        assert chunk_files(tmp_store) == chunks
        assert manifest_files(tmp_store) == manifests
        assert st.latest() == first.checkpoint_id

        forced = st.save(model, block_size=BS, force=True)
        assert not forced.unchanged
        assert forced.checkpoint_id != first.checkpoint_id
        assert forced.parent == first.checkpoint_id
        assert forced.stats.new_chunks == 0
        assert chunk_files(tmp_store) == chunks
        assert len(manifest_files(tmp_store)) == 2
        assert st.latest() == forced.checkpoint_id


def test_a_change_in_one_tensor_writes_only_its_changed_blocks(
    tmp_store, make_model, tensor_bytes, assert_same_tensors
):
    model = make_model(hidden=128)
    name = "model.layers.1.mlp.up_proj.weight"
    with Store.open(tmp_store, create=True, format=1) as st:  # chunk objects
        a = st.save(model, block_size=BS)
        before = chunk_files(tmp_store)
        changed = dict(model)
        t = model[name].clone()
        flat = t.view(-1)
        # Two elements inside block 2 and one inside block 5 of this tensor (bf16).
        for elem in (2 * BS // 2 + 10, 2 * BS // 2 + 11, 5 * BS // 2 + 7):
            flat[elem] = flat[elem] + 1
        changed[name] = t
        b = st.save(changed, block_size=BS)
        assert not b.unchanged and b.parent == a.checkpoint_id
        assert b.stats.new_chunks == 2
        assert b.stats.new_raw_bytes == 2 * BS
        ea, eb = a.manifest.tensor(name), b.manifest.tensor(name)
        diff_blocks = [
            i for i, (x, y) in enumerate(zip(ea.chunks, eb.chunks, strict=True)) if x != y
        ]
        assert diff_blocks == [2, 5]
        new = chunk_files(tmp_store) - before
        assert new == {eb.chunks[2].hex(), eb.chunks[5].hex()}
        for other in model:
            if other != name:
                assert a.manifest.tensor(other) == b.manifest.tensor(other)
        assert_same_tensors(st.load(a.checkpoint_id), model)
        assert_same_tensors(st.load(b.checkpoint_id), changed)


def test_blocks_shared_with_any_checkpoint_are_not_stored_again(tmp_store, make_model):
    m1, m2 = make_model(seed=1), make_model(seed=2)
    with Store.open(tmp_store, create=True) as st:
        st.save(m1, block_size=BS)
        st.save(m2, block_size=BS)
        n = len(chunk_files(tmp_store))
        back = st.save(m1, block_size=BS)  # back to the first weights: all blocks known
        assert not back.unchanged
        assert back.stats.new_chunks == 0
        assert len(chunk_files(tmp_store)) == n


# ---------------------------------------------------------------------------
# series, parents, refs


def test_parent_chain(tmp_store, make_model):
    ids = []
    with Store.open(tmp_store, create=True) as st:
        for seed in range(3):
            ids.append(st.save(make_model(seed=seed), block_size=BS).checkpoint_id)
        assert [st.manifest(i).parent for i in ids] == [None, ids[0], ids[1]]
        cps = st.checkpoints()
        assert [c.checkpoint_id for c in cps] == ids  # oldest first
        assert cps[-1].latest_of == ("default",)
        assert all(not c.latest_of for c in cps[:-1])


def test_two_series_each_have_their_own_latest(tmp_store, make_model, assert_same_tensors):
    ma, mb = make_model(seed=1), make_model(seed=2)
    with Store.open(tmp_store, create=True) as st:
        a1 = st.save(ma, series="rank0", block_size=BS)
        b1 = st.save(mb, series="rank1", block_size=BS)
        assert b1.parent is None  # series do not chain into each other
        a2 = st.save(mb, series="rank0", block_size=BS)
        assert a2.parent == a1.checkpoint_id
        again = st.save(mb, series="rank1", block_size=BS)
        assert again.unchanged and again.checkpoint_id == b1.checkpoint_id
        assert st.series() == {"rank0": a2.checkpoint_id, "rank1": b1.checkpoint_id}
        assert st.latest("rank0") == a2.checkpoint_id
        assert st.latest() is None
        assert st.resolve("latest", "rank1") == b1.checkpoint_id
        assert st.resolve("latest@rank0") == a2.checkpoint_id
        assert st.manifest(a1.checkpoint_id).series == "rank0"
        assert_same_tensors(st.load(series="rank1"), mb)
        with pytest.raises(RefNotFound, match="no checkpoint yet"):
            st.resolve("latest")


def test_tags_set_move_delete_resolve(tmp_store, make_model):
    with Store.open(tmp_store, create=True) as st:
        a = st.save(make_model(seed=1), block_size=BS, tag="first").checkpoint_id
        b = st.save(make_model(seed=2), block_size=BS).checkpoint_id
        assert st.tags() == {"first": a}
        assert st.resolve("first") == a
        assert st.tag(a, "first") == a  # same target again: fine
        with pytest.raises(UsageError, match="already names"):
            st.tag(b, "first")
        assert st.resolve("first") == a
        assert st.tag(b, "first", force=True) == b
        assert st.resolve("first") == b
        st.tag("latest", "stable")
        assert st.tags() == {"first": b, "stable": b}
        cp = {c.checkpoint_id: c for c in st.checkpoints()}
        assert cp[b].tags == ("first", "stable")
        st.untag("first")
        assert st.tags() == {"stable": b}
        with pytest.raises(RefNotFound):
            st.resolve("first")
        with pytest.raises(RefNotFound):
            st.untag("first")
        with pytest.raises(RefNotFound):
            st.tag("nosuchref", "x")
        assert "x" not in st.tags()


def test_tag_on_unchanged_save_names_the_latest(tmp_store, make_model):
    model = make_model()
    with Store.open(tmp_store, create=True) as st:
        a = st.save(model, block_size=BS)
        r = st.save(model, block_size=BS, tag="again")
        assert r.unchanged
        assert st.tags() == {"again": a.checkpoint_id}


def _colliding_manifests(prefix_len: int = 4) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
    """Two valid manifests whose ids share their first ``prefix_len`` hex digits."""
    seen: dict[str, tuple[str, bytes]] = {}
    created = 1.0
    while True:
        m = Manifest(
            series="default",
            created=created,
            block_size=BS,
            tensors=(),
            source=SourceInfo(kind="mapping"),
        )
        data = m.encode()
        cid = xxhash.xxh3_128_hexdigest(data)
        other = seen.get(cid[:prefix_len])
        if other is not None:
            return other, (cid, data)
        seen[cid[:prefix_len]] = (cid, data)
        created += 1.0


def test_id_prefixes_unique_ambiguous_unknown(tmp_store):
    (id1, d1), (id2, d2) = _colliding_manifests()
    with Store.open(tmp_store, create=True) as st:
        st.backend.put(layout.manifest_key(id1), d1)
        st.backend.put(layout.manifest_key(id2), d2)
        assert st.resolve(id1) == id1
        assert st.resolve(id1[:12]) == id1
        assert st.resolve(id2[:12].upper()) == id2
        with pytest.raises(AmbiguousRef, match="matches 2 checkpoints"):
            st.resolve(id1[:4])
        unknown = next(c for c in "0123456789abcdef" if c != id1[0]) + id1[1:8]
        with pytest.raises(RefNotFound):
            st.resolve(unknown)
        with pytest.raises(RefNotFound):
            st.resolve("zzzz")
        with pytest.raises(AmbiguousRef):
            st.resolve(id1[:1])  # any prefix is one (issue 12); this one is shared


def test_metadata_rank_and_world_size_are_recorded(tmp_store, make_model):
    info = SourceInfo(
        kind="mapping", location="trainer", rank=1, world_size=4, metadata={"run": "r7"}
    )
    with Store.open(tmp_store, create=True) as st:
        r = st.save(open_mapping(make_model(), info), block_size=BS, metadata={"step": "100"})
    with Store.open(tmp_store) as st:
        m = st.manifest(r.checkpoint_id)
    assert m.source.kind == "mapping"
    assert m.source.location == "trainer"
    assert (m.source.rank, m.source.world_size) == (1, 4)
    assert m.source.metadata == {"run": "r7", "step": "100"}
    assert m.created > 1.6e9 and m.created != int(m.created)  # sub-second resolution
    assert m.stats.logical_bytes == sum(t.nbytes for t in m.tensors)


def test_created_time_can_be_given(tmp_store, make_model):
    with Store.open(tmp_store, create=True) as st:
        r = st.save(make_model(), block_size=BS, created=1_700_000_000.25)
        assert st.manifest(r.checkpoint_id).created == 1_700_000_000.25


# ---------------------------------------------------------------------------
# opening and names


def test_missing_store_without_create(tmp_store):
    with pytest.raises(StoreNotFound, match="no apollo_cas store"):
        Store.open(tmp_store)
    assert not Path(tmp_store).exists()


def test_create_then_reopen(tmp_store):
    Store.open(tmp_store, create=True).close()
    assert (Path(tmp_store) / "config").is_file()
    with Store.open(tmp_store) as st:
        assert st.checkpoint_ids() == []
        assert st.checkpoints() == []
        assert st.latest() is None


def test_store_of_another_format_version(tmp_store, make_model, snapshot):
    with Store.open(tmp_store, create=True) as st:
        st.save(make_model(), block_size=BS)
    cfg = Path(tmp_store) / "config"
    d = msgpack.unpackb(cfg.read_bytes())
    d["format"] = 99
    cfg.write_bytes(msgpack.packb(d))
    before = snapshot(tmp_store)
    with pytest.raises(FormatVersionError, match="99"):
        Store.open(tmp_store)
    with pytest.raises(FormatVersionError):
        Store.open(tmp_store, create=True)
    assert snapshot(tmp_store) == before


def test_manifest_of_another_format_version(tmp_store):
    m = Manifest(
        series="default",
        created=1.0,
        block_size=BS,
        tensors=(),
        source=SourceInfo(kind="mapping"),
        format=7,
    )
    data = m.encode()
    cid = xxhash.xxh3_128_hexdigest(data)
    with Store.open(tmp_store, create=True) as st:
        st.backend.put(layout.manifest_key(cid), data)
        with pytest.raises(FormatVersionError, match="manifest format version 7"):
            st.manifest(cid)


BAD_NAMES = ["../x", "a/b", ".hidden", "", "latest", "x\0y", "-dash", "a" * 200, "..", "/abs"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_series_and_tag_names(bad, tmp_store, make_model, snapshot):
    model = make_model(layers=1)
    with Store.open(tmp_store, create=True) as st:
        st.save(model, block_size=BS)
        before = snapshot(Path(tmp_store).parent)
        with pytest.raises(InvalidName):
            st.save(make_model(layers=1, seed=5), series=bad, block_size=BS)
        with pytest.raises(InvalidName):
            st.save(make_model(layers=1, seed=5), tag=bad, block_size=BS)
        with pytest.raises(InvalidName):
            st.tag("latest", bad)
        with pytest.raises(InvalidName):
            st.untag(bad)
        assert snapshot(Path(tmp_store).parent) == before  # nothing written, nothing escaped
        if bad not in ("latest", ""):  # those two mean the series' latest
            with pytest.raises(RefNotFound):
                st.resolve(bad)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "..", "", "x\ny"])
def test_invalid_tensor_names(bad, tmp_store):
    with Store.open(tmp_store, create=True) as st, pytest.raises(InvalidName):
        st.save({bad: torch.zeros(2)}, block_size=BS)
    assert not (Path(tmp_store) / "manifests").exists()
