"""A store is created by its first save's commit: a first save that fails leaves
nothing behind, and never removes what a concurrent save wrote (issue 11,
item 12). Bad inputs that used to end in "internal error" are one clear line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from lying import LyingSource, LyingTensor

from apollo_cas import layout
from apollo_cas.backends import open_backend
from apollo_cas.errors import CorruptManifest
from apollo_cas.locks import Locks
from apollo_cas.store import Store


def _safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _bad_sources(d: Path) -> dict[str, tuple[Path, str | None]]:
    huge = json.dumps({"w": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}})
    text = d / "notes.pt"
    text.write_text("these are my notes, not weights\n" * 20)
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.ones(1)}, d / "sparse.pt")
    torch.save({"w": torch.empty(4, device="meta")}, d / "meta.pt")
    return {
        "shape-2^64": (_safetensors(d / "huge.safetensors", huge.encode()), None),
        "nested-header": (
            _safetensors(d / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            None,
        ),
        "text-as-pt": (text, "pt"),
        "sparse-pt": (d / "sparse.pt", None),
        "meta-pt": (d / "meta.pt", None),
    }


@pytest.mark.parametrize(
    "case", ["shape-2^64", "nested-header", "text-as-pt", "sparse-pt", "meta-pt"]
)
def test_bad_input_is_one_clear_error_and_leaves_no_store(tmp_path, tmp_store, run_cli, case):
    path, kind = _bad_sources(tmp_path)[case]
    args = ["save", path, "--store", tmp_store] + (["--source-kind", kind] if kind else [])
    r = run_cli(*args)
    assert r.returncode not in (0, 135)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "internal error" not in r.stderr
    assert not Path(tmp_store).exists()


def test_failed_first_save_leaves_no_store(tmp_store):
    with Store(open_backend(tmp_store)) as st, pytest.raises(CorruptManifest):
        st.save(LyingSource([LyingTensor("w", (-2, -2), bytes(4096 * 3))]), block_size=4096)
    assert not Path(tmp_store).exists()
    # The next save creates it.
    with Store(open_backend(tmp_store)) as st:
        st.save({"w": np.ones(8, dtype=np.float32)})
    with Store.open(tmp_store) as st:
        assert len(st.checkpoint_ids()) == 1


def test_failed_first_save_keeps_a_directory_the_user_made(fast_tmp_dir):
    d = fast_tmp_dir / "mine"
    d.mkdir()
    (d / "README").write_text("my notes")
    with Store(open_backend(str(d))) as st, pytest.raises(CorruptManifest):
        st.save(LyingSource([LyingTensor("w", (-1, -2), bytes(8))]))
    assert sorted(p.name for p in d.iterdir()) == ["README"]


def test_failed_first_save_spares_a_concurrent_first_save(tmp_store):
    """Another process is inside its own first save (it holds the shared lock and
    has written a chunk): the failing one must not remove that chunk."""
    other = open_backend(tmp_store)
    key = layout.chunk_key("ab" * 16)
    with Locks(other).hold("shared", "save default"):
        other.put(key, b"a chunk the other save relies on")
        with Store(open_backend(tmp_store)) as st, pytest.raises(CorruptManifest):
            st.save(LyingSource([LyingTensor("w", (-2, -2), bytes(16))]))
        assert other.get(key) == b"a chunk the other save relies on"


def test_failed_first_save_leaves_no_object_in_an_object_store():
    from apollo_cas.backends.memory import MemoryBackend

    backend = MemoryBackend()
    with Store(backend) as st, pytest.raises(CorruptManifest):
        st.save(LyingSource([LyingTensor("w", (-2, -2), bytes(4096 * 3))]), block_size=4096)
    assert list(backend.list("")) == []
