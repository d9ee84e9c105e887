"""Kill a real ``apollo-cas`` with SIGKILL at random instants; fill the disk; take away permission.

Each kill test first times an uninterrupted run of the same command, then
draws kill times uniformly inside that duration, so kills land in start-up,
in the middle of the work and at its end. After every kill:

* ``apollo-cas verify --read-data`` passes (exit 0): every ref names a complete
  manifest and every chunk re-hashes to its name;
* ``latest`` restores bit-exactly to the last *completed* save (the killed
  save's content if its ref had moved, else the previous one);
* a new save (or restore) succeeds;
* restore outputs never look valid when incomplete.

What each kill hit is counted (by what it left in the store) and printed at
the end of the run ("apollo_cas fault injection").

Every test runs on both store formats: format 1 (a chunk per object) and
format 2 (packs of 1 MiB here, so a save writes several, and their index).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from safetensors.numpy import save_file

from apollo_cas import layout
from apollo_cas.store import Store

ITERATIONS = int(os.environ.get("APOLLO_CAS_FAULT_ITERATIONS", "12"))
MODEL_MB = int(os.environ.get("APOLLO_CAS_FAULT_MODEL_MB", "48"))
SEED = int(os.environ.get("APOLLO_CAS_FAULT_SEED", str(int(time.time()) % 100_000)))
BLOCK = "64KiB"
#: Packs small enough that every save of the fault suite writes several.
PACK_SIZE = 1 << 20


@pytest.fixture(autouse=True, params=[1, 2], ids=["format1", "format2"])
def store_format(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The format of the stores this test's commands create (the CLI reads the
    same settings as this process: ``cli_env`` copies the environment)."""
    monkeypatch.setenv("APOLLO_CAS_FORMAT", str(request.param))
    monkeypatch.setenv("APOLLO_CAS_PACK_SIZE", str(PACK_SIZE))
    return int(request.param)


# ---------------------------------------------------------------------------
# running the real command line


def apollo() -> list[str]:
    exe = shutil.which("apollo-cas")
    return [exe] if exe else [sys.executable, "-m", "apollo_cas.cli.main"]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("APOLLO_CAS_STORE", "APOLLO_CAS_DEBUG")}
    env.update(APOLLO_CAS_THREADS="2", APOLLO_CAS_NO_PROGRESS="1")
    return env


def run(
    *args: object, prefix: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *apollo(), *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        check=False,
    )


def run_ok(*args: object) -> subprocess.CompletedProcess[str]:
    p = run(*args)
    assert p.returncode == 0, f"apollo-cas {' '.join(map(str, args))}: {p.stderr}"
    return p


def timed(*args: object) -> float:
    t0 = time.monotonic()
    run_ok(*args)
    return time.monotonic() - t0


