"""torch ``.pt`` state_dicts: loaded with ``weights_only=True``, never running code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from apollo_cas.errors import SourceError, UnsafePickle, UnsupportedSource
from apollo_cas.sources import detect_kind, open_path
from apollo_cas.store import Store


def read_all(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with open_path(path) as src:
        assert src.info.kind == "pt"
        return {t.name: (t.dtype.name, t.shape, bytes(t.read(0, t.nbytes))) for t in src.tensors()}


def expected(tensors, tensor_bytes):
    from apollo_cas import dtypes

    return {
        k: (dtypes.from_torch(v.dtype).name, tuple(v.shape), tensor_bytes(v))
        for k, v in tensors.items()
    }


class Evil:
    """Unpickling this runs a shell command (if the loader lets it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_dict(tmp_path, make_model, write_pt, tensor_bytes):
    model = make_model()
    model["scalar"] = torch.tensor(7, dtype=torch.int64)
    model["empty"] = torch.empty(0, dtype=torch.bfloat16)
    model["fp8"] = torch.randn(10).to(torch.float8_e4m3fn)
    f = write_pt(model, tmp_path / "model.pt")
    assert detect_kind(f) == "pt"
    assert read_all(f) == expected(model, tensor_bytes)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", "model_state_dict"])
def test_common_wrappers_are_unwrapped(tmp_path, make_model, tensor_bytes, wrapper):
    model = make_model(layers=1)
    f = tmp_path / "ckpt.pt"
    torch.save({wrapper: model, "epoch": 3, "optimizer_lr": 1e-4}, f)
    assert read_all(f) == expected(model, tensor_bytes)


def test_nested_dicts_are_flattened_with_dots(tmp_path, tensor_bytes):
    a, b = torch.arange(4.0), torch.ones(2, 2, dtype=torch.bfloat16)
    f = tmp_path / "nested.pt"
    torch.save({"encoder": {"layer": {"w": a}}, "head": b, "step": 10}, f)
    assert read_all(f) == expected({"encoder.layer.w": a, "head": b}, tensor_bytes)


def test_views_and_tied_weights_are_saved_as_their_values(tmp_path, tensor_bytes):
    emb = torch.randn(6, 4)
    t = torch.arange(12.0).reshape(3, 4)
    sd = {"emb": emb, "tied": emb, "transposed": t.t(), "row": t[1]}
    f = tmp_path / "views.pt"
    torch.save(sd, f)
    assert read_all(f) == expected({k: v.contiguous() for k, v in sd.items()}, tensor_bytes)


def test_legacy_non_zip_format(tmp_path, tensor_bytes):
    sd = {"w": torch.randn(5, 3), "b": torch.arange(3, dtype=torch.int32)}
    f = tmp_path / "legacy.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=False)
    assert read_all(f) == expected(sd, tensor_bytes)


def test_store_round_trip(tmp_path, make_model, write_pt, assert_same_tensors):
    model = make_model(dtype=torch.float16)
    f = write_pt(model, tmp_path / "m.pt")
    with Store.open(tmp_path / "store", create=True) as st, open_path(f) as src:
        r = st.save(src, block_size=4096)
        assert r.manifest.source.kind == "pt"
        assert_same_tensors(st.load(), model)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.pt"
    torch.save(
        {"w": torch.zeros(2), "x": Evil(marker)}, f, _use_new_zipfile_serialization=not legacy
    )
    with pytest.raises(UnsafePickle) as e:
        kind = detect_kind(f)  # detection must not unpickle either
        open_path(f, kind)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    assert "system" in msg  # names the global it refused
    assert "weights_only` set to `False`" not in msg  # never advise the unsafe load
    assert not marker.exists()


def test_plain_pickle_of_a_class_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2))
    with pytest.raises((UnsafePickle, UnsupportedSource)):
        open_path(f, "pt")
    assert not marker.exists()


def test_a_pickled_model_object_is_refused(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), f)  # the whole module, not its state_dict
    with pytest.raises(UnsafePickle, match="Linear"):
        open_path(f)


def test_not_a_state_dict(tmp_path):
    f = tmp_path / "t.pt"
    torch.save(torch.zeros(3), f)
    with pytest.raises(UnsupportedSource, match="not a state_dict"):
        open_path(f)


def test_no_tensors(tmp_path):
    f = tmp_path / "t.pt"
    torch.save({"epoch": 1, "lr": 0.1}, f)
    with pytest.raises(SourceError, match="no tensors"):
        open_path(f)


@pytest.mark.parametrize("cut", [10, 200, -50])
def test_truncated_file(tmp_path, make_model, write_pt, cut):
    f = write_pt(make_model(layers=1), tmp_path / "m.pt")
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(UnsupportedSource) as e:
        open_path(f, "pt")
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_unsupported_dtype_in_pt(tmp_path):
    f = tmp_path / "c.pt"
    torch.save({"z": torch.zeros(2, dtype=torch.complex64)}, f)
    with pytest.raises(SourceError, match="complex64"):
        open_path(f)
