"""Store locks: shared for writers (save), exclusive for gc's sweep.

Locks are objects under ``locks/`` (JSON: owner host, pid, process start time,
kind, expiry), so the same protocol works on a directory and on S3, as in
restic. Acquire = write our lock object, then list the others; on conflict,
remove ours and retry with randomized backoff until a timeout. A shared lock
conflicts with any exclusive one; an exclusive lock conflicts with *every*
other lock, exclusive ones included, whatever their age. A lock of a dead process on
this host is removed on sight (cron after a crash must just work); locks of
other hosts count until they expire. Long operations refresh their lock.

Why this shape: saves only take *shared* locks, so any number of ranks and
hosts save at once. gc computes what to delete without any lock and takes the
exclusive lock only for the short sweep, so saves wait at most for deletions,
never for a full mark phase (restic's most-voted complaint).

Why "write, then list, proceed only on a clean listing" is mutually exclusive:
of any two contenders, the one that lists second sees the other's lock (each
writes before it lists, and listings are strongly consistent on a filesystem
and on S3). So two exclusive contenders, or an exclusive and a shared one,
cannot both proceed. An earlier rule ("the older exclusive lock wins and
proceeds on sight") broke this: a contender whose timestamp was taken early but
whose lock was written late saw the younger holder's lock, judged itself older
and walked in beside it. Age now only shortens the older contender's backoff,
which breaks livelock between two exclusive contenders without ever letting one
proceed while another's lock is visible.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .backends.base import Backend
from .errors import ObjectNotFound, StoreLocked
from .layout import LOCKS_PREFIX, lock_key

#: Names of store lock objects: "s-" (shared) or "e-" (exclusive) and a uuid4.
_LOCK_NAME = re.compile(r"^[se]-[0-9a-f]{32}$")

#: A lock not refreshed for this long is considered abandoned (other hosts).
LOCK_TTL = 30 * 60.0
REFRESH_EVERY = 5 * 60.0


def _proc_start(pid: int) -> str:
    """Start time of a process (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _proc_start(pid) in ("", start)


@dataclass(frozen=True)
class LockInfo:
    """One lock object's content."""

    lock_id: str
    kind: str  # "shared" | "exclusive"
    host: str
    pid: int
    start: str
    created: float
    expires: float
    purpose: str

    def stale(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return not _alive(self.pid, self.start)
        return now > self.expires

    def describe(self) -> str:
        return (
            f"{self.kind} lock by pid {self.pid} on {self.host} ({self.purpose}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.created))})"
        )


class Locks:
    """Acquire and release store locks."""

    #: Backoff after a conflict: starts at ``min_delay`` seconds (with jitter),
    #: doubles per retry, capped at ``max_delay``.
    min_delay = 0.05
    max_delay = 2.0

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def all(self) -> list[LockInfo]:
        out = []
        for key in self.backend.list(LOCKS_PREFIX):
            # Only our own lock objects: other objects live under locks/ too (the
            # S3 backend's per-ref CAS locks, locks/cas-*), and deleting one of
            # those as "unreadable" would break their mutual exclusion.
            if not _LOCK_NAME.match(key[len(LOCKS_PREFIX) :]):
                continue
            try:
                d = json.loads(self.backend.get(key))
                out.append(LockInfo(**d))
            except ObjectNotFound:
                continue
            except (ValueError, TypeError):
                # An unreadable lock (torn write on a crash): treat as abandoned.
                self.backend.delete(key)
        return out

    def _write(self, info: LockInfo) -> None:
        self.backend.put(lock_key(info.lock_id), json.dumps(asdict(info)).encode())

    def break_all(self) -> int:
        """Remove every lock (``apollo-cas unlock --force``). Returns how many."""
        locks = self.all()
        for lk in locks:
            self.backend.delete(lock_key(lk.lock_id))
        return len(locks)

    def clear_stale(self) -> int:
        now = time.time()
        n = 0
        for lk in self.all():
            if lk.stale(now):
                self.backend.delete(lock_key(lk.lock_id))
                n += 1
        return n

    @contextmanager
    def hold(self, kind: str, purpose: str, timeout: float = 60.0) -> Iterator[LockInfo]:
        """Hold a lock of ``kind`` (``"shared"`` or ``"exclusive"``) for the block.

        Raises :class:`StoreLocked` naming the conflicting lock if it cannot be
        taken within ``timeout`` seconds.
        """
        pid = os.getpid()
        now = time.time()
        info = LockInfo(
            lock_id=f"{kind[0]}-{uuid.uuid4().hex}",
            kind=kind,
            host=socket.gethostname(),
            pid=pid,
            start=_proc_start(pid),
            created=now,
            expires=now + LOCK_TTL,
            purpose=purpose,
        )
        deadline = now + timeout
        delay = self.min_delay
        while True:
            self._write(info)
            conflict = self._conflict(info)
            if conflict is None:
                break
            # Withdraw before waiting: a lock left in place while we sleep would
            # make every other contender back off too (livelock).
            self.backend.delete(lock_key(info.lock_id))
            if time.time() > deadline:
                raise StoreLocked(
                    f"store {self.backend.location} is locked: {conflict.describe()}",
                    "wait for it to finish; if that process is gone, run "
                    "'apollo-cas unlock --store STORE'",
                )
            time.sleep(self._backoff(delay, info, conflict))
            delay = min(delay * 2, self.max_delay)
        stop = threading.Event()
        refresher = threading.Thread(target=self._refresh, args=(info, stop), daemon=True)
        refresher.start()
        try:
            yield info
        finally:
            stop.set()
            refresher.join()  # a refresh racing the delete would resurrect the lock
            self.backend.delete(lock_key(info.lock_id))

    @staticmethod
    def _backoff(delay: float, mine: LockInfo, conflict: LockInfo) -> float:
        """How long to wait after withdrawing: ``delay`` with random jitter.

        Two exclusive contenders that keep meeting would retry in lockstep; the
        jitter desynchronises them, and the older one (earlier ``created``)
        waits about a third as long, so it usually gets in first and gc runs
        are served roughly in order. Age never lets anyone proceed: it only
        changes when the next attempt is made.
        """
        jitter = 0.5 + random.random()
        if (
            mine.kind == "exclusive"
            and conflict.kind == "exclusive"
            and ((mine.created, mine.lock_id) < (conflict.created, conflict.lock_id))
        ):
            jitter /= 3
        return delay * jitter

    def _conflict(self, mine: LockInfo) -> LockInfo | None:
        """A live lock that forbids ``mine``, or None; stale locks are removed on sight.

        Must be called after ``mine`` is written: that order is what makes the
        check mutually exclusive (see the module docstring).
        """
        now = time.time()
        for lk in self.all():
            if lk.lock_id == mine.lock_id:
                continue
            if lk.stale(now):
                self.backend.delete(lock_key(lk.lock_id))
                continue
            # Shared + shared is the only compatible pair. An exclusive lock
            # conflicts with any other, even a younger exclusive one: its owner
            # may already be inside (it listed before ours was written).
            if mine.kind == "exclusive" or lk.kind == "exclusive":
                return lk
        return None

    def _refresh(self, info: LockInfo, stop: threading.Event) -> None:
        while not stop.wait(REFRESH_EVERY):
            info = LockInfo(**{**asdict(info), "expires": time.time() + LOCK_TTL})
            try:
                self._write(info)
            except Exception:
                return
