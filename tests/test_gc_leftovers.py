"""What gc must leave alone (issue 11 items 2, 14, 15).

* Chunks no manifest names that are younger than the grace window (they may
  belong to a save in flight), with their delta bases.
* Temporaries of writers that still run (a lock being written right now),
  and any temporary younger than a floor whose writer cannot be judged here,
  whatever ``--grace`` says; those of dead writers go at ``--grace 0s``.
* A manifest that vanished between gc's listing and its loading (a save that
  lost the ref race deletes its own) is no damage; one a ref names is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apollo_cas import codecs, layout, procinfo
from apollo_cas.backends.base import TEMPORARY_FLOOR
from apollo_cas.backends.local import LocalBackend, temp_path
from apollo_cas.errors import CorruptManifest
from apollo_cas.gc import gc
from apollo_cas.hashing import digest_hex
from apollo_cas.retention import RetentionPolicy
from apollo_cas.store import Store
from apollo_cas.verify import verify
from tests.damage import chunk_file_range

BS = 4096
POOL = np.random.default_rng(77).integers(0, 256, (8, BS), dtype=np.uint8)


def model(blocks: list[int], poke: int | None = None) -> dict[str, np.ndarray]:
    w = POOL[blocks].copy()
    if poke is not None:
        w[:, poke] ^= 0x5A
    return {"w": w.reshape(-1)}


def chunk_file(root: Path, cid: bytes) -> Path:
    return root / layout.chunk_key(cid.hex())


def stored(st: Store, cid: bytes) -> bool:
    """Whether the store holds ``cid``, in either format (format 2: an index names it)."""
    st.inventory.refresh()
    return cid in st.inventory.ids()


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# ---------------------------------------------------------------------------
# young unreferenced chunks (item 2)


@pytest.mark.parametrize("fmt", [1, 2])
def test_young_unreferenced_chunks_and_their_bases_are_kept(tmp_path: Path, fmt: int) -> None:
    root = tmp_path / "store"
    with Store.open(root, create=True, format=fmt) as st:
        base_id = st.save(model([0, 1, 2]), block_size=BS, created=1.0).checkpoint_id or ""
        st.save(model([3]), block_size=BS, created=2.0)  # the latest
        base = st.manifest(base_id)
        # What a save in flight wrote: deltas against base's chunks, no manifest yet.
        child = model([0, 1, 2], poke=9)
        blocks = [child["w"][i * BS : (i + 1) * BS].tobytes() for i in range(3)]
        young = []
        for raw, parent_chunk in zip(blocks, base.tensors[0].chunks, strict=True):
            b = codecs.Base(chunk_id=parent_chunk, raw=lambda c=parent_chunk: st.read_chunk(c))
            young.append(st.chunks.put_block(raw, 1, base=b))
        st.chunks.flush()  # format 2: its pack and index written, as a save does before its manifest
        deltas = [r.chunk_id for r in young if r.base is not None]
        if not deltas:
            pytest.skip("this codec policy stored no deltas")
        old_orphan = st.chunks.put_block(b"\x42" * BS).chunk_id
        st.chunks.flush()  # format 2: a pack of its own, aged below
        age(chunk_file_range(st, old_orphan)[0], 7200)
        r = gc(st, RetentionPolicy(keep_last=1))  # forgets base: its chunks are candidates
        assert base_id in r.forgotten
        assert r.young_chunks_kept >= 2 * len(deltas)
        for d in deltas:
            assert stored(st, d)
            # ... and the chunk it is a delta against, though its manifest is gone
            assert stored(st, st.chunks.base_of(d) or b"")
        assert not stored(st, old_orphan)  # an old leftover goes
        for d, raw in zip(young, blocks, strict=True):
            assert st.read_chunk(d.chunk_id) == raw
        assert gc(st, grace=0).young_chunks_kept == 0  # without a window they go too
        assert not any(stored(st, d) for d in deltas)
        assert verify(st, read_data=True).ok


@pytest.mark.parametrize("fmt", [1, 2])
def test_dry_run_counts_what_the_grace_window_keeps(tmp_path: Path, fmt: int) -> None:
    root = tmp_path / "store"
    with Store.open(root, create=True, format=fmt) as st:
        st.save(model([0]), block_size=BS)
        st.chunks.put_block(b"\x01" * BS)
        st.chunks.flush()  # format 2: in a pack and its index, as by a save's end
        dry = gc(st, dry_run=True)
        assert dry.chunks_deleted == 0 and dry.young_chunks_kept == 1
        assert dry.to_json()["young_chunks_kept"] == 1
        assert gc(st, dry_run=True, grace=0).chunks_deleted == 1


# ---------------------------------------------------------------------------
# temporaries (item 15)

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from apollo_cas.backends.local import write_file_atomic

    class Paused(list):
        # The body of a lock object, written in two pieces with a pause between:
        # a process stalled in the middle of writing its lock.
        def __iter__(self):
            yield b'{"partial": '
            print("writing", flush=True)
            sys.stdin.readline()
            yield b'1}'

    write_file_atomic(Path(sys.argv[1]), Paused())
    print("written", flush=True)
""")


