"""The GPU delta save on CPU tensors (CI has no GPU): device steps, encoding, hook, faults.

``Store.device_delta = "always"`` runs the GPU path's steps (parent decoded by the
restore pipeline, XOR, plane split, zero-plane detection, packing, host encoding) on
CPU tensors. The source seam is a DeviceSource whose ``block_digests`` hashes on the
host, as a GPU source would on its device, so the save takes the device branch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

torch = pytest.importorskip("torch")

from damage import chunk_file_range, flip_last_byte  # noqa: E402

from apollo_cas import codecs  # noqa: E402
from apollo_cas.codecs import envelope  # noqa: E402
from apollo_cas.delta_bases import base_finder  # noqa: E402
from apollo_cas.errors import CorruptChunk, UsageError  # noqa: E402
from apollo_cas.gpu import delta_ops  # noqa: E402
from apollo_cas.gpu.blocks import host_block_digests  # noqa: E402
from apollo_cas.gpu.delta_encode import encode_delta, sparse_wanted, zero_frame  # noqa: E402
from apollo_cas.gpu.delta_hook import delta_device  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from apollo_cas.store import Store  # noqa: E402

BS = 4096


class HostHashed(DeviceSource):
    """A DeviceSource whose ids come like a GPU's: all at once, before any fetch."""

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        return host_block_digests([t.bytes.numpy().data for t in self.tensors()], block_size)


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": (0.02 * torch.randn(64, 96, generator=g)).to(torch.bfloat16),  # 3 blocks
        "q": (0.02 * torch.randn(96, 97, generator=g)).to(torch.bfloat16),  # short last block
        "norm": 1 + 0.05 * torch.randn(96, generator=g),  # fp32, one short block
        "w32": 0.02 * torch.randn(4096, generator=g),  # fp32, 4 whole blocks
        "u8": torch.randint(0, 7, (3 * BS,), dtype=torch.uint8, generator=g),  # inner zstd
    }


def dense_step(m: dict[str, torch.Tensor], seed: int, rel: float = 1e-3) -> None:
    """The benchmark's dense step: every float moves by ``rel`` relative, in place."""
    g = torch.Generator().manual_seed(seed)
    for v in m.values():
        if v.dtype.is_floating_point:
            noise = 1 + rel * torch.randn(v.shape, generator=g)
            v.copy_((v.float() * noise).to(v.dtype))
        else:
            flip = torch.rand(v.shape, generator=g) < 0.01
            v[flip] += 1


def open_store(path: Path, mode: str) -> Store:
    st = Store.open(path, create=True, workers=2)
    st.device_delta = mode
    return st


def save(st: Store, m: dict[str, torch.Tensor]) -> None:
    src = HostHashed(m)
    try:
        st.save(src, block_size=BS, force=True)
    finally:
        src.close()


def chunk_files(root: Path) -> dict[str, bytes]:
    """Every stored chunk of the store at ``root`` (id hex -> its stored bytes), in
    either format: chunk files, or envelopes in packs located through the index.
    Never empty: a comparison of two empty maps would pass whatever the paths wrote."""
    st = Store.open(root)
    try:
        got = {cid.hex(): bytes(st.chunks.get_blob(cid)) for cid in st.inventory.ids()}
    finally:
        st.close()
    assert got, f"no chunks in {root}"
    return got


# ------------------------------------------------------------------ device steps


def test_xor_split_nonzero_pack() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 64), dtype=torch.uint8, generator=g)
    b = a.clone()
    b[1, 5] ^= 0x10  # row 1: one byte of element 2, plane 1
    b[2, 8] ^= 0x01  # row 2: element 4, plane 0
    x = delta_ops.xor_rows_(b.clone(), a)
    assert torch.equal(x, a ^ b)
    out = torch.empty(3 * 64, dtype=torch.uint8)
    q = delta_ops.split_planes(x, 2, out)
    assert q.shape == (2, 3, 32)
    assert torch.equal(q[1, 1], x[1].view(32, 2)[:, 1])
    nz = delta_ops.nonzero_planes(q)
    assert nz.tolist() == [[False, False, True], [False, True, False]]
    keep = nz.flatten().nonzero().flatten()
    packed = delta_ops.pack_planes(q, keep, torch.empty(3 * 64, dtype=torch.uint8))
    assert torch.equal(packed[0], q[0, 2]) and torch.equal(packed[1], q[1, 1])


