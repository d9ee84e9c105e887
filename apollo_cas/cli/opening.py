"""The store a save writes into, as the command line shows it.

Where a new store may be made, and that it is made by its first save, are the
library's rules (:mod:`apollo_cas.opening`); this adds only the line that says
a command created one.
"""

from __future__ import annotations

from .. import layout
from ..errors import ApolloError
from ..opening import open_for_save, refuse_foreign_directory
from ..store import Store
from .common import note

__all__ = ["announce_created", "open_for_save", "refuse_foreign_directory"]


def announce_created(store: Store, created: bool) -> None:
    """Say so when this command made a new store (a typo in a path makes one too)."""
    if not created:
        return
    try:
        born = store.backend.exists(layout.CONFIG_KEY)
    except ApolloError:
        # Called on the way out of a failed command too: a server that died
        # must not replace that command's error with one about this check.
        return
    if born:
        note(f"created store at {store.location}")
