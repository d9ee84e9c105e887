"""A save of source paths from Python gets the CLI's guarantees (issue 16, move 5).

``apollo-cas save SOURCE...`` refuses a bad source before the store (or its
history import) is touched, imports the original tool's history when a source
or ``--checkpoint-dir`` is one, checks a tag before the first of several
sources, and lets one unreadable source not stop the others. Each of those is
:mod:`apollo_cas.save_paths`' (and :mod:`apollo_cas.batch`'s), so a Python
caller of :func:`save_paths` gets the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas import opening  # noqa: E402
from apollo_cas.batch import PartialFailure, each  # noqa: E402
from apollo_cas.errors import (  # noqa: E402
    ApolloError,
    Refused,
    SourceError,
    SourceNotFound,
    StaleHandles,
    StoreLocked,
    UsageError,
)
from apollo_cas.save_paths import (  # noqa: E402
    SaveEvents,
    SaveOptions,
    check_sources,
    save_path,
    save_paths,
)
from apollo_cas.sources import handles  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from tests.sources.handle_files import CpuIpc, handles_file  # noqa: E402


class Record(SaveEvents):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def source_saved(self, path: Path, result: object) -> None:
        self.events.append(("source_saved", path.name))

    def failed(self, path: Path, error: ApolloError) -> None:
        self.events.append(("failed", path.name))

    def saved(self, path: Path, result: object, stays_latest: bool) -> None:
        self.events.append(("imported", path.name))

    def started(self, root: Path) -> None:
        self.events.append(("started", root.name))


@pytest.fixture
def weights(tmp_path, make_model, write_safetensors):
    return write_safetensors(make_model(layers=1, hidden=32, seed=3), tmp_path / "w.safetensors")


@pytest.fixture
def seed(tmp_path, write_seed, make_model):
    return write_seed(tmp_path / "ckpts", [make_model(layers=1, hidden=32, seed=s) for s in (1, 2)])


def test_a_missing_source_is_refused_before_anything_is_saved(tmp_path, weights) -> None:
    with Store.open(tmp_path / "store", create=True) as st:
        with pytest.raises(SourceNotFound, match="does not exist"):
            save_paths(st, [weights, tmp_path / "missing.safetensors"])
        assert st.checkpoint_ids() == []  # the first, good source was not saved either


def test_a_store_named_as_a_source_is_refused(tmp_path, weights) -> None:
    with Store.open(tmp_path / "store", create=True) as st:
        st.save({"w": torch.zeros(4)})
        with pytest.raises(UsageError, match="is an apollo_cas store, not weights to save"):
            check_sources([tmp_path / "store"])


def test_a_bad_handles_file_is_refused_before_the_history_import(tmp_path, seed) -> None:
    """``--checkpoint-dir DIR --handles FILE`` with a handles file that does not
    parse leaves DIR as it was: no history import, no store born."""
    bad = tmp_path / "handles.pt"
    bad.write_bytes(b"not a handles file")
    st, created = opening.open_for_save(str(seed.root))
    assert created
    with st, pytest.raises(SourceError):
        save_paths(st, [bad], kind="handles", history=seed.root)
    assert not (seed.root / "config").exists()


def test_a_checkpoint_root_as_a_source_imports_its_history(tmp_path, seed) -> None:
    rec = Record()
    with Store.open(tmp_path / "store", create=True) as st:
        results = save_paths(st, [seed.root], SaveOptions(tag="newest"), events=rec)
        assert [r.manifest.created for r in results if r.manifest] == seed.timestamps
        assert st.resolve("newest") == st.latest() == results[-1].checkpoint_id
    assert rec.events == [("imported", d.name) for d in seed.dirs]


def test_history_is_imported_first_then_the_sources(weights, seed) -> None:
    """The original tool's checkpoint dir used as the store: its history first,
    then the new save on top (and again on a later save, only what is new)."""
    rec = Record()
    st, _ = opening.open_for_save(str(seed.root))
    with st:
        results = save_paths(st, [weights], history=seed.root, events=rec)
        assert len(results) == len(seed.dirs) + 1
        assert st.latest() == results[-1].checkpoint_id
        assert save_paths(st, [weights], history=seed.root)[0].unchanged
    assert rec.events == [
        ("started", seed.root.name),
        *[("imported", d.name) for d in seed.dirs],
        ("source_saved", weights.name),
    ]


def test_a_taken_tag_is_refused_before_the_first_source(tmp_path, weights, seed) -> None:
    with Store.open(tmp_path / "store", create=True) as st:
        first = st.save({"w": torch.zeros(4)}, tag="t")
        st.save({"w": torch.ones(4)})
        with pytest.raises(Refused, match="already names"):
            save_paths(st, [weights, seed.dirs[0]], SaveOptions(tag="t"))
        assert len(st.checkpoint_ids()) == 2 and st.resolve("t") == first.checkpoint_id


def test_one_unreadable_source_does_not_stop_the_others(tmp_path, weights, seed) -> None:
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")  # exists, but is no safetensors
    rec = Record()
    with Store.open(tmp_path / "store", create=True) as st:
        with pytest.raises(PartialFailure) as got:
            save_paths(st, [weights, torn, seed.dirs[0]], SaveOptions(tag="last"), events=rec)
        assert len(st.checkpoint_ids()) == 2
        # The tag names the last source's checkpoint.
        assert st.resolve("last") == got.value.done["results"][-1]["checkpoint"]
    assert rec.events == [
        ("source_saved", weights.name),
        ("failed", torn.name),
        ("source_saved", seed.dirs[0].name),
    ]
    assert "1 of 3 sources failed" in got.value.message
    assert [f["source"] for f in got.value.done["failed"]] == [str(torn)]
    assert len(got.value.done["results"]) == 2
    # A single source's error is its own.
    with Store.open(tmp_path / "store") as st, pytest.raises(SourceError):
        save_paths(st, [torn])


def test_an_error_of_the_store_stops_the_rest() -> None:
    """A locked (full, unreachable) store fails every item the same way: not tried."""

    def one(i: int, item: str) -> str:
        if item == "b":
            raise StoreLocked("locked")
        return item

    failed: list[str] = []
    batch = each(
        ["a", "b", "c"], one, recoverable=(SourceError,), failed=lambda x, _: failed.append(x)
    )
    assert batch.done == [("a", "a")] and failed == ["b"] and batch.not_tried == ["c"]
    with pytest.raises(PartialFailure, match="not tried: c"):
        batch.raise_if_failed("item", ["a"], {})


def test_a_handles_file_saved_by_path_is_stale_checked(tmp_path) -> None:
    """handle_options reach open_handles; Store.save checks the HandlesSource."""
    assert "HandlesSource" in handles.__all__
    opts = SaveOptions(handle_options={"ipc": CpuIpc()})
    with Store.open(tmp_path / "store", create=True) as st:
        (first,) = save_path(st, handles_file(tmp_path), "handles", opts)
        reloaded = handles_file(tmp_path, {"model.norm.weight": (8,)}, name="reloaded.pt")
        with pytest.raises(StaleHandles):
            save_paths(st, [reloaded], opts)
        assert st.latest() == first.checkpoint_id