def test_gather_runs_coalesce_adjacent_blocks() -> None:
    runs = delta_ops.row_runs([(0, 0), (0, BS), (1, 0), (0, 3 * BS)], BS)
    assert runs == [(0, 0, 0, 2), (1, 0, 2, 1), (0, 3 * BS, 3, 1)]
    srcs = [
        torch.arange(4 * BS, dtype=torch.int64).to(torch.uint8),
        torch.full((BS,), 7, dtype=torch.uint8),
    ]
    rows = torch.empty(4, BS, dtype=torch.uint8)
    delta_ops.gather_rows(srcs, runs, rows, BS)
    assert torch.equal(rows[1], srcs[0][BS : 2 * BS]) and torch.equal(rows[2], srcs[1])


class HostKernel:
    """The Triton kernel's ``block_digests`` contract, computed with xxhash on CPU tensors."""

    @staticmethod
    def block_digests(data: torch.Tensor, block_size: int) -> torch.Tensor:
        ds = host_block_digests([data.numpy().data], block_size)[0]
        return torch.frombuffer(bytearray(b"".join(ds)), dtype=torch.uint8).view(-1, 16)


@pytest.mark.parametrize("kernel", [None, HostKernel()])
def test_check_rows_names_a_block_that_changed(kernel: object) -> None:
    rows = torch.zeros(2, BS, dtype=torch.uint8)
    ids = host_block_digests([rows.view(-1).numpy().data], BS)[0]
    delta_ops.check_rows(rows, ids, BS, kernel)()  # type: ignore[arg-type]
    rows[1, 0] = 1
    verdict = delta_ops.check_rows(rows, ids, BS, kernel)  # type: ignore[arg-type]
    with pytest.raises(CorruptChunk) as e:
        verdict()  # the check is queued; its verdict raises
    assert ids[1].hex() in str(e.value) and "changed during the save" in str(e.value)
    assert delta_ops.check_rows(rows, [], BS, kernel)() is None  # type: ignore[arg-type]


# ------------------------------------------------------------------ host encoding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_encode_delta_is_byte_identical_to_codecs_encode(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    base = (0.02 * torch.randn(BS // dtype.itemsize, generator=g)).to(dtype)
    new = (base.float() * (1 + 1e-3 * torch.randn(base.shape, generator=g))).to(dtype)
    braw, nraw = base.view(torch.uint8).numpy(), new.view(torch.uint8).numpy()
    bid = host_block_digests([braw.data], BS)[0][0]
    policy = codecs.CodecPolicy()
    want = codecs.encode(nraw.data, policy, dtype.itemsize, codecs.Base(bid, braw.data, 0))
    w = dtype.itemsize
    q = delta_ops.split_planes(
        torch.from_numpy(nraw ^ braw).view(1, BS), w, torch.empty(BS, dtype=torch.uint8)
    )
    views = [None if not q[k].any() else q[k, 0].numpy().data for k in range(w)]
    d = encode_delta(views, w, BS, bid, 1, policy.level, w, sparse_wanted(policy))
    assert d.blob is not None
    if d.accepted:
        assert d.blob == want
    else:  # fp32: above the accept fraction, compared with the full encoding
        from apollo_cas.gpu.delta_encode import choose

        assert choose(d, nraw.data, policy, w) == want
    assert codecs.decode(want, "x", lambda h: bytes(braw)) == bytes(nraw)


def test_sparse_rows_finds_the_changed_elements_of_the_selected_rows() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    rows.view(-1)[torch.randint(0, 256, (20,), generator=g)] = 7
    xv = rows.view(torch.int16)
    counts = delta_ops.changed_elements(rows, 2).tolist()
    assert counts == [int((xv[r] != 0).sum()) for r in range(4)]
    take = [True, False, True, True]
    idx = torch.empty(64, dtype=torch.int32)
    val = torch.empty(64 * 8, dtype=torch.uint8)
    k = delta_ops.sparse_rows(rows, 2, take, idx, val, counts)
    want = [np.flatnonzero(xv[r].numpy()) for r in range(4) if take[r]]
    assert k == sum(len(w) for w in want)
    assert idx[:k].tolist() == np.concatenate(want).tolist()
    vals = np.concatenate([xv[r].numpy()[np.flatnonzero(xv[r].numpy())] for r in (0, 2, 3)])
    assert val[: 2 * k].numpy().tobytes() == vals.astype("<i2").tobytes()


