"""The GPU restore pipeline on CPU tensors (CI has no GPU and no nvCOMP).

``device="cpu"`` runs the same code as the GPU: the plane-major staging layout, the
frames region (decoded by python-zstandard through the same FrameDecoder interface
as nvCOMP), the interleave, the XOR chains, verification before placing, bounded
buffers and the per-chunk CPU fallback. Faults come in through the pipeline's seam,
the blob reader, never by patching its internals.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from apollo_cas import codecs  # noqa: E402
from apollo_cas.errors import CorruptChunk, TargetError  # noqa: E402
from apollo_cas.gpu.restore import (  # noqa: E402
    RestorePipeline,
    memory_bound,
    object_reader,
    parse_chunk,
    places_of,
)
from apollo_cas.gpu.zstd import HostFrames  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402

BS = 4096
#: A codec id no release writes: the pipeline and the CPU decoder refuse it.
UNKNOWN_CODEC = 9


def model(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": (0.02 * torch.randn(64 * scale, 96, generator=g)).to(torch.bfloat16),
        "q": (0.02 * torch.randn(96, 97, generator=g)).to(torch.bfloat16),  # partial last block
        "norm": 1 + 0.05 * torch.randn(96, generator=g),  # fp32, one short block
        "f64": torch.randn(700, generator=g, dtype=torch.float64),  # 8-byte planes
        "u8": torch.randint(0, 7, (5001,), dtype=torch.uint8, generator=g),  # zstd, odd size
        "noise": torch.randint(0, 256, (3000,), dtype=torch.uint8, generator=g),  # raw codec
        "empty": torch.empty(0, 4),
    }


def step(m: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A dense step: every float moves a little (XOR deltas against the parent)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in m.items():
        if v.dtype.is_floating_point and v.numel():
            noise = 1 + 1e-3 * torch.randn(v.shape, generator=g)
            out[k] = (v.double() * noise.double()).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store", create=True)


def pipeline(
    st: Store,
    reader: Callable[..., Sequence[Any]] | None = None,
    **options: Any,
) -> RestorePipeline:
    options.setdefault("workers", 2)
    options.setdefault("frames", None)
    return RestorePipeline(
        reader or object_reader(st.chunks.get_blob, 2),
        st.chunks.read,
        BS,
        device="cpu",
        **options,
    )


def load(st: Store, ref: str, pipe: RestorePipeline) -> dict[str, torch.Tensor]:
    return load_tensors_pipeline(pipe, st.manifest(st.resolve(ref)))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)


@pytest.mark.parametrize("frames", [None, "host-frames"])
@pytest.mark.parametrize("batch", [BS, 5 * BS, 1 << 20])
def test_round_trip_full_and_delta(store: Store, frames: str | None, batch: int) -> None:
    m0 = model()
    m1 = step(m0, 1)
    store.save(m0, block_size=BS)
    r = store.save(m1, block_size=BS)
    assert r.stats.new_chunks > 0
    dec = HostFrames(2) if frames else None
    for ref, want in (("latest", m1), (store.resolve("latest"), m1)):
        pipe = pipeline(store, frames=dec, batch_bytes=batch)
        got = load(store, ref, pipe)
        assert same(got, want)
        assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape for k in want)
        assert pipe.stats.bases_decoded > 0  # the dense step is stored as XOR deltas
        if frames:
            assert pipe.stats.frames > 0  # zstd frames went through the frames region
        # Each host thread's figures are counted (a profile reads them side by side).
        st = pipe.stats
        assert st.read_cpu_s > 0 and st.main_cpu_s > 0 and st.queue_s > 0
        assert st.read_s >= 0 and st.arena_wait_s >= 0 and st.finish_s >= 0
        assert st.main_cpu_s <= st.seconds + 0.05
    parent = store.manifest(store.resolve("latest")).parent
    assert parent is not None
    pipe = pipeline(store, frames=dec, batch_bytes=batch)
    assert same(load(store, parent, pipe), m0)
    assert pipe.stats.bases_decoded == 0 and pipe.stats.cpu_fallback_chunks == 0


def test_delta_chains_deeper_than_one(store: Store) -> None:
    ms = [model()]
    for i in range(1, 5):
        ms.append(step(ms[-1], i))
    for m in ms:
        store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    depths = {codecs.delta_depth(store.chunks.get_blob(c)) for e in man.tensors for c in e.chunks}
    assert max(depths) >= 3
    pipe = pipeline(store, batch_bytes=3 * BS)
    assert same(load(store, "latest", pipe), ms[-1])
    assert pipe.stats.bases_decoded > pipe.stats.places  # chains: several bases per block
    bound = memory_bound(3 * BS, BS, max(depths))
    assert pipe.stats.pinned_bytes <= bound["pinned_host"]
    assert pipe.stats.device_scratch_bytes <= bound["device_scratch"]


def test_buffers_are_bounded_independent_of_model_size(store: Store, tmp_path: Path) -> None:
    batch = 4 * BS
    bound = memory_bound(batch, BS)
    seen = []
    for scale in (1, 8):
        st = Store.open(tmp_path / f"s{scale}", create=True)
        m = model(scale=scale)
        st.save(m, block_size=BS)
        st.save(step(m, 1), block_size=BS)
        pipe = pipeline(st, batch_bytes=batch)
        load(st, "latest", pipe)
        assert pipe.stats.batches > 1
        assert pipe.stats.pinned_bytes <= bound["pinned_host"]
        assert pipe.stats.device_scratch_bytes <= bound["device_scratch"]
        seen.append(pipe.stats.pinned_bytes)
    assert seen[1] <= seen[0] * 1.5  # 8x the model, about the same buffers


class Faulty:
    """A blob reader that hands out a changed copy of some chunks' stored bytes."""

    def __init__(self, st: Store, change: Callable[[bytes, bytes], bytes | None]) -> None:
        self.inner = object_reader(st.chunks.get_blob, 2)
        self.change = change
        self.hits: list[bytes] = []

    def __call__(self, ids: Sequence[bytes], arena: Any = None) -> list[bytes]:
        out = []
        for cid, blob in zip(ids, self.inner(ids, arena), strict=True):
            new = self.change(cid, bytes(blob))
            if new is not None:
                self.hits.append(cid)
                blob = new
            out.append(blob)
        return out