def run_killed(at: float, *args: object) -> tuple[bool, float]:
    """Start the command, SIGKILL it after ``at`` seconds. Returns whether the
    kill landed (False: the command had already finished) and how long the
    command ran (its full duration when the kill came too late)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [*apollo(), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
        start_new_session=True,
    )
    try:
        proc.wait(timeout=at)
        return False, time.monotonic() - started
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, at


# ---------------------------------------------------------------------------
# a generated model and its versions


class Weights:
    """A model of about MODEL_MB MiB: float32 matrices, a float16 tensor and an
    odd-sized uint8 tensor (off the block grid). Version ``k`` is either fresh
    random data (every chunk new and stored in full) or the base with each
    32-bit word XORed by a constant (every block changes; deltas against the
    parent pay)."""

    def __init__(self, mb: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        per = max(1, (mb << 20) // 7 // 4 // 1024)
        self.base: dict[str, np.ndarray] = {
            f"layers.{i}.weight": (rng.standard_normal((per, 1024)) * 0.02).astype(np.float32)
            for i in range(6)
        }
        self.base["norm.half"] = (rng.standard_normal(per * 1024) * 0.1).astype(np.float16)
        self.base["vocab.odd"] = rng.integers(0, 256, 100_003, dtype=np.uint8)
        self._digests: dict[tuple[int, bool], str] = {}

    def version(self, k: int, fresh: bool) -> dict[str, np.ndarray]:
        if fresh:
            rng = np.random.default_rng(10_000 + k)
            return {
                n: rng.integers(0, 256, a.nbytes, dtype=np.uint8).view(a.dtype).reshape(a.shape)
                for n, a in self.base.items()
            }
        out = {}
        for n, a in self.base.items():
            word = (
                np.uint8(k * 37 % 251 + 1)
                if a.itemsize == 1
                else np.uint32((k * 0x9E3779B1) & 0x007FFFFF)
            )
            view: Any = a.view(np.uint8 if a.itemsize == 1 else np.uint32)
            out[n] = (view ^ word).view(a.dtype)
        return out

    def write(self, k: int, fresh: bool, path: Path) -> None:
        save_file(self.version(k, fresh), str(path))

    def flat_digest(self, k: int, fresh: bool) -> str:
        """XXH3 of ``weights.bin`` as restore writes it (sorted names, back to back)."""
        key = (k, fresh)
        if key not in self._digests:
            v = self.version(k, fresh)
            h = xxhash.xxh3_128()
            for n in sorted(v):
                h.update(v[n].tobytes())
            self._digests[key] = h.hexdigest()
        return self._digests[key]


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(MODEL_MB)


@pytest.fixture
def rng(fault_stats: dict[str, Counter[str]]) -> random.Random:
    fault_stats.setdefault("seed (APOLLO_CAS_FAULT_SEED)", Counter())[str(SEED)] = 1
    return random.Random(SEED)


# ---------------------------------------------------------------------------
# looking at a store and at restore outputs


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def latest_ref(store: Path) -> str | None:
    p = store / layout.series_key("default")
    return p.read_text().strip() if p.exists() else None


def count_objects(store: Path) -> tuple[int, int, int]:
    """(manifests, chunk objects or packs and indexes, temporaries) on disk."""
    manifests = chunks = tmps = 0
    for dirpath, _, names in os.walk(store):
        for n in names:
            if n.startswith(".tmp-"):
                tmps += 1
            elif "/chunks" in dirpath or "/packs" in dirpath or dirpath.endswith("/index"):
                chunks += 1
            elif dirpath.endswith("manifests"):
                manifests += 1
    return manifests, chunks, tmps


def referenced_chunks(store: Path) -> set[str]:
    with Store.open(store) as st:
        out: set[str] = set()
        for cid in st.checkpoint_ids():
            out |= {c.hex() for c in st.manifest(cid).chunk_ids()}
        return out


def chunks_on_disk(store: Path) -> set[str]:
    """The chunks present: chunk files (format 1), or what the indexes list (format 2)."""
    with Store.open(store) as st:
        return {c.hex() for c in st.inventory.ids()}


def assert_verifies(store: Path) -> None:
    p = run("verify", "--store", store, "--read-data", "--json")
    assert p.returncode == 0, f"verify after a kill: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert json.loads(p.stdout)["ok"] is True


def assert_restores(store: Path, ref: str, digest: str, scratch: Path) -> None:
    """``restore REF --format flat`` gives exactly the expected bytes."""
    out = scratch / f"restore-{time.monotonic_ns()}"
    run_ok("restore", ref, "--store", store, "--to", out, "--format", "flat")
    assert file_digest(out / "weights.bin") == digest, f"{ref} did not restore bit-exactly"
    index = json.loads((out / "weights.json").read_text())
    assert sum(e["size"] for e in index.values()) == (out / "weights.bin").stat().st_size
    shutil.rmtree(out)


def checkpoint_digest(store: Path, cid: str) -> str:
    """The flat digest of a checkpoint, read through the Python API (no subprocess)."""
    with Store.open(store) as st:
        m = st.manifest(cid)
        h = xxhash.xxh3_128()
        for t in sorted(m.tensors, key=lambda t: t.name):
            for c in t.chunks:
                h.update(st.read_chunk(c))
        return h.hexdigest()


# ---------------------------------------------------------------------------
# SIGKILL during save


@pytest.mark.slow
def test_kill_during_save(
    tmp_path: Path, weights: Weights, rng: random.Random, fault_stats: dict[str, Counter[str]]
) -> None:
    stats = fault_stats.setdefault("save killed", Counter())
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    weights.write(0, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK)
    weights.write(1, True, src)
    duration = timed("save", src, "--store", store, "--block-size", BLOCK)
    prev = (1, True)
    for i in range(ITERATIONS):
        version = (i + 2, i % 3 == 0)  # a third of the saves write everything anew
        weights.write(*version, src)
        before_ref = latest_ref(store)
        m0, c0, t0 = count_objects(store)
        killed, ran = run_killed(
            rng.uniform(0, duration), "save", src, "--store", store, "--block-size", BLOCK
        )
        if not killed:  # the window was too wide for this machine's current speed
            duration = ran
        after_ref = latest_ref(store)
        m1, c1, t1 = count_objects(store)
        committed = after_ref != before_ref
        if not killed:
            stats["finished before the kill"] += 1
        elif committed:
            stats["killed after its ref moved"] += 1
        elif m1 > m0:
            stats["killed between manifest and ref"] += 1
        elif c1 > c0 or t1 > t0:
            stats["killed while writing chunks"] += 1
        else:
            stats["killed before writing"] += 1
        assert_verifies(store)
        expected = version if committed else prev
        assert_restores(store, "latest", weights.flat_digest(*expected), tmp_path)
        # The next save of the same weights completes, re-using what the killed one wrote.
        p = run_ok("save", src, "--store", store, "--block-size", BLOCK, "--json")
        cid = json.loads(p.stdout)["checkpoint"]
        assert latest_ref(store) == cid
        assert checkpoint_digest(store, cid) == weights.flat_digest(*version)
        prev = version
    # Whatever the kills left is garbage that gc reclaims.
    run_ok("gc", "--store", store, "--grace", "0s", "--max-unused", "0")
    assert count_objects(store)[2] == 0
    assert chunks_on_disk(store) == referenced_chunks(store)
    assert_verifies(store)
    assert stats["killed while writing chunks"] + stats["killed after its ref moved"] > 0
    assert sum(v for k, v in stats.items() if k.startswith("killed")) >= ITERATIONS // 2


# ---------------------------------------------------------------------------
# SIGKILL during gc


@pytest.mark.slow
def test_kill_during_gc(
    tmp_path: Path,
    weights: Weights,
    rng: random.Random,
    fault_stats: dict[str, Counter[str]],
    store_format: int,
) -> None:
    stats = fault_stats.setdefault(f"gc killed (format {store_format})", Counter())
    store = tmp_path / "store"
    pinned = tmp_path / "pinned.safetensors"
    weights.write(0, True, pinned)
    run_ok("save", pinned, "--store", store, "--block-size", BLOCK, "--tag", "pinned")
    # Two fresh versions saved in turn: after each save, gc --keep-last 1 forgets
    # the other one and sweeps all its chunks (fresh data: nothing shared).
    srcs = [tmp_path / "x.safetensors", tmp_path / "y.safetensors"]
    for k, src in enumerate(srcs, start=1):
        weights.write(k, True, src)
        run_ok("save", src, "--store", store, "--block-size", BLOCK)
    # Start-up and the mark phase (what a dry run does) take most of a gc's time
    # but change nothing; three kills in four are drawn after them, where gc deletes.
    marking = timed("gc", "--store", store, "--keep-last", "1", "--dry-run")
    duration = timed("gc", "--store", store, "--keep-last", "1")
    for i in range(ITERATIONS):
        k = i % 2 + 1
        run_ok("save", srcs[k - 1], "--store", store, "--block-size", BLOCK, "--force")
        m0, c0, _ = count_objects(store)
        start = 0.0 if i % 4 == 0 else min(marking * 0.8, duration * 0.8)
        killed, ran = run_killed(
            rng.uniform(start, duration), "gc", "--store", store, "--keep-last", "1"
        )
        if not killed:
            duration = ran
        m1, c1, _ = count_objects(store)
        if not killed:
            stats["finished before the kill"] += 1
        elif m1 == m0 and c1 == c0:
            stats["killed before deleting"] += 1
        elif c1 == c0:
            stats["killed after forgetting manifests, before the sweep"] += 1
        elif len(chunks_on_disk(store)) > len(referenced_chunks(store)):
            stats["killed during the sweep"] += 1
        else:
            stats["killed after the sweep"] += 1
        assert_verifies(store)
        assert_restores(store, "latest", weights.flat_digest(k, True), tmp_path)
    run_ok("gc", "--store", store, "--keep-last", "1", "--grace", "0s", "--max-unused", "0")
    with Store.open(store) as st:
        assert set(st.checkpoint_ids()) == {st.resolve("pinned"), st.latest()}
    assert chunks_on_disk(store) == referenced_chunks(store)
    assert_restores(store, "pinned", weights.flat_digest(0, True), tmp_path)
    # A new save still works after all that.
    weights.write(99, False, srcs[0])
    run_ok("save", srcs[0], "--store", store, "--block-size", BLOCK)
    assert_verifies(store)
    # In format 2 the sweep deletes a few packs and indexes in milliseconds, so
    # random instants almost never land in it: test_gc_killed_at_each_step and
    # test_gc_killed_during_repack kill it after each of its writes instead.
    assert store_format == 2 or (
        stats["killed during the sweep"]
        + stats["killed after forgetting manifests, before the sweep"]
        > 0
    )


# ---------------------------------------------------------------------------
# SIGKILL during restore


def _output_state(out: Path, fmt: str, valid: dict[str, str]) -> str:
    """Check a restore directory after a kill; returns what it holds.

    ``valid`` maps the digest of each complete output file to a label. Any file
    under a final name must be complete; the index (weights.json) may exist only
    next to a complete weights.bin it describes.
    """
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    finals = {n for n in names if not n.startswith(".tmp-")}
    if fmt == "flat":
        assert finals <= {"weights.bin", "weights.json"}, finals
        if "weights.json" in finals:
            assert "weights.bin" in finals, "weights.json names a weights.bin that is not there"
            index = json.loads((out / "weights.json").read_text())
            assert sum(e["size"] for e in index.values()) == (out / "weights.bin").stat().st_size
        if "weights.bin" in finals:
            label = valid.get(file_digest(out / "weights.bin"))
            assert label is not None, "a half-written weights.bin under its final name"
            return f"{label} {'complete' if 'weights.json' in finals else 'without index'}"
        return "empty"
    assert finals <= {"model.safetensors"}, finals
    if "model.safetensors" in finals:
        label = valid.get(file_digest(out / "model.safetensors"))
        assert label is not None, "a half-written model.safetensors under its final name"
        return f"{label} complete"
    return "empty"


@pytest.mark.slow
def test_kill_during_restore(
    tmp_path: Path, weights: Weights, rng: random.Random, fault_stats: dict[str, Counter[str]]
) -> None:
    stats = fault_stats.setdefault("restore killed", Counter())
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    weights.write(0, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK, "--tag", "a")
    weights.write(1, False, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK, "--tag", "b")
    valid: dict[str, dict[str, str]] = {"flat": {}, "safetensors": {}}
    duration: dict[str, float] = {}
    for fmt in ("flat", "safetensors"):
        for ref in ("a", "b"):
            ref_dir = tmp_path / f"ref-{fmt}-{ref}"
            duration[fmt] = timed(
                "restore", ref, "--store", store, "--to", ref_dir, "--format", fmt
            )
            name = "weights.bin" if fmt == "flat" else "model.safetensors"
            valid[fmt][file_digest(ref_dir / name)] = ref
            shutil.rmtree(ref_dir)
    assert valid["flat"] == {weights.flat_digest(0, True): "a", weights.flat_digest(1, False): "b"}
    outs = {fmt: tmp_path / f"out-{fmt}" for fmt in valid}
    for fmt, out in outs.items():
        run_ok("restore", "a", "--store", store, "--to", out, "--format", fmt)
    current = {"flat": "a", "safetensors": "a"}
    for i in range(ITERATIONS):
        fmt = "flat" if i % 2 == 0 else "safetensors"
        target = "b" if current[fmt] == "a" else "a"  # always replace one checkpoint by another
        killed, _ = run_killed(
            rng.uniform(0, duration[fmt]),
            "restore",
            target,
            "--store",
            store,
            "--to",
            outs[fmt],
            "--format",
            fmt,
        )
        which, _, rest = _output_state(outs[fmt], fmt, valid[fmt]).partition(" ")
        held = "nothing" if which == "empty" else f"{'new' if which == target else 'old'} {rest}"
        stats[f"{fmt}: {'killed' if killed else 'finished'}, left {held}"] += 1
        assert_verifies(store)  # restore never touches the store
        t0 = time.monotonic()
        run_ok("restore", target, "--store", store, "--to", outs[fmt], "--format", fmt)
        duration[fmt] = time.monotonic() - t0  # the next window, at today's load
        assert _output_state(outs[fmt], fmt, valid[fmt]) == f"{target} complete"
        current[fmt] = target
    leftovers = sum(1 for out in outs.values() for p in out.iterdir() if p.name.startswith(".tmp-"))
    stats["temporary files left in output dirs"] += leftovers
    assert sum(v for k, v in stats.items() if "killed" in k) >= ITERATIONS // 3


# ---------------------------------------------------------------------------
# SIGKILL at named points
#
# Random instants rarely hit the short steps between "all chunks written" and
# "process exits". These runs kill the real command line at each step of the
# protocol instead: a wrapper runs apollo-cas in a process that SIGKILLs itself
# when it reaches the step (a backend call patched to die before or after the
# real call).

KILLER = r"""
import os, signal, sys
from pathlib import Path
from apollo_cas.backends import local
point, after = sys.argv[1], int(sys.argv[2])
seen = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def reached():
    seen[0] += 1
    return seen[0] >= after