def test_encode_sparse_follows_the_codec_4_layout() -> None:
    """Decoded by hand as readpath's docs/CODECS.md describes codec 4."""
    import struct

    from apollo_cas.codecs import zstd_frames
    from apollo_cas.gpu.delta_encode import encode_sparse

    m = 2048
    x = np.zeros(m, dtype="<u2")
    where = np.array([3, 4, 100, 2047])
    x[where] = [1, 0x8001, 7, 0xFFFF]
    bid = bytes(range(16))
    params, (gframe, vframe) = encode_sparse(
        where.astype(np.int32), x[where].tobytes(), 2, 1, bid, 3
    )
    base_id, depth, w, n, glen = struct.unpack("<16sBBII", params)
    assert (base_id, depth, w, n, glen) == (bid, 3, 2, 4, len(gframe))
    gaps = np.frombuffer(zstd_frames.decompress_exact(gframe, 4 * n), np.uint8).reshape(4, n).T
    gaps = np.ascontiguousarray(gaps).view("<u4").reshape(n)
    assert (np.cumsum(gaps.astype(np.int64) + 1) - 1).tolist() == where.tolist()
    vals = np.frombuffer(zstd_frames.decompress_exact(vframe, 2 * n), np.uint8).reshape(2, n).T
    assert np.ascontiguousarray(vals).view("<u2").reshape(n).tolist() == x[where].tolist()


@pytest.mark.skipif(not hasattr(codecs, "SPARSE"), reason="this release has no codec 4")
def test_encode_sparse_is_byte_identical_to_the_sparse_codec() -> None:
    from apollo_cas.gpu.delta_encode import encode_sparse

    g = np.random.default_rng(4)
    x = np.zeros(1 << 15, dtype="<u2")
    x[g.choice(len(x), 300, replace=False)] = g.integers(1, 1 << 16, 300)
    idx = np.flatnonzero(x)
    want = codecs.sparse.encode(x.view(np.uint8), 2, 1, bytes(16), 2)
    got = encode_sparse(idx.astype(np.int32), x[idx].tobytes(), 2, 1, bytes(16), 2)
    assert want is not None and got[0] == want[0] and got[1] == list(want[1])


@pytest.mark.skipif(not hasattr(codecs, "SPARSE"), reason="this release has no codec 4")
@settings(max_examples=25, deadline=None)
@given(
    blocks=hst.lists(
        hst.tuples(hst.sampled_from([1, 2, 3, 4, 8]), hst.integers(1, 9000), hst.integers(0, 99)),
        min_size=0,
        max_size=6,
    )
)
def test_outright_sparse_blocks_of_a_group_are_encode_deltas_bytes(
    blocks: list[tuple[int, int, int]],
) -> None:
    """A group's codec-4-outright chunks, with their frames made in one call, are the
    bytes encode_delta makes block by block; a block over the outright fraction (5% of
    its elements) is left to encode_delta (None)."""
    from apollo_cas.gpu.delta_encode import outright_many, sparse_planes_of

    raw = 64 << 10
    items, want = [], []
    for itemsize, changed, seed in blocks:
        ws = codecs.sparse.width_for(itemsize)
        g = np.random.default_rng(seed)
        idx = np.sort(g.choice(raw // ws, min(changed, raw // ws), replace=False))
        vals = g.integers(1, 256, len(idx) * ws, dtype=np.uint8)
        vals[::ws] |= 1  # every changed element has a non-zero byte
        sp = sparse_planes_of(idx, vals.tobytes(), ws)
        base, depth = bytes([seed]) * 16, 1 + seed % 3
        items.append((sp, itemsize, base, depth))
        outright = len(idx) <= 0.05 * (raw // ws)
        d = encode_delta([None], 1, raw, base, depth, 1, itemsize, True, sp, len(idx), outright)
        want.append(d.blob if outright else None)
    got = outright_many(items, raw, 1)
    assert [None if d is None else d.blob for d in got] == want
    assert all(d is None or d.size == len(d.blob) - envelope.HEADER_SIZE for d in got)


def test_zero_plane_frame_is_the_compressors() -> None:
    from apollo_cas.codecs import zstd_frames

    assert zero_frame(2048, 1) == zstd_frames.compress_plane(bytes(2048), 1)


# ------------------------------------------------------------------ the save path


def test_dense_step_round_trip_and_same_chunks_as_cpu_path(tmp_path: Path) -> None:
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}
    m = model()
    for st in stores.values():
        save(st, m)
    dense_step(m, 1)
    for st in stores.values():
        save(st, m)
    stats = stores["always"].last_device_delta
    assert stats is not None and stores["never"].last_device_delta is None
    # embed: 3 blocks, q: 2 whole blocks of 5 (the short one goes the CPU way), w32: 4, u8: 3
    assert stats.blocks == 3 + 4 + 4 + 3 and stats.fallback_blocks == 0
    assert stats.compared_blocks > 0  # fp32 deltas are above the accept fraction
    assert stats.planes_nonzero < stats.planes_total  # bf16 exponent planes mostly zero
    # The GPU path writes exactly the chunks the CPU path writes.
    assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    st = stores["always"]
    latest = st.manifest(st.resolve("latest"))
    assert latest.bases  # deltas were recorded for gc
    loaded = st.load("latest")  # today's CPU decoder
    for k, v in m.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k


def test_depth_limit_uses_the_root_like_the_cpu_path(tmp_path: Path) -> None:
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}
    for st in stores.values():
        st.chunks.policy = codecs.CodecPolicy(max_delta_depth=2)
    m = model()
    for i in range(4):
        if i:
            dense_step(m, 10 + i)
        for st in stores.values():
            save(st, m)
    assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    loaded = stores["always"].load("latest")
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in m.items())