def flip_last_byte(blob: bytes) -> bytes:
    """The envelope stays valid; the decoded content changes (a raw plane or raw bytes)."""
    return blob[:-1] + bytes([blob[-1] ^ 0x55])


def test_corrupt_chunk_is_named_and_its_batch_not_placed(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    embed = next(e for e in man.tensors if e.name == "embed")
    victim = embed.chunks[2]
    reader = Faulty(store, lambda cid, b: flip_last_byte(b) if cid == victim else None)
    pipe = pipeline(store, reader, batch_bytes=2 * BS)
    dests = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in man.tensors]
    with pytest.raises(CorruptChunk, match=victim.hex()):
        pipe.run(places_of(man.tensors, BS), dests)
    assert reader.hits == [victim]
    ei = [e.name for e in man.tensors].index("embed")
    # Batches of two blocks: blocks 0-1 were placed, the failing batch (block 2 on) was not.
    assert ei == 0
    assert torch.equal(dests[ei][: 2 * BS], raw(m["embed"])[: 2 * BS])
    assert bool((dests[ei][2 * BS :] == 0xAB).all())


def test_load_hands_out_nothing_when_a_chunk_fails(store: Store) -> None:
    store.save(model(), block_size=BS)

    def flip_raw(cid: bytes, blob: bytes) -> bytes | None:
        return flip_last_byte(blob) if codecs.info(blob)[0] == "raw" else None

    reader = Faulty(store, flip_raw)
    with pytest.raises(CorruptChunk, match="does not hash to its name"):
        load(store, "latest", pipeline(store, reader))


def test_raw_size_checked_against_the_place_before_decoding(store: Store) -> None:
    store.save(model(), block_size=BS)

    def grow(cid: bytes, blob: bytes) -> bytes:
        n = struct.unpack_from("<Q", blob, 8)[0]
        return blob[:8] + struct.pack("<Q", n + 64) + blob[16:]

    reader = Faulty(store, grow)
    with pytest.raises(CorruptChunk, match="its place needs"):
        load(store, "latest", pipeline(store, reader))


