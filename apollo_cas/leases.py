"""Leases: how long the holder of a lock object may act on it, one rule for every lock.

Two protocols hold locks through objects under ``locks/``: the store locks of
:mod:`apollo_cas.locks` (shared for saves, exclusive for gc's sweep) and the
S3 backend's per-ref compare-and-swap locks (:mod:`apollo_cas.backends.s3.cas`).
Both follow the rules of this module:

* **The holder's view** (:class:`Term`): a lease runs for ``ttl`` seconds from
  an instant read *before* the write that made the lock visible, so the holder
  never believes in its lease longer than anyone judging it does. Time is
  counted on two clocks: the wall clock (the one store locks write into their
  body and others compare with theirs) and ``CLOCK_BOOTTIME``, which keeps
  counting while the machine is suspended (a frozen VM must not wake up
  believing it still holds a lease that expired meanwhile). The lease has
  lapsed once *either* clock is past its end.
* **The judge's view** (:func:`expired`): someone else's lease has expired once
  the judge's clock is strictly past its end. Store locks carry their end
  (``expires``) in their body and are judged by the judge's wall clock; S3 CAS
  locks end ``ttl`` after their LastModified and are judged by the server's
  clock (the Date header), so no client's clock matters there.
* **Bodies**: the two protocols write different JSON bodies, both kept exactly
  as earlier versions wrote them (docs/CONCURRENCY.md): :class:`LockInfo` for
  store locks (``locks/<s|e>-<uuid>``), :class:`SwapLockInfo` for CAS locks
  (``locks/cas-<key hash>.<uuid>``, informational: that protocol reads only
  names and modification times). Each parser reads only its own kind.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import procinfo


def boottime() -> float:
    """A clock that keeps counting while the machine is suspended (Linux), else monotonic."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


@dataclass(frozen=True)
class Term:
    """One lease as its holder counts it: ``ttl`` seconds from ``wall`` (on the
    wall clock given to :meth:`begin`) and, equally, from ``boot`` (on
    :func:`boottime`)."""

    ttl: float
    wall: float
    boot: float

    @classmethod
    def begin(cls, ttl: float, clock: Callable[[], float] = time.time) -> Term:
        """A term starting now: call it *before* writing the lock object."""
        return cls(ttl, clock(), boottime())

    @property
    def until(self) -> float:
        """The end of the lease on the wall clock (what a store lock writes as ``expires``)."""
        return self.wall + self.ttl

    @property
    def boot_until(self) -> float:
        """The end of the lease on :func:`boottime`."""
        return self.boot + self.ttl

    def lapsed(self, clock: Callable[[], float] = time.time) -> bool:
        """Whether either clock is past the end (a clock check, no I/O)."""
        return clock() > self.until or boottime() > self.boot_until

    def within(self, fraction: float, clock: Callable[[], float] = time.time) -> bool:
        """Whether less than ``fraction`` of the TTL has passed on both clocks:
        for a holder that acts only while a margin is left."""
        limit = self.ttl * fraction
        return clock() - self.wall < limit and boottime() - self.boot < limit


def expired(until: float, now: float) -> bool:
    """The judge's rule: a lease that ends at ``until`` has expired at ``now``
    (both on the judge's clock) once ``now`` is strictly past it."""
    return now > until


# ---------------------------------------------------------------------------
# store locks: locks/<s|e>-<uuid>