def test_damaged_parent_chunk_gives_full_chunks_never_a_wrong_delta(tmp_path: Path) -> None:
    st = open_store(tmp_path / "s", "always")
    m = model()
    save(st, m)
    parent = st.manifest(st.resolve("latest"))
    victim = {t.name: t for t in parent.tensors}["embed"].chunks[1]
    path, offset, length = chunk_file_range(st, victim)  # its object, or its range of a pack
    os.chmod(path, 0o644)
    blob = bytearray(path.read_bytes())
    blob[offset + length - 7] ^= 0xFF  # inside the raw mantissa plane: only the hash sees it
    path.write_bytes(bytes(blob))
    dense_step(m, 1)
    save(st, m)
    stats = st.last_device_delta
    assert stats.damaged_batches == 1 and stats.fallback_blocks > 0
    latest = st.manifest(st.resolve("latest"))
    new_id = {t.name: t for t in latest.tensors}["embed"].chunks[1]
    assert new_id not in latest.bases  # stored in full, not against the damaged parent
    loaded = st.load("latest")
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in m.items())


def test_small_batches_bound_the_buffers(tmp_path: Path) -> None:
    from apollo_cas.gpu.delta_hook import make_hook

    st = open_store(tmp_path / "s", "never")
    m = model()
    save(st, m)
    dense_step(m, 1)
    src = HostHashed(m)
    parent = st.manifest(st.resolve("latest"))
    got = []
    hook = make_hook(
        st,
        src,
        base_finder(st, src, parent, BS),
        BS,
        "always",
        batch_bytes=2 * BS,
        on_stats=got.append,
    )
    assert hook is not None
    st.device_delta = "never"  # the hook is passed by hand below
    from apollo_cas.pipeline import write_source

    st.chunks.known.update(parent.chunk_ids())
    res = write_source(st.chunks, src, BS, 2, base_finder(st, src, parent, BS), None, hook)
    (stats,) = got
    assert stats.batches >= 7  # 14 blocks, 2 per batch, one width per piece
    assert stats.pipeline["batches"] == 7
    from apollo_cas.gpu.restore import memory_bound

    bound = memory_bound(2 * BS, BS)  # the restore pipeline's own buffers
    assert stats.pinned_bytes <= 2 * 2 * BS + bound["pinned_host"]  # two slots + pipeline's
    # parent rows in two halves, live rows, planes, packed planes: 5 batches' worth
    assert stats.device_scratch_bytes <= 5 * 2 * BS + bound["device_scratch"]
    assert res.stats.new_chunks == res.stats.chunks


def test_selection() -> None:
    m = model()
    src = HostHashed(m)
    assert delta_device(src, "auto") is None  # CPU tensors: the CPU path
    assert delta_device(src, "never") is None
    assert delta_device(src, "always") == torch.device("cpu")
    with pytest.raises(ValueError):
        delta_device(src, "sometimes")


