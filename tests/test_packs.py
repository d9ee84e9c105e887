"""Store format 2: packs and index objects; format-1 stores keep working.

Layout and write order (docs/FORMAT.md, "Format 2"), the damage a pack can
suffer (truncated, an index range outside its pack, a flipped bit) and what it
breaks, restores reading long ranges, and a format-1 store written by the
previous release restoring bit-exactly.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from apollo_cas import layout, packs
from apollo_cas.backends.base import Backend
from apollo_cas.backends.local import LocalBackend
from apollo_cas.errors import CorruptChunk, StoreError
from apollo_cas.hashing import digest_hex
from apollo_cas.inventory import PackIndex
from apollo_cas.pack_objects import PackWriter, read_trailer
from apollo_cas.store import Store
from apollo_cas.verify import verify
from tests.backends.wrappers import ForwardingBackend
from tests.damage import point_outside_its_pack

BS = 4096
PACK = 64 << 10  # 16 blocks: a model of 100 blocks fills several packs
FIXTURES = Path(__file__).parent / "fixtures"


def model(seed: int, blocks: int = 100) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.integers(0, 256, blocks // 2 * BS, dtype=np.uint8),
        "b": rng.integers(0, 256, blocks // 2 * BS + 77, dtype=np.uint8),
    }


def flat(m: dict[str, np.ndarray]) -> bytes:
    return b"".join(m[k].tobytes() for k in sorted(m))


def pack_paths(root: str | Path) -> list[Path]:
    return sorted(p for p in (Path(root) / "packs").rglob("*") if p.is_file())


@pytest.fixture
def st(tmp_store: str) -> Iterator[Store]:
    with Store.open(tmp_store, create=True, format=2, pack_size=PACK, workers=2) as s:
        yield s


def restored(st: Store, ref: str, out: Path) -> bytes:
    st.restore(ref, out, format="flat")
    data = (out / "weights.bin").read_bytes()
    shutil.rmtree(out)
    return data


# ---------------------------------------------------------------------------
# layout


def test_a_save_writes_packs_in_tensor_order_then_one_index(st: Store, tmp_store: str) -> None:
    m = model(1)
    cid = st.save(m, block_size=BS).checkpoint_id or ""
    assert not (Path(tmp_store) / "chunks").exists()
    [index] = list((Path(tmp_store) / "index").iterdir())
    data = index.read_bytes()
    assert digest_hex(data) == index.name  # named by its content
    infos = packs.decode_index(data, index.name, index.name)
    by_id = {i.pack_id: i for i in infos}
    assert {p.name for p in pack_paths(tmp_store)} == set(by_id)
    for p in pack_paths(tmp_store):
        raw = p.read_bytes()
        assert digest_hex(raw) == p.name and p.parent.name == p.name[:2]
        # Self-describing: the trailer alone lists what the index lists.
        assert read_trailer(LocalBackend(tmp_store), p.name).entries == by_id[p.name].entries
        assert len(raw) <= PACK + 4 * BS + packs.trailer_size(32)
    # Tensor order: the manifest's chunks, in order, are the packs' entries in order.
    manifest_order = [c for t in st.manifest(cid).tensors for c in t.chunks]
    pack_order = [e.chunk_id for i in infos for e in i.entries]
    assert pack_order == list(dict.fromkeys(manifest_order))
    assert restored(st, cid, Path(tmp_store) / "out") == flat(m)


def test_packs_written_at_once_keep_tensor_order(tmp_store: str) -> None:
    """Eight workers: several packs are written at once, yet the index lists
    them, and each its chunks, in tensor order, and every pack is named by its bytes."""
    m = model(3, blocks=300)
    with Store.open(tmp_store, create=True, format=2, pack_size=PACK, workers=8) as s:
        cid = s.save(m, block_size=BS).checkpoint_id or ""
        [index] = list((Path(tmp_store) / "index").iterdir())
        infos = packs.decode_index(index.read_bytes(), index.name, index.name)
        assert len(infos) >= 8
        manifest_order = [c for t in s.manifest(cid).tensors for c in t.chunks]
        assert [e.chunk_id for i in infos for e in i.entries] == list(dict.fromkeys(manifest_order))
        for p in pack_paths(tmp_store):
            assert digest_hex(p.read_bytes()) == p.name
        assert restored(s, cid, Path(tmp_store) / "out") == flat(m)


def test_packs_written_as_their_pieces_hold_every_envelope_as_appended(tmp_path: Path) -> None:
    """Three writers write packs as their pieces (never assembled): every pack
    hashes to its name, its trailer is its entries, every envelope reads back
    from its pack exactly as appended, in order."""
    backend = LocalBackend(tmp_path / "s")
    rng = np.random.default_rng(5)
    writer = PackWriter(backend, 50_000, writers=3)
    blobs = {}
    for i in range(400):
        # Sizes vary a lot, so later packs need larger buffers than earlier ones.
        blob = rng.integers(0, 256, int(rng.integers(1, 4000 if i < 200 else 30_000)), np.uint8)
        cid = xxhash.xxh3_128_digest(blob.tobytes())
        blobs[cid] = blob.tobytes()
        assert writer.append(cid, blob.tobytes(), len(blob), None)
    infos = writer.close()
    assert [e.chunk_id for i in infos for e in i.entries] == list(blobs)
    for info in infos:
        raw = (tmp_path / "s" / layout.pack_key(info.pack_id)).read_bytes()
        assert digest_hex(raw) == info.pack_id and len(raw) == info.size
        assert read_trailer(backend, info.pack_id).entries == info.entries
        for e in info.entries:
            assert raw[e.offset : e.offset + e.length] == blobs[e.chunk_id]


def test_objects_written_per_save(st: Store, tmp_store: str) -> None:
    """At most stored bytes / pack size + 5 new objects per save (issue 18's target)."""

    def objects() -> set[str]:
        return {
            str(p) for p in Path(tmp_store).rglob("*") if p.is_file() and "locks" not in p.parts
        }

    m = model(2, blocks=200)
    for label, change in (("full", None), ("one block", 7), ("dense", -1)):
        if change is not None and change >= 0:
            m["a"][change * BS] ^= 1
        elif change == -1:
            m = {k: v ^ np.uint8(1) for k, v in m.items()}  # every block changes a little
        before = objects()
        r = st.save(m, block_size=BS)
        new = objects() - before
        bound = r.stats.new_stored_bytes // PACK + 5
        assert len(new) <= bound, (label, len(new), bound)


def test_a_save_without_block_size_keeps_its_series_block_size(st: Store) -> None:
    """Issue 18 item 7: a second save without --block-size used to switch to
    1 MiB, store everything again and lose its deltas."""
    m = model(3)
    first = st.save(m, block_size=BS)
    m["a"][:10] ^= 1
    second = st.save(m)
    assert second.manifest is not None and second.manifest.block_size == BS
    assert second.stats.new_chunks == 1
    other = st.save(model(4), series="fresh")
    assert other.manifest is not None and other.manifest.block_size == 1 << 20
    assert first.manifest is not None and first.manifest.block_size == BS


def test_cli_save_without_block_size_keeps_the_series_block_size(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    from safetensors.numpy import save_file

    src, store = tmp_path / "m.safetensors", tmp_path / "store"
    m = model(5)
    save_file(m, str(src))
    assert run_cli("save", src, "--store", store, "--block-size", "4KiB").returncode == 0
    m["b"][:3] ^= 1
    save_file(m, str(src))
    p = run_cli("save", src, "--store", store, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["new_chunks"] == 1
    with Store.open(store) as s:
        assert s.manifest(out["checkpoint"]).block_size == BS


class FirstPackWaits(LocalBackend):
    """The first pack's write ends only after the fourth pack is written."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fourth = threading.Event()
        self.puts = 0
        self.lock = threading.Lock()

    def put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        with self.lock:
            n, self.puts = self.puts, self.puts + 1
        if n == 0 and not self.fourth.wait(10):
            raise TimeoutError("the writer waited for the first pack before writing the fourth")
        done = super().put_by_digest(key_for, parts, durable=durable)
        if n == 3:
            self.fourth.set()
        return done


def test_a_slow_pack_write_never_holds_up_the_others(tmp_path: Path) -> None:
    """Writes end in any order: the writer hands a sealed pack to whichever writer
    is free (waiting on the oldest would deadlock here, and idled writers on a
    disk), and still lists its packs in the order they were sealed."""
    backend = FirstPackWaits(tmp_path / "s")
    writer = PackWriter(backend, 1000, writers=2)
    ids = []
    for i in range(8):
        blob = bytes([i]) * 1000
        ids.append(xxhash.xxh3_128_digest(blob))
        writer.append(ids[-1], blob, 1000, None)
    infos = writer.close()
    assert [e.chunk_id for info in infos for e in info.entries] == ids
    assert backend.puts == 8


# ---------------------------------------------------------------------------
# reads


class CountingBackend(LocalBackend):
    """A local backend that counts its reads (a seam, not a patch)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.calls: Counter[str] = Counter()

    def get(self, key: str) -> bytes:
        self.calls["get"] += 1
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.calls["get_range"] += 1
        return super().get_range(key, offset, length)


def test_restore_reads_long_ranges_in_output_order(
    st: Store, tmp_store: str, tmp_path: Path
) -> None:
    m = model(6, blocks=200)
    st.save(m, block_size=BS)
    backend = CountingBackend(tmp_store)
    with Store.from_backend(backend, workers=2) as reader:
        reader.restore("latest", tmp_path / "out", format="flat")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == flat(m)
    n_packs = len(pack_paths(tmp_store))
    # One ranged read per pack (spans stop at pack ends), never one per chunk.
    assert backend.calls["get_range"] <= n_packs + 2 < 200


def test_a_chunk_of_the_wrong_length_is_damage(st: Store) -> None:
    st.save(model(7), block_size=BS)
    cid = st.manifest(st.resolve("latest")).tensors[0].chunks[0]
    assert len(st.read_chunk(cid, BS)) == BS
    with pytest.raises(CorruptChunk, match=cid.hex()):
        st.read_chunk(cid, BS - 1)


# ---------------------------------------------------------------------------
# damage: what breaks, and verify names it


def two_checkpoints(st: Store) -> tuple[str, str, dict[str, np.ndarray], dict[str, np.ndarray]]:
    a, b = model(10), model(11)
    ia = st.save(a, block_size=BS, created=1.0).checkpoint_id or ""
    ib = st.save(b, block_size=BS, created=2.0).checkpoint_id or ""
    return ia, ib, a, b


def where(st: Store, cid: bytes) -> tuple[Path, int, int]:
    loc = st.chunks.locate(cid)
    return Path(st.location) / loc.key, loc.offset, loc.length


def test_a_flipped_bit_in_one_chunk_of_a_pack_breaks_only_the_checkpoints_using_it(
    st: Store, tmp_path: Path
) -> None:
    ia, ib, _a, b = two_checkpoints(st)
    victim = st.manifest(ia).tensors[1].chunks[2]
    path, offset, length = where(st, victim)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x10]))
    assert verify(st).ok  # without reading data nothing looks wrong
    r = verify(st, read_data=True)
    assert not r.ok
    [damage] = r.damaged_chunks
    assert damage.chunk == victim.hex()
    assert set(damage.breaks) == {ia} and damage.breaks[ia] == ["b"]
    assert set(r.broken_checkpoints) == {ia}
    with pytest.raises(CorruptChunk, match=victim.hex()):
        st.restore(ia, tmp_path / "a", format="flat")
    # The other checkpoint, whose chunks share the same packs' neighbours, is intact.
    assert restored(st, ib, tmp_path / "b") == flat(b)