B = local.LocalBackend
if point == "lock-written":
    real_put = B.put
    def put(self, key, data, *, durable=True):
        real_put(self, key, data, durable=durable)
        if key.startswith("locks/"):
            die()
    B.put = put
elif point == "half-a-chunk":
    real_atomic = local.write_file_atomic
    real_by_digest = local.write_file_by_digest
    def half(final, chunks):
        tmp = local.temp_path(Path(final))  # as the real write names it
        data = b"".join(bytes(c) for c in chunks)
        tmp.write_bytes(data[: len(data) // 2])
        die()
    def atomic(path, chunks, *, sync_dir=True):
        if "chunks" in Path(path).parts and reached():
            half(path, chunks)
        real_atomic(path, chunks, sync_dir=sync_dir)
    def by_digest(directory, path_for, chunks, *, sync_dir=True):  # packs
        if reached():
            half(Path(directory) / "by-digest", chunks)
        return real_by_digest(directory, path_for, chunks, sync_dir=sync_dir)
    local.write_file_atomic = atomic
    local.write_file_by_digest = by_digest
elif point == "chunks-synced":
    real_sync = B.sync
    def sync(self):
        real_sync(self)
        # format 2: the packs are durable, their index not yet written
        if any(Path(self.root).glob("chunks/*/*")) or any(Path(self.root).glob("packs/*/*")):
            die()
    B.sync = sync
elif point == "index-written":
    real_atomic = local.write_file_atomic
    def atomic(path, chunks, *, sync_dir=True):
        real_atomic(path, chunks, sync_dir=sync_dir)
        if "index" in Path(path).parts and reached():
            die()
    local.write_file_atomic = atomic
elif point == "repack-written":
    real_by_digest = local.write_file_by_digest
    def by_digest(directory, path_for, chunks, *, sync_dir=True):  # packs
        final = real_by_digest(directory, path_for, chunks, sync_dir=sync_dir)
        if reached():
            die()
        return final
    local.write_file_by_digest = by_digest
elif point in ("manifest-written", "ref-moved"):
    real_cas = B.compare_and_swap
    def cas(self, key, expected, data):
        if key.startswith("refs/series/"):
            if point == "manifest-written":
                die()
            ok = real_cas(self, key, expected, data)
            die()
        return real_cas(self, key, expected, data)
    B.compare_and_swap = cas
elif point in ("manifest-deleted", "chunk-deleted", "index-deleted"):
    real_delete = B.delete
    prefix = {
        "manifest-deleted": ("manifests/",),
        "chunk-deleted": ("chunks/", "packs/"),
        "index-deleted": ("index/",),
    }[point]
    def delete(self, key):
        real_delete(self, key)
        if key.startswith(prefix) and reached():
            die()
    B.delete = delete
elif point == "index-pending":
    from apollo_cas.targets import files
    real_index = files.write_file_atomic
    def index(path, chunks, *, sync_dir=True):
        die()
    files.write_file_atomic = index
else:
    raise SystemExit("unknown point " + point)
from apollo_cas.cli.main import cli, run
sys.exit(run(cli, sys.argv[3:]))
"""


def run_until(point: str, after: int, *args: object) -> int:
    p = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(after), *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    return p.returncode


SAVE_POINTS = {
    # point: (after how many hits in format 1, in format 2, does the ref move?)
    "lock-written": (1, 1, False),
    "half-a-chunk": (40, 3, False),  # format 2: the third pack is cut short
    "chunks-synced": (1, 1, False),  # format 2: packs durable, no index yet
    "index-written": (0, 1, False),  # format 2 only: index durable, no manifest yet
    "manifest-written": (1, 1, False),
    "ref-moved": (1, 1, True),
}


@pytest.mark.parametrize("point", sorted(SAVE_POINTS))
def test_save_killed_at_each_step(
    point: str, tmp_path: Path, fault_stats: dict[str, Counter[str]], store_format: int
) -> None:
    after1, after2, moves = SAVE_POINTS[point]
    after = after1 if store_format == 1 else after2
    if after == 0:
        pytest.skip(f"format {store_format} has no step {point!r}")
    weights = Weights(8, seed=1)
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    weights.write(0, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK)
    before = latest_ref(store)
    weights.write(1, point != "half-a-chunk", src)
    rc = run_until(
        point, after, "save", src, "--store", store, "--block-size", BLOCK, "--tag", "new"
    )
    assert rc == -signal.SIGKILL
    fault_stats.setdefault("save killed at", Counter())[f"{point} (format {store_format})"] += 1
    assert (latest_ref(store) != before) == moves
    assert not (store / layout.tag_key("new")).exists()  # tags come after the ref
    assert_verifies(store)
    expected = (1, point != "half-a-chunk") if moves else (0, True)
    assert_restores(store, "latest", weights.flat_digest(*expected), tmp_path)
    # The next run of the same save succeeds (a stale lock is no obstacle).
    p = run_ok("save", src, "--store", store, "--block-size", BLOCK, "--tag", "new", "--json")
    cid = json.loads(p.stdout)["checkpoint"]
    assert checkpoint_digest(store, cid) == weights.flat_digest(1, point != "half-a-chunk")
    assert (store / layout.tag_key("new")).read_text().strip() == cid
    if point == "manifest-written":  # the orphan manifest is a complete checkpoint
        with Store.open(store) as st:
            assert len(st.checkpoint_ids()) == 3


@pytest.mark.parametrize(
    ("point", "after"),
    [
        ("lock-written", 1),
        ("manifest-deleted", 1),
        ("chunk-deleted", 1),
        ("chunk-deleted", 100),
        ("index-deleted", 1),
    ],
)
def test_gc_killed_at_each_step(
    point: str,
    after: int,
    tmp_path: Path,
    fault_stats: dict[str, Counter[str]],
    store_format: int,
) -> None:
    if store_format == 2 and (point, after) == ("chunk-deleted", 100):
        pytest.skip("format 2 deletes a few packs, not 100 chunk objects")
    if store_format == 1 and point == "index-deleted":
        pytest.skip("format 1 has no index objects")
    weights = Weights(8, seed=2)
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    for k in range(3):
        weights.write(k, True, src)
        run_ok("save", src, "--store", store, "--block-size", BLOCK)
    rc = run_until(point, after, "gc", "--store", store, "--keep-last", "1")
    assert rc == -signal.SIGKILL
    fault_stats.setdefault("gc killed at", Counter())[
        f"{point} #{after} (format {store_format})"
    ] += 1
    assert_verifies(store)
    assert_restores(store, "latest", weights.flat_digest(2, True), tmp_path)
    run_ok("gc", "--store", store, "--keep-last", "1", "--grace", "0s", "--max-unused", "0")
    with Store.open(store) as st:
        assert st.checkpoint_ids() == [st.latest()]
    assert chunks_on_disk(store) == referenced_chunks(store)
    weights.write(3, False, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK)
    assert_verifies(store)


@pytest.mark.parametrize(
    "point", ["repack-written", "index-written", "index-deleted", "chunk-deleted"]
)
def test_gc_killed_during_repack(
    point: str, tmp_path: Path, fault_stats: dict[str, Counter[str]], store_format: int
) -> None:
    """Format 2: gc copies the live chunks of half-dead packs into new packs,
    writes their index, then replaces the old indexes and deletes the old packs.
    Killed after any of those writes, the store verifies and restores, and the
    next gc finishes the job."""
    if store_format == 1:
        pytest.skip("format 1 has no packs to repack")
    weights = Weights(8, seed=4)
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    weights.write(0, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK)
    # Half the tensors change: every pack of the first save keeps about half its chunks.
    v = weights.version(0, True)
    fresh = weights.version(1, True)
    for name in sorted(v)[::2]:
        v[name] = fresh[name]
    save_file(v, str(src))
    cid = json.loads(run_ok("save", src, "--store", store, "--block-size", BLOCK, "--json").stdout)[
        "checkpoint"
    ]
    digest = checkpoint_digest(store, cid)
    rc = run_until(point, 1, "gc", "--store", store, "--keep-last", "1", "--max-unused", "0")
    assert rc == -signal.SIGKILL
    fault_stats.setdefault("gc killed during repack at", Counter())[point] += 1
    assert_verifies(store)
    assert checkpoint_digest(store, cid) == digest
    assert_restores(store, "latest", digest, tmp_path)
    run_ok("gc", "--store", store, "--keep-last", "1", "--grace", "0s", "--max-unused", "0")
    assert chunks_on_disk(store) == referenced_chunks(store)
    assert_verifies(store)
    assert_restores(store, "latest", digest, tmp_path)


def test_restore_killed_before_its_index(
    tmp_path: Path, fault_stats: dict[str, Counter[str]]
) -> None:
    """Killed after weights.bin is in place, before weights.json is written: the
    directory must not look like a valid restore of either checkpoint."""
    weights = Weights(8, seed=3)
    store, src, out = tmp_path / "store", tmp_path / "model.safetensors", tmp_path / "out"
    weights.write(0, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK, "--tag", "old")
    weights.write(1, True, src)
    run_ok("save", src, "--store", store, "--block-size", BLOCK)
    run_ok("restore", "old", "--store", store, "--to", out, "--format", "flat")
    rc = run_until(
        "index-pending", 1, "restore", "latest", "--store", store, "--to", out, "--format", "flat"
    )
    assert rc == -signal.SIGKILL
    fault_stats.setdefault("restore killed at", Counter())["index-pending"] += 1
    assert not (out / "weights.json").exists()  # the old index went first
    assert file_digest(out / "weights.bin") == weights.flat_digest(1, True)
    run_ok("restore", "latest", "--store", store, "--to", out, "--format", "flat")
    assert file_digest(out / "weights.bin") == weights.flat_digest(1, True)
    assert (out / "weights.json").exists()


# ---------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 20 MiB tmpfs, or None where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if p.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _random_model(path: Path, mib: int, seed: int) -> str:
    data = np.random.default_rng(seed).integers(0, 256, mib << 20, dtype=np.uint8)
    save_file({"w": data}, str(path))
    return xxhash.xxh3_128_hexdigest(data.tobytes())


def test_disk_full(
    tmp_path: Path,
    small_fs: Path | None,
    fault_stats: dict[str, Counter[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stats = fault_stats.setdefault("disk full", Counter())
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    small_digest = _random_model(small, 6, 1)
    _random_model(big, 30, 2)  # random bytes do not compress: cannot fit in 20 MiB
    if small_fs is None:
        _disk_full_injected(tmp_path, small, big, small_digest, monkeypatch, capsys)
        stats["ENOSPC injected in-process (mount not permitted)"] += 1
        return
    store = small_fs / "store"
    first = json.loads(
        run_ok("save", small, "--store", store, "--block-size", BLOCK, "--json").stdout
    )["checkpoint"]
    p = run("save", big, "--store", store, "--block-size", BLOCK)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: no space left")
    assert "apollo-cas gc" in p.stderr  # says what to do
    stats["save on a full 20 MiB tmpfs: exit 1, one line"] += 1
    assert latest_ref(store) == first
    assert_verifies(store)
    assert_restores(store, "latest", small_digest, tmp_path)
    # A restore into the full filesystem fails cleanly: nothing under a final name.
    out = small_fs / "out"
    p = run("restore", "--store", store, "--to", out, "--format", "flat")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no space left" in p.stderr
    assert not (out / "weights.bin").exists() and not (out / "weights.json").exists()
    stats["restore into a full tmpfs: exit 1, one line, no partial output"] += 1
    # gc reclaims the failed save's chunks; then saves work again.
    gc = json.loads(
        run_ok("gc", "--store", store, "--grace", "0s", "--max-unused", "0", "--json").stdout
    )
    assert gc["chunks_deleted"] > 0
    assert chunks_on_disk(store) == referenced_chunks(store)
    _random_model(small, 6, 3)
    run_ok("save", small, "--store", store, "--block-size", BLOCK)
    assert_verifies(store)
    assert_restores(store, first, small_digest, tmp_path)


def _disk_full_injected(
    tmp_path: Path,
    small: Path,
    big: Path,
    small_digest: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Fallback: the same checks with ENOSPC raised by the local backend's writes
    once 20 MiB have been written (the CLI runs in-process)."""
    from apollo_cas.backends import local
    from apollo_cas.cli.main import cli
    from apollo_cas.cli.main import run as cli_run

    store = tmp_path / "store"
    assert cli_run(cli, ["save", str(small), "--store", str(store), "--block-size", BLOCK]) == 0
    first = latest_ref(store)
    real, real_by_digest = local.write_file_atomic, local.write_file_by_digest
    budget = {"left": 20 << 20}

    def take(path: Path, chunks: list[Any]) -> None:
        size = sum(len(c) for c in chunks)
        if size > budget["left"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        budget["left"] -= size

    def full_disk(path: Path, chunks: list[Any], *, sync_dir: bool = True) -> None:
        take(path, chunks)
        real(path, chunks, sync_dir=sync_dir)

    def full_disk_packs(
        directory: Path, path_for: Any, chunks: list[Any], *, sync_dir: bool = True
    ) -> Path:
        take(directory, chunks)
        return real_by_digest(directory, path_for, chunks, sync_dir=sync_dir)

    monkeypatch.setattr(local, "write_file_atomic", full_disk)
    monkeypatch.setattr(local, "write_file_by_digest", full_disk_packs)
    capsys.readouterr()
    assert cli_run(cli, ["save", str(big), "--store", str(store), "--block-size", BLOCK]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left")
    monkeypatch.setattr(local, "write_file_atomic", real)
    monkeypatch.setattr(local, "write_file_by_digest", real_by_digest)
    assert latest_ref(store) == first
    assert_verifies(store)
    assert_restores(store, "latest", small_digest, tmp_path)


# ---------------------------------------------------------------------------
# no permission


def _unprivileged() -> tuple[tuple[str, ...], str] | None:
    """A command prefix that runs apollo-cas without root's powers, and how.

    Preferably as ``nobody``; where nobody cannot run this Python (it lives under
    a 0700 /root), as root without the capabilities that bypass file modes.
    """
    probe = [*apollo(), "--version"]
    for prefix, how in (
        (("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"), "nobody"),
        (("setpriv", "--reuid=nobody", "--regid=nobody", "--clear-groups"), "nobody"),
        (("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"), "no-caps"),
    ):
        if shutil.which(prefix[0]) is None:
            continue
        p = subprocess.run([*prefix, *probe], capture_output=True, check=False, env=cli_env())
        if p.returncode == 0:
            return prefix, how
    return None


def test_permission_denied(tmp_path: Path, fault_stats: dict[str, Counter[str]]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to set up a store another user cannot read")
    how = _unprivileged()
    if how is None:
        pytest.skip("cannot drop privileges here (no setpriv)")
    prefix, mode = how
    stats = fault_stats.setdefault("permission denied", Counter())
    # A world-traversable parent (pytest's tmp dirs are 0700) holding the store.
    parent = Path(tempfile.mkdtemp(prefix="apollo-perm-"))
    try:
        parent.chmod(0o755)
        src = parent / "model.safetensors"
        digest = _random_model(src, 1, 5)
        src.chmod(0o644)
        store = parent / "store"
        run_ok("save", src, "--store", store, "--block-size", BLOCK)
        if mode == "no-caps":  # root-owned is root's own: hand it to another uid
            for p in [store, *store.rglob("*")]:
                os.chown(p, 54321, 54321, follow_symlinks=False)
        store.chmod(0o700)
        before = {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()}
        for args in (
            ("list",),
            ("verify", "--read-data"),
            ("save", src, "--force"),
            ("restore", "--to", parent / "out"),
            ("gc",),
        ):
            r = run(*args, "--store", store, prefix=prefix)
            assert r.returncode == 1, (args, r.stderr)
            assert r.stderr.count("\n") == 1, r.stderr
            assert r.stderr.startswith("error: permission denied"), r.stderr
            stats[f"{args[0]} on a 0700 store ({mode}): exit 1, one line"] += 1
        # Readable but not writable: reading and verifying work, a save is refused,
        # nothing changes.
        store.chmod(0o755)
        for f in store.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        assert run("list", "--store", store, prefix=prefix).returncode == 0
        r = run("verify", "--store", store, "--read-data", "--json", prefix=prefix)
        assert r.returncode == 0, r.stderr  # it cannot take its lock, and says so
        assert json.loads(r.stdout)["locked"] is False
        r = run("save", src, "--store", store, "--force", prefix=prefix)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert "permission denied" in r.stderr
        stats[f"save to a read-only store ({mode}): exit 1, one line"] += 1
        after = {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()}
        assert after == before
        assert_restores(store, "latest", digest, tmp_path)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