def test_no_parent_and_no_deltas_take_the_cpu_path(tmp_path: Path) -> None:
    st = open_store(tmp_path / "s", "always")
    m = model()
    save(st, m)
    assert st.last_device_delta is None  # no parent
    st.chunks.policy = codecs.CodecPolicy(delta=False)
    dense_step(m, 1)
    save(st, m)
    assert st.last_device_delta is None  # no base finder without deltas


def test_damaged_parent_in_a_middle_batch_falls_back_for_that_batch_only(tmp_path: Path) -> None:
    from apollo_cas.gpu.delta_hook import make_hook
    from apollo_cas.pipeline import write_source

    st = open_store(tmp_path / "s", "never")
    m = model()
    save(st, m)
    parent = st.manifest(st.resolve("latest"))
    victim = {t.name: t for t in parent.tensors}["w32"].chunks[2]
    flip_last_byte(st, victim)  # a flip only the hash check can see
    dense_step(m, 1)
    src = HostHashed(m)
    got: list = []
    finder = base_finder(st, src, parent, BS)
    hook = make_hook(st, src, finder, BS, "always", batch_bytes=2 * BS, on_stats=got.append)
    st.chunks.known.update(parent.chunk_ids())
    res = write_source(st.chunks, src, BS, 2, finder, None, hook)
    (stats,) = got
    assert stats.damaged_batches == 1 and stats.fallback_blocks == 2  # one batch of 2 blocks
    assert stats.blocks == 14 - 2
    entry = {t.name: t for t in res.tensors}["w32"]
    assert entry.chunks[2] not in res.bases  # full chunk: its parent is damaged
    assert entry.chunks[0] in res.bases and entry.chunks[3] in res.bases
    st.chunks.flush()  # format 2: the save's packs are findable once flushed (as a save does)
    for t in res.tensors:
        raw = b"".join(st.read_chunk(c) for c in t.chunks)
        assert raw == m[t.name].view(torch.uint8).numpy().tobytes(), t.name


def test_small_batches_through_the_store_give_the_cpu_paths_chunks(tmp_path: Path) -> None:
    """``Store.device_delta_batch_bytes`` of two blocks: seven batches, placed in turn
    into the two halves of the parent scratch while the device thread uses the other;
    the chunks are the CPU path's, byte for byte, and load back exactly."""
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}
    stores["always"].device_delta_batch_bytes = 2 * BS
    m = model()
    for st in stores.values():
        save(st, m)
    for step in (1, 2):  # the second step's parent is itself deltas
        dense_step(m, step)
        for st in stores.values():
            save(st, m)
        stats = stores["always"].last_device_delta
        assert stats.pipeline["batches"] == 7 and stats.fallback_blocks == 0
        assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    loaded = stores["always"].load("latest")
    for k, v in m.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k


def test_parent_batches_larger_than_a_piece_are_used_as_pieces(tmp_path: Path) -> None:
    """``Store.device_delta_parent_batch_bytes`` of six blocks beside pieces of two: the
    pipeline decodes three batches, each used as pieces of at most two rows (its rows
    in the halves of a larger parent scratch); the chunks are the CPU path's, byte for
    byte, and a damaged parent chunk sends only its pipeline batch to the CPU path."""
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}
    fast = stores["always"]
    fast.device_delta_batch_bytes = 2 * BS
    fast.device_delta_parent_batch_bytes = 6 * BS
    m = model()
    for st in stores.values():
        save(st, m)
    for step in (1, 2):
        dense_step(m, step)
        for st in stores.values():
            save(st, m)
        stats = fast.last_device_delta
        assert stats.pipeline["batches"] == 3 and stats.fallback_blocks == 0
        assert stats.batches >= 7  # 14 blocks in pieces of at most 2
        assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    from apollo_cas.gpu.restore import memory_bound

    bound = memory_bound(6 * BS, BS)["device_scratch"]
    # live rows, planes, packed planes of a piece; two halves of a pipeline batch
    assert stats.device_scratch_bytes <= 3 * 2 * BS + 2 * 6 * BS + bound
    parent = fast.manifest(fast.resolve("latest"))
    flip_last_byte(fast, {t.name: t for t in parent.tensors}["w32"].chunks[2])
    dense_step(m, 3)
    save(fast, m)
    stats = fast.last_device_delta
    assert stats.damaged_batches == 1 and 2 <= stats.fallback_blocks <= 6
    loaded = fast.load("latest")
    for k, v in m.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k


