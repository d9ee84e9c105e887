"""Property tests: any mapping of any dtypes, shapes and contents, at any block
size, restores bit-exactly; a save stores exactly the blocks the store lacked."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from apollo_cas import dtypes
from apollo_cas.manifest import SourceInfo
from apollo_cas.sources.safetensors_file import SafetensorsSource, safetensors_files
from apollo_cas.store import Store

PROPS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

block_sizes = st.integers(16, 48).map(lambda k: k * 256)  # 4096 .. 12288, multiples of 256
names = st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True)


def _fill(kind: str, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytes(n)
    if kind == "pattern":  # repeats: identical blocks inside one tensor
        return (bytes(rng.integers(0, 256, 64, dtype=np.uint8)) * (n // 64 + 1))[:n]
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


@st.composite
def tensor_specs(draw: st.DrawFn) -> tuple[str, tuple[int, ...], bytes]:
    name = draw(st.sampled_from(sorted(dtypes.BY_NAME)))
    item = dtypes.BY_NAME[name].itemsize
    ndim = draw(st.integers(0, 3))
    max_elems = 24_000 // item
    shape: list[int] = []
    count = 1
    for _ in range(ndim):
        d = draw(st.integers(0, max(0, min(200, max_elems // max(count, 1)))))
        shape.append(d)
        count *= d
    if draw(st.booleans()) and ndim == 1:  # sometimes a large 1-d tensor
        shape = [draw(st.integers(0, max_elems))]
        count = shape[0]
    raw = _fill(
        draw(st.sampled_from(["random", "zeros", "pattern"])),
        count * item,
        draw(st.integers(0, 2**32 - 1)),
    )
    if name == "BOOL":
        raw = bytes(b & 1 for b in raw)
    return name, tuple(shape), raw


def to_tensor(spec: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    name, shape, raw = spec
    dt = getattr(torch, dtypes.BY_NAME[name].torch_name)
    if not raw:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)


mappings = st.dictionaries(names, tensor_specs(), min_size=1, max_size=6)


def _check_restores(st_: Store, cid: str, specs: dict, out: Path, tensor_bytes) -> None:
    # load(): torch tensors in memory
    got = st_.load(cid)
    assert sorted(got) == sorted(specs)
    for k, (dname, shape, raw) in specs.items():
        assert dtypes.from_torch(got[k].dtype).name == dname
        assert tuple(got[k].shape) == shape
        assert tensor_bytes(got[k]) == raw

    # flat: weights.bin + weights.json in the original tool's format
    st_.restore(cid, out / "flat", format="flat")
    index = json.loads((out / "flat" / "weights.json").read_text())
    blob = (out / "flat" / "weights.bin").read_bytes()
    assert sorted(index) == sorted(specs)
    assert len(blob) == sum(len(raw) for _, _, raw in specs.values())
    for k, (dname, shape, raw) in specs.items():
        e = index[k]
        assert e["dtype"] == dtypes.BY_NAME[dname].torch_str
        assert e["shape"] == list(shape) and e["size"] == len(raw)
        assert blob[e["offset"] : e["offset"] + e["size"]] == raw

    # safetensors: read back by the library and by apollo_cas's own reader
    files = st_.restore(cid, out / "st", format="safetensors")
    assert [Path(f).name for f in files] == ["model.safetensors"]
    with safe_open(files[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(specs)
        for k, (dname, shape, raw) in specs.items():
            t = f.get_tensor(k)
            assert dtypes.from_torch(t.dtype).name == dname
            assert tuple(t.shape) == shape
            assert tensor_bytes(t) == raw
    src = SafetensorsSource(safetensors_files(out / "st"), SourceInfo(kind="safetensors"))
    try:
        seen = {t.name: t for t in src.tensors()}
        assert sorted(seen) == sorted(specs)
        for k, (dname, shape, raw) in specs.items():
            t = seen[k]
            assert (t.dtype.name, t.shape) == (dname, shape)
            assert bytes(t.read(0, t.nbytes)) == raw
        del seen, t
    finally:
        src.close()


@PROPS
@given(specs=mappings, block_size=block_sizes)
def test_save_then_load_and_restore_are_bit_exact(specs, block_size, tensor_bytes, fast_tmp_base):
    with tempfile.TemporaryDirectory(dir=fast_tmp_base) as tmp:
        tmp_path = Path(tmp)
        with Store.open(tmp_path / "store", create=True) as s:
            r = s.save({k: to_tensor(v) for k, v in specs.items()}, block_size=block_size)
            assert r.manifest.block_size == block_size
            assert r.stats.logical_bytes == sum(len(raw) for _, _, raw in specs.values())
            _check_restores(s, r.checkpoint_id, specs, tmp_path, tensor_bytes)


def block_ids(specs: dict, block_size: int) -> dict[bytes, int]:
    """The model of the chunk store: every distinct block id -> its raw length."""
    out = {}
    for _, _, raw in specs.values():
        for o in range(0, len(raw), block_size):
            block = raw[o : o + block_size]
            out[xxhash.xxh3_128_digest(block)] = len(block)
    return out


@st.composite
def related_pairs(draw: st.DrawFn) -> tuple[dict, dict]:
    """A mapping and a later one: some tensors kept, some bytes flipped, some
    tensors replaced, added or dropped."""
    a = draw(mappings)
    b = {}
    for k, (dname, shape, raw) in a.items():
        action = draw(st.sampled_from(["keep", "keep", "flip", "replace", "drop"]))
        if action == "keep":
            b[k] = (dname, shape, raw)
        elif action == "flip" and raw:
            buf = bytearray(raw)
            for pos in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
                buf[pos] = buf[pos] ^ 1  # keeps BOOL values valid
            b[k] = (dname, shape, bytes(buf))
        elif action == "replace":
            b[k] = draw(tensor_specs())
    b.update(draw(st.dictionaries(names, tensor_specs(), max_size=2)))
    if not b:
        b = dict(a)
    return a, b


@PROPS
@given(pair=related_pairs(), block_size=block_sizes)
def test_a_save_stores_exactly_the_blocks_the_store_lacks(
    pair, block_size, tensor_bytes, fast_tmp_base
):
    a, b = pair
    with tempfile.TemporaryDirectory(dir=fast_tmp_base) as tmp:
        root = Path(tmp) / "store"
        with Store.open(root, create=True) as s:
            ra = s.save({k: to_tensor(v) for k, v in a.items()}, block_size=block_size)
            ids_a = block_ids(a, block_size)
            assert ra.stats.new_chunks == len(ids_a)
            assert ra.stats.new_raw_bytes == sum(ids_a.values())

            rb = s.save({k: to_tensor(v) for k, v in b.items()}, block_size=block_size)
            ids_b = block_ids(b, block_size)
            new = set(ids_b) - set(ids_a)
            assert rb.stats.new_chunks == len(new)
            assert rb.stats.new_raw_bytes == sum(ids_b[c] for c in new)
            assert rb.stats.chunks == sum(-(-len(raw) // block_size) for _, _, raw in b.values())
            stored = {c.hex() for c in s.inventory.ids()}  # chunk files or indexed packs
            assert stored == {c.hex() for c in set(ids_a) | set(ids_b)}
            if a == b:
                assert rb.unchanged and rb.checkpoint_id == ra.checkpoint_id
            else:
                assert not rb.unchanged and rb.parent == ra.checkpoint_id
                got = s.load(rb.checkpoint_id)
                assert {k: tensor_bytes(t) for k, t in got.items()} == {
                    k: raw for k, (_, _, raw) in b.items()
                }
