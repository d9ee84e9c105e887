"""The saved-file record and the exact target through the Python API: what makes
a new checkpoint, crash safety, and records that do not fit their checkpoint."""

from __future__ import annotations

import filecmp
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from apollo_cas.errors import CorruptManifest
from apollo_cas.filesets import FileSet, SavedFile, safetensors_record
from apollo_cas.manifest import SavedFilesRef
from apollo_cas.sources import open_path
from apollo_cas.store import Store
from apollo_cas.targets.exact import load_record

from .failures import Boom, failing_after

BS = 4096
INDEX = "model.safetensors.index.json"


@pytest.fixture
def store(tmp_store):
    with Store.open(tmp_store, create=True) as st:
        yield st


def save_path(st: Store, path: Path):
    with open_path(path) as src:
        return st.save(src, block_size=BS)


def test_a_changed_header_alone_is_a_new_checkpoint(store, make_model, fast_tmp_dir):
    model = make_model(layers=1)
    src = fast_tmp_dir / "in" / "m.safetensors"
    src.parent.mkdir()
    save_file(model, str(src), metadata={"format": "pt"})
    first_bytes = src.read_bytes()
    a = save_path(store, src)
    assert save_path(store, src).unchanged  # same file again: nothing added

    save_file(model, str(src), metadata={"format": "pt", "step": "2"})  # same tensors
    b = save_path(store, src)
    assert not b.unchanged and b.parent == a.checkpoint_id
    assert b.stats.new_chunks == 0  # no tensor block changed; only the record is new
    store.restore(b.checkpoint_id, fast_tmp_dir / "b")
    assert filecmp.cmp(src, fast_tmp_dir / "b" / "m.safetensors", shallow=False)
    store.restore(a.checkpoint_id, fast_tmp_dir / "a")
    assert (fast_tmp_dir / "a" / "m.safetensors").read_bytes() == first_bytes

    # The same tensors from memory, or read back from a rewritten restore: no change.
    assert store.save(model, block_size=BS).unchanged


def test_sources_without_files_record_nothing(store, make_model, fast_tmp_dir, write_pt):
    model = make_model(layers=1)
    assert store.manifest(store.save(model, block_size=BS).checkpoint_id).saved_files is None
    pt = write_pt(make_model(layers=1, seed=3), fast_tmp_dir / "m.pt")
    r = save_path(store, pt)
    assert store.manifest(r.checkpoint_id).saved_files is None
    res = store.restore_files(r.checkpoint_id, fast_tmp_dir / "o")
    assert not res.exact and "saved from pt" in (res.reason or "")


def test_uncovered_bytes_in_weights_bin_come_back(
    store, fast_tmp_dir, write_seed_checkpoint, make_model
):
    d = write_seed_checkpoint(fast_tmp_dir / "2025-01-01-0000", make_model(layers=1))
    index = json.loads((d / "weights.json").read_text())
    blob = (d / "weights.bin").read_bytes()
    # Move every tensor 7 bytes further per position: holes of junk between them.
    out, pos = bytearray(), 0
    for i, name in enumerate(index):
        e = index[name]
        out += bytes([i % 256]) * 7
        e_data = blob[e["offset"] : e["offset"] + e["size"]]
        e["offset"] = pos + 7
        out += e_data
        pos = len(out)
    (d / "weights.bin").write_bytes(bytes(out) + b"end")
    (d / "weights.json").write_text(json.dumps(index, indent=4, sort_keys=False))
    r = save_path(store, d)
    res = store.restore_files(r.checkpoint_id, fast_tmp_dir / "out")
    assert res.exact and res.format == "flat"
    for n in ("weights.bin", "weights.json"):
        assert filecmp.cmp(d / n, fast_tmp_dir / "out" / n, shallow=False)


def sharded(make_model, path: Path, seed: int) -> Path:
    model = make_model(layers=2, seed=seed)
    names = sorted(model)
    path.mkdir(parents=True)
    weight_map = {}
    for i in range(2):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: model[k] for k in names[i::2]}, str(path / fname), metadata={"i": str(i)})
        weight_map.update(dict.fromkeys(names[i::2], fname))
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return path