def test_a_truncated_pack_is_found_without_reading_data(st: Store, tmp_path: Path) -> None:
    ia, ib, a, _b = two_checkpoints(st)
    victim = st.manifest(ib).tensors[0].chunks[5]
    path, _, _ = where(st, victim)
    in_pack = {e.chunk_id for e in read_trailer(st.backend, path.name).entries}
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = verify(st)
    assert not r.ok
    assert {d.chunk for d in r.damaged_chunks} == {c.hex() for c in in_pack}
    assert all("truncated" in d.reason for d in r.damaged_chunks)
    assert set(r.broken_checkpoints) == {ib}
    with pytest.raises(CorruptChunk):
        st.restore(ib, tmp_path / "b", format="flat")
    assert restored(st, ia, tmp_path / "a") == flat(a)


def test_an_index_naming_a_range_outside_its_pack(st: Store, tmp_store: str) -> None:
    ia, ib, _, b = two_checkpoints(st)
    victim = st.manifest(ia).tensors[0].chunks[0]
    point_outside_its_pack(st, victim)  # ia's index: its entry past its pack's end
    with Store.open(tmp_store) as fresh:
        r = verify(fresh)
        assert [d.chunk for d in r.damaged_chunks] == [victim.hex()]
        assert "outside" in r.damaged_chunks[0].reason
        assert set(r.broken_checkpoints) == {ia}
        with pytest.raises(CorruptChunk, match="outside"):
            fresh.read_chunk(victim)
        m = fresh.manifest(ib)
        assert b"".join(fresh.read_chunk(c) for t in m.tensors for c in t.chunks) == flat(b)


