"""Opening the store a save writes into: an existing one, or a new one made by
its first save; never a new one among someone's files.

A store that does not exist yet is not created here: its ``config`` is written
by the commit of its first save (:mod:`apollo_cas.unborn`), so a failed first
save leaves nothing. This module holds the rule for *where* such a store may
be made; the command line (``save``, ``apollo-checkpoint``) and Python callers
share it, and the CLI only says "created store at ..." afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import codecs, frontend, layout
from .backends import open_backend
from .errors import Refused, StoreNotFound
from .store import Store

__all__ = ["open_for_save", "refuse_foreign_directory"]


def open_for_save(
    location: str,
    policy: codecs.CodecPolicy | None = None,
    *,
    allow_non_empty: bool = False,
    workers: int | None = None,
) -> tuple[Store, bool]:
    """The store at ``location`` and whether it is new. A missing one is created
    by its first successful save (inside Store.save), not before, so a failed
    first save leaves nothing. A new store is not made inside a directory that
    already holds other files (a typo of the store path, or the wrong directory)
    unless ``allow_non_empty`` (``--force``); the original tool's checkpoint
    directory is the exception, since it is meant to become the store."""
    try:
        return Store.open(location, policy=policy, workers=workers), False
    except StoreNotFound:
        pass
    if not allow_non_empty:
        refuse_foreign_directory(location)
    return Store(open_backend(location), policy, workers), True


def refuse_foreign_directory(location: str) -> None:
    """Refuse to make a new store in a local directory that holds other files."""
    from .sources.seed import is_checkpoint_root

    if "://" in location or not os.path.isdir(location):
        return
    root = Path(location)
    # What an interrupted first save may leave (its chunks and locks, no config
    # yet) is the store being made, not someone's files.
    own = {
        prefix.split("/", 1)[0]
        for prefix in (
            layout.CHUNKS_PREFIX,
            layout.PACKS_PREFIX,
            layout.INDEX_PREFIX,
            layout.MANIFESTS_PREFIX,
            layout.GROUPS_PREFIX,
            layout.SERIES_PREFIX,
            layout.LOCKS_PREFIX,
        )
    }
    others = [
        p.name
        for p in root.iterdir()
        if not (p.name == "latest" and p.is_symlink()) and not (p.name in own and p.is_dir())
    ]
    if others and not is_checkpoint_root(root):
        shown = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        raise Refused(
            f"{location} is not an apollo_cas store and is not empty (holds {shown})",
            frontend.offer(
                "--force",
                "name a new or empty directory for a new store, or pass --force to create "
                "the store among these files",
                otherwise="name a new or empty directory for the store",
            ),
        )
