"""gc and forget: retention, the two-phase sweep, and what it must never delete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from apollo_cas import gc as gc_mod
from apollo_cas.errors import CorruptManifest, UsageError
from apollo_cas.gc import GcReport, forget
from apollo_cas.gc import gc as _gc
from apollo_cas.manifest import SourceInfo
from apollo_cas.retention import RetentionPolicy
from apollo_cas.sources import open_mapping
from apollo_cas.store import Store
from apollo_cas.verify import verify

BS = 4096


def gc(store: Store, *args: Any, **kw: Any) -> GcReport:
    """gc that leaves no unreachable chunk behind: in a format-2 store every pack
    with any unused byte is repacked (``max_unused=0``), as a format-1 sweep would."""
    kw.setdefault("max_unused", 0.0)
    return _gc(store, *args, **kw)


_POOL = np.random.default_rng(1234).integers(0, 256, (12, BS), dtype=np.uint8)


def model(blocks: list[int], tail: int = 0, poke: int | None = None) -> dict[str, np.ndarray]:
    """Tensor ``w`` made of pool blocks (shared blocks dedup across checkpoints),
    optionally one byte changed per block (``poke``: deltas against the parent
    pay off), and a small tensor ``t`` of ``tail`` bytes."""
    w = _POOL[blocks].copy()
    if poke is not None:
        w[:, poke % BS] ^= 0x5A
    t = (np.arange(tail, dtype=np.uint32) * 2654435761 % 251).astype(np.uint8)
    return {"w": w.reshape(-1), "t": t}


def as_bytes(m: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in m.items()}


def read_back(store: Store, cid: str) -> dict[str, bytes]:
    """A checkpoint's tensors, reassembled from verified chunks."""
    m = store.manifest(cid)
    return {t.name: b"".join(store.read_chunk(c) for c in t.chunks) for t in m.tensors}


def chunk_ids_on_disk(root: str) -> set[bytes]:
    """The chunks present (format 1: chunk files; format 2: what the indexes list)."""
    with Store.open(root) as st:
        return st.inventory.ids()


def manifests_on_disk(root: str) -> set[str]:
    return {p.name for p in (Path(root) / "manifests").glob("*") if not p.name.startswith(".")}


def reachable(store: Store) -> set[bytes]:
    out: set[bytes] = set()
    for cid in store.checkpoint_ids():
        out |= store.manifest(cid).chunk_ids()
    return out