def test_locate_many_answers_as_locate_does(st: Store, tmp_store: str) -> None:
    ia, ib, _, _ = two_checkpoints(st)
    ids = [c for ref in (ib, ia) for t in st.manifest(ref).tensors for c in t.chunks]
    assert st.chunks.locate_many(ids) == [st.chunks.locate(c) for c in ids]
    missing = bytes(16)
    with pytest.raises(CorruptChunk, match=f"chunk {missing.hex()} is missing"):
        st.chunks.locate_many([*ids[:3], missing])
    victim = st.manifest(ia).tensors[0].chunks[0]
    point_outside_its_pack(st, victim)
    with Store.open(tmp_store) as fresh, pytest.raises(CorruptChunk, match="outside"):
        fresh.chunks.locate_many([*ids[:3], victim])


# ---------------------------------------------------------------------------
# S3-like backends: a pack is one create-only PUT


class PutLog(ForwardingBackend):
    """Wraps a backend and records its writes."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.puts: list[str] = []

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.puts.append(key)
        super().put(key, data, durable=durable)

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        self.puts.append(key)
        return super().put_if_absent(key, data, durable=durable)

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        self.puts.append(key)
        return super().compare_and_swap(key, expected, data)

    def sync(self) -> None:
        self.puts.append("<sync>")
        super().sync()


def test_write_order_packs_then_index_then_manifest_then_ref(tmp_store: str) -> None:
    log = PutLog(LocalBackend(tmp_store))
    with Store.from_backend(log, create=True, workers=2, format=2, pack_size=PACK) as s:
        s.save(model(12), block_size=BS)
    writes = [k for k in log.puts if not k.startswith(("locks/", "config"))]
    kinds = [k.split("/", 1)[0] for k in writes]
    first_index = kinds.index("index")
    assert set(kinds[:first_index]) == {"packs", "<sync>"} and kinds[first_index - 1] == "<sync>"
    assert kinds[first_index + 1 :] == ["manifests", "refs"]


# ---------------------------------------------------------------------------
# format-1 stores written by the previous release


@pytest.fixture
def format1_store(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    dest = tmp_path / "format1"
    shutil.copytree(FIXTURES / "format1_store", dest)
    return dest, json.loads((FIXTURES / "format1_expected.json").read_text())


def test_a_format1_store_restores_bit_exactly_and_verifies(
    format1_store: tuple[Path, dict[str, Any]], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    store, expected = format1_store
    p = run_cli("verify", "--store", store, "--read-data", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["ok"] is True
    with Store.open(store) as st:
        assert st.format == 1
        for cid, want in expected["checkpoints"].items():
            out = tmp_path / cid
            assert (
                run_cli(
                    "restore", cid, "--store", store, "--to", out, "--format", "flat"
                ).returncode
                == 0
            )
            got = xxhash.xxh3_128_hexdigest((out / "weights.bin").read_bytes())
            assert got == want["flat"], cid
            tensors = st.load(cid)
            for name, digest in want["tensors"].items():
                assert xxhash.xxh3_128_hexdigest(tensors[name].numpy().tobytes()) == digest
        assert st.resolve("latest") == expected["latest"]
        assert st.resolve("first") == expected["tag_first"]


def test_a_format1_store_stays_format1(
    format1_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    store, expected = format1_store
    with Store.open(store) as st:
        m = st.load("latest")
        arrays = {k: v.numpy().copy() for k, v in m.items()}
        arrays["layers.0.w"][0, :8] += np.float32(1.0)
        r = st.save(arrays)
        assert r.manifest is not None and r.manifest.block_size == 4096  # the series'
        assert not (store / "packs").exists() and not (store / "index").exists()
        assert verify(st, read_data=True).ok
        from apollo_cas.gc import gc
        from apollo_cas.retention import RetentionPolicy

        gc(st, RetentionPolicy(keep_last=1))
        assert verify(st, read_data=True).ok
        assert st.resolve("first") == expected["tag_first"]


# ---------------------------------------------------------------------------
# apollo-cas migrate: format 1 -> 2


def assert_fixture_restores(store: Path, expected: dict[str, Any], tmp_path: Path) -> None:
    with Store.open(store) as st:
        for cid, want in expected["checkpoints"].items():
            out = tmp_path / f"check-{cid}"
            st.restore(cid, out, format="flat")
            assert xxhash.xxh3_128_hexdigest((out / "weights.bin").read_bytes()) == want["flat"]
            shutil.rmtree(out)
        assert verify(st, read_data=True).ok


def test_migrate_dry_run_then_migrate(
    format1_store: tuple[Path, dict[str, Any]], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    store, expected = format1_store
    before = {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    p = run_cli("migrate", "--store", store, "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["dry_run"] and plan["chunks"] == 14 and plan["chunk_objects_deleted"] == 14
    after = {
        str(p): p.read_bytes() for p in store.rglob("*") if p.is_file() and "locks" not in p.parts
    }
    assert after == before
    p = run_cli("migrate", "--store", store, "--json")
    assert p.returncode == 0, p.stderr
    done = json.loads(p.stdout)
    assert done["chunks"] == 14 and done["chunk_objects_deleted"] == 14
    with Store.open(store) as st:
        assert st.format == 2
    assert not any(p.is_file() for p in (store / "chunks").rglob("*"))
    assert pack_paths(store)
    assert_fixture_restores(store, expected, tmp_path)
    again = json.loads(run_cli("migrate", "--store", store, "--json").stdout)
    assert again["chunk_objects_deleted"] == 0 and again["packs_written"] == 0


@pytest.mark.parametrize("point", ["repack-written", "index-written", "chunk-deleted"])
def test_migrate_killed_then_run_again(
    point: str, format1_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """SIGKILLed after its first pack, after its index, or while deleting chunk
    objects: the store stays readable in its format, and a second run finishes."""
    from faults.test_crash import run_ok, run_until

    store, expected = format1_store
    rc = run_until(point, 1, "migrate", "--store", store)
    assert rc == -9
    assert_fixture_restores(store, expected, tmp_path)
    run_ok("migrate", "--store", store)
    with Store.open(store) as st:
        assert st.format == 2
    assert not any(p.is_file() for p in (store / "chunks").rglob("*"))
    assert_fixture_restores(store, expected, tmp_path)


def test_a_long_lived_store_reads_what_another_process_saved_since(
    st: Store, tmp_store: str, tmp_path: Path
) -> None:
    """The index is cached per process: a checkpoint saved by another process
    after this one loaded it must still restore and verify (locate looks again)."""
    st.save(model(20), block_size=BS)
    assert verify(st).ok  # loads the index
    with Store.open(tmp_store) as other:
        newer = other.save(model(21), block_size=BS).checkpoint_id or ""
    assert restored(st, newer, tmp_path / "out") == flat(model(21))
    assert verify(st, read_data=True).ok


class IndexReads(LocalBackend):
    """A local backend that records which index objects it reads (a seam)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.index_reads: list[str] = []

    def get(self, key: str) -> bytes:
        if key.startswith(layout.INDEX_PREFIX):
            self.index_reads.append(key)
        return super().get(key)