def test_output_appears_only_when_complete(store, make_model, fast_tmp_dir, snapshot, monkeypatch):
    old = save_path(store, sharded(make_model, fast_tmp_dir / "old", 1)).checkpoint_id
    new = save_path(store, sharded(make_model, fast_tmp_dir / "new", 2)).checkpoint_id
    out = fast_tmp_dir / "out"
    assert store.restore_files(old, out).exact
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    monkeypatch.setattr(store, "reader", failing_after(store, 5))
    with pytest.raises(Boom):
        store.restore(new, out)
    assert snapshot(out) == before  # no new or temporary file; the old ones untouched


def test_index_is_written_after_every_file(store, make_model, fast_tmp_dir, monkeypatch):
    from apollo_cas.targets import files as files_mod

    old = save_path(store, sharded(make_model, fast_tmp_dir / "old", 1)).checkpoint_id
    new = save_path(store, sharded(make_model, fast_tmp_dir / "new", 2)).checkpoint_id
    out = fast_tmp_dir / "out"
    store.restore(old, out)
    assert (out / INDEX).exists()
    real_commit = files_mod.PendingFile.commit
    calls = [0]

    def commit(self):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return real_commit(self)

    monkeypatch.setattr(files_mod.PendingFile, "commit", commit)
    with pytest.raises(Exception, match="space"):
        store.restore(new, out)
    assert not (out / INDEX).exists()  # half-new shards never look like a valid checkpoint
    monkeypatch.undo()
    store.restore(new, out)
    for n in (INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert filecmp.cmp(fast_tmp_dir / "new" / n, out / n, shallow=False)


def test_records_that_do_not_fit_are_refused(store, make_model, fast_tmp_dir):
    src = fast_tmp_dir / "m.safetensors"
    save_file(make_model(layers=1), str(src))
    cid = save_path(store, src).checkpoint_id
    manifest = store.manifest(cid)
    good = load_record(store.read_chunk, manifest, "here")
    f = good.files[0]

    def check(record: FileSet, match: str) -> None:
        data = record.encode()
        m = replace(manifest, saved_files=SavedFilesRef("safetensors", b"\0" * 16, len(data)))
        with pytest.raises(CorruptManifest, match=match):
            load_record(lambda _cid: data, m, "here")

    check(replace(good, files=(replace(f, name="../escape.safetensors"),)), "plain name")
    check(replace(good, files=(replace(f, size=f.size - 1),)), "does not fit")
    (name, off), nbytes = f.tensors[0], manifest.tensor(f.tensors[0][0]).nbytes
    unplaced = replace(f, tensors=f.tensors[1:], gaps=((off, b"\0" * nbytes),))
    check(replace(good, files=(unplaced,)), f"{name!r} is in no recorded file")
    check(replace(good, files=(f, f)), "twice")
    check(replace(good, files=(replace(f, size=f.size + 3),)), "not recorded")
    check(replace(good, kind="seed"), "the manifest says safetensors")
    extra = SavedFile("x.safetensors", 8, b"", (("nope", 0),))
    check(replace(good, files=(f, extra)), "lacks")


def test_files_that_changed_while_saved_are_refused(fast_tmp_dir, make_model):
    src = fast_tmp_dir / "m.safetensors"
    model = make_model(layers=1)
    save_file(model, str(src))
    sizes = {k: v.numel() * v.element_size() for k, v in model.items()}
    assert safetensors_record([src], None, sizes).refused is None
    sizes["lm_head.weight"] += 2  # the source read another file than the record did
    assert "changed while" in (safetensors_record([src], None, sizes).refused or "")
    shutil.copy(src, fast_tmp_dir / ".hidden.safetensors")
    hidden = safetensors_record([fast_tmp_dir / ".hidden.safetensors"], None, sizes)
    assert "cannot be written back" in (hidden.refused or "")


def test_library_written_file_has_no_gaps(fast_tmp_dir, make_model):
    src = fast_tmp_dir / "m.safetensors"
    model = make_model(layers=1)
    model["odd"] = torch.ones(3, dtype=torch.int8)
    save_file(model, str(src))
    sizes = {k: v.numel() * v.element_size() for k, v in model.items()}
    (f,) = safetensors_record([src], None, sizes).files
    assert f.gaps == () and f.size == src.stat().st_size
    assert f.header == src.read_bytes()[: len(f.header)]