def files(root: str) -> dict[str, bytes]:
    """Every object of a store except locks (gc and verify create and remove theirs)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and "locks" not in p.parts and not p.name.startswith(".refs")
    }


@pytest.fixture
def store(tmp_store: str) -> Iterator[Store]:
    with Store.open(tmp_store, create=True) as s:
        yield s


def orphan_chunk(store: Store, seed: int) -> bytes:
    """A chunk nothing references (what an interrupted save leaves)."""
    data = np.random.default_rng(seed).integers(0, 256, BS, dtype=np.uint8).tobytes()
    cid = store.chunks.put_block(data).chunk_id
    store.chunks.flush()  # format 2: its pack and index written, as by a save's end
    return cid


# ---------------------------------------------------------------------------
# retention and sweep


def test_without_policy_gc_only_sweeps_unreferenced_chunks(store: Store, tmp_store: str) -> None:
    a = store.save(model([0, 1, 2]), block_size=BS).checkpoint_id or ""
    b = store.save(model([3, 4, 5]), block_size=BS).checkpoint_id or ""
    orphan = orphan_chunk(store, 1)
    assert orphan in chunk_ids_on_disk(tmp_store)
    assert gc(store).young_chunks_kept == 1  # too young: it may belong to a save in flight
    r = gc(store, grace=0)
    assert r.forgotten == [] and set(r.kept) == {a, b}
    assert r.chunks_deleted == 1 and r.bytes_freed > 0
    assert chunk_ids_on_disk(tmp_store) == reachable(store)
    assert read_back(store, a) == as_bytes(model([0, 1, 2]))
    assert read_back(store, b) == as_bytes(model([3, 4, 5]))


def test_keep_last_forgets_old_checkpoints_and_their_chunks(store: Store, tmp_store: str) -> None:
    ids = [
        store.save(model([i, i + 1], tail=i * 7), block_size=BS, created=1000.0 + i).checkpoint_id
        or ""
        for i in range(5)
    ]
    r = gc(store, RetentionPolicy(keep_last=2))
    assert r.forgotten == ids[:3]
    assert set(r.kept) == set(ids[3:])
    assert manifests_on_disk(tmp_store) == set(ids[3:])
    assert chunk_ids_on_disk(tmp_store) == reachable(store)
    for i in (3, 4):
        assert read_back(store, ids[i]) == as_bytes(model([i, i + 1], tail=i * 7))
    assert verify(store, read_data=True).ok


def test_dry_run_deletes_nothing_and_predicts_the_real_run(store: Store, tmp_store: str) -> None:
    for i in range(4):
        store.save(model([i, 8], tail=3), block_size=BS, created=1000.0 + i)
    orphan_chunk(store, 7)
    before = files(tmp_store)
    dry = gc(store, RetentionPolicy(keep_last=1), dry_run=True)
    assert files(tmp_store) == before
    assert dry.dry_run and len(dry.forgotten) == 3 and dry.chunks_deleted > 0
    real = gc(store, RetentionPolicy(keep_last=1))
    assert real.forgotten == dry.forgotten
    assert real.chunks_deleted == dry.chunks_deleted
    assert real.bytes_freed == dry.bytes_freed
    freed = sum(len(v) for v in before.values()) - sum(len(v) for v in files(tmp_store).values())
    assert freed == real.bytes_freed


def test_tags_and_every_series_latest_are_always_kept(store: Store, tmp_store: str) -> None:
    a = [
        store.save(model([i]), series="a", block_size=BS, created=100.0 + i).checkpoint_id or ""
        for i in range(4)
    ]
    b = [
        store.save(model([i + 4]), series="b", block_size=BS, created=200.0 + i).checkpoint_id or ""
        for i in range(3)
    ]
    store.tag(a[0], "first")
    r = gc(store, RetentionPolicy(keep_last=0))
    assert set(r.kept) == {a[0], a[3], b[2]}
    assert any("tag first" in x for x in r.reasons[a[0]])
    assert manifests_on_disk(tmp_store) == {a[0], a[3], b[2]}
    assert read_back(store, a[0]) == as_bytes(model([0]))
    assert store.resolve("latest@b") == b[2]
    assert verify(store, read_data=True).ok


def test_gc_keeps_delta_bases_of_kept_checkpoints(store: Store, tmp_store: str) -> None:
    base = store.save(model(list(range(6))), block_size=BS, created=1.0).checkpoint_id or ""
    child = (
        store.save(model(list(range(6)), poke=17), block_size=BS, created=2.0).checkpoint_id or ""
    )
    m = store.manifest(child)
    if not m.bases:
        pytest.skip("this codec policy stored no deltas")
    r = gc(store, RetentionPolicy(keep_last=1))
    assert r.forgotten == [base]
    # The parent's manifest is gone, but the blocks the child's deltas need stay.
    assert set(m.bases.values()) <= chunk_ids_on_disk(tmp_store)
    assert read_back(store, child) == as_bytes(model(list(range(6)), poke=17))


def test_gc_removes_old_leftovers_of_interrupted_writes_only(store: Store, tmp_store: str) -> None:
    store.save(model([1, 2]), block_size=BS)
    d = Path(tmp_store) / "chunks" / "ab"
    d.mkdir(parents=True, exist_ok=True)
    old, young = d / ".tmp-1234-deadbeef-x", d / ".tmp-1234-cafebabe-y"
    old.write_bytes(b"half a chunk")
    young.write_bytes(b"a write in flight")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    r = gc(store, grace=3600)
    assert r.temporaries_removed == 1
    assert not old.exists() and young.exists()
    # Names without a writer tag (older versions) cannot be judged: grace 0
    # still leaves them for the floor (tests/test_gc_leftovers.py has the rest).
    assert gc(store, grace=0).temporaries_removed == 0
    os.utime(young, (time.time() - 3600, time.time() - 3600))
    assert gc(store, grace=0).temporaries_removed == 1
    assert not young.exists()


def test_gc_refuses_to_sweep_when_a_manifest_is_unreadable(store: Store, tmp_store: str) -> None:
    a = store.save(model([1, 2]), block_size=BS, created=1.0).checkpoint_id or ""
    store.save(model([3, 4]), block_size=BS, created=2.0)
    orphan_chunk(store, 3)
    p = Path(tmp_store) / "manifests" / a
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    before = files(tmp_store)
    with Store.open(tmp_store) as fresh, pytest.raises(CorruptManifest):
        gc(fresh, RetentionPolicy(keep_last=1))
    assert files(tmp_store) == before  # without that manifest we cannot know what it needs
    # The way out: forget the damaged checkpoint (its manifest is not decoded), then gc.
    with Store.open(tmp_store) as fresh:
        forget(fresh, a)
        r = gc(fresh, RetentionPolicy(keep_last=1), grace=0)
        assert r.chunks_deleted == 3  # a's two blocks and the orphan
        assert verify(fresh, read_data=True).ok


def test_a_long_lived_process_saves_correctly_after_another_process_gcs(tmp_store: str) -> None:
    """Regression: a chunk cache kept across saves named chunks gc had swept."""
    trainer = Store.open(tmp_store, create=True)
    a, b = model([0, 1, 2, 3]), model([4, 5, 6, 7])
    trainer.save(a, block_size=BS)
    trainer.save(b, block_size=BS)
    with Store.open(tmp_store) as other:
        assert gc(other, RetentionPolicy(keep_last=1)).chunks_deleted > 0
    c = trainer.save(a, block_size=BS).checkpoint_id or ""  # the weights went back to a
    with Store.open(tmp_store) as fresh:
        assert read_back(fresh, c) == as_bytes(a)
        assert verify(fresh, read_data=True).ok


# ---------------------------------------------------------------------------
# saves and tags that race the mark phase


def test_a_save_finishing_during_the_mark_phase_keeps_its_chunks(tmp_store: str) -> None:
    """The dangerous case: a save deduplicates against chunks gc marked as garbage."""
    with Store.open(tmp_store, create=True) as st:
        old = model([0, 1, 2, 3], tail=5)
        st.save(old, block_size=BS, created=1.0)
        st.save(model([6, 7, 8, 9]), block_size=BS, created=2.0)
        late: dict[str, str] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "mark" and done == total and not late:
                # Another process saves `old` again between the phases: every
                # block already exists (as a gc candidate), so it writes nothing.
                with Store.open(tmp_store) as writer:
                    r = writer.save(old, block_size=BS, created=3.0)
                    assert r.stats.new_chunks == 0
                    late["id"] = r.checkpoint_id or ""

        r = gc(st, RetentionPolicy(keep_last=1), progress=progress)
        assert r.rescued_chunks > 0
        assert late["id"] in r.kept
    with Store.open(tmp_store) as fresh:
        assert read_back(fresh, late["id"]) == as_bytes(old)
        assert verify(fresh, read_data=True).ok
        assert chunk_ids_on_disk(tmp_store) == reachable(fresh)


def test_a_tag_added_during_the_mark_phase_keeps_the_checkpoint(tmp_store: str) -> None:
    with Store.open(tmp_store, create=True) as st:
        first = st.save(model([0, 1]), block_size=BS, created=1.0).checkpoint_id or ""
        st.save(model([2, 3]), block_size=BS, created=2.0)

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "mark" and done == total:
                with Store.open(tmp_store) as other:
                    other.tag(first, "keepme", force=True)

        r = gc(st, RetentionPolicy(keep_last=1), progress=progress)
        assert first not in r.forgotten
    with Store.open(tmp_store) as fresh:
        assert read_back(fresh, first) == as_bytes(model([0, 1]))
        assert verify(fresh, read_data=True).ok


class _GapHook:
    """Wraps a store's locks; runs ``on_gap`` after the n-th exclusive hold ends,
    i.e. in a gap between two sweep batches, where a save may run."""

    def __init__(self, locks: Any, n: int, on_gap: Callable[[], None]) -> None:
        self.locks, self.n, self.on_gap, self.count = locks, n, on_gap, 0

    @contextmanager
    def hold(self, kind: str, purpose: str, timeout: float = 60.0) -> Iterator[Any]:
        with self.locks.hold(kind, purpose, timeout) as info:
            yield info
        self.count += 1
        if self.count == self.n:
            self.on_gap()


def test_batched_sweep_with_a_save_in_a_gap(
    tmp_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep lets saves in between batches. A save in a gap may dedup against
    candidates not yet deleted, including delta chunks: their bases must still be
    there, which is why dependents are deleted before their bases. (Format 1:
    a format-2 sweep deletes a few packs in one hold.)"""
    monkeypatch.setattr(gc_mod, "DELETE_BATCH", 1)
    monkeypatch.setattr(gc_mod, "YIELD_SECONDS", 0.0)
    blocks = list(range(8))
    with Store.open(tmp_store, create=True, format=1) as st:
        st.save(model(blocks), block_size=BS, created=1.0)
        mid = model(blocks, poke=99)
        mid_id = st.save(mid, block_size=BS, created=2.0).checkpoint_id or ""
        st.save(model([9, 10, 11]), block_size=BS, created=3.0)
        deltas = st.manifest(mid_id).bases
        late: dict[str, str] = {}

        def save_mid_again() -> None:
            with Store.open(tmp_store) as writer:
                late["id"] = writer.save(mid, block_size=BS, created=4.0).checkpoint_id or ""

        dry = gc(st, RetentionPolicy(keep_last=1), dry_run=True)
        st.locks = _GapHook(st.locks, max(1, dry.chunks_deleted // 2), save_mid_again)  # type: ignore[assignment]
        r = gc(st, RetentionPolicy(keep_last=1), max_hold=0.0)
        assert late, "the gap hook never ran"
        assert r.chunks_deleted + r.rescued_chunks == dry.chunks_deleted
        if deltas:
            assert r.rescued_chunks > 0 or r.chunks_deleted == dry.chunks_deleted
    with Store.open(tmp_store) as fresh:
        assert read_back(fresh, late["id"]) == as_bytes(mid)
        assert verify(fresh, read_data=True).ok
        assert chunk_ids_on_disk(tmp_store) == reachable(fresh)


# ---------------------------------------------------------------------------
# multi-rank groups


def test_groups_are_kept_or_forgotten_whole(tmp_store: str) -> None:
    with Store.open(tmp_store, create=True) as st:
        if "group" not in Store.save.__code__.co_varnames:
            pytest.skip("this store has no multi-rank groups")
        ids: dict[tuple[int, int], str] = {}
        for step in range(3):
            for rank in range(2):
                src = open_mapping(
                    model([step * 2 + rank]), SourceInfo(kind="mapping", rank=rank, world_size=2)
                )
                saved = st.save(src, block_size=BS, group=f"step{step}", created=10.0 * step + rank)
                ids[step, rank] = saved.checkpoint_id or ""
        # Rank 1 keeps its last 1, but a tag keeps rank 0 of step 0: that group
        # stays whole; group step1 has no kept member and goes.
        st.tag(ids[0, 0], "pinned")
        r = gc(st, RetentionPolicy(keep_last=1))
        assert ids[0, 1] in r.kept and ids[0, 0] in r.kept
        assert set(r.forgotten) == {ids[1, 0], ids[1, 1]}
        assert r.groups_deleted == 1
        names = {g.name for g in st.groups()}
        assert names == {"step0", "step2"}
        assert verify(st, read_data=True).ok
        with pytest.raises(UsageError, match="group"):
            forget(st, ids[0, 1])


# ---------------------------------------------------------------------------
# forget


def test_forget_one_checkpoint(store: Store, tmp_store: str) -> None:
    a = store.save(model([0, 1]), block_size=BS, created=1.0).checkpoint_id or ""
    b = store.save(model([2, 3]), block_size=BS, created=2.0).checkpoint_id or ""
    c = store.save(model([4, 5]), block_size=BS, created=3.0).checkpoint_id or ""
    store.tag(b, "release")
    with pytest.raises(UsageError, match="tagged release") as exc:
        forget(store, b)
    assert "--delete" in str(exc.value)
    with pytest.raises(UsageError, match="latest"):
        forget(store, c)
    forget(store, a)
    assert manifests_on_disk(tmp_store) == {b, c}
    r = gc(store, grace=0)  # a's chunks are unreferenced now, and young
    assert r.chunks_deleted == 2  # a's two blocks, used by nothing else
    assert verify(store, read_data=True).ok


# ---------------------------------------------------------------------------
# command line


def test_cli_gc_forget_and_errors(tmp_store: str, run_cli: Callable[..., Any]) -> None:
    with Store.open(tmp_store, create=True) as st:
        ids = [
            st.save(model([i]), block_size=BS, created=100.0 + i).checkpoint_id or ""
            for i in range(4)
        ]
        st.tag(ids[0], "v0")
    p = run_cli("gc", "--store", tmp_store, "--keep-last", "1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "would forget 2" in p.stdout and "nothing was deleted" in p.stdout
    assert ids[1][:12] in p.stdout and ids[2][:12] in p.stdout
    assert manifests_on_disk(tmp_store) == set(ids)

    # refusals because of what the store holds exit 1 (cli/exits.py)
    p = run_cli("forget", ids[0][:10], "--store", tmp_store)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "tag" in p.stderr
    p = run_cli("forget", "latest", "--store", tmp_store)
    assert p.returncode == 1 and "latest" in p.stderr
    p = run_cli("forget", ids[1][:10], "--store", tmp_store, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"forgotten": [ids[1]]}

    p = run_cli("gc", "--store", tmp_store, "--keep-within", "2 days")
    assert p.returncode == 2 and "duration" in p.stderr and p.stderr.count("\n") == 1
    p = run_cli("gc", "--store", tmp_store, "--keep-last", "-1")
    assert p.returncode == 2

    # --grace 0s: the forgotten checkpoint's chunks are unreferenced now, and young.
    p = run_cli("gc", "--store", tmp_store, "--keep-last", "1", "--json", "--grace", "0s")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["forgotten"] == [ids[2]]
    assert set(out["kept"]) == {ids[0], ids[3]}
    assert out["chunks_deleted"] == 2 and out["bytes_freed"] > 0
    p = run_cli("gc", "--store", tmp_store)
    assert p.returncode == 0 and "deleted 0 manifest(s) and 0 chunk(s)" in p.stdout
    p = run_cli("gc", "--store", str(Path(tmp_store).parent / "nope"))
    assert p.returncode == 1 and p.stderr.startswith("error: no apollo_cas store")


# ---------------------------------------------------------------------------
# a random sequence of saves, tags, forgets and gcs against a model


class GcMachine(RuleBasedStateMachine):
    """Random operations; after each, every checkpoint the model says exists
    restores bit-exactly, and after a gc no unreferenced chunk is left."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="apollo-gc-")
        self.store = Store.open(os.path.join(self.root, "s"), create=True, workers=2)
        self.content: dict[str, dict[str, bytes]] = {}  # checkpoint -> tensors
        self.tags: dict[str, str] = {}
        self.clock = 1_700_000_000.0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _latest(self) -> set[str]:
        return set(self.store.series().values())

    @rule(
        series=st.sampled_from(["a", "b"]),
        blocks=st.lists(st.integers(0, len(_POOL) - 1), min_size=1, max_size=5),
        poke=st.none() | st.integers(0, BS - 1),
        tail=st.integers(0, 300),
        advance=st.sampled_from([60.0, 1800.0, 3600.0, 5 * 3600.0, 86400.0, 3 * 86400.0]),
    )
    def save(
        self, series: str, blocks: list[int], poke: int | None, tail: int, advance: float
    ) -> None:
        self.clock += advance
        m = model(blocks, tail, poke)
        r = self.store.save(m, series=series, block_size=BS, created=self.clock)
        assert r.checkpoint_id is not None
        self.content.setdefault(r.checkpoint_id, as_bytes(m))
        assert self.content[r.checkpoint_id] == as_bytes(m)

    @precondition(lambda self: bool(self.content))
    @rule(data=st.data(), name=st.sampled_from(["t1", "t2", "t3"]))
    def tag(self, data: st.DataObject, name: str) -> None:
        cid = data.draw(st.sampled_from(list(self.content)))
        self.store.tag(cid, name, force=True)
        self.tags[name] = cid

    @precondition(lambda self: bool(self.tags))
    @rule(data=st.data())
    def untag(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.tags)))
        self.store.untag(name)
        del self.tags[name]

    @precondition(lambda self: bool(self.content))
    @rule(data=st.data())
    def forget_one(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(list(self.content)))
        protected = cid in self.tags.values() or cid in self._latest()
        if protected:
            with pytest.raises(UsageError):
                forget(self.store, cid)
        else:
            forget(self.store, cid)
            del self.content[cid]

    @rule(
        last=st.none() | st.integers(0, 3),
        hourly=st.none() | st.integers(0, 3),
        daily=st.none() | st.integers(0, 3),
        within=st.none() | st.sampled_from([3600.0, 86400.0]),
        orphans=st.integers(0, 2),
    )
    def collect(
        self,
        last: int | None,
        hourly: int | None,
        daily: int | None,
        within: float | None,
        orphans: int,
    ) -> None:
        for i in range(orphans):
            orphan_chunk(self.store, int(self.clock) + i)
        protected = set(self.tags.values()) | self._latest()
        policy = RetentionPolicy(
            keep_last=last, keep_hourly=hourly, keep_daily=daily, keep_within=within
        )
        r = gc(self.store, policy, now=self.clock, grace=0)
        assert not protected & set(r.forgotten)
        if policy.empty:
            assert r.forgotten == []
        assert set(r.kept) | set(r.forgotten) == set(self.content)
        for cid in r.forgotten:
            del self.content[cid]
        # Unreferenced chunks are gone; everything referenced is there.
        assert chunk_ids_on_disk(self.store.location) == reachable(self.store)

    @invariant()
    def everything_the_model_holds_restores(self) -> None:
        assert manifests_on_disk(self.store.location) == set(self.content) or not self.content
        for cid, tensors in self.content.items():
            assert read_back(self.store, cid) == tensors
        for name, cid in self.tags.items():
            assert self.store.resolve(name) == cid


TestGcMachine = GcMachine.TestCase
TestGcMachine.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# the same on S3


@pytest.mark.s3
def test_gc_forget_and_verify_on_s3(s3_location: str) -> None:
    """gc's listing, sizes, locks and deletes, and verify, through the S3 backend."""
    with Store.open(s3_location, create=True, workers=4) as st:
        ids = [
            st.save(model([i, i + 1]), block_size=BS, created=10.0 + i).checkpoint_id or ""
            for i in range(4)
        ]
        st.tag(ids[0], "first")
        orphan = orphan_chunk(st, 42)
        dry = gc(st, RetentionPolicy(keep_last=1), dry_run=True, grace=0)
        assert dry.forgotten == ids[1:3]
        r = gc(st, RetentionPolicy(keep_last=1), grace=0)
        assert r.forgotten == ids[1:3] and r.chunks_deleted == dry.chunks_deleted
        assert r.bytes_freed == dry.bytes_freed
        assert set(st.checkpoint_ids()) == {ids[0], ids[3]}
        assert not st.chunks.exists(orphan)
        assert read_back(st, ids[0]) == as_bytes(model([0, 1]))
        assert read_back(st, ids[3]) == as_bytes(model([3, 4]))
        report = verify(st, read_data=True)
        assert report.ok and report.unreferenced_chunks == 0
        with pytest.raises(UsageError):
            forget(st, ids[3])
        st.untag("first")
        forget(st, ids[0])
        assert gc(st, grace=0).chunks_deleted == 2  # blocks 0 and 1: only ids[0] used them
        assert list(st.backend.list("locks/")) == [] or all(
            k.startswith("locks/cas-") for k in st.backend.list("locks/")
        )


# ---------------------------------------------------------------------------
# format 2: packs


def pack_files(root: str) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (Path(root) / "packs").rglob("*") if p.is_file()}


def test_format2_repack_threshold(tmp_store: str) -> None:
    """A pack mostly unused is repacked (its live chunks copied, the pack deleted);
    one within ``max_unused`` is left alone; the dry run is the plan."""
    with Store.open(tmp_store, create=True, format=2) as st:
        first = st.save(model(list(range(10))), block_size=BS, created=1.0).checkpoint_id
        st.save(model([0, 11]), block_size=BS, created=2.0)  # keeps 1 of 10 blocks of pack 1
        before = pack_files(tmp_store)
        assert len(before) == 2
        lazy = _gc(st, RetentionPolicy(keep_last=1), max_unused=0.95, dry_run=True)
        assert lazy.packs["packs_repacked"] == 0 and lazy.packs["packs_deleted"] == 0
        plan = _gc(st, RetentionPolicy(keep_last=1), max_unused=0.5, dry_run=True)
        assert plan.packs["packs_repacked"] == 1 and plan.packs["chunks_repacked"] == 1
        assert pack_files(tmp_store) == before
        r = _gc(st, RetentionPolicy(keep_last=1), max_unused=0.5)
        assert r.forgotten == [first]
        assert r.bytes_freed == plan.bytes_freed
        after = pack_files(tmp_store)
        assert len(after) == 2 and set(after) != set(before)
        assert chunk_ids_on_disk(tmp_store) == reachable(st)
        assert len(list((Path(tmp_store) / "index").iterdir())) == 1
    with Store.open(tmp_store) as fresh:
        assert read_back(fresh, fresh.resolve("latest")) == as_bytes(model([0, 11]))
        assert verify(fresh, read_data=True).ok


def test_format2_lost_index_is_rebuilt_from_the_pack_trailer(tmp_store: str) -> None:
    """A pack whose index is gone is not garbage while a manifest needs its chunks:
    gc re-indexes it from its trailer."""
    with Store.open(tmp_store, create=True, format=2) as st:
        cid = st.save(model([1, 2, 3]), block_size=BS).checkpoint_id or ""
    for p in (Path(tmp_store) / "index").iterdir():
        p.unlink()
    with Store.open(tmp_store) as st:
        assert not verify(st).ok
        r = _gc(st, grace=0.0)
        assert r.packs["packs_reindexed"] == 1
        assert verify(st, read_data=True).ok
        assert read_back(st, cid) == as_bytes(model([1, 2, 3]))