def index_keys(root: str) -> set[str]:
    return {f"{layout.INDEX_PREFIX}{p.name}" for p in (Path(root) / "index").iterdir()}


def test_a_long_lived_store_reads_only_the_index_objects_new_since_its_last_save(
    tmp_store: str,
) -> None:
    backend = IndexReads(tmp_store)
    with Store.from_backend(backend, create=True, workers=2) as st:
        st.save(model(50), block_size=BS)
        first = index_keys(tmp_store)
        with Store.open(tmp_store) as other:
            other.save(model(51), block_size=BS)
        theirs = index_keys(tmp_store) - first
        backend.index_reads.clear()
        st.save(model(52), block_size=BS)  # dedups against what the other saved too
        assert set(backend.index_reads) == theirs
        assert st.inventory.index().chunks == PackIndex.load(backend).chunks
        backend.index_reads.clear()
        assert verify(st).ok  # verify reads and checks every index object again
        assert set(backend.index_reads) == index_keys(tmp_store)


def test_a_long_lived_store_sees_the_indexes_gc_replaced(tmp_store: str, tmp_path: Path) -> None:
    from apollo_cas.gc import gc
    from apollo_cas.retention import RetentionPolicy

    with Store.open(tmp_store, create=True, format=2, pack_size=PACK, workers=2) as st:
        for seed in (60, 61, 62):
            st.save(model(seed), block_size=BS, created=float(seed))
        before = index_keys(tmp_store)
        with Store.open(tmp_store) as other:
            gc(other, RetentionPolicy(keep_last=1), grace=0.0, max_unused=0.0)
        assert index_keys(tmp_store) != before  # gc replaced the indexes it read
        latest = st.save(model(63), block_size=BS).checkpoint_id or ""
        fresh = PackIndex.load(LocalBackend(tmp_store))
        assert st.inventory.index().chunks == fresh.chunks
        assert set(st.inventory.index().indexes) == set(fresh.indexes)
        assert restored(st, latest, tmp_path / "out") == flat(model(63))
        assert verify(st, read_data=True).ok


