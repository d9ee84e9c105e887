"""Host-side planning helpers of the GPU restore (pure Python, no torch needed)."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from apollo_cas.gpu.chunkplan import runs_within


@given(st.lists(st.integers(0, 50)), st.integers(1, 100))
def test_runs_within_keeps_order_and_the_limit(weights: list[int], limit: int) -> None:
    runs = list(runs_within(weights, lambda w: w, limit))
    assert [w for run in runs for w in run] == weights  # every item once, in order
    for run in runs:
        assert run  # no empty run
        assert sum(run) <= limit or len(run) == 1  # only a lone heavy item exceeds it
    for a, b in pairwise(runs):
        assert sum(a) + b[0] > limit  # a run ends only where the next item would not fit
