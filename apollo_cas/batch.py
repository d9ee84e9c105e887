"""Work over several items (sources to save, refs to forget) where one failing does not stop the rest.

The rule, the same for every such call: the items are done in order; a single
item's error is raised as it is; with several, an error about the item itself
(an unreadable source, a ref that names nothing) is reported as it happens and
the next item is tried, while any other error (the store is locked, full or
unreachable) stops the loop, since the rest would fail the same way. At the end
:meth:`Batch.raise_if_failed` raises one :class:`PartialFailure` that says what
was done, what failed and what was not tried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import ApolloError

__all__ = ["Batch", "PartialFailure", "each"]

T = TypeVar("T")
R = TypeVar("R")


class PartialFailure(ApolloError):
    """A call over several items did some and failed on others. Each failure was
    reported as it happened; this is the summary line. ``done`` is what was
    finished (the CLI puts it into the ``--json`` error document)."""

    def __init__(self, message: str, hint: str | None, done: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.done = done

    @classmethod
    def of(
        cls,
        what: str,
        done_names: list[str],
        failed: list[tuple[object, ApolloError]],
        done_json: dict[str, Any],
        total: int,
        not_tried: list[str] | None = None,
    ) -> PartialFailure:
        names = ", ".join(str(item) for item, _ in failed)
        message = f"{len(failed)} of {total} {what}s failed ({names}); " + (
            f"done: {', '.join(done_names)}" if done_names else "none was done"
        )
        if not_tried:
            message += f"; not tried: {', '.join(not_tried)}"
            done_json = {**done_json, "not_tried": not_tried}
        failures = [
            {what: str(item), "type": type(e).__name__, "message": e.message, "hint": e.hint}
            for item, e in failed
        ]
        return cls(
            message,
            "each failure is shown above; fix those and run them again",
            {**done_json, "failed": failures},
        )


@dataclass
class Batch(Generic[T, R]):
    """What :func:`each` did: ``done`` (item, result) pairs, ``failed`` (item,
    error) pairs, and the items ``not_tried`` after an error that stopped it."""

    total: int
    done: list[tuple[T, R]] = field(default_factory=list)
    failed: list[tuple[object, ApolloError]] = field(default_factory=list)
    not_tried: list[str] = field(default_factory=list)

    def raise_if_failed(self, what: str, done_names: list[str], done_json: dict[str, Any]) -> None:
        """Raise the :class:`PartialFailure` of ``what`` (a noun: "source", "ref")
        if any item failed."""
        if self.failed:
            raise PartialFailure.of(
                what, done_names, self.failed, done_json, self.total, self.not_tried
            )


def each(
    items: Sequence[T],
    action: Callable[[int, T], R],
    *,
    recoverable: tuple[type[ApolloError], ...],
    failed: Callable[[T, ApolloError], None],
) -> Batch[T, R]:
    """Run ``action(index, item)`` on each item in order (see the module docstring).

    ``recoverable``: the errors about one item, after which the next is tried;
    ``failed(item, error)`` is told of each failure as it happens.
    """
    out: Batch[T, R] = Batch(len(items))
    for i, item in enumerate(items):
        try:
            result = action(i, item)
        except ApolloError as exc:
            if len(items) == 1:
                raise
            failed(item, exc)
            out.failed.append((item, exc))
            if not isinstance(exc, recoverable):
                out.not_tried = [str(x) for x in items[i + 1 :]]
                break
            continue
        out.done.append((item, result))
    return out
