"""Retention policies: restic-like keep rules, tags and latest always kept."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo_cas.errors import UsageError
from apollo_cas.retention import RetainItem, RetentionPolicy, parse_duration, select

HOUR = 3600.0
DAY = 86400.0
#: A fixed, DST-free moment (local midnight varies; the checks below bucket with
#: the same local clock as the code, so any timezone works).
NOW = 1_750_000_000.0


def item(
    i: int, created: float, series: str = "s", tags: tuple[str, ...] = (), latest: bool = False
) -> RetainItem:
    return RetainItem(f"{i:032x}", series, created, tags, (series,) if latest else ())


def history(times: list[float], series: str = "s") -> list[RetainItem]:
    """Checkpoints at ``times`` (any order); the newest is the series' latest."""
    newest = max(range(len(times)), key=lambda i: times[i])
    return [item(i, t, series, latest=i == newest) for i, t in enumerate(times)]


# ---------------------------------------------------------------------------
# parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2d", 2 * DAY),
        ("12h", 12 * HOUR),
        ("30m", 1800),
        ("1w", 7 * DAY),
        ("90s", 90),
        ("45", 45),
        ("1d12h", 1.5 * DAY),
        ("1.5h", 1.5 * HOUR),
        (" 2D ", 2 * DAY),
        ("0", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "2x", "-1d", "d", "2 days", "1h-", "h1"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_duration(text)
    assert "duration" in str(exc.value) and "2d" in str(exc.value)  # says what and how
    assert exc.value.exit_code == 2


def test_policy_validation() -> None:
    with pytest.raises(UsageError):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(UsageError):
        RetentionPolicy(keep_within=-5)
    assert RetentionPolicy().empty
    assert not RetentionPolicy(keep_last=0).empty
    assert "last 3" in RetentionPolicy(keep_last=3).describe()


# ---------------------------------------------------------------------------
# the rules


def test_no_policy_forgets_nothing() -> None:
    cps = history([NOW - i * DAY for i in range(10)])
    keep, forget, reasons = select(cps, RetentionPolicy(), NOW)
    assert forget == [] and len(keep) == 10
    assert all(reasons[c] for c in keep)


def test_keep_last_per_series() -> None:
    a = history([NOW - i * 60 for i in range(5)], "a")
    b = [
        RetainItem(f"{100 + i:032x}", "b", NOW - i * 61, (), ("b",) if i == 0 else ())
        for i in range(4)
    ]
    keep, forget, _ = select(a + b, RetentionPolicy(keep_last=2), NOW)
    kept = set(keep)
    assert kept == {a[0].checkpoint_id, a[1].checkpoint_id, b[0].checkpoint_id, b[1].checkpoint_id}
    assert len(forget) == 5
    # Oldest first in both lists.
    created = {c.checkpoint_id: c.created for c in a + b}
    assert [created[c] for c in forget] == sorted(created[c] for c in forget)


def test_tags_and_latest_always_kept() -> None:
    cps = history([NOW - i * DAY for i in range(6)])
    cps[4] = RetainItem(cps[4].checkpoint_id, "s", cps[4].created, ("release",), ())
    keep, forget, reasons = select(cps, RetentionPolicy(keep_last=0), NOW)
    assert set(keep) == {cps[0].checkpoint_id, cps[4].checkpoint_id}
    assert "latest of s" in reasons[cps[0].checkpoint_id]
    assert any("tag release" in r for r in reasons[cps[4].checkpoint_id])
    assert len(forget) == 4


def test_keep_within() -> None:
    cps = history([NOW - h * HOUR for h in (0, 1, 5, 23, 25, 49)])
    keep, forget, _ = select(cps, RetentionPolicy(keep_within=parse_duration("1d")), NOW)
    assert keep == sorted(
        (c.checkpoint_id for c in cps[:4]),
        key=lambda i: next(c.created for c in cps if c.checkpoint_id == i),
    )
    assert set(forget) == {cps[4].checkpoint_id, cps[5].checkpoint_id}


def _bucket_hour(ts: float) -> tuple[int, int, int]:
    t = time.localtime(ts)
    return (t.tm_year, t.tm_yday, t.tm_hour)


def _bucket_day(ts: float) -> tuple[int, int]:
    t = time.localtime(ts)
    return (t.tm_year, t.tm_yday)


def test_keep_hourly_skips_empty_hours() -> None:
    # Three checkpoints in one hour, then a gap of several hours, then one more.
    base = (NOW // HOUR) * HOUR  # start of an hour (UTC; local offsets are whole or half hours)
    times = [base + 50, base + 1000, base + 3000, base - 5 * HOUR + 10, base - 6 * HOUR + 10]
    cps = history(times)
    keep, _, reasons = select(cps, RetentionPolicy(keep_hourly=2), NOW)
    by_bucket: dict[tuple[int, int, int], RetainItem] = {}
    for c in sorted(cps, key=lambda c: c.created):
        by_bucket[_bucket_hour(c.created)] = c  # newest wins
    want = {c.checkpoint_id for b, c in sorted(by_bucket.items(), reverse=True)[:2]}
    assert {c for c in keep if any(r.startswith("hourly") for r in reasons[c])} == want
    assert len(want) == 2


def test_keep_daily() -> None:
    times = [NOW - d * DAY - k * 600 for d in (0, 1, 3, 4, 10) for k in range(3)]
    cps = history(times)
    keep, forget, _reasons = select(cps, RetentionPolicy(keep_daily=3), NOW)
    newest_per_day: dict[tuple[int, int], RetainItem] = {}
    for c in sorted(cps, key=lambda c: c.created):
        newest_per_day[_bucket_day(c.created)] = c
    want = {c.checkpoint_id for _, c in sorted(newest_per_day.items(), reverse=True)[:3]}
    assert set(keep) == want  # latest is the newest of the newest day: already in want
    assert len(forget) == len(cps) - 3


def test_rules_combine_as_union() -> None:
    times = [NOW - h * HOUR for h in range(0, 72, 2)]
    cps = history(times)
    p = RetentionPolicy(keep_last=3, keep_daily=3, keep_within=5 * HOUR)
    keep, forget, reasons = select(cps, p, NOW)
    for c in keep:
        assert reasons[c]
    for c in forget:
        assert reasons[c] == []
    assert set(keep) | set(forget) == {c.checkpoint_id for c in cps}
    assert not set(keep) & set(forget)


# ---------------------------------------------------------------------------
# against an independent formulation


def _reference(cps: list[RetainItem], p: RetentionPolicy, now: float) -> set[str]:
    keep = {c.checkpoint_id for c in cps if c.tags or c.latest_of}
    if p.empty:
        return {c.checkpoint_id for c in cps}
    for s in {c.series for c in cps}:
        group = sorted(
            (c for c in cps if c.series == s), key=lambda c: (c.created, c.checkpoint_id)
        )
        if p.keep_last:
            keep |= {c.checkpoint_id for c in group[-p.keep_last :]}
        for n, bucket in ((p.keep_hourly, _bucket_hour), (p.keep_daily, _bucket_day)):
            if n:
                newest: dict[tuple[int, ...], RetainItem] = {}
                for c in group:
                    newest[bucket(c.created)] = c
                keep |= {c.checkpoint_id for _, c in sorted(newest.items(), reverse=True)[:n]}
        if p.keep_within is not None:
            keep |= {c.checkpoint_id for c in group if c.created >= now - p.keep_within}
    return keep


opt_n = st.none() | st.integers(0, 6)


@settings(max_examples=300, deadline=None)
@given(
    offsets=st.lists(
        st.tuples(st.integers(0, 20 * 24 * 3600), st.sampled_from(["a", "b"]), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    last=opt_n,
    hourly=opt_n,
    daily=opt_n,
    within=st.none() | st.integers(0, 10 * 24 * 3600),
)
def test_select_matches_reference(
    offsets: list[tuple[int, str, bool]],
    last: int | None,
    hourly: int | None,
    daily: int | None,
    within: int | None,
) -> None:
    items = [
        RetainItem(f"{i:032x}", s, NOW - off, ("t",) if tagged else ())
        for i, (off, s, tagged) in enumerate(offsets)
    ]
    # Mark each series' newest as latest, as the store would.
    newest: dict[str, RetainItem] = {}
    for c in sorted(items, key=lambda c: (c.created, c.checkpoint_id)):
        newest[c.series] = c
    items = [
        RetainItem(
            c.checkpoint_id,
            c.series,
            c.created,
            c.tags,
            (c.series,) if newest[c.series] is c else (),
        )
        for c in items
    ]
    p = RetentionPolicy(
        keep_last=last,
        keep_hourly=hourly,
        keep_daily=daily,
        keep_within=None if within is None else float(within),
    )
    keep, forget, _ = select(items, p, NOW)
    assert set(keep) == _reference(items, p, NOW)
    assert set(keep) | set(forget) == {c.checkpoint_id for c in items}
    assert len(keep) + len(forget) == len(items)
    for c in items:  # the promise gc relies on
        if c.tags or c.latest_of:
            assert c.checkpoint_id in keep
