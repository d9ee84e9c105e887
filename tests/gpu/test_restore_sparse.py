"""Codec 4 (sparse deltas) through the GPU restore pipeline, on CPU tensors.

A few changed elements per block give codec-4 chunks (positions and XOR values of
the changed elements). The pipeline decodes their two zstd frames with the batch's
others, scatters the values into the chunk's row on the device and XORs the base in
through the same chains as codec 3: no CPU fallback, in every mode, for every element
width, also in chains of sparse deltas and against live bases.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from apollo_cas import codecs  # noqa: E402
from apollo_cas.codecs import envelope, sparse, zstd_frames  # noqa: E402
from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu.restore import RestorePipeline, object_reader, parse_chunk, places_of  # noqa: E402
from apollo_cas.gpu.zstd import HostFrames  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402
from tests.gpu.test_restore import BS, Faulty, raw, same  # noqa: E402


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "bf16": (0.02 * torch.randn(3 * BS // 2 + 40, generator=g)).to(torch.bfloat16),
        "f32": 0.02 * torch.randn(2 * BS // 4, generator=g),
        "f64": torch.randn(BS // 8 + 3, generator=g, dtype=torch.float64),  # a short block
        "u8": torch.randint(0, 200, (2 * BS,), dtype=torch.uint8, generator=g),
    }


def sparse_step(m: dict[str, torch.Tensor], seed: int, frac: float = 0.02) -> dict[str, Any]:
    """A few elements of every tensor change (codec 4's case)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in m.items():
        v = v.clone()
        hit = torch.rand(v.shape, generator=g) < frac
        if v.dtype.is_floating_point:
            v[hit] = (v[hit].double() * 1.5 + 0.25).to(v.dtype)
        else:
            v[hit] += 1
        out[k] = v
    return out


def codec_of(st: Store, cid: bytes) -> int:
    return envelope.unpack(st.chunks.get_blob(cid)).codec


def saved_chain(tmp_path: Path, steps: int, fmt: int = 2) -> tuple[Store, list[Any]]:
    st = Store.open(tmp_path / "s", create=True, format=fmt)
    ms = [model()]
    for i in range(1, steps + 1):
        ms.append(sparse_step(ms[-1], i))
    for m in ms:
        st.save(m, block_size=BS)
    return st, ms


def load(st: Store, pipe: RestorePipeline, ref: str = "latest") -> dict[str, torch.Tensor]:
    return load_tensors_pipeline(pipe, st.manifest(st.resolve(ref)))


MODES: dict[str, Callable[[], dict[str, Any]]] = {
    "staged": lambda: {"frames": None},
    "staged-frames": lambda: {"frames": HostFrames(2), "direct": False},
    "direct": lambda: {"frames": HostFrames(2)},
}


def test_sparse_chunks_parse_to_a_device_plan(tmp_path: Path) -> None:
    st, _ms = saved_chain(tmp_path, 1)
    man = st.manifest(st.resolve("latest"))
    widths = set()
    for e in man.tensors:
        for bi, cid in enumerate(e.chunks):
            blob = st.chunks.get_blob(cid)
            if envelope.unpack(blob).codec != codecs.SPARSE:
                continue
            size = min(BS, e.nbytes - bi * BS)
            c = parse_chunk(blob, cid, size)
            assert c is not None and c.is_sparse
            base, depth, w, n, _g = sparse.parse_params(envelope.unpack(blob).params)
            assert (c.base, c.depth, c.w, c.nchanged) == (base, depth, w, n)
            assert len(c.pieces) == 2 and n > 0
            widths.add(w)
    assert widths == {1, 2, 4, 8}  # every element width is stored as codec 4 here


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("batch", [BS, 3 * BS, 1 << 20])
def test_sparse_chains_decode_on_the_device(tmp_path: Path, mode: str, batch: int) -> None:
    st, ms = saved_chain(tmp_path, 3)
    man = st.manifest(st.resolve("latest"))
    ids = {c for e in man.tensors for c in e.chunks}
    assert sum(codec_of(st, c) == codecs.SPARSE for c in ids) >= len(ids) // 2
    assert max(codecs.delta_depth(st.chunks.get_blob(c)) for c in ids) >= 3
    pipe = st.restore_pipeline(BS, "cpu", workers=2, batch_bytes=batch, **MODES[mode]())
    got = load(st, pipe)
    assert same(got, ms[-1])
    assert pipe.stats.cpu_fallback_chunks == 0  # codec 4 decoded by the pipeline itself
    assert pipe.stats.bases_decoded > pipe.stats.places  # chains of sparse deltas
    pipe.close()
    # An older checkpoint of the chain, too.
    parent = man.parent
    assert parent is not None
    pipe = st.restore_pipeline(BS, "cpu", workers=2, batch_bytes=batch, **MODES[mode]())
    assert same(load(st, pipe, parent), ms[-2])


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_sparse_deltas_against_live_bases(tmp_path: Path, mode: str) -> None:
    from apollo_cas.targets.live import restore_into

    st, ms = saved_chain(tmp_path, 1)
    live = {k: v.clone() for k, v in ms[0].items()}
    pipe = st.restore_pipeline(BS, "cpu", workers=2, **MODES[mode]())
    restore_into(pipe, live, st.manifest(st.resolve("latest")))
    assert same(live, ms[1])
    assert pipe.stats.bases_decoded > 0 and pipe.stats.cpu_fallback_chunks == 0


def reencode(blob: bytes, change: Callable[[np.ndarray, np.ndarray, int], None]) -> bytes:
    """A codec-4 chunk with its gaps and values changed by ``change(gaps, values, m)``."""
    env = envelope.unpack(blob)
    base, depth, w, n, glen = sparse.parse_params(env.params)
    gaps = sparse.from_byte_planes(
        zstd_frames.decompress_exact(env.payload[:glen], 4 * n), 4, n
    ).copy()
    vals = sparse.from_byte_planes(
        zstd_frames.decompress_exact(env.payload[glen:], w * n), w, n
    ).copy()
    change(gaps, vals, env.raw_size // w)
    gframe = zstd_frames.compress_plane(sparse.byte_planes(gaps.astype("<u4"), 4).data, 3)
    vframe = zstd_frames.compress_plane(sparse.byte_planes(vals, w).data, 3)
    params = sparse._HEAD.pack(base, depth, w, n, len(gframe))
    return envelope.pack(codecs.SPARSE, env.raw_size, params, gframe + vframe)


def past_the_end(gaps: np.ndarray, vals: np.ndarray, m: int) -> None:
    gaps[-1] += m  # the last changed element lies past the block


def one_value_flipped(gaps: np.ndarray, vals: np.ndarray, m: int) -> None:
    vals[0] ^= 1


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("change", [past_the_end, one_value_flipped])
def test_a_damaged_sparse_chunk_is_named_and_nothing_of_its_batch_placed(
    tmp_path: Path, mode: str, change: Callable[[np.ndarray, np.ndarray, int], None]
) -> None:
    st, _ms = saved_chain(tmp_path, 1)
    man = st.manifest(st.resolve("latest"))
    victim = next(
        c
        for e in man.tensors
        if e.name == "f32"
        for c in e.chunks
        if codec_of(st, c) == codecs.SPARSE
    )
    reader = Faulty(st, lambda cid, b: reencode(b, change) if cid == victim else None)
    pipe = RestorePipeline(reader, st.chunks.read, BS, device="cpu", workers=2, **MODES[mode]())
    dests = [torch.full((e.nbytes,), 0xAB, dtype=torch.uint8) for e in man.tensors]
    with pytest.raises(CorruptChunk, match=victim.hex()):
        pipe.run(places_of(man.tensors, BS), dests)
    assert reader.hits and set(reader.hits) == {victim}
    assert all(bool((d == 0xAB).all()) for d in dests)  # one batch: nothing placed


def test_a_sparse_chunk_wider_than_its_block_falls_back_to_the_cpu(tmp_path: Path) -> None:
    """Decoded gaps and values larger than the block (w=1, over 20% changed) would
    outgrow the staging bound: that chunk is decoded on the CPU, bit-exactly."""
    st = Store.open(tmp_path / "s", create=True)
    g = torch.Generator().manual_seed(3)
    m0 = {"u8": torch.randint(0, 200, (BS,), dtype=torch.uint8, generator=g)}
    m1 = {"u8": m0["u8"].clone()}
    m1["u8"][torch.rand(BS, generator=g) < 0.22] += 1
    st.save(m0, block_size=BS)
    st.save(m1, block_size=BS)
    (base,) = st.manifest(st.resolve(st.manifest(st.resolve("latest")).parent)).tensors[0].chunks
    (target,) = st.manifest(st.resolve("latest")).tensors[0].chunks
    x = raw(m1["u8"]).numpy() ^ raw(m0["u8"]).numpy()
    got = sparse.encode(x, 1, 3, base, 1)
    assert got is not None and 5 * got[2] > BS
    crafted = envelope.pack(codecs.SPARSE, BS, got[0], b"".join(got[1]))
    assert codecs.decode(crafted, "crafted", lambda h: raw(m0["u8"]).numpy().tobytes()) == bytes(
        raw(m1["u8"]).numpy()
    )
    assert parse_chunk(crafted, target, BS) is None
    asked: list[bytes] = []

    def read_raw(cid: bytes) -> bytes:
        asked.append(cid)
        return st.chunks.read(cid)

    reader = Faulty(st, lambda cid, b: crafted if cid == target else None)
    pipe = RestorePipeline(reader, read_raw, BS, device="cpu", workers=2, frames=None)
    assert same(load(st, pipe), m1)
    assert asked == [target] and pipe.stats.cpu_fallback_chunks == 1


def test_object_reader_is_the_seam(tmp_path: Path) -> None:
    """The same chain through a plain object reader (format 1 stores)."""
    st, ms = saved_chain(tmp_path, 2, fmt=1)
    pipe = RestorePipeline(
        object_reader(st.chunks.get_blob, 2), st.chunks.read, BS, device="cpu", frames=None
    )
    assert same(load(st, pipe), ms[-1]) and pipe.stats.cpu_fallback_chunks == 0
