"""Exclusive store locks exclude everyone: two gc sweeps never run at once.

The race these tests pin down (found in review): under the old rule "the older
exclusive lock wins and proceeds on sight", contender A took its timestamp,
was delayed before writing its lock object (a slow PUT), and B wrote, listed,
saw nothing and went in. A then wrote, listed, saw B's *younger* lock and went
in too: two exclusive holders. Now an exclusive contender proceeds only if,
after writing its own lock, it sees no other live lock at all.

* a deterministic replay of exactly that interleaving;
* threads (each with its own backend object, as separate processes would have)
  hammering shared and exclusive acquisitions through a backend that adds
  random latency to lock writes and listings, with counters that check mutual
  exclusion, on a directory and on the local S3 server;
* real processes doing the same on a directory, checked through a marker file
  created with ``O_EXCL``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apollo_cas.backends import Backend, open_backend
from apollo_cas.backends.local import LocalBackend
from apollo_cas.locks import Locks
from tests.backends.wrappers import ForwardingBackend


class SlowLockIO(ForwardingBackend):
    """Wraps a backend; lock writes and listings take a random 0..``max_s`` seconds.

    Latency between taking a timestamp and the lock object becoming visible, and
    between listing and acting on it, is what opens race windows on a real
    object store; here it is injected so a few dozen acquisitions hit them.
    """

    def __init__(self, inner: Backend, max_s: float, seed: int) -> None:
        super().__init__(inner)
        self.max_s = max_s
        self.rng = random.Random(seed)

    def _pause(self) -> None:
        time.sleep(self.rng.random() * self.max_s)

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        if key.startswith("locks/"):
            self._pause()
        super().put(key, data, durable=durable)

    def list(self, prefix: str) -> Iterator[str]:
        keys = list(super().list(prefix))
        self._pause()  # act on a listing that is already a little old
        return iter(keys)


def fast_locks(backend: Backend) -> Locks:
    """Locks with short backoff: the hammer tests make hundreds of attempts."""
    locks = Locks(backend)
    locks.min_delay = 0.002
    locks.max_delay = 0.05
    return locks


class GatedPut(LocalBackend):
    """A directory backend whose first lock write waits for ``gate`` (A's slow PUT)."""

    def __init__(self, root: Path, entered: threading.Event, gate: threading.Event) -> None:
        super().__init__(root)
        self.entered = entered
        self.gate = gate
        self.first = True

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        if key.startswith("locks/") and self.first:
            self.first = False
            self.entered.set()
            assert self.gate.wait(10), "test gate never opened"
        super().put(key, data, durable=durable)


def test_a_late_writing_older_exclusive_does_not_join_the_holder(tmp_path: Path) -> None:
    """Replay of the race: A's timestamp is older, its lock lands after B went in."""
    root = tmp_path / "store"
    entered, gate, a_in, a_done = (threading.Event() for _ in range(4))
    errors: list[BaseException] = []

    def contender_a() -> None:
        try:
            with fast_locks(GatedPut(root, entered, gate)).hold("exclusive", "A", timeout=20):
                a_in.set()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            a_done.set()

    ta = threading.Thread(target=contender_a)
    ta.start()
    assert entered.wait(10)  # A has its timestamp and is stuck before its write
    time.sleep(0.01)  # B's timestamp is strictly younger
    with fast_locks(LocalBackend(root)).hold("exclusive", "B", timeout=10) as b:
        gate.set()  # now A writes its (older) lock and lists: it sees B
        # The old rule let A in here within milliseconds.
        assert not a_in.wait(1.0), "an older exclusive lock joined a younger holder"
        assert b.lock_id
    ta.join(20)
    assert not errors, errors
    assert a_in.is_set() and a_done.is_set()  # A gets in once B has left
    assert list(LocalBackend(root).list("locks/")) == []


def hammer(
    make_backend: Callable[[int], Backend], threads: int, rounds: int, hold_s: float
) -> dict[str, int]:
    """``threads`` workers, each taking ``rounds`` locks (every other one exclusive).

    Returns counts of acquisitions and of mutual-exclusion violations observed:
    an exclusive holder next to any other holder, or a shared holder next to an
    exclusive one.
    """
    state = {"exclusive_in": 0, "shared_in": 0, "violations": 0, "exclusive": 0, "shared": 0}
    guard = threading.Lock()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(i)
        locks = fast_locks(make_backend(i))
        try:
            for r in range(rounds):
                kind = "exclusive" if (r + i) % 2 == 0 else "shared"
                with locks.hold(kind, f"hammer {i}/{r}", timeout=60):
                    with guard:
                        state[kind] += 1
                        if state["exclusive_in"] or (kind == "exclusive" and state["shared_in"]):
                            state["violations"] += 1
                        state[f"{kind}_in"] += 1
                    time.sleep(rng.random() * hold_s)  # overlap windows, if the lock leaks
                    with guard:
                        state[f"{kind}_in"] -= 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    return state


def test_exclusive_mutual_exclusion_threads_on_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    # 10 ms of injected latency and up to 10 ms inside: with these numbers the
    # old rule let two exclusive holders in a few times per run.
    threads, rounds = 6, 12
    st = hammer(lambda i: SlowLockIO(LocalBackend(root), 0.01, seed=i), threads, rounds, 0.01)
    assert st["violations"] == 0, st
    assert st["exclusive"] + st["shared"] == threads * rounds
    assert list(LocalBackend(root).list("locks/")) == []  # every lock released


def test_exclusive_mutual_exclusion_threads_on_s3(s3_location: str) -> None:
    """Same on the real S3 server: one backend (own connection pool) per thread."""
    threads, rounds = 4, 8
    st = hammer(
        lambda i: SlowLockIO(open_backend(s3_location), 0.01, seed=i), threads, rounds, 0.01
    )
    assert st["violations"] == 0, st
    assert st["exclusive"] + st["shared"] == threads * rounds
    assert list(open_backend(s3_location).list("locks/")) == []


# A worker process: takes exclusive locks in a loop; inside, it creates a marker
# file with O_EXCL (fails if another holder is inside) and removes it on the way out.
_WORKER = """
import os, sys, time, random
from apollo_cas.backends.local import LocalBackend
from apollo_cas.locks import Locks
root, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
locks = Locks(LocalBackend(root))
locks.min_delay, locks.max_delay = 0.002, 0.05
bad = 0
for r in range(rounds):
    with locks.hold("exclusive", f"proc {os.getpid()}", timeout=60):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            bad += 1
            continue
        os.close(fd)
        time.sleep(random.random() * 0.003)
        os.unlink(marker)
print(bad)
"""


def test_exclusive_mutual_exclusion_processes(tmp_path: Path) -> None:
    root, marker = tmp_path / "store", tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(marker), "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert [int(o) for o, _ in outs] == [0, 0, 0]
    assert not marker.exists()
    assert list(LocalBackend(root).list("locks/")) == []


@pytest.mark.parametrize("other", ["shared", "exclusive"])
def test_an_exclusive_contender_waits_for_any_holder(tmp_path: Path, other: str) -> None:
    """A held lock of either kind keeps an exclusive contender out until released."""
    root = tmp_path / "store"
    got = threading.Event()

    def contender() -> None:
        with fast_locks(LocalBackend(root)).hold("exclusive", "late", timeout=10):
            got.set()

    with fast_locks(LocalBackend(root)).hold(other, "first"):
        t = threading.Thread(target=contender)
        t.start()
        assert not got.wait(0.5)
    t.join(10)
    assert got.is_set()
    assert os.listdir(root / "locks") == []
