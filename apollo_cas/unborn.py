"""A store that does not exist yet is created by its first save's commit.

``save`` to a new location writes chunks (and its lock) before it knows whether
it will succeed; the store's ``config``, the object that makes a location a
store, is written only just before the first manifest. If that first save fails
before committing, what it wrote is removed again, so a failed first save leaves
nothing behind (issue 11, item 12).

Removal must never hurt another process. It runs under the exclusive lock,
taken without waiting: a concurrent first save holds its shared lock for as
long as it runs, so the exclusive lock is refused and its chunks stay (that save
will create the store). With the lock held and still no ``config``, nobody has
committed anything and nobody else is inside, so the chunks are nobody's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import layout
from .backends import Backend
from .errors import ApolloError, ObjectNotFound
from .locks import Locks


def exists(backend: Backend) -> bool:
    """Whether the location holds a store (its config)."""
    try:
        backend.get(layout.CONFIG_KEY)
    except ObjectNotFound:
        return False
    return True


@contextmanager
def first_save(backend: Backend, locks: Locks) -> Iterator[bool]:
    """Yield whether the store is unborn; if it is and the block fails before a
    config was written, remove what the block wrote (see the module docstring).
    Enter it outside the save's shared lock: removal needs the exclusive one."""
    unborn = not exists(backend)
    try:
        yield unborn
    except BaseException:
        if unborn:
            discard(backend, locks)
        raise


def discard(backend: Backend, locks: Locks) -> bool:
    """Remove the leftovers of a failed first save; True if they were removed."""
    try:
        with locks.hold("exclusive", "remove a failed first save", timeout=0):
            if exists(backend):
                return False  # another save committed: the store is born
            for prefix in (
                layout.CHUNKS_PREFIX,
                layout.PACKS_PREFIX,
                layout.INDEX_PREFIX,
                layout.MANIFESTS_PREFIX,
            ):
                for key in list(backend.list(prefix)):
                    backend.delete(key)
    except ApolloError:
        # Locked by a save in flight, or the backend failed: leave everything in
        # place (unreferenced chunks are gc's to collect); the save's own error
        # is the one to report.
        return False
    try:
        backend.remove_if_empty()
    except ApolloError:
        return False
    return True
