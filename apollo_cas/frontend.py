"""Which front end the user is typing into, so that error hints only name what it has.

The same library errors reach users of ``apollo-cas``, of the ``apollo-checkpoint``
compatibility command (which keeps the original tool's three options) and of the
Python API. A hint that says "pass --no-owner-check" is right for the first and
a dead end for the second. Error sites that suggest an option ask the current
front end through :func:`offer`; the command line sets the front end once at
its edge (:func:`using`), and records where the store location came from
(``--store``, ``$APOLLO_CAS_STORE``, ``--checkpoint-dir``) so that errors about
the store name the place the user actually set.

This module holds no state but a :class:`contextvars.ContextVar` and imports
nothing heavy: library modules may import it freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Frontend:
    """What the running program offers.

    ``options`` is ``None`` when every option of ``apollo-cas`` is available
    (``apollo-cas`` itself, and the Python API, whose callers read the CLI's
    names as the names of the matching arguments). ``instead`` is the command
    to suggest for an option this front end lacks. ``store_origin`` names where
    the store location came from, for errors about the store.
    """

    prog: str = "apollo-cas"
    options: frozenset[str] | None = None
    instead: str = ""
    store_origin: str = "--store / $APOLLO_CAS_STORE"

    def has(self, option: str) -> bool:
        """Whether the user can pass ``option`` (for example ``--source-kind``) here."""
        return self.options is None or option in self.options

    def offer(self, option: str, text: str, otherwise: str | None = None) -> str:
        """``text``, a hint that names ``option``, if this front end has the option;
        else ``otherwise``, or by default the same hint pointing at the command
        that has the option."""
        if self.has(option):
            return text
        if otherwise is not None:
            return otherwise
        return f"{text} ({self.prog} has no {option}: use '{self.instead} {option}')"


APOLLO_CAS = Frontend()

#: The original tool's command line: save and list with three options.
APOLLO_CHECKPOINT = Frontend(
    prog="apollo-checkpoint",
    options=frozenset({"--handles", "--checkpoint-dir", "--block-size"}),
    instead="apollo-cas save --handles FILE --checkpoint-dir DIR",
    store_origin="--checkpoint-dir",
)

_CURRENT: ContextVar[Frontend] = ContextVar("apollo_cas_frontend", default=APOLLO_CAS)


def current() -> Frontend:
    """The front end of this call (``apollo-cas``'s unless a command line set another)."""
    return _CURRENT.get()


def offer(option: str, text: str, otherwise: str | None = None) -> str:
    """A hint naming ``option``, fitted to the current front end (see :meth:`Frontend.offer`)."""
    return current().offer(option, text, otherwise)


def store_origin() -> str:
    """Where the store location of this call came from, as the user would write it."""
    return current().store_origin


@contextmanager
def using(frontend: Frontend) -> Iterator[Frontend]:
    """Make ``frontend`` current for the duration of the block."""
    token = _CURRENT.set(frontend)
    try:
        yield frontend
    finally:
        _CURRENT.reset(token)


def set_store_origin(origin: str) -> None:
    """Record, for the rest of this call, where the store location came from."""
    _CURRENT.set(replace(current(), store_origin=origin))
