"""Leases and fencing (issue 11 item 2), in one process with controlled timing.

A save frozen past its lock's TTL on another host (a suspended VM, a stopped
job) loses its lock: another host's gc judges it expired, deletes it and
sweeps. Here the freeze is the save's own progress callback, which runs after
every block was checked or written and before the commit, and the other host's
verdict is the deletion of the save's lock object. On resuming, the save must
notice (fencing), take the lock again and prove its chunks still exist; and gc
must keep young unreferenced chunks, which may belong to a save in flight.
The same with a real process, SIGSTOP and a real pid namespace:
``tests/faults/test_leases.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apollo_cas import gc as gc_mod
from apollo_cas import layout
from apollo_cas.backends.local import LocalBackend
from apollo_cas.errors import ConcurrentUpdate
from apollo_cas.gc import gc
from apollo_cas.leases import LockInfo, SwapLockInfo, Term, boottime, expired, parse_lock
from apollo_cas.locks import Locks
from apollo_cas.retention import RetentionPolicy
from apollo_cas.store import Store
from apollo_cas.verify import verify

BS = 4096
NBLOCKS = 8


def model(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).integers(0, 256, NBLOCKS * BS, dtype=np.uint8)}


def read_back(store: Store, cid: str) -> bytes:
    [t] = store.manifest(cid).tensors
    return b"".join(store.read_chunk(c) for c in t.chunks)


def at_last_block(action: Callable[[], None]) -> Callable[[int], None]:
    """A save progress callback that runs ``action`` once every block is done."""
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if done[0] == NBLOCKS * BS:
            action()

    return progress


def lose_lock_to_another_hosts_gc(root: Path, **gc_args: object) -> Callable[[], None]:
    """What the frozen save's peers do: judge its lock expired, delete it, gc."""

    def act() -> None:
        with Store.open(root) as other:
            keys = list(other.backend.list(layout.LOCKS_PREFIX))
            assert len(keys) == 1  # the save's shared lock
            other.backend.delete(keys[0])
            gc(other, **gc_args)  # type: ignore[arg-type]

    return act


def test_a_save_whose_lock_was_lost_does_not_commit_swept_chunks(tmp_path: Path) -> None:
    """The data loss of item 2: the save found every chunk present (they belong
    to a checkpoint gc forgets), lost its lock while frozen, and gc swept them."""
    root = tmp_path / "store"
    old, new = model(1), model(2)
    with Store.open(root, create=True) as st:
        st.save(old, block_size=BS, created=1.0)
        latest = st.save(new, block_size=BS, created=2.0).checkpoint_id
    saver = Store.open(root)
    sweep = lose_lock_to_another_hosts_gc(root, policy=RetentionPolicy(keep_last=1))
    with pytest.raises(ConcurrentUpdate, match="removed meanwhile by gc") as exc:
        saver.save(old, block_size=BS, progress=at_last_block(sweep))  # weights went back
    assert "save again" in str(exc.value)
    with Store.open(root) as st:
        assert st.latest() == latest  # nothing committed
        assert verify(st, read_data=True).ok
        assert st.checkpoint_ids() == [latest]
    assert list((root / "locks").iterdir()) == []
    # Run again, it writes the swept chunks anew.
    cid = saver.save(old, block_size=BS).checkpoint_id or ""
    assert read_back(saver, cid) == old["w"].tobytes()
    assert verify(saver, read_data=True).ok


def test_young_chunks_of_a_save_in_flight_survive_gc_and_the_save_commits(
    tmp_path: Path,
) -> None:
    """The save wrote new chunks, then lost its lock; gc runs with its default
    grace window: the young unreferenced chunks stay, and the save, after
    taking its lock again and checking them, commits."""
    root = tmp_path / "store"
    with Store.open(root, create=True) as st:
        st.save(model(1), block_size=BS)
    saver = Store.open(root)
    fresh = model(3)
    r = saver.save(
        fresh, block_size=BS, progress=at_last_block(lose_lock_to_another_hosts_gc(root))
    )
    assert r.stats.new_chunks == NBLOCKS
    with Store.open(root) as st:
        assert st.latest() == r.checkpoint_id
        assert read_back(st, r.checkpoint_id or "") == fresh["w"].tobytes()
        assert verify(st, read_data=True).ok
    assert list((root / "locks").iterdir()) == []


def test_a_lease_that_expired_is_not_renewed_and_fails_confirmation(tmp_path: Path) -> None:
    """The holder's clock says its lease ran out (it was frozen): it must not
    extend it (others may have acted on the expiry) and confirm() says so."""
    now = [1000.0]
    locks = Locks(Store.open(tmp_path / "s", create=True).backend, ttl=60.0, clock=lambda: now[0])
    with locks.hold("shared", "save") as lease:
        now[0] += 30
        assert locks.confirm(lease)  # held without a gap: renewed to 1030 + 60
        assert lease.valid_until == 1090.0
        now[0] += 61  # frozen past the TTL
        assert locks.lapsed(lease)
        assert not locks.renew(lease) and not locks.confirm(lease)
        locks.reacquire(lease)
        assert not locks.lapsed(lease) and locks.confirm(lease)
        [key] = locks.backend.list(layout.LOCKS_PREFIX)
        assert key == layout.lock_key(lease.lock_id)
    assert list(locks.backend.list(layout.LOCKS_PREFIX)) == []


def test_a_lock_object_that_vanished_is_never_resurrected(tmp_path: Path) -> None:
    locks = Locks(Store.open(tmp_path / "s", create=True).backend)
    with locks.hold("shared", "save") as lease:
        locks.backend.delete(layout.lock_key(lease.lock_id))  # `unlock --force`, or a peer
        assert not locks.renew(lease)
        assert not locks.backend.exists(layout.lock_key(lease.lock_id))
        assert locks.lapsed(lease) and not locks.confirm(lease)


