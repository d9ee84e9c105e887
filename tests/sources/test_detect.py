"""Detecting a source's kind from its layout and first bytes, and overriding it."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from apollo_cas.errors import SourceNotFound, UnsupportedSource, UsageError
from apollo_cas.sources import KINDS, detect_kind, open_path


def test_kinds():
    assert KINDS == ("safetensors", "pt", "handles", "seed")


def test_safetensors_by_name_and_by_content(tmp_path, write_safetensors, make_model):
    m = make_model(layers=1)
    assert detect_kind(write_safetensors(m, tmp_path / "a.safetensors")) == "safetensors"
    assert detect_kind(write_safetensors(m, tmp_path / "noext")) == "safetensors"
    index = write_safetensors(m, tmp_path / "sharded", shards=2)
    assert detect_kind(index) == "safetensors"
    assert detect_kind(tmp_path / "sharded") == "safetensors"


def test_pt_zip_and_legacy(tmp_path, write_pt):
    assert detect_kind(write_pt({"w": torch.zeros(2)}, tmp_path / "a.pt")) == "pt"
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert detect_kind(legacy) == "pt"


def test_handles_file_is_told_from_a_state_dict(tmp_path):
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    f = tmp_path / "vllm_weight_handles.pt"
    # The shape of the original tool's file; only the pickle's globals matter here.
    torch.save({"w": {"handle": (rebuild_cuda_tensor, (1, 2))}}, f)
    assert detect_kind(f) == "handles"


def test_seed_checkpoint_and_root(tmp_path, make_model, write_seed, write_seed_checkpoint):
    one = write_seed_checkpoint(tmp_path / "one", make_model(layers=1))
    assert detect_kind(one) == "seed"
    root = write_seed(tmp_path / "root", [make_model(layers=1)], dangling_latest=True)
    assert detect_kind(root.root) == "seed"


def test_seed_root_with_only_half_written_dirs_is_still_seed(tmp_path):
    d = tmp_path / "root" / "2025-01-01-0000"
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\0" * 10)
    assert detect_kind(tmp_path / "root") == "seed"


def test_missing_path(tmp_path):
    with pytest.raises(SourceNotFound, match="does not exist"):
        detect_kind(tmp_path / "nope")
    with pytest.raises(SourceNotFound, match="does not exist"):
        open_path(tmp_path / "nope", "safetensors")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world, not weights", os.urandom(4096), b"PK\x03\x04garbage zip"],
    ids=["empty", "text", "random", "broken-zip"],
)
def test_files_of_no_known_kind(tmp_path, content):
    f = tmp_path / "weights.dat"
    f.write_bytes(content)
    with pytest.raises(UnsupportedSource) as e:
        open_path(f)
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg


def test_plain_pickle_is_not_detected_as_anything_useful(tmp_path):
    f = tmp_path / "x.pkl"
    f.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    with pytest.raises(UnsupportedSource, match="not a safetensors file, torch checkpoint"):
        detect_kind(f)


def test_directory_of_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README").write_text("hi")
    with pytest.raises(UnsupportedSource, match="no safetensors files"):
        detect_kind(tmp_path / "d")


def test_kind_override(tmp_path, write_safetensors, make_model):
    f = write_safetensors(make_model(layers=1), tmp_path / "weights.pt")  # misleading name
    with open_path(f, "safetensors") as src:
        assert src.info.kind == "safetensors"
    with pytest.raises(UnsupportedSource):
        open_path(f, "pt")
    with pytest.raises(UsageError, match="unknown source kind"):
        open_path(f, "zip")
