"""A manifest is written only if the reader's own checks accept it (issue 11, item 6),
and those checks refuse shapes no tensor can have (item 8)."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from lying import LyingSource, LyingTensor

from apollo_cas.errors import CorruptManifest
from apollo_cas.manifest import Manifest, SourceInfo, TensorEntry
from apollo_cas.store import Store


@pytest.mark.parametrize(
    "tensors",
    [
        [LyingTensor("w", (-2, -2), bytes(16))],  # product matches, dims negative
        [LyingTensor("w", (3,), bytes(8))],  # product does not match
        [LyingTensor("w", (2**64, 0), b"")],  # a dimension msgpack cannot hold
        [LyingTensor("w", (2,), bytes(8)), LyingTensor("w", (2,), bytes(8))],  # same name
    ],
    ids=["negative-dims", "mismatch", "huge-dim", "duplicate-name"],
)
def test_a_manifest_the_reader_would_refuse_is_never_written(tmp_store, tensors):
    with Store.open(tmp_store, create=True) as st:
        st.save({"ok": np.ones(4, dtype=np.float32)})
        before = st.checkpoint_ids()
        with pytest.raises(CorruptManifest, match="nothing was saved"):
            st.save(LyingSource(tensors))
        assert st.checkpoint_ids() == before
        assert len(st.checkpoints()) == 1  # list still works
    with Store.open(tmp_store) as st:
        assert [c.checkpoint_id for c in st.checkpoints()] == before


def _manifest_bytes(tensors: list[dict[str, object]]) -> bytes:
    m = Manifest(
        series="default",
        created=1.0,
        block_size=4096,
        tensors=(TensorEntry("w", "F32", (2,), 8, (bytes(16),)),),
        source=SourceInfo(kind="mapping"),
    )
    d = msgpack.unpackb(m.encode(), raw=False)
    d["tensors"] = tensors
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    ("shape", "nbytes", "chunks"),
    [((-2, -2), 16, 1), ((2, True), 8, 1), ((1.0, 2), 8, 1)],
    ids=["negative", "bool", "float"],
)
def test_decode_refuses_shapes_no_tensor_has(shape, nbytes, chunks):
    t = {"n": "w", "d": "F32", "s": list(shape), "b": nbytes, "c": [bytes(16)] * chunks}
    with pytest.raises(CorruptManifest, match="shape"):
        Manifest.decode(_manifest_bytes([t]), "m")


def test_decode_refuses_a_tensor_named_twice():
    t = {"n": "w", "d": "F32", "s": [2], "b": 8, "c": [bytes(16)]}
    with pytest.raises(CorruptManifest, match="twice"):
        Manifest.decode(_manifest_bytes([t, t]), "m")


def test_seed_checkpoint_with_negative_sizes_does_not_poison_the_store(
    tmp_path, tmp_store, run_cli, write_seed_checkpoint, make_model
):
    """The issue's case: such a directory used to be saved, and list, gc and stats
    then failed for the whole store."""
    good = write_seed_checkpoint(tmp_path / "good", make_model(layers=1, hidden=16))
    assert run_cli("save", good, "--store", tmp_store).returncode == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "weights.bin").write_bytes(bytes(64))
    entry = {"offset": 0, "size": -8, "shape": [-2], "dtype": "torch.float32"}
    (bad / "weights.json").write_text(json.dumps({"w": entry}))
    r = run_cli("save", bad, "--store", tmp_store)
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for cmd in ("list", "stats"):
        assert run_cli(cmd, "--store", tmp_store).returncode == 0, cmd
