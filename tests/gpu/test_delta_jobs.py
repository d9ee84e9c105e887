"""The GPU delta path's plan (gpu/delta_jobs.plan_jobs) against the CPU path's rules:
the same base, depth and fallbacks as ``delta_bases.BaseFinder``'s Base objects give
``codecs.encode`` (a base at the depth limit is replaced by its chain's root)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as hst

from apollo_cas.codecs import CodecPolicy
from apollo_cas.delta_bases import BaseFinder
from apollo_cas.gpu.delta_jobs import plan_jobs
from apollo_cas.sources.base import BlockRequest

BS = 1 << 20


class _Entry:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks


class _Store:
    chunks = None  # the bases' loaders are never called here


def _cid(k: int) -> bytes:
    return k.to_bytes(16, "big")


@settings(max_examples=60, deadline=None)
@given(
    links=hst.lists(hst.integers(0, 6), min_size=1, max_size=8),
    limit=hst.integers(1, 4),
    loop=hst.booleans(),
    short=hst.booleans(),
)
def test_plan_takes_the_base_the_cpu_path_would(
    links: list[int], limit: int, loop: bool, short: bool
) -> None:
    # Block b of the one tensor is chunk 100 + b, whose chain is links[b] deltas long;
    # with `loop`, block 0's chain comes round to its start.
    bases: dict[bytes, bytes] = {}
    for b, n in enumerate(links):
        prev = _cid(100 + b)
        for d in range(n):
            nxt = _cid(1000 * (b + 1) + d)
            bases[prev] = nxt
            prev = nxt
    if loop and links[0]:
        bases[_cid(1000 + links[0] - 1)] = _cid(100)
    chunks = [_cid(100 + b) for b in range(len(links))]
    finder = BaseFinder(_Store(), [_Entry(chunks)], bases)  # type: ignore[arg-type]
    policy = CodecPolicy(max_delta_depth=limit)
    wanted = [
        BlockRequest(0, b * BS, BS // 2 if short and b == len(links) - 1 else BS)
        for b in range(len(links))
    ]
    where = [(0, b) for b in range(len(links))]
    jobs, rest = plan_jobs(wanted, [chunks], where, [2], finder, policy, BS)
    want_jobs, want_rest = [], []
    for b in range(len(links)):
        base = finder(0, b) if wanted[b].length == BS else None
        if base is not None and base.depth + 1 > limit:
            base = base.root
        if base is None or base.depth + 1 > limit:
            want_rest.append(b)
        else:
            want_jobs.append((b, base.chunk_id, base.depth + 1))
    assert rest == want_rest
    assert [(j.i, j.base, j.depth) for j in jobs] == want_jobs
    if loop and links[0]:
        assert 0 in rest  # a looping chain is never a base
