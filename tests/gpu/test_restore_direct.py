"""Direct mode of the GPU restore pipeline, on CPU tensors.

With a frame decoder (nvCOMP on a GPU; python-zstandard's HostFrames here) the stored
bytes are read into the (pinned) arenas, copied to the device as they are, and the
plane-major layout is built there by torch ops: no host staging copy. The same
guarantees as the staged path: bit-exact, bases before deltas, nothing of a failing
batch placed, per-chunk CPU fallback, bounded buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from apollo_cas import codecs  # noqa: E402
from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu.restore import (  # noqa: E402
    RestorePipeline,
    memory_bound,
    object_reader,
    places_of,
)
from apollo_cas.gpu.zstd import HostFrames  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402
from tests.gpu.test_restore import (  # noqa: E402
    BS,
    UNKNOWN_CODEC,
    Faulty,
    flip_last_byte,
    model,
    raw,
    same,
    step,
)


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def store(request: Any, tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store", create=True, format=request.param)


def direct(st: Store, reader: Any = None, **options: Any) -> RestorePipeline:
    options.setdefault("workers", 2)
    if reader is None:
        pipe = st.restore_pipeline(BS, "cpu", frames=HostFrames(2), **options)
    else:
        pipe = RestorePipeline(reader, st.chunks.read, BS, device="cpu", frames=HostFrames(2))
        pipe.batch_bytes = options.get("batch_bytes", pipe.batch_bytes)
    assert pipe.direct
    return pipe


def load(st: Store, ref: str, pipe: RestorePipeline) -> dict[str, torch.Tensor]:
    return load_tensors_pipeline(pipe, st.manifest(st.resolve(ref)))


def test_direct_mode_round_trips_full_chunks_and_chains(store: Store) -> None:
    ms = [model(scale=3)]
    for i in range(1, 4):
        ms.append(step(ms[-1], i))
    for m in ms:
        store.save(m, block_size=BS)
    for batch in (BS, 3 * BS, 1 << 20):
        pipe = direct(store, batch_bytes=batch)
        assert same(load(store, "latest", pipe), ms[-1])
        assert pipe.stats.bases_decoded > 0 and pipe.stats.frames > 0
        assert pipe.stats.cpu_fallback_chunks == 0
        assert pipe.stager.host_bytes == 0  # no host staging slot: the arena went as is
        bound = memory_bound(batch, BS, 3, direct=True)
        assert pipe.stats.pinned_bytes <= bound["pinned_host"]
        assert pipe.stats.device_scratch_bytes <= bound["device_scratch"]
        pipe.close()


def test_direct_buffers_do_not_grow_with_the_model(tmp_path: Path) -> None:
    seen = []
    for scale in (1, 8):
        st = Store.open(tmp_path / f"s{scale}", create=True)
        m = model(scale=scale)
        st.save(m, block_size=BS)
        st.save(step(m, 1), block_size=BS)
        pipe = direct(st, batch_bytes=4 * BS)
        assert same(load(st, "latest", pipe), step(m, 1))
        assert pipe.stats.batches > 1
        seen.append((pipe.stats.pinned_bytes, pipe.stats.device_scratch_bytes))
    assert seen[1][0] == seen[0][0]  # the arenas are sized by the batch, not the model
    assert seen[1][1] <= seen[0][1] * 1.5


def test_object_reader_bytes_are_brought_into_the_arena(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    store.save(step(m, 1), block_size=BS)
    pipe = direct(store, object_reader(store.chunks.get_blob, 2))
    assert same(load(store, "latest", pipe), step(m, 1))


def test_a_corrupt_chunk_is_named_and_its_batch_not_placed(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    embed = next(e for e in man.tensors if e.name == "embed")
    victim = embed.chunks[2]
    reader = Faulty(store, lambda cid, b: flip_last_byte(b) if cid == victim else None)
    pipe = direct(store, reader, batch_bytes=2 * BS)
    dests = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in man.tensors]
    with pytest.raises(CorruptChunk, match=victim.hex()):
        pipe.run(places_of(man.tensors, BS), dests)
    ei = [e.name for e in man.tensors].index("embed")
    assert torch.equal(dests[ei][: 2 * BS], raw(m["embed"])[: 2 * BS])
    assert bool((dests[ei][2 * BS :] == 0xAB).all())


def first_planes_chunk(st: Store, man: Any) -> bytes:
    """The first chunk of manifest ``man`` stored with byte planes."""
    return next(
        c
        for e in man.tensors
        for c in e.chunks
        if "planes" in codecs.info(st.chunks.get_blob(c))[0]
    )


def never_placed(man: Any, dests: list[torch.Tensor], victim: bytes) -> bool:
    """Whether the block of ``victim`` in ``dests`` (filled with 0xAB) is untouched."""
    ti, bi = next(
        (ti, bi) for ti, e in enumerate(man.tensors) for bi, c in enumerate(e.chunks) if c == victim
    )
    return bool((dests[ti][bi * BS : (bi + 1) * BS] == 0xAB).all())


def test_a_damaged_zstd_frame_is_named(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    target = first_planes_chunk(store, man)

    def break_frame(cid: bytes, blob: bytes) -> bytes | None:
        if cid != target:
            return None
        b = bytearray(blob)
        i = b.find(b"\x28\xb5\x2f\xfd")  # the zstd frame's magic
        assert i > 0
        b[i + 12] ^= 0xFF
        return bytes(b)

    with pytest.raises(CorruptChunk, match=target.hex()):
        load(store, "latest", direct(store, Faulty(store, break_frame)))


def _nvcomp_on_cuda() -> bool:
    from apollo_cas.gpu.zstd import nvcomp_available

    return nvcomp_available()


def reframe(blob: bytes, stray: bytes = b"", cut: int = 0) -> bytes:
    """``blob`` (a planes chunk) with its first zstd plane followed by ``stray`` bytes or
    shortened by ``cut``, the plane's stored length changed to match: the envelope and
    the frame's declared size stay valid, only the frame's length is wrong."""
    from apollo_cas.codecs import PLANES, envelope, planes

    env = envelope.unpack(blob)
    w, layout = planes.parse_params(env.params)
    k = next(k for k, (kind, _n) in enumerate(layout) if kind == planes.PLANE_ZSTD)
    start = sum(n for _kind, n in layout[:k])
    n = layout[k][1]
    pay = bytes(env.payload)
    frame = pay[start : start + n - cut] + stray
    layout[k] = (planes.PLANE_ZSTD, len(frame))
    params = bytes([w, 0]) + b"".join(bytes([kd]) + ln.to_bytes(4, "little") for kd, ln in layout)
    return bytes(envelope.pack(PLANES, env.raw_size, params, pay[:start], frame, pay[start + n :]))


def _frame_length_damage(st: Store, device: str, stray: bytes, cut: int) -> bool:
    """Load through a reader whose first planes chunk has a frame of the wrong length:
    CorruptChunk naming it with nothing of its batch placed, or (only where ``stray``
    bytes follow a frame that still decodes right) the exact bytes. Never wrong bytes.
    Returns whether it was CorruptChunk."""
    m = model()
    st.save(m, block_size=BS)
    man = st.manifest(st.resolve("latest"))
    victim = first_planes_chunk(st, man)
    reader = Faulty(st, lambda cid, b: reframe(b, stray, cut) if cid == victim else None)
    frames = HostFrames(2) if device == "cpu" else "auto"
    pipe = RestorePipeline(
        reader, st.chunks.read, BS, device=device, frames=frames, batch_bytes=2 * BS
    )
    dests = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8, device=device) for e in man.tensors]
    try:
        pipe.run(places_of(man.tensors, BS), dests)
    except CorruptChunk as exc:
        assert victim.hex() in str(exc)
        assert never_placed(man, dests, victim)
        return True
    assert victim in reader.hits
    for e, d in zip(man.tensors, dests, strict=True):
        assert torch.equal(d.cpu(), raw(m[e.name]))  # the exact bytes, or an error
    return False


@pytest.mark.parametrize(("stray", "cut"), [(b"\0" * 7, 0), (b"", 5)], ids=["stray", "short"])
def test_a_frame_of_the_wrong_length_is_named_on_the_host(
    tmp_path: Path, stray: bytes, cut: int
) -> None:
    """The host decoder checks each frame's length (the read threads check only its
    declared size): bytes after a frame, or a frame cut short, are CorruptChunk."""
    st = Store.open(tmp_path / "s", create=True, format=2)
    assert _frame_length_damage(st, "cpu", stray, cut)


@pytest.mark.skipif(not _nvcomp_on_cuda(), reason="needs CUDA and nvCOMP (the [gpu] extra)")
@pytest.mark.parametrize(("stray", "cut"), [(b"\0" * 7, 0), (b"", 5)], ids=["stray", "short"])
def test_a_frame_of_the_wrong_length_never_gives_wrong_bytes_on_cuda(
    tmp_path: Path, stray: bytes, cut: int
) -> None:
    """nvCOMP gets the frame as stored: a short one cannot fill its slot, so its block
    fails its hash (CorruptChunk, nothing placed); bytes after a frame may decode right,
    and then the load is exact."""
    st = Store.open(tmp_path / "s", create=True, format=2)
    assert _frame_length_damage(st, "cuda", stray, cut) or not cut


def test_unknown_codec_falls_back_per_chunk_in_direct_mode(store: Store) -> None:
    m = model()
    store.save(m, block_size=BS)
    man = store.manifest(store.resolve("latest"))
    target = next(e for e in man.tensors if e.name == "q").chunks[1]

    def as_unknown_codec(cid: bytes, blob: bytes) -> bytes | None:
        # An id no release writes (codec 4, sparse, is decoded on the device now).
        return blob[:5] + bytes([UNKNOWN_CODEC]) + blob[6:] if cid == target else None

    pipe = direct(store, Faulty(store, as_unknown_codec))
    assert same(load(store, "latest", pipe), m)
    assert pipe.stats.cpu_fallback_chunks == 1


def test_restore_into_in_direct_mode_uses_live_bases(store: Store) -> None:
    from apollo_cas.targets.live import restore_into

    m0 = model()
    store.save(m0, block_size=BS)
    store.save(step(m0, 1), block_size=BS)
    live = {k: v.clone() for k, v in m0.items()}
    pipe = direct(store)
    restore_into(pipe, live, store.manifest(store.resolve("latest")))
    assert same(live, step(m0, 1)) and pipe.stats.bases_decoded > 0


@pytest.mark.skipif(not _nvcomp_on_cuda(), reason="needs CUDA and nvCOMP (the [gpu] extra)")
def test_nvcomp_round_trip_and_damage_on_cuda(tmp_path: Path) -> None:
    """On a GPU with nvCOMP (decompression configuration built on the host, no stream
    sync): a round trip is bit-exact, and a damaged zstd frame or a flipped byte is
    CorruptChunk naming the chunk, with nothing of its batch placed."""
    st = Store.open(tmp_path / "s", create=True, format=2)
    m = model()
    st.save(m, block_size=BS)
    man = st.manifest(st.resolve("latest"))
    pipe = st.restore_pipeline(BS, "cuda")
    assert pipe.frames is not None and pipe.frames.on_device and pipe.direct
    got = load_tensors_pipeline(pipe, man)
    assert same({k: v.cpu() for k, v in got.items()}, m)
    targets = [
        c
        for e in man.tensors
        for c in e.chunks
        if "planes" in codecs.info(st.chunks.get_blob(c))[0]
    ]
    frame_victim, byte_victim = targets[0], targets[-1]

    def damage(cid: bytes, blob: bytes) -> bytes | None:
        if cid == frame_victim:
            b = bytearray(blob)
            i = b.find(b"\x28\xb5\x2f\xfd")
            b[i + 12] ^= 0xFF
            return bytes(b)
        return flip_last_byte(blob) if cid == byte_victim else None

    for victim in (frame_victim, byte_victim):
        reader = Faulty(st, lambda cid, b, v=victim: damage(cid, b) if cid == v else None)
        bad = RestorePipeline(reader, st.chunks.read, BS, device="cuda", batch_bytes=2 * BS)
        dests = [
            torch.full((e.nbytes,), 0xAB, dtype=torch.uint8, device="cuda") for e in man.tensors
        ]
        with pytest.raises(CorruptChunk, match=victim.hex()):
            bad.run(places_of(man.tensors, BS), dests)
        assert never_placed(man, dests, victim)


@pytest.mark.parametrize("arenas", [None, 2, 4])
def test_arenas_same_bytes_within_their_bound(tmp_path: Path, arenas: int | None) -> None:
    """Three arenas by default (reads run a batch further ahead than with two): the
    same bytes at any count, and the pinned memory within the bound for that count;
    fewer than two is refused."""
    st = Store.open(tmp_path / "s", create=True)
    m = model(scale=4)
    st.save(m, block_size=BS)
    opts = {} if arenas is None else {"arenas": arenas}
    pipe = direct(st, batch_bytes=2 * BS, **opts)
    assert pipe.arenas == (arenas or 3)
    assert same(load(st, "latest", pipe), m)
    assert pipe.stats.batches > 3
    bound = memory_bound(2 * BS, BS, direct=True, arenas=pipe.arenas)["pinned_host"]
    assert pipe.stats.pinned_bytes <= bound
    pipe.close()
    with pytest.raises(ValueError, match="at least 2"):
        direct(st, arenas=1)
