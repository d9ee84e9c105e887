"""Retention policies: which checkpoints gc keeps and which it forgets.

The semantics follow restic's ``forget`` so that operators meet no surprises:

* ``keep_last N``: the N newest checkpoints of each series;
* ``keep_hourly N`` / ``keep_daily N``: for the last N hours (days) *that have a
  checkpoint*, the newest checkpoint of that hour (day), per series. Hours and
  days are calendar buckets in local time, as restic does: "one per day" means
  one per day on the operator's clock;
* ``keep_within D``: every checkpoint created after ``now - D``.

A checkpoint is kept when any rule keeps it. On top of the rules, tag targets
and every series' latest checkpoint are always kept: gc must never remove what
a ref names (promise 3), and the next save of a series deltas against its
latest. With no rule at all nothing is forgotten: ``gc`` without flags only
sweeps unreferenced chunks, so a bare ``gc`` can never lose a checkpoint.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .errors import UsageError

if TYPE_CHECKING:
    from .store import Checkpoint

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str) -> float:
    """``"2d"``, ``"12h"``, ``"30m"``, ``"1w"``, ``"90s"`` or plain seconds -> seconds.

    Several terms add up (``"1d12h"``), as in restic's ``--keep-within``.
    """
    raw = str(text).strip()
    terms = re.findall(r"\d+(?:\.\d+)?\s*[smhdwSMHDW]?", raw)
    if not raw or not terms or "".join(terms).replace(" ", "") != raw.replace(" ", ""):
        raise UsageError(
            f"cannot read duration {text!r}",
            "use a number with a unit: s, m, h, d or w (for example 2d, 12h, 30m, 1w, 1d12h)",
        )
    total = 0.0
    for term in terms:
        m = _DURATION.match(term)
        assert m is not None  # findall matched the same pattern
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    return total


@dataclass(frozen=True)
class RetentionPolicy:
    """What gc keeps besides tags and each series' latest. ``None`` = rule unused."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_within: float | None = None  # seconds

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_hourly", "keep_daily"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be a whole number >= 0, not {value!r}")
        if self.keep_within is not None and self.keep_within < 0:
            raise UsageError(f"--keep-within must not be negative ({self.keep_within!r} s)")

    @property
    def empty(self) -> bool:
        """True when no rule is given: gc forgets nothing."""
        return (
            self.keep_last is None
            and self.keep_hourly is None
            and self.keep_daily is None
            and self.keep_within is None
        )

    def describe(self) -> str:
        parts = []
        if self.keep_last is not None:
            parts.append(f"last {self.keep_last}")
        if self.keep_hourly is not None:
            parts.append(f"hourly {self.keep_hourly}")
        if self.keep_daily is not None:
            parts.append(f"daily {self.keep_daily}")
        if self.keep_within is not None:
            parts.append(f"within {self.keep_within:g}s")
        return ", ".join(parts) or "keep all"


@dataclass(frozen=True)
class RetainItem:
    """What selection needs to know of one checkpoint."""

    checkpoint_id: str
    series: str
    created: float
    tags: tuple[str, ...] = ()
    latest_of: tuple[str, ...] = ()

    @classmethod
    def of(cls, cp: Checkpoint | RetainItem) -> RetainItem:
        if isinstance(cp, RetainItem):
            return cp
        return cls(cp.checkpoint_id, cp.manifest.series, cp.manifest.created, cp.tags, cp.latest_of)


class Selection(NamedTuple):
    """The outcome of :func:`select`; unpacks as ``(keep, forget, reasons)``."""

    keep: list[str]  # ids, oldest first
    forget: list[str]  # ids, oldest first
    reasons: dict[str, list[str]]  # id -> why it is kept (empty for forgotten ones)


def _hour(ts: float) -> tuple[int, ...]:
    t = time.localtime(ts)
    return (t.tm_year, t.tm_yday, t.tm_hour)


def _day(ts: float) -> tuple[int, ...]:
    t = time.localtime(ts)
    return (t.tm_year, t.tm_yday)


def _keep_buckets(
    newest_first: Sequence[RetainItem],
    n: int,
    bucket: Callable[[float], tuple[int, ...]],
    label: str,
    reasons: dict[str, list[str]],
) -> None:
    """restic's rule: walking newest first, keep the first checkpoint of each new
    bucket until ``n`` buckets are used (empty buckets do not count)."""
    last: tuple[int, ...] | None = None
    left = n
    for cp in newest_first:
        if left <= 0:
            return
        b = bucket(cp.created)
        if b != last:
            reasons[cp.checkpoint_id].append(label)
            last = b
            left -= 1


def select(
    checkpoints: Iterable[Checkpoint | RetainItem],
    policy: RetentionPolicy,
    now: float | None = None,
) -> Selection:
    """Split ``checkpoints`` into those to keep and those to forget under ``policy``.

    Rules apply per series (each series is one writer: a host, a rank, a run).
    """
    now = time.time() if now is None else now
    cps = sorted(
        (RetainItem.of(c) for c in checkpoints), key=lambda c: (c.created, c.checkpoint_id)
    )
    reasons: dict[str, list[str]] = {c.checkpoint_id: [] for c in cps}
    for c in cps:
        if c.tags:
            reasons[c.checkpoint_id].append("tag " + ",".join(c.tags))
        if c.latest_of:
            reasons[c.checkpoint_id].append("latest of " + ",".join(c.latest_of))
    if policy.empty:
        for c in cps:
            reasons[c.checkpoint_id].append("no retention policy")
    else:
        by_series: dict[str, list[RetainItem]] = {}
        for c in cps:
            by_series.setdefault(c.series, []).append(c)
        for group in by_series.values():
            newest_first = group[::-1]
            if policy.keep_last:
                for c in newest_first[: policy.keep_last]:
                    reasons[c.checkpoint_id].append(f"last {policy.keep_last}")
            if policy.keep_hourly:
                _keep_buckets(
                    newest_first, policy.keep_hourly, _hour, f"hourly {policy.keep_hourly}", reasons
                )
            if policy.keep_daily:
                _keep_buckets(
                    newest_first, policy.keep_daily, _day, f"daily {policy.keep_daily}", reasons
                )
            if policy.keep_within is not None:
                cutoff = now - policy.keep_within
                for c in group:
                    if c.created >= cutoff:
                        reasons[c.checkpoint_id].append(f"within {policy.keep_within:g}s")
    keep = [c.checkpoint_id for c in cps if reasons[c.checkpoint_id]]
    forget = [c.checkpoint_id for c in cps if not reasons[c.checkpoint_id]]
    return Selection(keep, forget, reasons)