BAD_KNOBS = [
    (knob, b, "must be a positive")
    for knob in ("device_delta_batch_bytes", "device_delta_parent_batch_bytes")
    for b in (0, -BS, "256MiB", 1.5, True)
]
BAD_KNOBS += [
    (knob, b, "must be True or False")
    for knob in ("device_delta_timing", "device_delta_kernels")
    for b in ("yes", 1, None)
]
BAD_KNOBS += [
    ("device_delta_switch_interval", b, "must be None or seconds")
    for b in (0, -1e-3, 2, "1ms", True)
]
BAD_KNOBS += [
    ("device_delta_read_threads", b, "must be None or a positive int")
    for b in (0, -2, 1.5, "4", True)
]


@pytest.mark.parametrize(("knob", "bad", "says"), BAD_KNOBS)
def test_a_bad_delta_setting_is_refused_before_the_save_writes(
    tmp_path: Path, knob: str, bad: Any, says: str
) -> None:
    st = open_store(tmp_path / "s", "always")
    m = model()
    save(st, m)
    before = st.checkpoint_ids()
    dense_step(m, 1)
    setattr(st, knob, bad)
    with pytest.raises(UsageError, match=rf"Store\.{knob} {says}"):
        save(st, m)
    assert st.checkpoint_ids() == before


def test_the_switch_interval_is_set_while_the_path_runs_and_restored_after(
    tmp_path: Path,
) -> None:
    import sys

    st = open_store(tmp_path / "s", "always")
    m = model()
    save(st, m)
    before = sys.getswitchinterval()
    st.device_delta_switch_interval = 0.00125
    dense_step(m, 1)
    save(st, m)
    assert st.last_device_delta.switch_interval_s == 0.00125
    assert sys.getswitchinterval() == before
    st.device_delta_switch_interval = None
    dense_step(m, 2)
    save(st, m)
    assert st.last_device_delta.switch_interval_s == before


def test_the_read_threads_setting_sizes_the_parents_read_pool(tmp_path: Path) -> None:
    class Recorded(Store):
        """A store that keeps the restore pipelines it makes, to look at afterwards."""

        made: ClassVar[list[Any]] = []

        def restore_pipeline(self, block_size: int, device: Any = "cuda", **options: Any) -> Any:
            pipe = super().restore_pipeline(block_size, device, **options)
            self.made.append(pipe)
            return pipe

    st = Recorded.open(tmp_path / "s", create=True, workers=4)
    st.device_delta = "always"
    m = model()
    save(st, m)
    # None: the pipeline's default, dense_workers(4) = 2 here
    for step, threads, want in ((1, None, 2), (2, 1, 1), (3, 3, 3)):
        st.device_delta_read_threads = threads
        dense_step(m, step)
        save(st, m)
        assert st.last_device_delta.fallback_blocks == 0
        assert st.made[-1].read_workers == want
    loaded = st.load("latest")
    for k, v in m.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)), k


def test_timed_steps_on_cpu_tensors_use_the_host_clock(tmp_path: Path) -> None:
    st = open_store(tmp_path / "s", "always")
    m = model()
    save(st, m)
    dense_step(m, 1)
    st.device_delta_timing = True
    save(st, m)
    stats = st.last_device_delta
    # The host also times the device thread's work outside the marked steps.
    assert stats.steps and set(stats.steps_host) == set(stats.steps) | {
        "setup",
        "sync",
        "assemble",
        "submit",
    }


@pytest.mark.parametrize("batch_bytes", [None, 2 * BS])
def test_weights_changing_mid_save_is_an_error_not_a_chunk(
    tmp_path: Path, batch_bytes: int | None
) -> None:
    from apollo_cas.gpu.delta_hook import make_hook
    from apollo_cas.pipeline import write_source

    st = open_store(tmp_path / "s", "never")
    m = model()
    save(st, m)
    parent = st.manifest(st.resolve("latest"))
    dense_step(m, 1)
    src = HostHashed(m)
    ids = src.block_digests(BS)

    class Stale(HostHashed):
        def block_digests(self, block_size: int) -> list[list[bytes]] | None:
            return ids

    dense_step(m, 2)  # the trainer stepped after the ids were taken
    stale = Stale(m)
    finder = base_finder(st, stale, parent, BS)
    hook = make_hook(st, stale, finder, BS, "always", batch_bytes=batch_bytes)
    st.chunks.known.update(parent.chunk_ids())
    # Raised on the device thread, in any batch: the save fails (never a CPU fallback
    # that would store the changed weights under the ids taken before).
    with pytest.raises(CorruptChunk, match="changed during the save"):
        write_source(st.chunks, stale, BS, 2, finder, None, hook)