@pytest.mark.parametrize(
    "fmt,stage,rescued",
    # Format 1 deletes chunks in batches. Format 2 unindexes the packs it drops
    # first, so the gap that matters is between the forgotten manifests and that;
    # a lapse between pack deletes (a pack per chunk) finds the peer's save wrote
    # its chunks again (nothing indexed had them), and the rest of the packs go.
    [(1, "sweep", NBLOCKS - 1), (2, "forget", NBLOCKS), (2, "sweep", 0)],
)
def test_a_gc_that_lost_its_lock_mid_sweep_relists_before_deleting_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int, stage: str, rescued: int
) -> None:
    """The mirror case: gc is frozen past its exclusive lease between two sweep
    batches; a peer judges its lock expired, deletes it and saves weights that
    deduplicate against gc's remaining candidates. On resuming, gc must see
    that it lost its lease and re-list the manifests (rescuing those chunks)
    before it deletes anything more."""
    monkeypatch.setattr(gc_mod, "DELETE_BATCH", 1)  # one chunk per batch, many batches per hold
    monkeypatch.setattr(gc_mod, "YIELD_SECONDS", 0.0)
    root = tmp_path / "store"
    old = model(1)
    with Store.open(root, create=True, format=fmt, pack_size=BS) as st:
        st.save(old, block_size=BS, created=1.0)
        st.save(model(2), block_size=BS, created=2.0)
    late: dict[str, str] = {}

    def progress(step: str, done: int, total: int) -> None:
        if step == stage and done == 1 and not late:
            with Store.open(root) as peer:
                [key] = peer.backend.list(layout.LOCKS_PREFIX)  # gc's exclusive lock
                peer.backend.delete(key)
                late["id"] = peer.save(old, block_size=BS, created=3.0).checkpoint_id or ""

    with Store.open(root) as st:
        r = gc(st, RetentionPolicy(keep_last=1), progress=progress)
    assert late and r.rescued_chunks == rescued
    with Store.open(root) as st:
        assert st.latest() == late["id"]
        assert read_back(st, late["id"]) == old["w"].tobytes()
        assert verify(st, read_data=True).ok


class FreezesBeforeTheManifest(LocalBackend):
    """A directory backend on which the process "freezes" right before writing
    its manifest, after its fence passed: the clock jumps past the lease, a
    peer deletes the lock and runs gc."""

    def __init__(self, root: Path, now: list[float], peer: Callable[[], None]) -> None:
        super().__init__(root)
        self.now, self.peer = now, peer

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        if key.startswith(layout.MANIFESTS_PREFIX) and self.peer is not None:
            peer, self.peer = self.peer, None  # type: ignore[assignment]
            self.now[0] += 3600
            peer()
        return super().put_if_absent(key, data, durable=durable)


def test_a_lease_lost_during_the_commit_withdraws_the_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "store"
    old, new = model(1), model(2)
    with Store.open(root, create=True) as st:
        st.save(old, block_size=BS, created=1.0)
        latest = st.save(new, block_size=BS, created=2.0).checkpoint_id
    now = [2e9]
    peer = lose_lock_to_another_hosts_gc(root, policy=RetentionPolicy(keep_last=1))
    backend = FreezesBeforeTheManifest(root, now, peer)
    saver = Store(backend)
    saver.locks = Locks(backend, clock=lambda: now[0])
    with pytest.raises(ConcurrentUpdate, match="removed meanwhile by gc"):
        saver.save(old, block_size=BS)
    with Store.open(root) as st:
        assert st.latest() == latest and st.checkpoint_ids() == [latest]
        assert verify(st, read_data=True).ok


# ---------------------------------------------------------------------------
# one lease rule and two lock bodies (apollo_cas.leases)


def test_a_term_lapses_on_either_clock() -> None:
    now = [1000.0]
    term = Term.begin(60.0, lambda: now[0])
    assert term.until == 1060.0 and not term.lapsed(lambda: now[0])
    assert term.within(1 / 3, lambda: now[0])
    now[0] += 20.0  # a third of the TTL gone on the wall clock: no longer young
    assert not term.within(1 / 3, lambda: now[0]) and not term.lapsed(lambda: now[0])
    now[0] += 40.5
    assert term.lapsed(lambda: now[0])
    # The wall clock stood still (or went back) while the machine was suspended:
    # the boot clock still counts the time that passed.
    asleep = Term(60.0, 1000.0, boottime() - 61.0)
    assert asleep.lapsed(lambda: 1000.0) and not asleep.within(1.0, lambda: 1000.0)
    assert expired(1060.0, 1060.5) and not expired(1060.0, 1060.0)


def test_the_two_lock_bodies_keep_their_bytes_and_read_only_their_own_kind() -> None:
    cas = SwapLockInfo("refs/series/default", "host-a", 4242, 60.0)
    # The bytes CAS lock objects have always carried.
    assert cas.encode() == (
        b'{"kind": "compare-and-swap", "key": "refs/series/default", '
        b'"host": "host-a", "pid": 4242, "ttl": 60.0}'
    )
    assert SwapLockInfo.parse(cas.encode()) == cas
    assert SwapLockInfo.mine("refs/tags/t", 5.0).pid == os.getpid()
    store_lock = LockInfo("s-" + "a" * 32, "shared", "h", 1, "9", 1.0, 2.0, "save", "b", "n")
    assert parse_lock(store_lock.lock_id, store_lock.encode()) == store_lock
    assert parse_lock("s-" + "a" * 32, cas.encode()) is None
    assert SwapLockInfo.parse(store_lock.encode()) is None
    assert SwapLockInfo.parse(b"\x00 not json") is None
