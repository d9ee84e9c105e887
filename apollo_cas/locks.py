"""Store locks: shared for writers (save), exclusive for gc's sweep.

Locks are objects under ``locks/`` (JSON: owner host, boot id, pid namespace,
pid, process start time, kind, expiry), so the same protocol works on a
directory and on S3, as in restic. Acquire = write our lock object, then list the others; on conflict,
remove ours and retry with randomized backoff until a timeout. A shared lock
conflicts with any exclusive one; an exclusive lock conflicts with *every*
other lock, exclusive ones included, whatever their age. A lock of a dead process on
this host is removed on sight (cron after a crash must just work); locks of
other hosts count until they expire. Long operations refresh their lock.
The lock body, its lease clocks and the expiry rule live in
:mod:`apollo_cas.leases`, shared with the S3 backend's compare-and-swap locks.

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

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from . import procinfo, settings
from .backends.base import Backend
from .errors import ApolloError, ObjectNotFound, StoreLocked
from .layout import LOCKS_PREFIX, lock_key
from .leases import LockInfo, Term, parse_lock

log = logging.getLogger(__name__)

#: Names of store lock objects: "s-" (shared) or "e-" (exclusive) and a uuid4.
_LOCK_NAME = re.compile(r"^[se]-[0-9a-f]{32}$")

#: A lock not renewed for this long has expired (the holder's lease).
LOCK_TTL = 30 * 60.0
#: Holders renew every TTL/6 (5 minutes by default), so a lease has at least
#: 5/6 of its TTL left whenever the holder is running normally.
REFRESH_FRACTION = 1 / 6
REFRESH_EVERY = LOCK_TTL * REFRESH_FRACTION


def ttl_from_env() -> float:
    """The lease length this process uses: ``APOLLO_CAS_LOCK_TTL`` (seconds,
    :mod:`apollo_cas.settings`) or 30 minutes."""
    return settings.lock_ttl() or LOCK_TTL


class Lease:
    """A lock this process holds, and until when its lease is valid.

    ``term`` (:class:`~apollo_cas.leases.Term`) is the lease as of the last
    successful write of the lock object, counted from *before* that write
    began; ``valid_until`` is its end as written in the object. A lease that
    passed it (the process was frozen: SIGSTOP, a suspended VM, swapping) or
    whose object vanished or changed under it (another process judged it
    expired, ``unlock --force``) is lost: others may have deleted chunks
    meanwhile.
    """

    def __init__(self, locks: Locks, info: LockInfo, data: bytes, term: Term) -> None:
        self.locks = locks
        self.info = info
        self.data = data  # the lock object's bytes as we last wrote them
        self.term = term
        self.lost = False
        self.mutex = threading.Lock()

    @property
    def valid_until(self) -> float:
        """The end of the lease on the wall clock (the ``expires`` last written)."""
        return self.term.until

    @property
    def lock_id(self) -> str:
        return self.info.lock_id

    @property
    def kind(self) -> str:
        return self.info.kind

    def lapsed(self) -> bool:
        """See :meth:`Locks.lapsed` (a clock check, no I/O)."""
        return self.locks.lapsed(self)

    def confirm(self) -> bool:
        """See :meth:`Locks.confirm` (one compare-and-swap)."""
        return self.locks.confirm(self)

    def reacquire(self, timeout: float = 60.0) -> None:
        """See :meth:`Locks.reacquire`."""
        self.locks.reacquire(self, timeout)


class Locks:
    """Acquire and release store locks."""

    #: Backoff after a conflict: starts at ``min_delay`` seconds (with jitter),
    #: doubles per retry, capped at ``max_delay``.
    min_delay = 0.05
    max_delay = 2.0

    def __init__(
        self,
        backend: Backend,
        *,
        ttl: float | None = None,
        refresh_every: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ttl``: lease length of the locks this object takes (default
        :func:`ttl_from_env`); ``refresh_every``: renewal period (TTL/6);
        ``clock``: wall clock in epoch seconds, for expiry (tests pass their own)."""
        self.backend = backend
        self.ttl = ttl if ttl is not None else ttl_from_env()
        self.refresh_every = refresh_every if refresh_every is not None else self.ttl / 6
        self.clock = clock

    def all(self) -> list[LockInfo]:
        out = []
        for key in self.backend.list(LOCKS_PREFIX):
            name = key[len(LOCKS_PREFIX) :]
            # Only our own lock objects: other objects live under locks/ too (the
            # S3 backend's per-ref CAS locks, locks/cas-*), and deleting one of
            # those as "unreadable" would break their mutual exclusion.
            if not _LOCK_NAME.match(name):
                continue
            try:
                info = parse_lock(name, self.backend.get(key))
                if info is None:
                    # Writes are atomic, so this is no torn write but a format we
                    # cannot read (or damage): it counts as a foreign lock until
                    # it has not been rewritten for a TTL.
                    mtime = self.backend.info(key).mtime
                    info = LockInfo.unreadable(name, mtime, max(self.ttl, LOCK_TTL))
            except ObjectNotFound:
                continue
            out.append(info)
        return out

    def break_all(self) -> int:
        """Remove every lock (``apollo-cas unlock --force``). Returns how many."""
        locks = self.all()
        for lk in locks:
            self.backend.delete(lock_key(lk.lock_id))
        return len(locks)

    def clear_stale(self) -> int:
        now = self.clock()
        n = 0
        for lk in self.all():
            if lk.stale(now):
                self.backend.delete(lock_key(lk.lock_id))
                n += 1
        return n

    # -- holding -------------------------------------------------------------
    @contextmanager
    def hold(self, kind: str, purpose: str, timeout: float = 60.0) -> Iterator[Lease]:
        """Hold a lock of ``kind`` (``"shared"`` or ``"exclusive"``) for the block.

        Raises :class:`StoreLocked` naming the conflicting lock if it cannot be
        taken within ``timeout`` seconds. Yields the :class:`Lease`; see
        :meth:`confirm` and :meth:`reacquire`. Releasing never raises: an error
        of the block is never replaced by one of the cleanup, and a lock left
        behind is cleared as stale later (the error is logged).
        """
        lease = self._acquire(kind, purpose, timeout)
        stop = threading.Event()
        refresher = threading.Thread(target=self._refresh, args=(lease, stop), daemon=True)
        refresher.start()
        try:
            yield lease
        except BaseException:
            self._release(lease, stop, refresher, quiet=True)
            raise
        self._release(lease, stop, refresher, quiet=False)

    def _release(
        self, lease: Lease, stop: threading.Event, refresher: threading.Thread, quiet: bool
    ) -> None:
        """Delete the lock object. A failure is never raised: the block's own error
        (a dead server, a full disk) is the one to report, and a lock left
        behind is stale once this process is gone (or its lease ran out). After
        a block that succeeded it is logged; after one that failed it would only
        repeat the block's error."""
        stop.set()
        refresher.join()  # a renewal racing the delete would resurrect the lock
        try:
            self.backend.delete(lock_key(lease.lock_id))
        except Exception as exc:
            (log.debug if quiet else log.warning)(
                "warning: could not remove lock %s in %s (%s); it is cleared as stale later",
                lock_key(lease.lock_id),
                self.backend.location,
                exc,
            )

    def _new_info(self, kind: str, purpose: str) -> LockInfo:
        me = procinfo.current()
        now = self.clock()
        return LockInfo(
            lock_id=f"{kind[0]}-{uuid.uuid4().hex}",
            kind=kind,
            host=me.host,
            pid=me.pid,
            start=me.start,
            created=now,
            expires=now + self.ttl,
            purpose=purpose,
            boot_id=me.boot_id,
            pid_ns=me.pid_ns,
        )

    def _acquire(self, kind: str, purpose: str, timeout: float) -> Lease:
        info = self._new_info(kind, purpose)
        deadline = time.monotonic() + timeout
        delay = self.min_delay
        key = lock_key(info.lock_id)
        while True:
            term = Term.begin(self.ttl, self.clock)
            info = replace(info, expires=term.until)
            data = info.encode()
            self.backend.put(key, data)
            try:
                conflict = self._conflict(info)
            except BaseException:
                self._delete_quietly(key)  # the listing failed: do not leave ours behind
                raise
            if conflict is None:
                return Lease(self, info, data, term)
            # Withdraw before waiting: a lock left in place while we sleep would
            # make every other contender back off too (livelock).
            self.backend.delete(key)
            if time.monotonic() > deadline:
                raise StoreLocked(
                    f"store {self.backend.location} is locked: {conflict.describe()}",
                    "wait for it to finish; if that process is gone, run "
                    "'apollo-cas unlock --store STORE'",
                )
            time.sleep(self._backoff(delay, info, conflict))
            delay = min(delay * 2, self.max_delay)

    def _delete_quietly(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except Exception as exc:
            log.warning("warning: could not remove lock %s (%s)", key, exc)

    # -- leases ----------------------------------------------------------------
    def lapsed(self, lease: Lease) -> bool:
        """Whether ``lease`` is lost or has passed its expiry (on either clock)."""
        return lease.lost or lease.term.lapsed(self.clock)

    def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by a TTL, by compare-and-swap of its lock object.

        Refuses (False) a lease that already lapsed: extending it would
        resurrect a lock that others may have judged expired and acted on. A
        lock object that vanished or changed makes the lease lost.
        """
        with lease.mutex:
            if self.lapsed(lease):
                return False
            term = Term.begin(self.ttl, self.clock)
            info = replace(lease.info, expires=term.until)
            data = info.encode()
            if not self.backend.compare_and_swap(lock_key(info.lock_id), lease.data, data):
                lease.lost = True
                return False
            lease.info, lease.data, lease.term = info, data, term
            return True

    def confirm(self, lease: Lease) -> bool:
        """Fencing: prove that ``lease`` was held without a gap until now.

        True if its lock object still holds exactly what we last wrote and the
        lease never expired; it is then renewed, so a full TTL is left for
        what follows. False if it lapsed at any point: whatever the lock
        protected may have been changed meanwhile (gc may have swept).
        """
        return self.renew(lease)

    def reacquire(self, lease: Lease, timeout: float = 60.0) -> None:
        """Take a lost lease's lock again (a new lock object, same kind and
        purpose), waiting for conflicting holders as :meth:`hold` does. The
        caller must then re-check what the lock protects."""
        with lease.mutex:
            old = lease.lock_id
            fresh = self._acquire(lease.kind, lease.info.purpose, timeout)
            lease.info, lease.data, lease.term = fresh.info, fresh.data, fresh.term
            lease.lost = False
        self._delete_quietly(lock_key(old))

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
            mine.exclusive
            and conflict.exclusive
            and ((mine.created, mine.lock_id) < (conflict.created, conflict.lock_id))
        ):
            jitter /= 3
        return delay * jitter

    def _conflict(self, mine: LockInfo) -> LockInfo | None:
        """A live lock that forbids ``mine``, or None; stale locks are removed on sight.

        Must be called after ``mine`` is written: that order is what makes the
        check mutually exclusive (see the module docstring).
        """
        now = self.clock()
        for lk in self.all():
            if lk.lock_id == mine.lock_id:
                continue
            if lk.stale(now):
                self.backend.delete(lock_key(lk.lock_id))
                continue
            # Shared + shared is the only compatible pair. An exclusive lock
            # conflicts with any other, even a younger exclusive one: its owner
            # may already be inside (it listed before ours was written).
            if mine.exclusive or lk.exclusive:
                return lk
        return None

    def _refresh(self, lease: Lease, stop: threading.Event) -> None:
        while not stop.wait(self.refresh_every):
            # A lapsed or lost lease is not renewed (the holder finds out when it
            # confirms); after a reacquire the same loop renews the new lock.
            try:
                self.renew(lease)
            except ApolloError as exc:
                log.debug("lock renewal failed: %s", exc)  # retried at the next period