class FailingReads(Store):
    """A store whose restore pipeline cannot read (an I/O defect of the device path)."""

    def restore_pipeline(self, block_size: int, device: Any = "cuda", **options: Any) -> Any:
        from apollo_cas.gpu.restore import RestorePipeline

        def reader(ids: Any, arena: Any = None) -> Any:
            raise RuntimeError("reader broke")

        return RestorePipeline(reader, self.chunks.read, block_size, device=device, **options)


def test_a_failing_gpu_path_leaves_the_save_to_the_cpu_path(tmp_path: Path) -> None:
    st = FailingReads.open(tmp_path / "s", create=True, workers=2)
    st.device_delta = "always"
    ref = open_store(tmp_path / "ref", "never")
    m = model()
    save(st, m)
    save(ref, m)
    dense_step(m, 1)
    save(st, m)
    save(ref, m)
    assert "reader broke" in (st.last_device_delta.error or "")
    assert chunk_files(tmp_path / "s") == chunk_files(tmp_path / "ref")


def test_inner_zstd_policy_gives_the_cpu_paths_chunks(tmp_path: Path) -> None:
    """codec="zstd": one "plane" per block, bf16, fp32 and uint8 rows in shared batches."""
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}
    for st in stores.values():
        st.chunks.policy = codecs.CodecPolicy(codec="zstd")
    m = model()
    for st in stores.values():
        save(st, m)
    dense_step(m, 5)
    for st in stores.values():
        save(st, m)
    assert stores["always"].last_device_delta.blocks == 14
    assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")


def test_stores_that_write_in_order_never_get_two_writes_at_once(tmp_path: Path) -> None:
    """A store that writes in order (packs) gets its chunks one call at a time, from
    the saver's device thread or the caller's, never from the encode pool's threads."""
    import threading
    import time

    from apollo_cas.chunkstore import ChunkStore, PutResult

    threads: set[str] = set()
    active = [0, 0]  # now, most at once
    order: list[bytes] = []
    lock = threading.Lock()

    class Ordered(ChunkStore):
        ordered_writes = True

        def put_encoded(
            self, chunk_id: bytes, blob: bytes, base: bytes | None, raw_size: int
        ) -> PutResult:
            with lock:
                threads.add(threading.current_thread().name)
                active[0] += 1
                active[1] = max(active)
                order.append(chunk_id)
            time.sleep(0.001)  # room for an overlapping call to show
            try:
                return super().put_encoded(chunk_id, blob, base, raw_size)
            finally:
                with lock:
                    active[0] -= 1

    st = open_store(tmp_path / "s", "always")
    st.chunks = Ordered(st.backend, st.chunks.policy, st.chunks.inventory)
    m = model()
    save(st, m)
    dense_step(m, 1)
    save(st, m)
    assert st.last_device_delta.blocks > 0
    assert active[1] == 1
    assert not any(name.startswith("apollo-delta_") for name in threads), threads
    # In the saver's order: by plane width and element size, then tensor and block
    # (packs hold a save's chunks in the order a restore reads them); the deltas that
    # waited for a comparison with their full encoding come after.
    from apollo_cas.gpu.delta_jobs import inner_width

    src = HostHashed(m)
    sizes = [t.dtype.itemsize for t in src.tensors()]  # the source's order, not the dict's
    key = {
        cid: (inner_width(st.chunks.policy, sizes[ti], BS), sizes[ti], ti, bi)
        for ti, ids in enumerate(src.block_digests(BS) or [])
        for bi, cid in enumerate(ids)
    }
    src.close()
    stats = st.last_device_delta
    placed = [key[c] for c in order if c in key]
    direct = placed[: stats.blocks - stats.compared_blocks]
    assert len(placed) == stats.blocks and direct == sorted(direct) and len(direct) > 4
    loaded = st.load("latest")
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in m.items())


