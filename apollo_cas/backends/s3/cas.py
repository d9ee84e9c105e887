"""Compare-and-swap of one key on S3: how refs change.

Two ways, chosen per server by :mod:`.capabilities` (all writers of one store
must take the same one):

* conditional: read the value and its ETag, then write with ``If-Match`` (or
  ``If-None-Match: *`` to create; ``If-Match`` on DELETE), one request;
* lock: a lock protocol like restic's serialises writers. Each writer creates
  its own lock object ``locks/cas-<key hash>.<owner>``, lists its competitors,
  and proceeds only when it sees none (of several that see each other, the
  oldest waits and the others withdraw); a lock whose holder died expires
  after ``lock_ttl`` seconds (judged by the server's clock), and a holder never
  writes after a third of that time (the lease rules and the lock body:
  :mod:`apollo_cas.leases`, shared with the store locks).

Neither retries a write blindly: a retried write that did land looks like a
lost race. Each reads back what an unknown outcome left instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ...errors import BackendError, ConcurrentUpdate, ObjectNotFound, StoreLocked
from ...leases import SwapLockInfo, Term, expired
from .config import CAS_LOCK_PREFIX, DEFAULT_MAX_ATTEMPTS
from .errormap import Outcome
from .transport import S3Transport, content_md5, server_time

log = logging.getLogger(__name__)

#: A competing lock object: ((server LastModified, name), name).
_Competitor = tuple[tuple[float, str], str]


#: A CAS lock's holder writes only within this fraction of the TTL: the rest is
#: for the read-compare step and the write itself, one request bounded by the
#: connect + read timeouts, well inside it.
WRITE_WINDOW = 1 / 3


class RefSwap:
    """Compare-and-swap on one store, either way; see the module docstring."""

    def __init__(
        self, transport: S3Transport, *, lock_ttl: float, lock_wait: float, list_page_size: int
    ) -> None:
        self.transport = transport
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        self.list_page_size = list_page_size
        # Threads of this process take turns on a key before competing with other
        # processes through S3: fewer conflicts and lock-object round trips.
        self._key_locks = [threading.Lock() for _ in range(64)]

    def key_lock(self, key: str) -> threading.Lock:
        """The lock this process's threads take turns on for ``key``."""
        return self._key_locks[hash(key) % len(self._key_locks)]

    def _read_current(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            return self.transport.fetch(key)
        except ObjectNotFound:
            return None, None

    def conditional(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Read value and ETag; write only if the ETag is unchanged (If-Match / If-None-Match).

        Equal values mean equal ETags, so a value that went A -> B -> A still
        swaps, which is what compare-and-swap on values means.
        """
        t = self.transport
        k = t.place.object_name(key)
        c = t.client_once
        bucket = t.place.bucket
        deadline = time.monotonic() + max(60.0, self.lock_wait)
        failures = 0
        delay = 0.01
        while True:
            current, etag = self._read_current(key)
            if current != expected:
                return False
            if data is None and current is None:
                return True  # "delete if absent": nothing to do
            op: Callable[[], Any]
            if data is None:
                op = functools.partial(c.delete_object, Bucket=bucket, Key=k, IfMatch=etag)
            else:
                condition = {"IfNoneMatch": "*"} if current is None else {"IfMatch": etag}
                op = functools.partial(
                    c.put_object,
                    Bucket=bucket,
                    Key=k,
                    Body=data,
                    ContentMD5=content_md5(data),
                    **condition,
                )

            outcome, exc = t.attempt("updating", key, op)
            if outcome == Outcome.OK:
                return True
            if outcome == Outcome.UNSUPPORTED:
                raise BackendError(
                    f"{t.place.endpoint_desc} refused a conditional write to "
                    f"{t.place.location}{key}",
                    "set APOLLO_CAS_S3_CAS=lock for this store (on every writer)",
                ) from exc
            if outcome in (Outcome.UNKNOWN, Outcome.NOT_SENT):
                failures += 1
                if failures >= DEFAULT_MAX_ATTEMPTS and exc is not None:
                    raise t.translate(exc, "updating", key) from exc
            if outcome == Outcome.UNKNOWN:
                # The request may have been applied. If the key now holds what we
                # wrote, count it as ours: a writer that set the same bytes at the
                # same instant would leave the same state.
                after, _ = self._read_current(key)
                if after == data:
                    return True
                if after != expected:
                    return False
            if time.monotonic() > deadline:
                raise ConcurrentUpdate(
                    f"{key} in {t.place.location} kept changing while updating it",
                    "too many writers at once; run the command again",
                )
            # Conflict: the next read sees the new value. Back off only when the
            # value came back equal (someone wrote the same bytes) or after errors.
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.5)

    def locked(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Compare and swap under a lock object, for servers without conditional writes."""
        while True:
            with self._lock(key) as lease:
                current, _ = self._read_current(key)
                if current != expected:
                    return False
                if data is None and current is None:
                    return True
                if not lease.within(WRITE_WINDOW):
                    continue  # too slow to write safely: take the lock again
                self._write_under_lease(key, data, lease)
                return True

    def _write_under_lease(self, key: str, data: bytes | None, lease: Term) -> None:
        t = self.transport
        k = t.place.object_name(key)
        c = t.client_once

        def op() -> Any:
            if data is None:
                return c.delete_object(Bucket=t.place.bucket, Key=k)
            return c.put_object(
                Bucket=t.place.bucket, Key=k, Body=data, ContentMD5=content_md5(data)
            )

        # The write is idempotent while we hold the lock, so it may be retried,
        # but only while the lease is young: a request sent after that could land
        # after another writer took over an expired lock.
        delay = 0.05
        while True:
            outcome, exc = t.attempt("updating", key, op)
            if outcome == Outcome.OK:
                return
            assert exc is not None
            if outcome == Outcome.UNSUPPORTED or not lease.within(WRITE_WINDOW):
                raise t.translate(exc, "updating", key) from exc
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    @contextmanager
    def _lock(self, key: str) -> Iterator[Term]:
        """Hold the lock for ``key``: restic-style lock objects with owners and expiry.

        Each contender writes its own object ``locks/cas-<hash>.<uuid>``, then
        lists them all. With S3's read-after-write and list-after-write
        consistency, two contenders cannot both see a list without the other,
        so at most one proceeds. When several see each other, the oldest (by the
        server's LastModified, then name) waits for the rest to withdraw, and the
        others withdraw and retry after a random backoff. Locks older than
        ``lock_ttl`` by the server's clock belong to dead holders and are removed.
        """
        t = self.transport
        place = t.place
        base = f"{CAS_LOCK_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}."
        full_base = place.object_name(base + "x")[:-1]
        record = SwapLockInfo.mine(key, self.lock_ttl).encode()
        deadline = time.monotonic() + self.lock_wait
        backoff = 0.01
        while True:
            mine = base + uuid.uuid4().hex
            mine_full = place.object_name(mine)
            lease = Term.begin(self.lock_ttl)  # before the write: see apollo_cas.leases
            t.call(
                "locking",
                mine,
                functools.partial(
                    t.client.put_object,
                    Bucket=place.bucket,
                    Key=mine_full,
                    Body=record,
                    ContentMD5=content_md5(record),
                ),
            )
            acquired = False
            blocker = ""
            try:
                while True:
                    live, my_stamp = self._live_locks(full_base, mine_full)
                    if not live and my_stamp is not None:
                        acquired = True
                        break
                    if not live:
                        break  # our own lock is not listed yet: start over
                    oldest: _Competitor = min(live)
                    blocker = oldest[1]
                    if (
                        my_stamp is None
                        or oldest[0] < my_stamp
                        or not lease.within(WRITE_WINDOW)
                        or time.monotonic() > deadline
                    ):
                        break  # withdraw: someone older is competing (or we aged)
                    # We are the oldest: the others withdraw; look again shortly.
                    time.sleep(random.uniform(0.005, 0.03))
                if acquired:
                    yield lease
                    return
            finally:
                if not t.delete_quietly(mine_full):
                    # Left behind, it expires after lock_ttl and gc reaps it.
                    log.warning("could not remove lock object %s%s", place.location, mine)
            if time.monotonic() > deadline:
                raise StoreLocked(
                    f"{key} in {place.location} is locked by another writer "
                    f"(lock object {blocker[len(place.prefix) :]})",
                    f"another apollo-cas process is updating it; a lock left by a crashed "
                    f"process expires after {self.lock_ttl:.0f} s",
                )
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 0.25)  # a ref update takes a few requests

    def _live_locks(
        self, full_base: str, mine_full: str
    ) -> tuple[list[_Competitor], tuple[float, str] | None]:
        """Competing live locks and our own stamp; reaps dead ones."""
        live: list[_Competitor] = []
        mine: tuple[float, str] | None = None
        now: float | None = None
        for name, mtime, headers in list(self.transport.list_raw(full_base, self.list_page_size)):
            if now is None:
                now = server_time(headers)
            stamp = (mtime, name)
            if name == mine_full:
                mine = stamp
                continue
            if expired(mtime + self.lock_ttl, now):
                self.transport.delete_quietly(name)
                continue
            live.append((stamp, name))
        return live, mine
