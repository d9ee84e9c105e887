"""Restore to safetensors: one file or shards + index, vLLM's per-rank layout,
stale files replaced, and nothing that looks valid after a failure."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from apollo_cas.errors import UsageError
from apollo_cas.manifest import SourceInfo
from apollo_cas.sources import open_mapping, open_path
from apollo_cas.store import Store

from .failures import Boom, failing_after

BS = 4096
INDEX = "model.safetensors.index.json"


@pytest.fixture
def model(make_model):
    m = make_model(layers=3, hidden=64)
    m["extra.scalar"] = torch.tensor(3, dtype=torch.int16)
    m["extra.empty"] = torch.empty(0, 2, dtype=torch.float32)
    return m


@pytest.fixture
def store(tmp_store):
    with Store.open(tmp_store, create=True) as st:
        yield st


def read_dir(files) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert k not in out
                out[k] = sf.get_tensor(k)
    return out


def raw_header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def test_single_file(store, model, tmp_path, assert_same_tensors):
    cid = store.save(model, block_size=BS).checkpoint_id
    out = tmp_path / "out"
    files = store.restore(cid, out)
    assert files == [str(out / "model.safetensors")]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert_same_tensors(read_dir(files), model)
    assert_same_tensors(load_file(files[0]), model)

    header, data_start = raw_header(out / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == sorted(model)  # file order = sorted names: a layer stays together
    pos = 0
    for name in sorted(model):
        begin, end = header[name]["data_offsets"]
        assert begin == pos  # contiguous, no gaps
        pos = end
    assert data_start + pos == (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("shard_size", [None, 20_000], ids=["single", "sharded"])
def test_transformers_loads_the_model_from_it(store, tmp_path, assert_same_tensors, shard_size):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    sd = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict()
    store.save(sd, block_size=BS)
    out = tmp_path / "hf"
    store.restore(None, out, max_shard_size=shard_size)
    cfg.save_pretrained(out)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same_tensors(loaded.state_dict(), sd)


def test_apollo_cas_reads_its_own_output(store, model, tmp_path, assert_same_tensors):
    store.save(model, block_size=BS)
    store.restore(None, tmp_path / "out", max_shard_size=20_000)
    with open_path(tmp_path / "out") as src:
        r = store.save(src, block_size=BS)
    assert r.unchanged


def test_shards_and_index(store, model, tmp_path, assert_same_tensors, tensor_bytes):
    store.save(model, block_size=BS)
    out = tmp_path / "out"
    limit = 30_000
    files = store.restore(None, out, max_shard_size=limit)
    shards = [Path(f) for f in files if not f.endswith(".json")]
    n = len(shards)
    assert n > 3
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert files[-1] == str(out / INDEX)  # the file naming the others comes last
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(len(tensor_bytes(t)) for t in model.values())
    assert sorted(index["weight_map"]) == sorted(model)  # every tensor listed
    order = []
    for shard in shards:
        with safe_open(str(shard), "pt") as sf:
            keys = list(sf.keys())
        order += sorted(keys)
        for k in keys:
            assert index["weight_map"][k] == shard.name
        size = sum(len(tensor_bytes(model[k])) for k in keys)
        assert size <= limit or len(keys) == 1
    assert order == sorted(model)  # consecutive names per shard
    assert_same_tensors(read_dir(shards), model)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("processes", ["0", "1"], ids=["threads", "processes"])
def test_shards_filled_side_by_side_are_byte_identical(
    store, model, tmp_path, monkeypatch, tensor_bytes, processes
):
    """Shards are written in turn, a few chunks at a time (short spans here, so
    every shard takes many turns): each still holds exactly its header and
    its tensors' bytes, back to back."""
    from apollo_cas import decoding

    monkeypatch.setattr(decoding, "SPAN_BYTES", 2 * BS)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", processes)
    store.save(model, block_size=BS)
    assert store.decoder(1).processes == (processes == "1")
    files = store.restore(None, tmp_path / "out", max_shard_size=30_000)
    shards = [Path(f) for f in files if not f.endswith(".json")]
    assert len(shards) > 3
    for shard in shards:
        header, data_start = raw_header(shard)
        header.pop("__metadata__")
        names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        assert names == sorted(header)
        want = b"".join(tensor_bytes(model[k]) for k in names)
        assert header[names[-1]]["data_offsets"][1] == len(want)
        assert shard.read_bytes()[data_start:] == want


def test_stale_shards_and_index_are_replaced(store, model, make_model, tmp_path, tensor_bytes):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # files of the model repo stay
    (out / "tokenizer.json").write_text("{}")
    old = store.save(make_model(layers=6, hidden=64, seed=4), block_size=BS).checkpoint_id
    new = store.save(model, block_size=BS).checkpoint_id

    store.restore(old, out, max_shard_size=30_000)
    old_shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(old_shards) > 4

    # fewer shards: the old ones (other names) go, the index names only the new
    store.restore(new, out, max_shard_size=60_000)
    index = json.loads((out / INDEX).read_text())
    listed = set(index["weight_map"].values())
    on_disk = {p.name for p in out.glob("*.safetensors")}
    assert on_disk == listed
    assert not set(old_shards) & on_disk
    assert sorted(index["weight_map"]) == sorted(model)

    # one file: the index and every shard go
    store.restore(new, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]

    # and back to shards: the single file goes
    store.restore(new, out, max_shard_size=60_000)
    assert not (out / "model.safetensors").exists()
    assert (out / INDEX).exists()


