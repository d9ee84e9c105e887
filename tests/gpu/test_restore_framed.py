"""Framed byte planes (docs/CODECS.md) through the GPU paths, on CPU tensors: the
restore pipeline (direct and staged) gives every frame its own slot, the GPU delta save
writes the CPU path's framed chunks, and a damaged frame is named, never placed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from apollo_cas import codecs  # noqa: E402
from apollo_cas.codecs import envelope, planes  # noqa: E402
from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu.restore import RestorePipeline, memory_bound, places_of  # noqa: E402
from apollo_cas.gpu.zstd import HostFrames  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402
from tests.gpu.test_delta_save import HostHashed, chunk_files, dense_step  # noqa: E402
from tests.gpu.test_restore import Faulty, raw, same  # noqa: E402

#: Blocks of 256 KiB: bf16 planes of 128 KiB, two frames of 64 KiB each.
BS = 256 << 10
F = 64 << 10


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": (0.02 * torch.randn(3 * BS // 2 + 777, generator=g)).to(torch.bfloat16),
        "w32": 0.02 * torch.randn(BS // 4 * 2, generator=g),  # fp32: planes of 64 KiB
        "u8": torch.randint(0, 7, (BS,), dtype=torch.uint8, generator=g),  # zstd
    }


def open_store(path: Path, device_delta: str = "never", sparse: bool = True) -> Store:
    policy = codecs.CodecPolicy(plane_frame_bytes=F, sparse=sparse)
    st = Store.open(path, create=True, workers=2, policy=policy)
    st.device_delta = device_delta
    return st


def save(st: Store, m: dict[str, torch.Tensor]) -> str:
    """The new checkpoint's id."""
    src = HostHashed(m)
    try:
        return st.save(src, block_size=BS, force=True).checkpoint_id
    finally:
        src.close()


def framed_chunks(st: Store, ref: str) -> list[bytes]:
    """Chunks of ``ref`` whose planes (full, or a delta's inner planes) are framed."""
    out = []
    for e in st.manifest(st.resolve(ref)).tensors:
        for cid in e.chunks:
            env = envelope.unpack(st.chunks.get_blob(cid))
            params = env.params
            if env.codec == codecs.DELTA:
                _b, _d, inner, params = codecs.delta.parse_params(params)
                if inner != codecs.PLANES:
                    continue
            elif env.codec != codecs.PLANES:
                continue
            if params[1] == planes.FRAMED:
                out.append(cid)
    return out


def pipeline(st: Store, mode: str, reader: Any = None, **options: Any) -> RestorePipeline:
    frames = HostFrames(2) if mode == "direct" else None
    if reader is not None:
        pipe = RestorePipeline(reader, st.chunks.read, BS, device="cpu", frames=frames)
    else:
        pipe = st.restore_pipeline(BS, "cpu", frames=frames, workers=2)
    pipe.batch_bytes = options.get("batch_bytes", pipe.batch_bytes)
    assert pipe.direct == (mode == "direct")
    return pipe


@pytest.fixture
def steps(tmp_path: Path) -> tuple[Store, list[dict[str, torch.Tensor]], str]:
    """A store with a full save and two dense steps: the store, each step's weights,
    and the full save's id."""
    st = open_store(tmp_path / "s")
    m = model()
    ms = [{k: v.clone() for k, v in m.items()}]
    first = save(st, m)
    for i in (1, 2):
        dense_step(m, i)
        ms.append({k: v.clone() for k, v in m.items()})
        save(st, m)
    return st, ms, first


@pytest.mark.parametrize("mode", ["direct", "staged"])
@pytest.mark.parametrize("batch", [BS, 3 * BS, 64 << 20])
def test_framed_chunks_and_chains_restore_bit_exact(steps: Any, mode: str, batch: int) -> None:
    st, ms, first = steps
    assert framed_chunks(st, first)  # the full save's bf16 exponent planes
    pipe = pipeline(st, mode, batch_bytes=batch)
    got = load_tensors_pipeline(pipe, st.manifest(st.resolve("latest")))
    assert same(got, ms[-1])
    assert pipe.stats.bases_decoded > 0 and pipe.stats.cpu_fallback_chunks == 0
    if mode == "direct":
        chunks = sum(len(e.chunks) for e in st.manifest(st.resolve("latest")).tensors)
        assert pipe.stats.frames > chunks  # a framed plane is several frames
        bound = memory_bound(batch, BS, 2, direct=True)
        assert pipe.stats.pinned_bytes <= bound["pinned_host"]
        assert pipe.stats.device_scratch_bytes <= bound["device_scratch"]
    pipe.close()
    assert same(st.load("latest"), ms[-1])  # the CPU decoder agrees


def test_the_gpu_delta_save_writes_the_cpu_paths_framed_chunks(tmp_path: Path) -> None:
    # No sparse deltas: every delta is codec 3, its inner planes framed.
    stores = {mode: open_store(tmp_path / mode, mode, False) for mode in ("always", "never")}
    m = model()
    for st in stores.values():
        save(st, m)
    dense_step(m, 1)
    for st in stores.values():
        save(st, m)
    stats = stores["always"].last_device_delta
    assert stats is not None and stats.blocks > 0 and stats.fallback_blocks == 0
    assert chunk_files(tmp_path / "always") == chunk_files(tmp_path / "never")
    assert framed_chunks(stores["always"], "latest")  # deltas' inner planes are framed
    assert same(stores["always"].load("latest"), m)


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_a_damaged_second_frame_is_named_and_never_placed(steps: Any, mode: str) -> None:
    st, ms, ref = steps
    victim = framed_chunks(st, ref)[0]

    def break_second_frame(cid: bytes, blob: bytes) -> bytes | None:
        if cid != victim:
            return None
        b = bytearray(blob)
        first = b.find(b"\x28\xb5\x2f\xfd")  # zstd frame magic
        second = b.find(b"\x28\xb5\x2f\xfd", first + 4)
        assert 0 < first < second
        b[second + 40] ^= 0xFF
        return bytes(b)

    man = st.manifest(st.resolve(ref))
    pipe = pipeline(st, mode, Faulty(st, break_second_frame), batch_bytes=BS)
    dests = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in man.tensors]
    with pytest.raises(CorruptChunk, match=victim.hex()):
        pipe.run(places_of(man.tensors, BS), dests)
    ti, bi = next(
        (ti, bi) for ti, e in enumerate(man.tensors) for bi, c in enumerate(e.chunks) if c == victim
    )
    assert bool((dests[ti][bi * BS : (bi + 1) * BS] == 0xAB).all())
    if bi:  # the blocks before it, verified, are placed
        assert torch.equal(dests[ti][:BS], raw(ms[0][man.tensors[ti].name])[:BS])
