"""The backend interface: a tiny key/value contract every storage backend meets.

The store above never knows whether it talks to a directory, memory or S3. Keys
come from :mod:`apollo_cas.layout`; values are immutable bytes except for refs,
which only ever change through :meth:`Backend.compare_and_swap`.

Contract (checked for every backend by ``tests/backends/contract.py``):

* ``put`` is atomic: a reader sees the old value or the new one, never a prefix.
* ``put_if_absent`` creates or leaves alone; it is how chunks and manifests are
  written, so retries and concurrent writers of the same content are harmless.
* A put with ``durable=False`` may sit in caches until :meth:`sync`; the store
  syncs before it writes anything that refers to those keys.
* ``get`` of a missing key raises :class:`~apollo_cas.errors.ObjectNotFound`.
* OS and network errors surface as :class:`~apollo_cas.errors.BackendError`
  subclasses with a message naming the key and location.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..hashing import digest_hex_parts

#: No leftover of an interrupted write younger than this (seconds) is removed,
#: whatever grace gc is given, unless its writer is provably dead: a writer on
#: another host or in another container may be between creating and renaming it.
TEMPORARY_FLOOR = 300.0


#: Values of :attr:`Capabilities.compare_and_swap`: how a backend makes
#: :meth:`Backend.compare_and_swap` atomic.
CAS_FLOCK = "flock"  # read-compare-write under a kernel file lock (a directory)
CAS_MUTEX = "mutex"  # a lock of this process (memory: nobody else can see the store)
CAS_CONDITIONAL = "conditional"  # one conditional request (S3 If-Match / If-None-Match)
CAS_LOCK_OBJECTS = "lock"  # a lock-object protocol (S3 servers without conditional writes)
CAS_AUTO = "auto"  # one of the two S3 ways, chosen by probing the server at first use
CAS_METHODS = (CAS_FLOCK, CAS_MUTEX, CAS_CONDITIONAL, CAS_LOCK_OBJECTS, CAS_AUTO)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared by it instead of guessed from its type or
    location: callers above ``backends/`` read these flags, never ``isinstance``
    or a URL scheme."""

    #: Another process can open the same store from its location (a directory,
    #: S3), so restores may decode on worker processes; not the memory backend.
    shareable_across_processes: bool = True
    #: ``put_if_absent`` never replaces an existing object with other bytes, even
    #: between two racing writers (False where that is not promised: S3 without
    #: conditional creates checks, then writes).
    atomic_create: bool = True
    #: How :meth:`Backend.compare_and_swap` is made atomic (one of
    #: :data:`CAS_METHODS`), as configured; ``"auto"`` is resolved at the first
    #: swap (``S3Backend.cas_method`` then says which way was taken). Empty: not
    #: declared (a backend written before this flag).
    compare_and_swap: str = ""
    #: A directory in which every key is the plain file ``<files_root>/<key>``:
    #: readers with I/O of their own (the GPU restore path) may open those files
    #: directly. None where keys are not files.
    files_root: str | None = None


@dataclass(frozen=True)
class ObjectInfo:
    """Size in bytes and modification time (seconds since the epoch) of one object."""

    size: int
    mtime: float


class Backend(abc.ABC):
    """Abstract key/value storage. Subclasses: local directory, memory, S3."""

    #: Human-readable location, used in error messages (a path or an s3:// URL).
    location: str
    #: What this backend can do (see :class:`Capabilities`).
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole value of ``key``."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes of ``key`` starting at ``offset``."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Create or replace ``key`` atomically."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        """Create ``key`` unless it exists. Returns True if this call wrote it."""

    def put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        """Store the concatenation of ``parts`` (a pack: its envelopes where they
        lie, then its trailer) under ``key_for(its XXH3-128 hex)``, create-only, and
        return that id. This default hashes the parts, joins them and calls
        :meth:`put_if_absent`; the local backend writes them first and hashes the
        file where it lies (``fsio.atomic_write_by_digest``)."""
        digest = digest_hex_parts(parts)
        self.put_if_absent(key_for(digest), b"".join(parts), durable=durable)
        return digest

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abc.abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size and modification time of ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with ``prefix`` (no temporary objects), any order."""

    @abc.abstractmethod
    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Set ``key`` to ``data`` only if it currently holds ``expected``.

        ``expected=None`` means "must not exist"; ``data=None`` deletes. Returns
        whether the swap happened. Atomic with respect to other callers of this
        method on the same store, across processes (and hosts, for shared backends).
        """

    def sync(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Make every earlier ``durable=False`` put durable."""

    def remove_if_empty(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Remove the location itself if it holds no object (a failed first save's
        directories); object stores have nothing to remove."""

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release connections and file handles."""

    def remove_temporaries(self, older_than: float) -> int:
        """Delete leftovers of interrupted writes older than ``older_than`` (epoch s).

        Never one whose writer still runs, nor one younger than
        :data:`TEMPORARY_FLOOR` whose writer cannot be judged here. Returns how
        many were removed. Backends whose writes are atomic by construction
        (S3, memory) have none.
        """
        return 0