def test_a_failed_write_fails_the_save_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """A write that fails mid-path (a full disk) is the save's error, not a fall back
    to the CPU path, and nothing of the failed save is committed."""
    from apollo_cas.chunkstore import ChunkStore, PutResult
    from apollo_cas.errors import DiskFull

    class FillsUp(ChunkStore):
        ordered_writes = True
        left = -1  # writes until the one that fails (only that one: space comes back)

        def put_encoded(
            self, chunk_id: bytes, blob: bytes, base: bytes | None, raw_size: int
        ) -> PutResult:
            self.left -= 1
            if self.left == 0:
                raise DiskFull("no space left on the test's device", "free some space")
            return super().put_encoded(chunk_id, blob, base, raw_size)

    st = open_store(tmp_path / "s", "always")
    st.chunks = FillsUp(st.backend, st.chunks.policy, st.chunks.inventory)
    m = model()
    save(st, m)
    before = st.resolve("latest")
    dense_step(m, 1)
    st.chunks.left = 3  # FillsUp: the third chunk of the GPU path fails
    with pytest.raises(DiskFull, match="no space left"):
        save(st, m)
    assert st.resolve("latest") == before
    assert len(st.checkpoint_ids()) == 1


def test_large_blocks_same_chunks_as_cpu_path(tmp_path: Path) -> None:
    """64 KiB blocks: where codec 4 exists, few changes take it outright and their planes
    never leave the device; either way the chunks are the CPU path's."""
    bs = 64 << 10
    g = torch.Generator().manual_seed(7)
    m = {
        "a": (0.02 * torch.randn(4 * bs // 2, generator=g)).to(torch.bfloat16),
        "b": 0.02 * torch.randn(2 * bs // 4, generator=g),
    }
    stores = {mode: open_store(tmp_path / mode, mode) for mode in ("always", "never")}

    def save_bs(st: Store) -> None:
        src = HostHashed(m)
        try:
            st.save(src, block_size=bs, force=True)
        finally:
            src.close()

    for st in stores.values():
        save_bs(st)
    dense_step(m, 1)
    with torch.no_grad():
        m["a"][: bs // 4] = m["a"][: bs // 4] * 1.01  # one block: 50% changed, codec 3
    for st in stores.values():
        save_bs(st)
    stats = stores["always"].last_device_delta
    assert stats.blocks == 6 and stats.fallback_blocks == 0
    assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    loaded = stores["always"].load("latest")
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in m.items())
    if hasattr(codecs, "SPARSE"):
        assert stats.planes_nonzero < stats.planes_total - 4  # bf16 rows kept their planes


@pytest.mark.parametrize("ws", [1, 2, 4, 8])
def test_sparse_planes_are_the_host_split_of_each_rows_changes(ws: int) -> None:
    """The device's planes of every selected row equal the host's (sparse_planes_of),
    row after row, including a selected row with no change and one of one change."""
    from apollo_cas.gpu.delta_encode import sparse_planes_of

    g = torch.Generator().manual_seed(ws)
    rows = torch.zeros(5, 256, dtype=torch.uint8)
    for r, k in enumerate([9, 0, 1, 30, 4]):
        rows[r].view(-1)[torch.randperm(256, generator=g)[:k]] = torch.randint(
            1, 256, (k,), dtype=torch.uint8, generator=g
        )
    take = [True, True, True, False, True]
    counts = delta_ops.changed_elements(rows, ws).tolist()
    idx = torch.empty(256, dtype=torch.int32)
    val = torch.empty(256 * 8, dtype=torch.uint8)
    n = delta_ops.sparse_rows(rows, ws, take, idx, val, counts)
    taken = [c for c, t in zip(counts, take, strict=True) if t]
    out = torch.full((12 * 256,), 0xAA, dtype=torch.uint8)
    got = delta_ops.sparse_planes(idx, val, taken, ws, out).numpy().tobytes()
    assert len(got) == (4 + ws) * n
    want, e = b"", 0
    for c in taken:
        sp = sparse_planes_of(idx[e : e + c].numpy(), val[ws * e : ws * (e + c)].numpy(), ws)
        want += bytes(sp.gaps) + bytes(sp.values)
        e += c
    assert got == want


def test_dense_steps_use_half_the_save_threads() -> None:
    from apollo_cas.gpu.delta_hook import dense_workers

    assert [dense_workers(w) for w in (1, 2, 3, 4, 16, 17)] == [1, 2, 2, 2, 8, 8]
