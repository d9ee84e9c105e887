"""The one exception hierarchy of apollo_cas.

Every error a user can meet is an :class:`ApolloError`. Its message is a single
line that says what went wrong and where; ``hint`` says what to do about it. The
CLI prints ``error: <message> (<hint>)`` and exits with ``exit_code``.

::

    ApolloError                     exit 1
    ├── UsageError                  exit 2  bad option values, bad names
    │   ├── InvalidName                     a name that would escape its directory
    │   └── Refused                 exit 1  well formed, but what the store holds forbids it
    ├── StoreError
    │   ├── StoreNotFound                   no store at that location
    │   ├── FormatVersionError              store written by another format version
    │   ├── RefNotFound / AmbiguousRef      REF matches nothing / several checkpoints
    │   ├── ObjectNotFound                  a key is missing in the backend
    │   ├── CorruptObject                   a chunk or manifest fails its checks
    │   │   ├── CorruptChunk
    │   │   └── CorruptManifest
    │   ├── StoreLocked                     another process holds a conflicting lock
    │   └── ConcurrentUpdate                a ref moved under us too many times
    ├── BackendError                        I/O below the store
    │   ├── DiskFull
    │   ├── PermissionDenied
    │   └── BackendUnavailable              S3 endpoint unreachable, bad credentials
    ├── SourceError                         what save reads
    │   ├── SourceNotFound
    │   ├── UnsupportedSource
    │   ├── UnsafePickle                    a pickle that names a non-allowlisted global
    │   ├── UnsupportedDtype
    │   └── StaleHandles                    CUDA IPC handles that no longer point at the weights
    ├── TargetError                         what restore writes
    └── DamageFound                 exit 3  verify found damage
"""

from __future__ import annotations


class ApolloError(Exception):
    """Base class. ``str(err)`` is the one-line message shown to users."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(ApolloError):
    """The command was called wrongly: fix the arguments."""

    exit_code = 2


class InvalidName(UsageError):
    """A tensor, tag, series or key name that is empty, too long or would escape its directory."""


class Refused(UsageError):
    """A well-formed request that the store's state forbids (a tag that already
    names another checkpoint, forgetting a tagged checkpoint). A ``UsageError``
    for callers that catch those, but it exits 1: the command line was right."""

    exit_code = 1


class StoreError(ApolloError):
    """Something about the store itself."""


class StoreNotFound(StoreError):
    """No store exists at the given location."""


class FormatVersionError(StoreError):
    """The store (or one of its records) uses a format version this program cannot read."""


class RefNotFound(StoreError):
    """REF names no checkpoint."""


class AmbiguousRef(StoreError):
    """A checkpoint id prefix matches several checkpoints."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """A key is missing in the backend. Also a ``FileNotFoundError``, like obstore does."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        ApolloError.__init__(self, message, hint)


class CorruptObject(StoreError):
    """A stored object fails its integrity checks."""


class CorruptChunk(CorruptObject):
    """A chunk's bytes do not hash to its name, or cannot be decoded."""


class MissingChunk(CorruptChunk):
    """A chunk a manifest or delta names is not in the store (either format)."""


class CorruptManifest(CorruptObject):
    """A manifest cannot be decoded or fails its checks."""


class StoreLocked(StoreError):
    """Another process holds a conflicting lock on the store."""


class ConcurrentUpdate(StoreError):
    """A ref kept moving under us; retried and gave up."""


class BackendError(ApolloError):
    """An I/O error below the store."""


class DiskFull(BackendError):
    """No space left where the store or output lives."""


class PermissionDenied(BackendError):
    """The operating system or object store refused access."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached or refuses the credentials."""


class SourceError(ApolloError):
    """Something about what ``save`` reads."""


class SourceNotFound(SourceError):
    """The source path does not exist."""


class UnsupportedSource(SourceError):
    """The source exists but is not a kind apollo_cas reads."""


class UnsafePickle(SourceError):
    """A pickle names a global outside the allowlist; it was not executed."""


class UnsupportedDtype(SourceError):
    """A tensor dtype that cannot be stored bit-exactly."""


class StaleHandles(SourceError):
    """CUDA IPC handles that no longer describe the live weights."""


class TargetError(ApolloError):
    """Something about what ``restore`` writes."""


class DamageFound(ApolloError):
    """``verify`` found damaged or missing objects."""

    exit_code = 3


__all__ = [
    "AmbiguousRef",
    "ApolloError",
    "BackendError",
    "BackendUnavailable",
    "ConcurrentUpdate",
    "CorruptChunk",
    "CorruptManifest",
    "CorruptObject",
    "DamageFound",
    "DiskFull",
    "FormatVersionError",
    "InvalidName",
    "ObjectNotFound",
    "PermissionDenied",
    "RefNotFound",
    "Refused",
    "SourceError",
    "SourceNotFound",
    "StaleHandles",
    "StoreError",
    "StoreLocked",
    "StoreNotFound",
    "TargetError",
    "UnsafePickle",
    "UnsupportedDtype",
    "UnsupportedSource",
    "UsageError",
]
