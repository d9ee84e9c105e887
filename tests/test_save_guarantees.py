"""What the command line guarantees, a Python caller gets too (issue 16, move 5).

``apollo-cas save --handles`` refuses stale handles, imports the original
tool's history and creates a store only by its first save; each of those is
the library's, so ``Store.save(open_handles(path))``, :mod:`apollo_cas.history`
and :mod:`apollo_cas.opening` behave the same without the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas import history, opening  # noqa: E402
from apollo_cas.errors import Refused, StaleHandles, StoreNotFound  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.sources.mapping import MappingSource  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from tests.sources.handle_files import CpuIpc, dead_pid, handles_file  # noqa: E402

# ------------------------------------------------------------------- stale handles

RELOADED = {"model.layers.0.qkv_proj.weight": (12, 8), "model.norm.weight": (8,)}


def test_python_save_of_stale_handles_is_refused_like_the_cli(tmp_path: Path) -> None:
    """Handles whose tensors no longer match the previous checkpoint (the server
    reloaded another model) are refused by ``Store.save`` itself, with the error
    the CLI's check gives, and nothing is added to the series."""
    with Store.open(tmp_path / "store", create=True) as st:
        with handles.open_handles(handles_file(tmp_path), ipc=CpuIpc()) as src:
            first = st.save(src)
        stale = handles_file(tmp_path, RELOADED, name="reloaded.pt")
        with handles.open_handles(stale, ipc=CpuIpc()) as src:
            assert first.manifest is not None
            with pytest.raises(StaleHandles) as expected:
                handles.check_against(first.manifest, src)  # what the CLI ran
            with pytest.raises(StaleHandles) as got:
                st.save(src)
            assert str(got.value) == str(expected.value)
            assert got.value.hint == expected.value.hint
            assert "(6, 8) -> (12, 8)" in str(got.value)
            assert st.latest() == first.checkpoint_id
            forced = st.save(src, force=True)  # the model really changed
        assert not forced.unchanged and st.latest() == forced.checkpoint_id


def test_python_save_of_handles_of_a_dead_owner_is_refused(tmp_path: Path) -> None:
    ipc = CpuIpc()
    with pytest.raises(StaleHandles):
        handles.open_handles(handles_file(tmp_path, pid=dead_pid()), ipc=ipc)
    assert ipc.made == {}


def test_other_sources_may_change_shape(tmp_path: Path) -> None:
    """Only handles carry the check: a changed model from a file or memory saves."""
    with Store.open(tmp_path / "store", create=True) as st:
        st.save({"w": torch.zeros(4, 4)})
        r = st.save(MappingSource({"w": torch.zeros(8, 4)}))
        assert not r.unchanged


# ------------------------------------------------------------------- history import


def test_history_import_through_the_library(
    tmp_path: Path, write_seed, make_model, write_safetensors
) -> None:
    models = [make_model(layers=1, hidden=32, seed=s) for s in range(3)]
    seed = write_seed(tmp_path / "ckpts", models)
    events: list[tuple[str, str]] = []

    class Record(history.ImportEvents):
        def skipped(self, path: Path, reason: str) -> None:
            events.append(("skipped", path.name))

        def saved(self, path: Path, result: object, stays_latest: bool) -> None:
            events.append(("saved", path.name))

    with Store.open(tmp_path / "store", create=True) as st:
        results = history.import_history(st, seed.root, tag="newest", events=Record())
        assert [r.manifest.created for r in results if r.manifest] == seed.timestamps
        assert events == [("saved", d.name) for d in seed.dirs]
        assert st.resolve("newest") == st.latest() == results[-1].checkpoint_id
        events.clear()
        assert history.import_history(st, seed.root, events=Record()) == []  # idempotent
        assert events == [("skipped", d.name) for d in seed.dirs]
        # An import older than a live save stays behind it.
        live = write_safetensors(make_model(layers=1, hidden=32, seed=9), tmp_path / "l.st")
        from apollo_cas.sources import open_path

        with open_path(live) as src:
            newest = st.save(src, series="other").checkpoint_id
        got = history.import_history(st, seed.root, series="other")
        assert len(got) == 3 and st.latest("other") == newest


def test_resume_history_imports_a_checkpoint_dir_once(tmp_path: Path, write_seed, make_model):
    seed = write_seed(tmp_path / "ckpts", [make_model(layers=1, hidden=32, seed=s) for s in (1, 2)])
    started: list[Path] = []

    class Record(history.ImportEvents):
        def started(self, root: Path) -> None:
            started.append(root)

    with opening.open_for_save(str(seed.root))[0] as st:
        assert len(history.resume_history(st, seed.root, events=Record())) == 2
        assert history.resume_history(st, seed.root, events=Record()) == []
    assert started == [seed.root]  # announced on first use only
    assert history.resume_history(Store.open(seed.root), tmp_path / "nothing") == []


# ------------------------------------------------------------------- store opening


def test_open_for_save_creates_by_the_first_save(tmp_path: Path) -> None:
    st, created = opening.open_for_save(str(tmp_path / "new"))
    assert created
    with pytest.raises(StoreNotFound):
        Store.open(tmp_path / "new")  # nothing made before the first save
    with st:
        st.save({"w": torch.zeros(4)})
    st2, created2 = opening.open_for_save(str(tmp_path / "new"))
    assert not created2 and st2.latest() is not None
    st2.close()


def test_open_for_save_refuses_someones_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Refused, match="not an apollo_cas store"):
        opening.open_for_save(str(tmp_path))
    st, created = opening.open_for_save(str(tmp_path), allow_non_empty=True)
    assert created
    st.close()


def test_what_a_killed_format_2_first_save_left_is_not_someone_elses_files(tmp_path: Path) -> None:
    """Packs and an index without a config are the store being made (its first save died
    after writing them): the next save may make the store there, without --force."""
    root = tmp_path / "store"
    for sub in ("packs/ab", "index", "locks"):
        (root / sub).mkdir(parents=True)
    (root / "packs" / "ab" / "leftover").write_bytes(b"x")
    store, new = opening.open_for_save(str(root))
    assert new
    store.close()