def test_gc_grace_0_leaves_the_temporary_of_a_lock_being_written(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    root = tmp_path / "store"
    with Store.open(root, create=True) as st:
        st.save(model([0]), block_size=BS)
    (root / "locks").mkdir(exist_ok=True)
    target = root / "locks" / ("s-" + "12" * 16)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "writing"
        [tmp] = [p for p in (root / "locks").iterdir() if p.name.startswith(".tmp-")]
        age(tmp, 10)  # older than any grace 0 can see
        p = run_cli("gc", "--store", root, "--grace", "0s", "--json")
        assert p.returncode == 0, p.stderr
        assert tmp.exists(), "gc removed the temporary of a lock being written"
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "written"
    assert target.read_bytes() == b'{"partial": 1}'


def _named(directory: Path, token: str) -> Path:
    p = directory / f".tmp-{token}-0badf00d-{'ab' * 16}"
    p.write_bytes(b"half a chunk")
    return p


@pytest.fixture
def chunk_dir(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    with Store.open(tmp_path / "store", create=True) as st:
        st.save(model([0]), block_size=BS)
        d = tmp_path / "store" / "chunks" / "ab"
        d.mkdir(parents=True, exist_ok=True)
        yield st, d


@pytest.mark.skipif(not procinfo.current().boot_id, reason="needs Linux /proc")
def test_temporaries_by_writer(chunk_dir: tuple[Store, Path]) -> None:
    st, d = chunk_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temp_path(d / ("cd" * 16))  # this process: alive
    mine.write_bytes(b"in flight")
    me, _, start = procinfo.tag().split(".")
    gone = _named(d, f"{dead.pid}.{procinfo.tag().split('.')[1]}.1")  # dead writer of here
    reused = _named(d, f"{me}.{procinfo.tag().split('.')[1]}.1")  # our pid, another start
    other_ns = _named(d, f"{me}.00000000.{start}")  # another container / host / boot
    legacy = _named(d, "12345")  # a name of an older version: cannot be judged
    old_foreign = _named(d, "99.00000000.5")
    age(old_foreign, TEMPORARY_FLOOR + 60)
    for p in (mine, gone, reused, other_ns, legacy):
        age(p, 120)  # older than grace 0, younger than the floor
    r = gc(st, grace=0)
    assert r.temporaries_removed == 3
    assert mine.exists() and other_ns.exists() and legacy.exists()
    assert not gone.exists() and not reused.exists() and not old_foreign.exists()
    mine.unlink()


# ---------------------------------------------------------------------------
# manifests that vanish while gc lists them (item 14)


class LosesTheRace(LocalBackend):
    """A directory backend on which, right after gc lists the manifests, a
    concurrent save that lost the ref race deletes the manifest it had written
    (what ``Store._commit`` does when its compare-and-swap fails)."""

    victim: str | None = None

    def list(self, prefix: str) -> Iterator[str]:
        keys = list(super().list(prefix))
        if prefix == layout.MANIFESTS_PREFIX and self.victim is not None:
            super().delete(layout.manifest_key(self.victim))
            self.victim = None
        return iter(keys)


def unreferenced_manifest(st: Store) -> str:
    """A complete manifest no ref names: the loser's, just before it deletes it."""
    m = st.manifest(st.latest() or "")
    data = replace(m, created=m.created + 1).encode()
    cid = digest_hex(data)
    st.backend.put(layout.manifest_key(cid), data)
    return cid


def test_gc_and_list_survive_a_manifest_deleted_by_a_losing_save(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store.open(root, create=True) as st:
        st.save(model([0, 1]), block_size=BS)
        st.save(model([2, 3]), block_size=BS)
        loser = unreferenced_manifest(st)
    backend = LosesTheRace(root)
    racing = Store(backend)
    backend.victim = loser
    assert len(racing.checkpoints()) == 2  # what `list` and `stats` show
    backend.victim = unreferenced_manifest(racing)
    r = gc(racing, grace=0)
    assert backend.victim is None and len(r.kept) == 2
    assert verify(racing, read_data=True).ok


def test_a_missing_manifest_that_a_ref_names_is_still_damage(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store.open(root, create=True) as st:
        st.save(model([0, 1]), block_size=BS)
        tagged = unreferenced_manifest(st)
        st.tag(tagged, "keep")
    backend = LosesTheRace(root)
    backend.victim = tagged
    with pytest.raises(CorruptManifest, match="manifest is missing"):
        gc(Store(backend), grace=0)