def test_verify_finds_an_index_damaged_after_this_process_read_it(tmp_store: str) -> None:
    with Store.open(tmp_store, create=True, format=2, pack_size=PACK, workers=2) as st:
        st.save(model(70), block_size=BS)
        assert verify(st).ok
        [index] = list((Path(tmp_store) / "index").iterdir())
        index.write_bytes(index.read_bytes()[:-7])
        with pytest.raises(StoreError, match=r"index .* is damaged"):
            verify(st)


def test_a_damaged_index_is_one_clear_error_and_gc_rebuilds_it(
    st: Store, tmp_store: str, tmp_path: Path
) -> None:
    m = model(30)
    cid = st.save(m, block_size=BS).checkpoint_id or ""
    [index] = list((Path(tmp_store) / "index").iterdir())
    index.write_bytes(index.read_bytes()[:-7])
    with Store.open(tmp_store) as fresh, pytest.raises(StoreError, match=r"index .* is damaged"):
        verify(fresh)
    shutil.move(index, tmp_path / "aside")  # what the error's hint says
    from apollo_cas.gc import gc

    with Store.open(tmp_store) as fresh:
        r = gc(fresh, grace=0.0)
        assert r.packs["packs_reindexed"] == len(pack_paths(tmp_store))
        assert verify(fresh, read_data=True).ok
        assert restored(fresh, cid, tmp_path / "out") == flat(m)


def test_cli_gc_dry_run_prints_the_plan(tmp_store: str, run_cli: Callable[..., Any]) -> None:
    with Store.open(tmp_store, create=True, format=2, pack_size=PACK) as s:
        s.save(model(40), block_size=BS, created=1.0)
        s.save(model(41), block_size=BS, created=2.0)
        n = len(pack_paths(tmp_store))
    before = sorted(p.name for p in pack_paths(tmp_store))
    p = run_cli("gc", "--store", tmp_store, "--keep-last", "1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "packs: would delete" in p.stdout and "nothing was deleted" in p.stdout
    assert sorted(p.name for p in pack_paths(tmp_store)) == before
    p = run_cli("gc", "--store", tmp_store, "--keep-last", "1", "--json")
    assert json.loads(p.stdout)["packs"]["packs_deleted"] == n // 2