def test_bad_delta_base_is_named_not_its_delta(store: Store) -> None:
    m0 = model()
    store.save(m0, block_size=BS)
    parent = store.manifest(store.resolve("latest"))
    store.save(step(m0, 1), block_size=BS)
    man = store.manifest(store.resolve("latest"))
    e = next(e for e in man.tensors if e.name == "embed")
    base = store.chunks.base_of(e.chunks[0])
    assert base is not None and base in {c for t in parent.tensors for c in t.chunks}
    reader = Faulty(store, lambda cid, b: flip_last_byte(b) if cid == base else None)
    with pytest.raises(CorruptChunk, match=base.hex()):
        load(store, "latest", pipeline(store, reader))


def test_unknown_codec_falls_back_to_the_cpu_decoder_per_chunk(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    target = next(e for e in man.tensors if e.name == "q").chunks[1]
    asked: list[bytes] = []

    def as_unknown_codec(cid: bytes, blob: bytes) -> bytes | None:
        # An id no release writes (codec 4, sparse, is decoded on the device now).
        return blob[:5] + bytes([UNKNOWN_CODEC]) + blob[6:] if cid == target else None

    def read_raw(cid: bytes) -> bytes:
        asked.append(cid)
        return store.chunks.read(cid)

    assert parse_chunk(as_unknown_codec(target, store.chunks.get_blob(target)), target, BS) is None
    pipe = RestorePipeline(
        Faulty(store, as_unknown_codec), read_raw, BS, device="cpu", workers=2, frames=None
    )
    assert same(load(store, "latest", pipe), m)
    assert asked == [target] and pipe.stats.cpu_fallback_chunks == 1


def test_restore_into_writes_in_place_only_changed_or_all(store: Store) -> None:
    m0 = model()
    store.save(m0, block_size=BS)
    m1 = step(m0, 1)
    store.save(m1, block_size=BS)
    live = {k: v.clone() for k, v in m0.items()}
    ptrs = {k: v.data_ptr() for k, v in live.items()}
    rep = store.restore_into("latest", live)
    assert same(live, m1) and {k: v.data_ptr() for k, v in live.items()} == ptrs
    man = store.manifest(store.resolve("latest"))
    total = sum(len(e.chunks) for e in man.tensors)
    assert 0 < rep.blocks_written < total and rep.verified
    again = store.restore_into("latest", live)
    assert again.blocks_written == 0
    every = store.restore_into("latest", live, only_changed=False)
    assert every.blocks_written == total and same(live, m1)


def test_restore_into_uses_live_blocks_as_delta_bases(store: Store) -> None:
    m0 = model()
    store.save(m0, block_size=BS)
    store.save(step(m0, 1), block_size=BS)
    live = {k: v.clone() for k, v in m0.items()}
    man = store.manifest(store.resolve("latest"))
    pipe = pipeline(store)
    from apollo_cas.targets.live import restore_into

    restore_into(pipe, live, man)
    assert same(live, step(m0, 1))
    assert pipe.stats.bases_decoded > 0
    # Every base came from the live tensors: only the deltas were read.
    deltas = sum(len(store.chunks.get_blob(c)) for e in man.tensors for c in set(e.chunks))
    assert pipe.stats.stored_bytes_read <= deltas


def test_restore_into_refuses_a_different_layout(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    live = {k: torch.zeros_like(v) for k, v in m.items()}
    live["q"] = torch.zeros(97, 96, dtype=torch.bfloat16)
    with pytest.raises(TargetError, match="nothing was written"):
        store.restore_into("latest", live)
    assert all(bool((v == 0).all()) for v in live.values())


def test_file_reader_into_the_arena_or_its_own_bytes(tmp_path: Path) -> None:
    from apollo_cas.gpu.restore import Arena, file_reader

    store = Store.open(tmp_path / "f1", create=True, format=1)  # chunk files
    store.save(model(), block_size=BS)
    man = store.manifest(store.resolve("latest"))
    ids = [c for e in man.tensors for c in e.chunks]
    want = [store.chunks.get_blob(c) for c in ids]
    read = file_reader(store.backend.root, 2)  # type: ignore[attr-defined]
    arena = Arena()
    arena.reset(sum(len(b) for b in want[:3]) + 3 * 64)  # room for the first few only
    got = read(ids, arena)
    assert [bytes(g) for g in got] == want
    assert [bytes(g) for g in read(ids, None)] == want
    # Full-chunk checkpoints restore through it (Store.restore_pipeline picks it).
    pipe = store.restore_pipeline(BS, "cpu", batch_bytes=2 * BS)
    assert same(load(store, "latest", pipe), model())
    missing = bytes(16)
    with pytest.raises(CorruptChunk, match="is missing"):
        read([missing], arena)


def test_restore_into_refuses_arrays_that_are_not_tensors(store: Store) -> None:
    import numpy as np

    m = model()
    store.save(m, block_size=BS)
    live: dict[str, Any] = {k: v.clone() for k, v in m.items()}
    live["norm"] = np.zeros(96, dtype=np.float32)
    with pytest.raises(TargetError, match="not a tensor"):
        store.restore_into("latest", live)


class RecordingStore(Store):
    """A Store that records the options each restore pipeline is built with and builds
    it on the CPU (python-zstandard for frames), so the device paths run in CI."""

    built: list[dict[str, Any]]

    def restore_pipeline(self, block_size: int, device: Any = "cuda", **options: Any) -> Any:
        self.built.append({"device": str(device), **options})
        options.setdefault("frames", HostFrames(2))
        return super().restore_pipeline(block_size, "cpu", **options)


def test_load_and_restore_into_batch_sizes(tmp_path: Path) -> None:
    """Store.load on a GPU takes 1 GiB batches unless told otherwise; restore_into
    (beside a server's own memory) 256 MiB; both pass the caller's batch_bytes on."""
    from apollo_cas.gpu.accounting import DEFAULT_BATCH_BYTES, LOAD_BATCH_BYTES

    st = RecordingStore.from_backend(Store.open(tmp_path / "s", create=True).backend, create=True)
    st.built = []
    m0 = model()
    st.save(m0, block_size=BS)
    assert same(st.load(device="cuda"), m0)
    assert same(st.load(device="cuda", batch_bytes=2 * BS), m0)
    live = {k: torch.zeros_like(v) for k, v in m0.items()}
    st.restore_into("latest", live, only_changed=False)
    assert same(live, m0)
    st.restore_into("latest", live, only_changed=False, batch_bytes=3 * BS)
    got = [b.get("batch_bytes") for b in st.built]
    assert got == [LOAD_BATCH_BYTES, 2 * BS, None, 3 * BS]
    assert LOAD_BATCH_BYTES > DEFAULT_BATCH_BYTES


@pytest.mark.parametrize("bad", [0, -1, "1GiB", 1.5, True])
def test_a_bad_batch_size_is_a_usage_error(tmp_path: Path, bad: Any) -> None:
    from apollo_cas.errors import UsageError

    st = RecordingStore.from_backend(Store.open(tmp_path / "s", create=True).backend, create=True)
    st.built = []
    m0 = model()
    st.save(m0, block_size=BS)
    with pytest.raises(UsageError, match="batch_bytes must be a positive number of bytes"):
        st.load(device="cuda", batch_bytes=bad)
    with pytest.raises(UsageError, match="batch_bytes"):
        st.restore_into("latest", {k: torch.zeros_like(v) for k, v in m0.items()}, batch_bytes=bad)
    assert st.built == []  # refused before any pipeline was built


class Holding:
    """A blob reader that holds the group reading ``held`` until a group of a later
    batch (any id of ``later``) has started, or ``patience`` seconds have passed."""

    def __init__(self, st: Store, held: bytes, later: set[bytes], patience: float) -> None:
        import threading

        self.inner = object_reader(st.chunks.get_blob, 1)
        self.held, self.later, self.patience = held, later, patience
        self.later_started = threading.Event()
        self.overlapped: bool | None = None

    def __call__(self, ids: Sequence[bytes], arena: Any = None) -> Sequence[Any]:
        if self.later.intersection(ids):
            self.later_started.set()
        if self.held in ids:
            self.overlapped = self.later_started.wait(self.patience)
        return self.inner(ids, arena)


def test_the_next_batch_is_read_while_a_batch_waits_for_its_last_group(store: Store) -> None:
    """Batch k+1's reads are on the pool before batch k's slowest group is done: the
    threads were idle at every batch's end (a barrier per batch) before."""
    m = model(scale=4)
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    places = places_of(man.tensors, BS)
    batch = 8 * BS
    first = [p.chunk_id for p in places if p.dest == 0][:8]  # "embed" starts batch 0
    later = {p.chunk_id for p in places if p.dest == 0} - set(first)
    reader = Holding(store, first[-1], later, patience=10.0)
    pipe = pipeline(store, reader, batch_bytes=batch, workers=4)
    got = load(store, "latest", pipe)
    assert reader.overlapped is True
    assert same(got, m)


def test_a_failed_read_stops_every_group_before_the_error_is_raised(store: Store) -> None:
    """No read may still write into an arena once the caller has the error."""
    import threading
    import time

    store.save(model(scale=4), block_size=BS)
    inner = object_reader(store.chunks.get_blob, 1)
    running = 0
    lock = threading.Lock()
    calls = [0]

    def reader(ids: Sequence[bytes], arena: Any = None) -> Sequence[Any]:
        nonlocal running
        with lock:
            running += 1
            calls[0] += 1
            n = calls[0]
        try:
            if n == 3:
                raise CorruptChunk("chunk x: the reader failed", "a test")
            time.sleep(0.05)
            return inner(ids, arena)
        finally:
            with lock:
                running -= 1

    with pytest.raises(CorruptChunk, match="the reader failed"):
        load(store, "latest", pipeline(store, reader, batch_bytes=8 * BS, workers=4))
    assert running == 0


def test_read_threads_are_capped_on_a_gpu_only() -> None:
    from apollo_cas.gpu.gather import GPU_READ_THREADS, read_threads

    assert read_threads(16, on_gpu=True) == GPU_READ_THREADS
    assert read_threads(4, on_gpu=True) == 4
    assert read_threads(16, on_gpu=False) == 16
    assert read_threads(0, on_gpu=True) == 1


def test_read_workers_sets_the_read_pool(store: Store) -> None:
    import threading

    m = model(scale=4)
    store.save(m, block_size=BS)
    inner = object_reader(store.chunks.get_blob, 1)
    names: set[str] = set()

    def reader(ids: Sequence[bytes], arena: Any = None) -> Sequence[Any]:
        names.add(threading.current_thread().name)
        return inner(ids, arena)

    pipe = pipeline(store, reader, batch_bytes=8 * BS, workers=4, read_workers=1)
    assert pipe.read_workers == 1
    assert same(load(store, "latest", pipe), m)
    assert len(names) == 1
    pipe = pipeline(store, reader, batch_bytes=8 * BS, workers=4)
    assert pipe.read_workers == 4  # on the CPU: every worker


class Counting:
    """A blob reader that counts its calls."""

    def __init__(self, st: Store) -> None:
        self.inner = object_reader(st.chunks.get_blob, 1)
        self.calls = 0

    def __call__(self, ids: Sequence[bytes], arena: Any = None) -> Sequence[Any]:
        self.calls += 1
        return self.inner(ids, arena)


@pytest.mark.parametrize("fmt", [1, 2])
def test_delta_bases_the_index_names_are_read_with_their_batch(tmp_path: Path, fmt: int) -> None:
    """With ``base_of`` a batch's deltas and their bases are one round of reads (one
    call with one read thread); without it the bases are a second round, found by
    parsing the deltas. A wrong answer from the index costs a read, never the bytes."""
    st = Store.open(tmp_path / "s", create=True, format=fmt)
    m0 = model()
    m1 = step(m0, 1)
    st.save(m0, block_size=BS)
    st.save(m1, block_size=BS)
    options = {"batch_bytes": 1 << 20, "read_workers": 1}
    plain = Counting(st)
    got = load(st, "latest", pipeline(st, plain, **options))
    assert same(got, m1) and plain.calls == 2
    if fmt == 2:
        indexed = Counting(st)
        pipe = pipeline(st, indexed, base_of=st.chunks.base_of, **options)
        assert same(load(st, "latest", pipe), m1) and indexed.calls == 1
        assert pipe.stats.bases_decoded == plain_bases(st)
    some_chunk = st.manifest(st.resolve("latest")).tensors[0].chunks[0]
    wrong = Counting(st)
    pipe = pipeline(st, wrong, base_of=lambda c: some_chunk if c != some_chunk else None, **options)
    assert same(load(st, "latest", pipe), m1)


def plain_bases(st: Store) -> int:
    """Distinct delta bases of latest's chunks (one level: the test's chains are)."""
    man = st.manifest(st.resolve("latest"))
    ids = {c for e in man.tensors for c in e.chunks}
    return len({b for c in ids if (b := st.chunks.base_of(c)) is not None} - ids)