@dataclass(frozen=True)
class LockInfo:
    """One store lock object's content.

    ``boot_id`` and ``pid_ns`` are empty in locks written by versions before
    they were recorded: such a lock is judged by its expiry only.
    """

    lock_id: str
    kind: str  # "shared" | "exclusive" (anything else conflicts like "exclusive")
    host: str
    pid: int
    start: str
    created: float
    expires: float
    purpose: str
    boot_id: str = ""
    pid_ns: str = ""

    @property
    def holder(self) -> procinfo.Holder:
        return procinfo.Holder(self.host, self.boot_id, self.pid_ns, self.pid, self.start)

    def stale(self, now: float) -> bool:
        """Whether the holder is gone: provably dead here, or (foreign) past its expiry."""
        verdict = procinfo.judge(self.holder)
        if verdict == procinfo.ALIVE:
            return False
        if verdict == procinfo.DEAD:
            return True
        return expired(self.expires, now)

    @property
    def exclusive(self) -> bool:
        return self.kind != "shared"

    def encode(self) -> bytes:
        """The lock object's bytes: the eight keys every version knows, with boot id
        and pid namespace carried in ``host`` (``"<host> boot=<id> pidns=<ns>"``).

        Versions before this one fail on any key they do not know and delete
        such a lock as torn, and judge a lock of their own hostname by its pid:
        a host they do not recognise makes them judge it by its lease instead,
        which is safe during a rolling upgrade.
        """
        d = asdict(self)
        del d["boot_id"], d["pid_ns"]
        if self.boot_id and self.pid_ns:
            d["host"] = f"{self.host} boot={self.boot_id} pidns={self.pid_ns}"
        return json.dumps(d).encode()

    @classmethod
    def unreadable(cls, name: str, mtime: float, ttl: float) -> LockInfo:
        """An unreadable lock object: a foreign lock of the kind its name says,
        whose lease runs from its last write (its modification time)."""
        return cls(
            lock_id=name,
            kind="shared" if name.startswith("s-") else "exclusive",
            host="(unreadable lock object)",
            pid=0,
            start="",
            created=mtime,
            expires=mtime + ttl,
            purpose="unreadable",
        )

    def describe(self) -> str:
        return (
            f"{self.kind} lock by pid {self.pid} on {self.host} ({self.purpose}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.created))})"
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "lock_id": (str,),
    "kind": (str,),
    "host": (str,),
    "pid": (int,),
    "start": (str,),
    "created": (int, float),
    "expires": (int, float),
    "purpose": (str,),
    "boot_id": (str,),
    "pid_ns": (str,),
}
_REQUIRED = {f.name for f in fields(LockInfo) if f.name not in ("boot_id", "pid_ns")}

#: ``host`` as :meth:`LockInfo.encode` writes it.
_HOST_WITH_IDS = re.compile(r"(.*) boot=(\S+) pidns=(\S+)")


def parse_lock(name: str, data: bytes) -> LockInfo | None:
    """Decode a store lock object; None if it is not one this version can read.

    Fields this version does not know are ignored: lock writes are atomic, so
    an unknown field is a newer writer, not damage.
    """
    try:
        d = json.loads(data)
    except ValueError:
        return None
    if not isinstance(d, dict) or not d.keys() >= _REQUIRED:
        return None
    known: dict[str, Any] = {}
    for key, types in _TYPES.items():
        if key in d:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, types):
                return None
            known[key] = v
    known["lock_id"] = name  # the object's name is what we delete and compare
    m = _HOST_WITH_IDS.fullmatch(known["host"])
    if m is not None and "boot_id" not in known and "pid_ns" not in known:
        known["host"], known["boot_id"], known["pid_ns"] = m.groups()
    return LockInfo(**known)


# ---------------------------------------------------------------------------
# S3 compare-and-swap locks: locks/cas-<key hash>.<uuid>

#: The ``kind`` of every CAS lock body.
SWAP_KIND = "compare-and-swap"


@dataclass(frozen=True)
class SwapLockInfo:
    """The body of an S3 compare-and-swap lock object, for people reading the
    bucket: which ref, which process, which TTL. The protocol itself judges
    these locks by name and LastModified only."""

    key: str
    host: str
    pid: int
    ttl: float

    @classmethod
    def mine(cls, key: str, ttl: float) -> SwapLockInfo:
        """The body this process writes for a lock on ``key``."""
        return cls(key, socket.gethostname(), os.getpid(), ttl)

    def encode(self) -> bytes:
        """The bytes every version writes: ``kind``, ``key``, ``host``, ``pid``, ``ttl``."""
        return json.dumps(
            {
                "kind": SWAP_KIND,
                "key": self.key,
                "host": self.host,
                "pid": self.pid,
                "ttl": self.ttl,
            }
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> SwapLockInfo | None:
        """Decode a CAS lock body; None if it is not one (a store lock, damage)."""
        try:
            d = json.loads(data)
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("kind") != SWAP_KIND:
            return None
        key, host, pid, ttl = (d.get(k) for k in ("key", "host", "pid", "ttl"))
        if (
            not isinstance(key, str)
            or not isinstance(host, str)
            or isinstance(pid, bool)
            or not isinstance(pid, int)
            or isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
        ):
            return None
        return cls(key, host, pid, ttl)
