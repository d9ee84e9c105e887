"""The dense step's two kernels (gpu/sparse_kernels.py) against the torch steps they
replace, and the kernel implementation of a piece (gpu/piece_steps.KernelSteps) against
the torch one, on CPU tensors under TRITON_INTERPRET=1 (on CUDA where it runs)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu import delta_ops, sparse_kernels  # noqa: E402
from apollo_cas.gpu.delta_jobs import DeltaJob  # noqa: E402
from apollo_cas.gpu.piece_steps import Buffers, KernelSteps, TorchSteps  # noqa: E402
from apollo_cas.gpu.staging import Uploads  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
if DEV == "cpu" and not INTERPRET:
    pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _xor_rows(bs: int, ws: int, changes: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Parent rows, a base tensor holding the live blocks (out of order), their element
    offsets, and the XOR the kernels must leave; row r differs in ``changes[r]`` places."""
    g = torch.Generator().manual_seed(seed)
    n, m = len(changes), bs // ws
    base = torch.randint(0, 256, ((n + 2) * bs,), dtype=torch.uint8, generator=g)
    slots = torch.randperm(n + 2, generator=g)[:n].tolist()
    parent = torch.empty(n, bs, dtype=torch.uint8)
    for r, (slot, c) in enumerate(zip(slots, changes, strict=True)):
        row = base[slot * bs : (slot + 1) * bs].clone()
        idx = torch.randperm(m, generator=g)[:c]
        row.view(_INT[ws])[idx] ^= torch.randint(1, 127, (c,), generator=g).to(_INT[ws])
        parent[r] = row
    want = parent.clone()
    for r, slot in enumerate(slots):
        want[r] ^= base[slot * bs : (slot + 1) * bs]
    offsets = torch.tensor([s * bs // ws for s in slots], dtype=torch.int64)
    return parent.to(DEV), base.to(DEV), offsets.to(DEV), want.to(DEV)


# Rows of one and of several tiles, the last tile short (bf16: 4096 elements a tile).
CASES = [(2, 16384, [0, 5, 300, 1]), (2, 2 * 8192 + 1024, [7, 0, 900]), (4, 16384, [3, 40])]
CASES += [(1, 8192, [2, 0, 77]), (8, 65536, [9, 1000])]
# A row with more changes than a tile's elements: the gaps' pass runs over it in pieces.
CASES += [(2, 65536, [9000, 3])]


@pytest.mark.parametrize(("ws", "bs", "changes"), CASES)
def test_xor_stats_matches_the_torch_steps(ws: int, bs: int, changes: list[int]) -> None:
    parent, base, offsets, want = _xor_rows(bs, ws, changes)
    out = torch.empty(
        len(changes) * sparse_kernels.tiles(bs // ws) * sparse_kernels.STAT_FIELDS,
        dtype=torch.int64,
    )
    stats = sparse_kernels.xor_stats(parent, base, offsets, ws, out.to(DEV))
    assert torch.equal(parent, want)
    counts, flags = sparse_kernels.row_summary(stats.cpu().numpy(), ws, ws)
    assert counts.tolist() == delta_ops.changed_elements(want, ws).tolist() == changes
    if ws > 1:
        q = delta_ops.split_planes(
            want, ws, torch.empty(want.numel(), dtype=torch.uint8, device=DEV)
        )
        assert flags.tolist() == delta_ops.nonzero_planes(q).tolist()
    _, one = sparse_kernels.row_summary(stats.cpu().numpy(), 1, ws)
    assert one.tolist() == [[c > 0 for c in changes]]


@pytest.mark.parametrize(("ws", "bs", "changes"), CASES)
def test_sparse_extract_writes_the_torch_planes(ws: int, bs: int, changes: list[int]) -> None:
    parent, base, offsets, want = _xor_rows(bs, ws, changes, seed=1)
    n = len(changes)
    out = torch.empty(
        n * sparse_kernels.tiles(bs // ws) * sparse_kernels.STAT_FIELDS,
        dtype=torch.int64,
        device=DEV,
    )
    stats = sparse_kernels.xor_stats(parent, base, offsets, ws, out)
    taken = [r for r in range(n) if r != 1]  # a row left out keeps its place out of the layout
    counts = [changes[r] for r in taken]
    total = sum(counts)
    got = torch.full(((4 + ws) * total + 8,), 0xEE, dtype=torch.uint8, device=DEV)
    table = torch.from_numpy(sparse_kernels.row_table(taken, counts)).to(DEV)
    sparse_kernels.sparse_extract(parent, stats, table, ws, got, counts)
    idx = torch.empty(total, dtype=torch.int32, device=DEV)
    val = torch.empty(total * 8, dtype=torch.uint8, device=DEV)
    take = [r in taken for r in range(n)]
    assert delta_ops.sparse_rows(want, ws, take, idx, val, changes) == total
    ref = delta_ops.sparse_planes(idx, val, counts, ws, torch.empty_like(got))
    assert torch.equal(got[: len(ref)], ref)
    assert (got[len(ref) :] == 0xEE).all()  # nothing written past the rows' planes


def test_buffers_made_once_are_checked_before_a_launch() -> None:
    """The buffers a dense step makes once and passes in (statistics view, index
    scratch, digest halves) are refused when they do not fit, before any kernel runs."""
    from apollo_cas.gpu import xxh3_kernel

    parent, base, offsets, _ = _xor_rows(16384, 2, [3, 4])
    t = sparse_kernels.tiles(16384 // 2)
    wrong = torch.empty((2, t + 1, sparse_kernels.STAT_FIELDS), dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="statistics of shape"):
        sparse_kernels.xor_stats(parent, base, offsets, 2, wrong)
    stats = torch.zeros((2, t, sparse_kernels.STAT_FIELDS), dtype=torch.int64, device=DEV)
    table = torch.from_numpy(sparse_kernels.row_table([0, 1], [3, 4])).to(DEV)
    small = torch.empty(6, dtype=torch.int32, device=DEV)
    out = torch.empty(64, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="scratch of 6 indices for 7 elements"):
        sparse_kernels.sparse_extract(parent, stats, table, 2, out, [3, 4], small)
    units = torch.zeros(3, dtype=torch.int64, device=DEV)
    halves = torch.empty((2, 2), dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match=r"out must be \(3, 2\) int64"):
        xxh3_kernel.digests_at(base, units, 1024, canonical=False, out=halves)
    with pytest.raises(ValueError, match="with canonical=False"):
        xxh3_kernel.digests_at(base, units, 1024, out=halves[:0])


def test_row_summary_refuses_a_plane_width_it_cannot_derive() -> None:
    with pytest.raises(ValueError, match="plane width 4 with elements of 2 bytes"):
        sparse_kernels.row_summary(
            np.zeros((1, 1, sparse_kernels.STAT_FIELDS), dtype=np.int64), 4, 2
        )


# -------------------------------------------------------------- a piece, both ways

BS = 16384


def _piece(changes: list[int], ws: int = 2):
    """Live tensors (with an unaligned one first), jobs naming their blocks, and parent rows."""
    import xxhash

    g = torch.Generator().manual_seed(3)
    live = [torch.randint(0, 256, (3 * BS,), dtype=torch.uint8, generator=g) for _ in range(3)]
    live = [v.to(DEV) for v in live]
    live[0] = live[0][3:]  # not 16-byte aligned: never the base the others are addressed from
    jobs, parent = [], []
    for r, c in enumerate(changes):
        ti, bi = (r % 2) + 1, r % 3
        block = live[ti][bi * BS : (bi + 1) * BS].cpu()
        p = block.clone()
        idx = torch.randperm(BS // ws, generator=g)[:c]
        p.view(_INT[ws])[idx] ^= 1
        parent.append(p)
        cid = xxhash.xxh3_128_digest(block.numpy().tobytes())
        jobs.append(DeltaJob(r, ti, bi * BS, cid, b"\x01" * 16, 1, ws, ws))
    return live, jobs, torch.stack(parent).to(DEV)


def _bufs(n: int) -> Buffers:
    def e(k: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.empty(k, dtype=dtype, device=DEV)

    return Buffers(e(n * BS), e(n * BS), e(n * BS), e(n * BS, torch.int32), e(n * BS), e(n * BS))


def _both(live, n):  # type: ignore[no-untyped-def]
    from apollo_cas.gpu import xxh3_kernel

    dev = torch.device(DEV)
    kern = KernelSteps(live, BS, xxh3_kernel, n, dev, _bufs(n))
    ref = TorchSteps(live, BS, xxh3_kernel if DEV == "cuda" else None, Uploads(), _bufs(n))
    return kern, ref


def test_kernel_steps_give_what_the_torch_steps_give() -> None:
    changes = [4, 0, 2000, 31, 8000]
    live, jobs, parent = _piece(changes)
    kern, ref = _both(live, len(jobs))
    assert kern.usable(jobs, 2, 2)
    rows_k, rows_t = parent.clone(), parent.clone()
    marks: list[str] = []
    sk = kern.scan(jobs, rows_k, 2, 2, True, marks.append)
    st = ref.scan(jobs, rows_t, 2, 2, True, lambda _m: None)
    sk.verdict()
    st.verdict()
    assert torch.equal(rows_k, rows_t)
    assert sk.counts == st.counts == changes
    assert sk.nonzero == st.nonzero
    assert marks == ["check", "xor_planes", "count"]
    taken = [0, 2, 3]
    keep = [i for i, f in enumerate(sk.nonzero) if f]  # plane-major: plane k of row r at 5k + r
    assert keep == [0, 2, 3, 4]  # the XOR flips low bytes only: plane 1 is zero
    pk, sp_k = kern.extract(rows_k, 2, 2, taken, changes, keep, marks.append)
    pt, sp_t = ref.extract(rows_t, 2, 2, taken, changes, keep, lambda _m: None)
    assert torch.equal(pk, pt) and pk.shape == (4, BS // 2)
    assert torch.equal(sp_k, sp_t) and len(sp_k) == 6 * (4 + 2000 + 31)
    assert marks[-2:] == ["sparse_rows", "pack"]
    # No kept plane: nothing is split or packed.
    none, _ = kern.extract(rows_k, 2, 2, taken, changes, [], lambda _m: None)
    assert none.shape == (0, BS // 2)


def test_kernel_steps_on_slices_of_their_parent_scratch() -> None:
    """Pieces as the saver hands them: slices of the scratch the steps were made with
    (viewed once, reached by pointer), of fewer rows than it, one after the other;
    and rows that are not part of it."""
    from apollo_cas.gpu import xxh3_kernel

    changes = [4, 0, 2000, 31, 8000, 7]
    live, jobs, parent = _piece(changes)
    scratch = torch.zeros((8, BS), dtype=torch.uint8, device=DEV)
    kern = KernelSteps(live, BS, xxh3_kernel, 8, torch.device(DEV), _bufs(8), scratch)
    ref = TorchSteps(live, BS, xxh3_kernel if DEV == "cuda" else None, Uploads(), _bufs(8))
    for r0, a, b in [(2, 0, 3), (0, 3, 5), (5, 5, 6)]:
        n = b - a
        rows_k = scratch[r0 : r0 + n]
        rows_k.copy_(parent[a:b])
        rows_t = parent[a:b].clone()
        sk = kern.scan(jobs[a:b], rows_k, 2, 2, True, lambda _m: None)
        st = ref.scan(jobs[a:b], rows_t, 2, 2, True, lambda _m: None)
        sk.verdict()
        assert torch.equal(rows_k, rows_t) and sk.counts == st.counts == changes[a:b]
        taken = [r for r in range(n) if changes[a + r] <= 2000]
        _, sp_k = kern.extract(rows_k, 2, 2, taken, sk.counts, [], lambda _m: None)
        _, sp_t = ref.extract(rows_t, 2, 2, taken, st.counts, [], lambda _m: None)
        assert torch.equal(sp_k, sp_t)
    # Rows of another tensor: viewed on their own, the same results.
    other = parent[:2].clone()
    sk = kern.scan(jobs[:2], other, 2, 2, True, lambda _m: None)
    assert sk.counts == changes[:2] and torch.equal(other, ref_xor(parent[:2], live, jobs[:2]))


def ref_xor(parent: torch.Tensor, live: list[torch.Tensor], jobs: list[DeltaJob]) -> torch.Tensor:
    out = parent.clone()
    for r, j in enumerate(jobs):
        out[r] ^= live[j.tensor][j.offset : j.offset + BS]
    return out


def test_kernel_steps_name_a_live_block_that_changed() -> None:
    live, jobs, parent = _piece([3, 3])
    kern, _ = _both(live, 2)
    live[2][BS + 5] ^= 0xFF  # job 1's block (tensor 2, block 1): after its id was taken
    scan = kern.scan(jobs, parent, 2, 2, True, lambda _m: None)
    with pytest.raises(CorruptChunk, match=jobs[1].cid.hex()):
        scan.verdict()


def test_kernel_steps_leave_unaligned_or_mixed_width_pieces_to_torch() -> None:
    live, jobs, _ = _piece([1, 1])
    kern, _ = _both(live, 2)
    assert not kern.usable(jobs, 4, 2)  # planes neither the element width nor one
    assert kern.usable(jobs, 1, 2)
    odd = [j._replace(offset=j.offset + 8) for j in jobs]
    assert not kern.usable(odd, 2, 2)


def test_digests_at_hashes_blocks_where_they_lie() -> None:
    import xxhash

    from apollo_cas.gpu import xxh3_kernel

    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 256, (4 * 1024,), dtype=torch.uint8, generator=g).to(DEV)
    starts = [2048, 0, 1024 + 16 * 3]  # out of order, one off the block grid
    units = torch.tensor([s // 16 for s in starts], dtype=torch.int64, device=DEV)
    want = [xxhash.xxh3_128_digest(base[s : s + 1024].cpu().numpy().tobytes()) for s in starts]
    got = xxh3_kernel.digests_at(base, units, 1024)
    assert [bytes(r) for r in got.cpu().numpy()] == want
    halves = xxh3_kernel.digests_at(base, units, 1024, canonical=False)
    assert (
        halves.cpu().numpy().tolist() == np.frombuffer(b"".join(want), ">i8").reshape(3, 2).tolist()
    )


# -------------------------------------------------------------- the restore's scatter


def _sparse_chunks(w: int, counts: list[int], size: int, damaged: int | None = None):  # type: ignore[no-untyped-def]
    """Codec-4 chunks as the restore lays them out: gap planes and value planes of each
    in one staging buffer; chunk ``damaged`` has a gap that runs past its block."""
    from apollo_cas.gpu.chunkplan import ChunkPlan

    rng = np.random.default_rng(w * 100 + len(counts))
    m = size // w
    dev = bytearray()
    chunks = []
    for r, c in enumerate(counts):
        idx = np.sort(rng.choice(m, c, replace=False)).astype(np.int64)
        gaps = (np.diff(idx, prepend=-1) - 1).astype("<u4")
        if r == damaged and c:
            gaps[-1] = m  # the last element lands past the block
        vals = rng.integers(1, 256, c * w, dtype=np.uint8)
        g = len(dev)
        dev += gaps.view(np.uint8).reshape(c, 4).T.tobytes()
        v = len(dev)
        dev += vals.reshape(c, w).T.tobytes()
        ch = ChunkPlan(bytes(16), size)
        ch.w, ch.nchanged, ch.slots, ch.row = w, c, (g, v), r
        chunks.append(ch)
    buf = torch.frombuffer(bytearray(dev) or bytearray(1), dtype=torch.uint8).to(DEV)
    return chunks, buf


@pytest.mark.parametrize(
    ("w", "counts", "size"),
    [
        (2, [3, 0, 5000, 9000, 1], 32768),
        (1, [17, 4100], 16384),
        (4, [300, 1], 8192),
        (8, [2, 6], 4096),
    ],
)
def test_the_scatter_kernel_writes_what_the_torch_scatter_writes(
    w: int, counts: list[int], size: int
) -> None:
    from apollo_cas.gpu.sparse_steps import scatter_sparse

    chunks, dev = _sparse_chunks(w, counts, size, damaged=1 if counts[1] else None)
    rows = [torch.full((len(counts), size), 0x5A, dtype=torch.uint8, device=DEV) for _ in range(2)]
    scatter_sparse(chunks, dev, rows[0], Uploads(), kernel=False)
    scatter_sparse(chunks, dev, rows[1], Uploads(), kernel=True)
    assert torch.equal(rows[0], rows[1])
    assert int(rows[1][1].ne(0).sum()) <= counts[1] * w  # nothing outside the chunk's row
