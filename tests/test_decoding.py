"""Restore decoding on worker processes gives the same bytes and the same errors as
threads, and several outputs are filled side by side."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from damage import flip_last_byte
from hypothesis import given, settings
from hypothesis import strategies as hst

from apollo_cas import Store, decoding
from apollo_cas.decoding import Decoder, Output, interleave_outputs, pwrite_all
from apollo_cas.errors import CorruptChunk, UsageError
from apollo_cas.inventory import Location
from apollo_cas.manifest import TensorEntry
from apollo_cas.targets.assemble import Placement, write_chunks


def _store(tmp_path: Path, fmt: int = 1) -> Store:
    rng = np.random.default_rng(0)
    st = Store.open(tmp_path / "s", create=True, workers=2, format=fmt)
    st.save(
        {f"t{i}": rng.standard_normal(40_000 + i).astype(np.float32) for i in range(4)},
        block_size=16384,
    )
    return st


@pytest.mark.parametrize("writes", ["auto", "pwrite"])
@pytest.mark.parametrize("store_format", [1, 2])
@pytest.mark.parametrize("fmt", ["flat", "safetensors"])
def test_processes_restore_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, store_format: int, writes: str
) -> None:
    st = _store(tmp_path, store_format)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "0")
    a = st.restore("latest", tmp_path / "threads", format=fmt)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    monkeypatch.setenv("APOLLO_CAS_WORKER_WRITES", writes)
    assert st.decoder(1).processes
    b = st.restore("latest", tmp_path / "procs", format=fmt)
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    for x, y in zip(a, b, strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes()


def test_worker_errors_reach_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    cid = st.manifest(st.resolve("latest")).tensors[2].chunks[1].hex()
    flip_last_byte(st, bytes.fromhex(cid))
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    with pytest.raises(CorruptChunk, match=cid):
        st.restore("latest", tmp_path / "out", format="flat")
    assert not (tmp_path / "out" / "weights.bin").exists()


def test_a_bad_worker_writes_value_is_refused_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _store(tmp_path)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    monkeypatch.setenv("APOLLO_CAS_WORKER_WRITES", "fast")
    with pytest.raises(UsageError, match="APOLLO_CAS_WORKER_WRITES"):
        st.restore("latest", tmp_path / "out", format="flat")
    assert not (tmp_path / "out" / "weights.bin").exists()


@pytest.mark.parametrize("kind", ["maps", "files"])
def test_worker_outputs_write_at_their_offsets(tmp_path: Path, kind: str) -> None:
    from apollo_cas.decode_worker import OutputFiles, OutputMaps

    paths = [tmp_path / "a", tmp_path / "b"]
    for p in paths:
        p.write_bytes(bytes(64))
    out = OutputMaps() if kind == "maps" else OutputFiles()
    out.write(str(paths[0]), 8, b"x" * 8)
    out.write(str(paths[1]), 60, memoryview(b"yyyy"))
    out.write(str(paths[0]), 0, b"z")
    out.close()
    assert paths[0].read_bytes() == b"z" + bytes(7) + b"x" * 8 + bytes(48)
    assert paths[1].read_bytes() == bytes(60) + b"yyyy"


def test_memory_stores_stay_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    st = Store.open("memory://x", create=True)
    assert not st.decoder(1 << 40).processes


@pytest.mark.parametrize("device", [None, "cpu"])
def test_load_through_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str | None
) -> None:
    import torch

    st = _store(tmp_path)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "0")
    ref = st.load()
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    got = st.load(device=device)
    assert list(got) == list(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype


def test_interleave_outputs_takes_one_item_from_each_stream_in_turn() -> None:
    got = list(interleave_outputs([["a0", "a1", "a2"], [], ["b0"], ["c0", "c1"]]))
    assert got == ["a0", "b0", "c0", "a1", "c1", "a2"]
    # Lazy: endless streams (a huge model's jobs) are never read ahead.
    endless = [itertools.count(0, 2), itertools.count(1, 2)]
    assert list(itertools.islice(interleave_outputs(endless), 7)) == list(range(7))


@settings(max_examples=300, deadline=None)
@given(hst.lists(hst.lists(hst.integers(), max_size=8), max_size=6))
def test_interleave_outputs_is_a_permutation_keeping_each_streams_order(
    streams: list[list[int]],
) -> None:
    tagged = [[(s, i, v) for i, v in enumerate(items)] for s, items in enumerate(streams)]
    got = list(interleave_outputs([iter(t) for t in tagged]))
    assert sorted(got) == sorted(x for t in tagged for x in t)
    for s, t in enumerate(tagged):
        assert [x for x in got if x[0] == s] == t
    # Two in a row from one stream only once every other stream has run dry.
    for k in range(1, len(got)):
        if got[k][0] == got[k - 1][0]:
            seen = [x[0] for x in got[:k]]
            for r, t in enumerate(tagged):
                if r != got[k][0]:
                    assert seen.count(r) == len(t)


BLOCK = 8


class PackReader:
    """Every chunk back to back in one pack, in output order (as a first save
    writes consecutive shards' tensors); records each span it is asked for."""

    def __init__(self, chunks_per_output: list[int]) -> None:
        self.data: dict[bytes, bytes] = {}
        self.where: dict[bytes, int] = {}
        self.ids: list[list[bytes]] = []
        self.spans: list[list[bytes]] = []
        at = 0
        for out, n in enumerate(chunks_per_output):
            self.ids.append([])
            for i in range(n):
                cid = bytes([out, i]) * 8
                self.data[cid] = bytes([16 * out + i]) * BLOCK
                self.where[cid] = at
                self.ids[-1].append(cid)
                at += BLOCK

    def locate(self, chunk_id: bytes) -> Location:
        return Location("pack", self.where[chunk_id], BLOCK)

    def read(self, chunk_id: bytes, size: int | None = None) -> bytes:
        self.spans.append([chunk_id])
        return self.data[chunk_id]

    def read_span(
        self, key: str, offset: int, items: list[tuple[bytes, int, int, int | None]]
    ) -> list[bytes]:
        self.spans.append([c for c, *_ in items])
        return [self.data[c] for c, *_ in items]


class FakeWorker:
    """Stands in for a worker process: writes each batch with the parent's reader,
    so the test sees the order batches are handed out in."""

    reader: PackReader

    def __init__(self, location: str, writes: str = "mmap") -> None:
        pass

    def call(self, paths: list[str], batch: list[decoding.Span]) -> list[tuple[int, int, int]]:
        done = []
        for span in batch:
            for it, data in zip(span[2], decoding.read_span(self.reader, span), strict=True):
                fd = os.open(paths[it[0]], os.O_RDWR)
                try:
                    pwrite_all(fd, data, it[1])
                finally:
                    os.close(fd)
                done.append((it[0], it[1], len(data)))
        return done

    def close(self) -> None:
        pass


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_spans_of_several_outputs_are_handed_out_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: bool
) -> None:
    """Consecutive spans come from different outputs (workers busy at once
    write different files), each span stays within one output and in order, and
    the files get the same bytes."""
    monkeypatch.setattr(decoding, "SPAN_BYTES", 2 * BLOCK)
    sizes = [5, 3, 4]
    reader = PackReader(sizes)
    monkeypatch.setattr(FakeWorker, "reader", reader, raising=False)
    monkeypatch.setattr(decoding, "_Worker", FakeWorker)
    placements = [
        Placement(TensorEntry(f"t{o}", "U8", (n * BLOCK,), n * BLOCK, tuple(reader.ids[o])), o, 0)
        for o, n in enumerate(sizes)
    ]
    paths = [tmp_path / f"out{o}" for o in range(len(sizes))]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in paths]
    try:
        outputs = [Output(fd, str(p)) for fd, p in zip(fds, paths, strict=True)]
        # One worker: the order spans are read in is the order they were handed out.
        decoder = Decoder(reader, 1, location="fake" if processes else None, processes=processes)
        progress: list[int] = []
        total = write_chunks(decoder, outputs, placements, BLOCK, progress.append)
    finally:
        for fd in fds:
            os.close(fd)
    label = {c: (o, i) for o, cids in enumerate(reader.ids) for i, c in enumerate(cids)}
    assert [[label[c] for c in span] for span in reader.spans] == [
        [(0, 0), (0, 1)],
        [(1, 0), (1, 1)],
        [(2, 0), (2, 1)],
        [(0, 2), (0, 3)],
        [(1, 2)],
        [(2, 2), (2, 3)],
        [(0, 4)],
    ]
    assert total == sum(progress) == sum(sizes) * BLOCK
    for o, p in enumerate(paths):
        assert p.read_bytes() == b"".join(reader.data[c] for c in reader.ids[o])


def test_worker_errors_in_any_shard_reach_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, snapshot
) -> None:
    """Filling shards side by side, a damaged chunk in the last shard still fails
    the restore naming that chunk, and no shard (nor a temporary file) is left."""
    st = _store(tmp_path, 2)
    tensors = st.manifest(st.resolve("latest")).tensors
    cid = tensors[-1].chunks[-1].hex()
    flip_last_byte(st, bytes.fromhex(cid))
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "1")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CorruptChunk, match=cid):
        st.restore("latest", out, max_shard_size=tensors[0].nbytes)
    assert snapshot(out) == {}
