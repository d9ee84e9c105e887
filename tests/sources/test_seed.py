"""The original tool's checkpoint directories: one checkpoint, and a whole history
with half-written directories and a dangling ``latest``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from apollo_cas.cli.history import Shown
from apollo_cas.errors import InvalidName, SourceError, UnsupportedDtype, UnsupportedSource
from apollo_cas.save_paths import SaveOptions, save_paths
from apollo_cas.sources import detect_kind, open_path
from apollo_cas.sources.seed import SeedSource, scan_root
from apollo_cas.store import Store

ALL_TORCH = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.uint16,
    torch.int16,
    torch.uint32,
    torch.int32,
    torch.uint64,
    torch.int64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def mixed_model(random_tensor):
    gen = torch.Generator().manual_seed(3)
    m = {f"t.{str(d).split('.')[1]}": random_tensor((7, 5), d, gen) for d in ALL_TORCH}
    m["t.scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    m["t.empty"] = torch.empty(0, 8, dtype=torch.bfloat16)
    return m


def read_all(src):
    return {t.name: (t.dtype.name, t.shape, bytes(t.read(0, t.nbytes))) for t in src.tensors()}


def test_one_checkpoint_with_torch_dtype_spellings(
    tmp_path, random_tensor, write_seed_checkpoint, tensor_bytes
):
    from apollo_cas import dtypes

    model = mixed_model(random_tensor)
    d = write_seed_checkpoint(tmp_path / "2025-03-01-1205", model)
    index = json.loads((d / "weights.json").read_text())
    assert index["t.bfloat16"]["dtype"] == "torch.bfloat16"  # as the original tool wrote it
    assert detect_kind(d) == "seed"
    with open_path(d) as src:
        assert src.info.kind == "seed"
        assert src.created == 1740830700.0  # 2025-03-01 12:05 UTC, from the name
        got = read_all(src)
    assert got == {
        k: (dtypes.from_torch(v.dtype).name, tuple(v.shape), tensor_bytes(v))
        for k, v in model.items()
    }


def test_timestamp_from_meta_when_the_name_is_not_one(tmp_path, make_model, write_seed_checkpoint):
    d = write_seed_checkpoint(
        tmp_path / "renamed", make_model(layers=1), timestamp="2024-12-31-2359"
    )
    with SeedSource(d) as src:
        assert src.created == 1735689540.0


def test_half_written_without_index(tmp_path):
    d = tmp_path / "2025-03-01-1200"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UnsupportedSource, match="half-written"):
        SeedSource(d)


def test_weights_bin_shorter_than_index(tmp_path, make_model, write_seed_checkpoint):
    d = write_seed_checkpoint(tmp_path / "c", make_model(layers=1))
    with open(d / "weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SourceError, match=r"shorter than weights\.json says") as e:
        SeedSource(d)
    assert "\n" not in str(e.value)


def test_unreadable_index(tmp_path, make_model, write_seed_checkpoint):
    d = write_seed_checkpoint(tmp_path / "c", make_model(layers=1))
    (d / "weights.json").write_text('{"model.norm.weight": {"offs')
    with pytest.raises(UnsupportedSource, match="unreadable"):
        SeedSource(d)


@pytest.mark.parametrize(
    ("entry", "error", "match"),
    [
        ({"offset": 0, "size": 8, "shape": [3], "dtype": "torch.float32"}, SourceError, "size 8"),
        (
            {"offset": 0, "size": 8, "shape": [1], "dtype": "torch.complex64"},
            UnsupportedDtype,
            "complex64",
        ),
        ({"offset": 0, "shape": [2], "dtype": "torch.float32"}, UnsupportedSource, "malformed"),
        (
            {"offset": -4, "size": 4, "shape": [1], "dtype": "torch.float32"},
            SourceError,
            "offset -4",
        ),
    ],
    ids=["size-mismatch", "dtype", "missing-size", "negative-offset"],
)
def test_inconsistent_index(tmp_path, entry, error, match):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(16))
    (d / "weights.json").write_text(json.dumps({"w": entry}))
    with pytest.raises(error, match=match):
        SeedSource(d)


def test_tensor_name_that_would_escape(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(4))
    entry = {"offset": 0, "size": 4, "shape": [1], "dtype": "torch.float32"}
    (d / "weights.json").write_text(json.dumps({"../../etc/x": entry}))
    with pytest.raises(InvalidName):
        SeedSource(d)


@pytest.fixture
def history(tmp_path, make_model, write_seed):
    """Three whole checkpoints, a half-written newer one, a dangling latest, a
    same-minute casualty (index present, weights.bin cut short) and a dir whose
    index was being rewritten when the tool died."""
    base = make_model(layers=2, hidden=64)
    models = [base]
    for step in range(1, 3):
        m = dict(models[-1])
        name = f"model.layers.{step % 2}.self_attn.q_proj.weight"
        m[name] = m[name] + 0.5
        models.append(m)
    root = write_seed(tmp_path / "checkpoints", models, half_written=True, dangling_latest=True)
    short = root.root / "2025-03-01-1300"
    shutil.copytree(root.dirs[0], short)
    (short / "checkpoint-meta.json").unlink()
    with open(short / "weights.bin", "r+b") as f:
        f.truncate(5000)
    torn = root.root / "2025-03-01-1310"
    shutil.copytree(root.dirs[1], torn)
    (torn / "checkpoint-meta.json").unlink()
    (torn / "weights.json").write_text((torn / "weights.json").read_text()[:100])
    (root.root / "logs").mkdir()
    (root.root / "notes.txt").write_text("not a checkpoint")
    # Written out of order: the import must follow the timestamps, not mtimes.
    for i, d in enumerate(reversed(root.dirs)):
        os.utime(d, (1e9 + i, 1e9 + i))
    root.half_written += [short, torn]
    return root


def test_scan_root_orders_whole_checkpoints_and_reports_the_rest(history):
    good, skipped = scan_root(history.root)
    assert good == history.dirs
    reasons = {s.path.name: s.reason for s in skipped}
    assert "dangling" in reasons["latest"]
    for d in history.half_written:
        assert d.name in reasons, d
    assert "half-written" in reasons[history.half_written[0].name]
    assert "logs" in reasons
    assert detect_kind(history.root) == "seed"


def test_import_history_keeps_timestamps_and_order(history, tmp_store, capsys, assert_same_tensors):
    with Store.open(tmp_store, create=True) as st:
        results = save_paths(
            st,
            [history.root],
            SaveOptions(tag="imported", block_size=4096),
            events=Shown(as_json=False),  # what the CLI prints, on stderr
        )
        assert len(results) == len(history.dirs)
        cps = st.checkpoints()
        assert [c.manifest.created for c in cps] == history.timestamps
        assert [c.checkpoint_id for c in cps] == [r.checkpoint_id for r in results]
        assert [c.manifest.parent for c in cps] == [None] + [c.checkpoint_id for c in cps[:-1]]
        assert all(c.manifest.source.kind == "seed" for c in cps)
        assert [c.manifest.source.location for c in cps] == [str(d) for d in history.dirs]
        assert st.latest() == cps[-1].checkpoint_id
        assert st.tags() == {"imported": cps[-1].checkpoint_id}
        for c, model in zip(cps, history.models, strict=True):
            assert_same_tensors(st.load(c.checkpoint_id), model)
        # Only the changed q_proj blocks were new after the first import.
        assert cps[1].manifest.stats.new_chunks == 64 * 64 * 2 // 4096
    err = capsys.readouterr().err
    assert "dangling" in err
    for d in history.half_written:
        assert str(d) in err
    # The original directories are left as they were.
    assert os.readlink(history.root / "latest") == "2025-03-01-1240"
    for d in history.dirs:
        assert (d / "weights.bin").is_file() and (d / "weights.json").is_file()


def test_importing_the_same_history_twice_adds_nothing(history, tmp_store, capsys):
    def run():
        return save_paths(
            st, [history.root], SaveOptions(block_size=4096), events=Shown(as_json=True)
        )

    with Store.open(tmp_store, create=True) as st:
        first = run()
        ids = st.checkpoint_ids()
        assert run() == []
        assert st.checkpoint_ids() == ids
        assert st.latest() == first[-1].checkpoint_id
    assert "already imported" in capsys.readouterr().err
