"""The GPU restore pipeline on format-2 stores (chunks in packs), on CPU tensors.

``Store.restore_pipeline`` reads a format-2 store through ``pack_reader`` (chunks
located through the index, adjacent ones of a pack read as one range) and a format-1
store through its chunk files; both must restore bit-exactly, and damage inside a pack
(a flipped byte, a truncated pack, an index range outside its pack, a missing pack)
must be a CorruptChunk naming a chunk with nothing handed out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from damage import chunk_file_range, flip_last_byte, point_outside_its_pack  # noqa: E402

from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu.readers import ArenaViews  # noqa: E402
from apollo_cas.gpu.restore import Arena, pack_reader  # noqa: E402
from apollo_cas.gpu.zstd import HostFrames  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.targets.tensors import load_tensors_pipeline  # noqa: E402
from tests.gpu.test_restore import BS, model, same, step  # noqa: E402


def saved(tmp_path: Path, fmt: int, pack_size: int | None = None) -> tuple[Store, list[Any]]:
    st = Store.open(tmp_path / f"s{fmt}", create=True, format=fmt, pack_size=pack_size)
    m0 = model(scale=4)
    m1 = step(m0, 1)
    st.save(m0, block_size=BS)
    st.save(m1, block_size=BS)
    return st, [m0, m1]


def load(st: Store, ref: str, **options: Any) -> dict[str, torch.Tensor]:
    options.setdefault("workers", 2)
    pipe = st.restore_pipeline(BS, "cpu", **options)
    try:
        return load_tensors_pipeline(pipe, st.manifest(st.resolve(ref)))
    finally:
        pipe.close()


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("frames", [None, "host"])
def test_both_formats_round_trip_through_the_store_pipeline(
    tmp_path: Path, fmt: int, frames: str | None
) -> None:
    st, (m0, m1) = saved(tmp_path, fmt, pack_size=64 << 10)
    assert st.format == fmt
    if fmt == 2:
        assert len(list((tmp_path / "s2" / "packs").rglob("*"))) > 3  # several packs
    dec = HostFrames(2) if frames else None
    for batch in (2 * BS, 1 << 20):
        assert same(load(st, "latest", frames=dec, batch_bytes=batch), m1)
        parent = st.manifest(st.resolve("latest")).parent
        assert parent is not None
        assert same(load(st, parent, frames=dec, batch_bytes=batch), m0)


def test_restore_into_a_format_2_store(tmp_path: Path) -> None:
    st, (m0, m1) = saved(tmp_path, 2)
    live = {k: v.clone() for k, v in m0.items()}
    rep = st.restore_into("latest", live, only_changed=False)
    assert same(live, m1) and rep.verified


class Ranges:
    """A backend's get_range that counts its calls (root=None: the non-local path)."""

    def __init__(self, st: Store) -> None:
        self.st = st
        self.calls = 0

    def __call__(self, key: str, offset: int, length: int) -> bytes:
        self.calls += 1
        return self.st.backend.get_range(key, offset, length)


def test_pack_reader_coalesces_adjacent_chunks_into_ranged_reads(tmp_path: Path) -> None:
    st, _ = saved(tmp_path, 2)
    man = st.manifest(st.resolve("latest"))
    parent = st.manifest(man.parent or "")
    ids = list(dict.fromkeys(c for e in parent.tensors for c in e.chunks))
    want = [st.chunks.get_blob(c) for c in ids]
    ranges = Ranges(st)
    remote = pack_reader(st.chunks.locate_many, ranges)
    arena = Arena()
    arena.reset(sum(len(b) for b in want) + 64 * len(want))
    assert [bytes(b) for b in remote(ids, arena)] == want
    # The first save's chunks lie back to back in its packs, in tensor order.
    npacks = len({st.chunks.locate(c).key for c in ids})
    assert ranges.calls == npacks < len(ids)
    # Local: preadv into the arena; out of order and with no arena room, own bytes.
    local = pack_reader(st.chunks.locate_many, ranges, st.backend.root)  # type: ignore[attr-defined]
    small = Arena()
    small.reset(len(want[-1]) + 64)
    rev = ids[::-1]
    assert [bytes(b) for b in local(rev, small)] == want[::-1]
    assert [bytes(b) for b in local(ids, None)] == want
    assert ranges.calls == npacks  # the local reader never called get_range


def test_pack_reader_says_where_each_chunk_lies_in_the_arena(tmp_path: Path) -> None:
    st, _ = saved(tmp_path, 2)
    man = st.manifest(st.resolve("latest"))
    ids = list(dict.fromkeys(c for e in man.tensors for c in e.chunks))
    reader = pack_reader(st.chunks.locate_many, st.backend.get_range, st.backend.root)  # type: ignore[attr-defined]
    arena = Arena()
    arena.reset(sum(st.chunks.locate(c).length for c in ids) // 2)  # room for about half
    got = reader(ids[::-1], arena)
    assert isinstance(got, ArenaViews)
    assert got.at == [arena.offset_of(b) for b in got]
    assert 0 < sum(a is not None for a in got.at) < len(ids)  # the rest: bytes of their own
    assert [bytes(b) for b in got] == [st.chunks.get_blob(c) for c in ids[::-1]]


def victim_of(st: Store) -> bytes:
    man = st.manifest(st.resolve("latest"))
    return next(e for e in man.tensors if e.name == "embed").chunks[3]


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_damaged_chunk_inside_a_pack_is_named(tmp_path: Path, fmt: int) -> None:
    st, _ = saved(tmp_path, fmt)
    victim = victim_of(st)
    flip_last_byte(st, victim)
    with pytest.raises(CorruptChunk, match=victim.hex()):
        load(st, "latest", batch_bytes=1 << 20)


def test_a_truncated_pack_is_a_corrupt_chunk(tmp_path: Path) -> None:
    st, _ = saved(tmp_path, 2)
    victim = victim_of(st)
    path, offset, length = chunk_file_range(st, victim)
    os.chmod(path, 0o644)
    os.truncate(path, offset + length // 2)
    with pytest.raises(CorruptChunk, match=f"chunk {victim.hex()}: .*truncated pack"):
        load(st, "latest")


def test_a_missing_pack_is_a_corrupt_chunk(tmp_path: Path) -> None:
    st, _ = saved(tmp_path, 2)
    victim = victim_of(st)
    path, _, _ = chunk_file_range(st, victim)
    path.unlink()
    with pytest.raises(CorruptChunk, match="is missing: its pack"):
        load(st, "latest")


def test_an_index_naming_a_range_outside_its_pack(tmp_path: Path) -> None:
    st, _ = saved(tmp_path, 2)
    victim = victim_of(st)
    root = Path(st.location)
    point_outside_its_pack(st, victim)
    with Store.open(root) as fresh:
        dests: list[Any] = []
        with pytest.raises(CorruptChunk, match=f"chunk {victim.hex()}: .*outside"):
            dests.append(load(fresh, "latest"))
        assert dests == []