def test_foreign_stale_index_is_replaced(store, model, tmp_path, assert_same_tensors):
    out = tmp_path / "out"
    out.mkdir()
    (out / INDEX).write_text(json.dumps({"weight_map": {"old.weight": "pytorch_model.bin"}}))
    store.save(model, block_size=BS)
    store.restore(None, out)
    assert not (out / INDEX).exists()  # vLLM would load only what a stale index lists
    assert_same_tensors(read_dir([out / "model.safetensors"]), model)


def test_vllm_sharded_layout_for_a_manifest_with_rank(store, model, tmp_path, assert_same_tensors):
    ids = []
    for rank in (0, 1):
        info = SourceInfo(kind="handles", location="h.pt", rank=rank, world_size=2)
        ids.append(store.save(open_mapping(model, info), block_size=BS).checkpoint_id)
    out = tmp_path / "out"
    r0 = store.restore(ids[0], out, max_shard_size=40_000)
    parts0 = [Path(p).name for p in r0]
    assert parts0 == [f"model-rank-0-part-{i}.safetensors" for i in range(len(r0))]
    assert sorted(p.name for p in out.iterdir()) == sorted(parts0)
    assert len(r0) > 1

    assert len(store.restore(ids[1], out, max_shard_size=40_000)) > 1  # stale parts, ours
    (out / "model-rank-1-part-99.safetensors").write_text("not written by a restore")
    r1 = store.restore(ids[1], out)
    assert [Path(p).name for p in r1] == ["model-rank-1-part-0.safetensors"]
    # Our own stale parts of rank 1 go; a file no restore wrote stays (issue 11 item 17).
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*parts0, "model-rank-1-part-0.safetensors", "model-rank-1-part-99.safetensors"]
    )
    assert not (out / INDEX).exists()
    assert_same_tensors(read_dir(r1), model)
    assert_same_tensors(read_dir(r0), model)


def test_layout_choice(store, model, tmp_path):
    info = SourceInfo(kind="mapping", rank=3, world_size=4)
    cid = store.save(open_mapping(model, info), block_size=BS).checkpoint_id
    hf = store.restore(cid, tmp_path / "a")  # auto: weights under their own names
    assert [Path(p).name for p in hf] == ["model.safetensors"]
    vl = store.restore(cid, tmp_path / "b", safetensors_layout="vllm-sharded")
    assert [Path(p).name for p in vl] == ["model-rank-3-part-0.safetensors"]
    with pytest.raises(UsageError, match="layout"):
        store.restore(cid, tmp_path / "c", safetensors_layout="bogus")
    with pytest.raises(UsageError, match="positive"):
        store.restore(cid, tmp_path / "c", max_shard_size=-1)
    with pytest.raises(UsageError, match="format"):
        store.restore(cid, tmp_path / "c", format="npz")


def test_only_empty_tensors(store, tmp_path, assert_same_tensors):
    m = {"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.bfloat16)}
    store.save(m, block_size=BS)
    files = store.restore(None, tmp_path / "out")
    assert_same_tensors(read_dir(files), m)


@pytest.mark.parametrize("shard_size", [None, 30_000], ids=["single", "sharded"])
@pytest.mark.parametrize("previous", [None, "single", "sharded"])
def test_output_appears_only_when_complete(
    store, model, make_model, tmp_path, monkeypatch, snapshot, shard_size, previous
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    if previous:
        store.save(make_model(layers=2, seed=8), block_size=BS)
        store.restore(None, out, max_shard_size=None if previous == "single" else 25_000)
    cid = store.save(model, block_size=BS).checkpoint_id
    before = snapshot(out)
    monkeypatch.setattr(store, "reader", failing_after(store, 5))
    with pytest.raises(Boom):
        store.restore(cid, out, max_shard_size=shard_size)
    assert snapshot(out) == before  # no new or temporary file; old ones untouched


def test_index_is_written_after_every_shard(store, model, tmp_path, monkeypatch):
    """A failure while the shards are renamed into place leaves no index: a
    half-new set of shards never looks like a valid checkpoint."""
    from apollo_cas.targets import files as files_mod

    out = tmp_path / "out"
    store.save(model, block_size=BS)
    store.restore(None, out, max_shard_size=30_000)
    assert (out / INDEX).exists()  # an index from an earlier restore

    real_commit = files_mod.PendingFile.commit
    calls = [0]

    def commit(self):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return real_commit(self)

    monkeypatch.setattr(files_mod.PendingFile, "commit", commit)
    other = dict(model)
    other["model.norm.weight"] = model["model.norm.weight"] + 1
    store.save(other, block_size=BS)
    with pytest.raises(Exception, match="space"):
        store.restore(None, out, max_shard_size=30_000)
    assert not (out / INDEX).exists()
