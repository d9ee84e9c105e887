"""The bulk range copy of the GPU restore's staging step: the piece table, the
range-by-range CPU copy, and the Triton kernel (under TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from apollo_cas.gpu.segments import PIECE, Segments, copy_into_many, spans  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _expected(src: np.ndarray, dst: np.ndarray, ranges: list[tuple[int, int, int]]) -> np.ndarray:
    out = dst.copy()
    for a, b, k in ranges:
        out[b : b + k] = src[a : a + k]
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3 * 37 + 5), min_size=1, max_size=12),
    st.integers(1, 37),
)
def test_spans_cover_every_byte_of_every_range_once(lengths: list[int], span: int) -> None:
    n = np.asarray(lengths, dtype=np.int64)
    s = np.cumsum(n) - n + 1000
    d = np.cumsum(n) - n
    t = spans(s, d, n, span)
    assert (t[2] <= span).all()
    if int(n.max()) <= span:  # nothing to cut: the ranges as they are
        assert np.array_equal(t, np.stack((s, d, n)))
    else:  # cut: every piece holds bytes
        assert (t[2] > 0).all()
    covered = sorted((int(b), int(b + k)) for b, k in zip(t[1], t[2], strict=True) if k)
    want = sorted((int(b), int(b + k)) for b, k in zip(d, n, strict=True) if k)
    # the pieces of a range tile it: same bytes, no overlap
    assert sum(e - b for b, e in covered) == sum(e - b for b, e in want)
    assert (t[0] - t[1] == 1000).all()


def device_for(kernel: bool) -> str:
    """Where a copy test runs: CUDA if there, else the CPU (the kernel then only under
    TRITON_INTERPRET=1, else the test is skipped)."""
    dev = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
    if kernel and dev == "cpu" and not INTERPRET:
        pytest.skip("the kernel runs on the CPU only under TRITON_INTERPRET=1")
    if kernel:
        pytest.importorskip("triton")
    return dev


def copied(
    src: np.ndarray, dst: np.ndarray, ranges: list[tuple[int, int, int]], dev: str, kernel: bool
) -> np.ndarray:
    """``dst`` after a Segments copy of ``ranges`` from ``src`` on ``dev``."""
    segs = Segments()
    for r in ranges:
        segs.add(*r)
    out = torch.from_numpy(dst.copy()).to(dev)
    segs.copy(torch.from_numpy(src).to(dev), out, kernel=kernel)
    return out.cpu().numpy()


def _ranges(rng: np.random.Generator, size: int) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    while True:
        k = int(rng.integers(1, 40_000))
        if pos + k > size:
            return out
        out.append((int(rng.integers(0, size - k)), pos, k))
        pos += k + int(rng.integers(0, 17))


@pytest.mark.parametrize("kernel", [False, True])
def test_copy_places_every_range(kernel: bool) -> None:
    dev = device_for(kernel)
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, 200_000, dtype=np.uint8)
    dst = np.zeros(150_000, dtype=np.uint8)
    ranges = _ranges(rng, dst.size)
    segs = Segments()
    for r in ranges:
        segs.add(*r)
    segs.add(5, 5, 0)  # an empty range is no range
    assert len(segs) == len(ranges)
    out = torch.from_numpy(dst.copy()).to(dev)
    segs.copy(torch.from_numpy(src).to(dev), out, kernel=kernel)
    assert np.array_equal(out.cpu().numpy(), _expected(src, dst, ranges))


def test_a_range_outside_a_buffer_is_refused_before_anything_is_copied() -> None:
    src, dst = torch.arange(10, dtype=torch.uint8), torch.zeros(10, dtype=torch.uint8)
    segs = Segments()
    segs.add(0, 0, 4)
    segs.add(8, 4, 4)  # reads past the source's end
    with pytest.raises(ValueError, match="past its buffer"):
        segs.copy(src, dst)
    assert int(dst.sum()) == 0


@pytest.mark.parametrize("kernel", [False, True])
def test_copy_into_many_places_every_run_in_its_own_destination(kernel: bool) -> None:
    """Runs into separate tensors (separate allocations, any address order), one launch."""
    dev = device_for(kernel)
    rng = np.random.default_rng(11)
    src = torch.from_numpy(rng.integers(0, 256, 300_000, dtype=np.uint8)).to(dev)
    sizes = [70_000, 5, 0, 123_457, 40_000]
    dests = [torch.zeros(n, dtype=torch.uint8, device=dev) for n in sizes]
    want = [d.cpu().numpy().copy() for d in dests]
    runs: list[list[int]] = []
    for i, n in enumerate(sizes):
        pos = 0
        while n and pos < n:
            k = min(int(rng.integers(1, 50_000)), n - pos)
            a = int(rng.integers(0, src.numel() - k))
            runs.append([i, pos, a, k])
            want[i][pos : pos + k] = src[a : a + k].cpu().numpy()
            pos += k + int(rng.integers(0, 3))
    rng.shuffle(runs)  # type: ignore[arg-type]
    copy_into_many(src, dests, runs, kernel=kernel)
    for d, w in zip(dests, want, strict=True):
        assert np.array_equal(d.cpu().numpy(), w)


@pytest.mark.parametrize("bad", [[0, 8, 0, 3], [1, -1, 0, 2], [0, 0, 9, 2], [1, 0, -1, 1]], ids=str)
def test_copy_into_many_refuses_a_run_outside_its_destination(bad: list[int]) -> None:
    src = torch.arange(10, dtype=torch.uint8)
    dests = [torch.zeros(10, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="run"):
        copy_into_many(src, dests, [[0, 0, 0, 2], bad])
    assert not any(bool(d.any()) for d in dests)  # nothing copied


@pytest.mark.parametrize("kernel", [False, True])
def test_ranges_longer_than_a_span_are_cut_and_still_copied_whole(kernel: bool) -> None:
    """A range over SPAN goes up cut (the launch's second axis covers one span), beside a
    range shorter than a piece: the short one is not stretched, the long one not cut off."""
    from apollo_cas.gpu.segments import SPAN

    dev = device_for(kernel)
    rng = np.random.default_rng(3)
    long_n = 2 * SPAN + PIECE + 5
    src = rng.integers(0, 256, long_n + 100, dtype=np.uint8)
    dst = np.zeros(long_n + 200, dtype=np.uint8)
    ranges = [(7, 0, long_n), (1, long_n + 50, 9)]
    assert np.array_equal(copied(src, dst, ranges, dev, kernel), _expected(src, dst, ranges))


def test_alignment_of_each_side_needs_its_pointer_offsets_and_the_lengths() -> None:
    from apollo_cas.gpu.segments import alignment

    t = np.array([[0, 32], [16, 4096], [48, 16]], dtype=np.int64)
    assert alignment(t, 0, 1 << 20) == (True, True)
    assert alignment(t, 8, 1 << 20) == (False, True)  # the source's base pointer
    assert alignment(t, 0, 4) == (True, False)
    u = t.copy()
    u[0, 1] += 1  # a source offset
    assert alignment(u, 0, 0) == (False, True)
    u = t.copy()
    u[1, 0] += 3  # a destination offset
    assert alignment(u, 0, 0) == (True, False)
    u = t.copy()
    u[2, 1] += 1  # a length: neither side
    assert alignment(u, 0, 0) == (False, False)


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 0, 0), (0, 0, 1), (0, 16, 0)], ids=str)
def test_kernel_copies_aligned_and_unaligned_tables_alike(shift: tuple[int, int, int]) -> None:
    """The kernel's aligned variant (every offset and length a multiple of 16) and its
    byte variant give the same bytes."""
    dev = device_for(True)
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 3 * PIECE + 4096, dtype=np.uint8)
    dst = np.zeros(4 * PIECE, dtype=np.uint8)
    ds, dd, dn = shift
    ranges = [(16 + ds, dd, 2 * PIECE + 48), (4096, 3 * PIECE + dd, 160 + dn)]
    assert np.array_equal(copied(src, dst, ranges, dev, True), _expected(src, dst, ranges))
