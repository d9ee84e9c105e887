"""Locks: concurrent saves, dead and foreign lock owners, gc against saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from apollo_cas.errors import StoreLocked
from apollo_cas.gc import gc
from apollo_cas.retention import RetentionPolicy
from apollo_cas.store import Store
from apollo_cas.verify import verify

BS = 64 * 1024

HOLDER = textwrap.dedent("""
    import sys, time
    from apollo_cas.backends import open_backend
    from apollo_cas.locks import Locks
    with Locks(open_backend(sys.argv[1])).hold(sys.argv[2], "test holder", timeout=60):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
    print("released", flush=True)
""")


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "apollo_cas.cli.main", *map(str, args)]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "APOLLO_CAS_STORE"}
    e.update(APOLLO_CAS_NO_PROGRESS="1", APOLLO_CAS_THREADS="2")
    return e


def tensors(seed: int, mib: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.integers(0, 256, mib << 20, dtype=np.uint8),
        "b": rng.standard_normal(4096).astype(np.float32),
    }


def write_model(path: Path, seed: int, mib: int = 4) -> dict[str, np.ndarray]:
    t = tensors(seed, mib)
    save_file(t, str(path))
    return t


def flat_bytes(t: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in t.items()}


def read_back(store: Store, cid: str) -> dict[str, bytes]:
    m = store.manifest(cid)
    return {t.name: b"".join(store.read_chunk(c) for c in t.chunks) for t in m.tensors}


class Holder:
    """A separate process holding a lock of ``kind`` for ``seconds``."""

    def __init__(self, store: str, kind: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, store, kind, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"
        self.since = time.monotonic()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self) -> None:
        """Wait for the release and the process's end."""
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait()


@pytest.fixture
def store_with_one(tmp_path: Path) -> Iterator[tuple[str, str]]:
    root = str(tmp_path / "store")
    with Store.open(root, create=True) as st:
        cid = st.save(tensors(0, 1), block_size=BS).checkpoint_id or ""
    yield root, cid


def lock_files(root: str) -> list[str]:
    d = Path(root) / "locks"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# ---------------------------------------------------------------------------
# concurrent saves


def test_two_processes_saving_to_one_series(
    tmp_path: Path, store_with_one: tuple[str, str]
) -> None:
    """Overlapping cron runs: both checkpoints recorded once, chain intact."""
    root, first = store_with_one
    parent = first
    for rnd in range(3):
        srcs = [tmp_path / f"m{rnd}-{i}.safetensors" for i in range(2)]
        models = [write_model(p, seed=100 * rnd + i, mib=6) for i, p in enumerate(srcs)]
        procs = [
            subprocess.Popen(
                cli("save", p, "--store", root, "--block-size", "64KiB", "--json"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env(),
            )
            for p in srcs
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        ids = [json.loads(out)["checkpoint"] for out, _ in outs]
        assert len(set(ids)) == 2
        with Store.open(root) as st:
            assert len(st.checkpoint_ids()) == 1 + 2 * (rnd + 1)  # nothing twice, nothing lost
            latest = st.latest() or ""
            assert latest in ids
            other = ids[1 - ids.index(latest)]
            assert st.manifest(latest).parent == other
            assert st.manifest(other).parent == parent
            for cid, m in zip(ids, models, strict=True):
                assert read_back(st, cid) == flat_bytes(m)
            parent = latest
    with Store.open(root) as st:
        assert verify(st, read_data=True).ok
    assert lock_files(root) == []


@pytest.mark.parametrize("same_content", [False, True])
def test_a_save_that_loses_the_ref_race(tmp_path: Path, same_content: bool) -> None:
    """Deterministic version of the race: B commits while A is between writing
    its manifest and moving the ref. A re-parents onto B (or, with the same
    content, adds nothing); no orphan copy of A's checkpoint is left."""
    root = str(tmp_path / "s")
    a, b = Store.open(root, create=True), Store.open(root)
    p = a.save(tensors(1, 1), block_size=BS).checkpoint_id or ""
    x = tensors(2, 1)
    y = x if same_content else tensors(3, 1)
    real = a.backend.compare_and_swap
    won: dict[str, str] = {}

    def racing_cas(key: str, expected: bytes | None, data: bytes | None) -> bool:
        if not won and key.startswith("refs/series/"):
            won["b"] = b.save(y, block_size=BS).checkpoint_id or ""
        return real(key, expected, data)

    a.backend.compare_and_swap = racing_cas  # type: ignore[method-assign]
    r = a.save(x, block_size=BS)
    ids = set(a.checkpoint_ids())
    if same_content:
        assert r.unchanged and r.checkpoint_id == won["b"]
        assert ids == {p, won["b"]}
    else:
        assert r.parent == won["b"] and a.manifest(won["b"]).parent == p
        assert ids == {p, won["b"], r.checkpoint_id}
        assert a.latest() == r.checkpoint_id
    assert verify(a, read_data=True).ok


# ---------------------------------------------------------------------------
# stale and foreign locks


def test_a_lock_of_a_sigkilled_process_is_cleared_automatically(
    tmp_path: Path, store_with_one: tuple[str, str]
) -> None:
    root, _ = store_with_one
    h = Holder(root, "exclusive", 600)
    assert len(lock_files(root)) == 1
    with (
        Store.open(root) as st,
        pytest.raises(StoreLocked, match="exclusive lock by pid"),
        st.locks.hold("shared", "probe", timeout=0.5),
    ):
        pass
    h.kill()  # what a crash (OOM killer, power cut of the process) leaves
    assert len(lock_files(root)) == 1
    src = tmp_path / "m.safetensors"
    write_model(src, 7, 1)
    t0 = time.monotonic()
    p = subprocess.run(
        cli("save", src, "--store", root),
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 20  # no waiting for an expiry
    assert lock_files(root) == []
    # Same for a dead save's shared lock and the next gc's exclusive lock.
    h = Holder(root, "shared", 600)
    h.kill()
    with Store.open(root) as st:
        r = gc(st, lock_timeout=5)
        assert r.lock_wait_seconds < 5
    assert lock_files(root) == []


def _foreign_lock(root: str, kind: str, expires_in: float) -> Path:
    now = time.time()
    lock_id = f"{kind[0]}-{'ab' * 16}"
    path = Path(root) / "locks" / lock_id
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "lock_id": lock_id,
                "kind": kind,
                "host": "other-host.example",
                "pid": 4242,
                "start": "1",
                "created": now - 10,
                "expires": now + expires_in,
                "purpose": "gc",
            }
        )
    )
    return path


def test_a_lock_of_another_host_blocks_until_it_expires(store_with_one: tuple[str, str]) -> None:
    root, _ = store_with_one
    _foreign_lock(root, "exclusive", expires_in=2.5)
    t0 = time.monotonic()
    with Store.open(root) as st, st.locks.hold("shared", "save", timeout=30):
        waited = time.monotonic() - t0
    assert 1.5 < waited < 15
    assert lock_files(root) == []


def test_unlock_force_breaks_a_foreign_lock(
    tmp_path: Path, store_with_one: tuple[str, str], run_cli: Callable[..., Any]
) -> None:
    root, _ = store_with_one
    path = _foreign_lock(root, "exclusive", expires_in=3600)
    with (
        Store.open(root) as st,
        pytest.raises(StoreLocked) as exc,
        st.locks.hold("shared", "save", timeout=0.3),
    ):
        pass
    msg = str(exc.value)
    assert "other-host.example" in msg and "apollo-cas unlock" in msg
    p = run_cli("unlock", "--store", root)  # not stale: a plain unlock leaves it
    assert p.returncode == 0 and "removed 0" in p.stdout and "--force" in p.stderr
    assert path.exists()
    p = run_cli("unlock", "--store", root, "--force", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["removed"] == 1
    assert not path.exists()
    src = tmp_path / "m.safetensors"
    write_model(src, 9, 1)
    assert run_cli("save", src, "--store", root).returncode == 0


def test_other_objects_under_locks_are_left_alone(
    store_with_one: tuple[str, str], run_cli: Callable[..., Any]
) -> None:
    """The S3 backend keeps its per-ref CAS locks under locks/cas-*: taking,
    clearing or breaking store locks must not delete them."""
    root, _ = store_with_one
    cas = Path(root) / "locks" / ("cas-" + "0" * 32 + ".1234")
    cas.parent.mkdir(exist_ok=True)
    cas.write_text(json.dumps({"key": "refs/series/default", "owner": "x"}))
    with Store.open(root) as st, st.locks.hold("exclusive", "probe", timeout=5):
        pass
    assert run_cli("unlock", "--store", root, "--force").returncode == 0
    assert cas.exists()


# ---------------------------------------------------------------------------
# gc against saves


def test_gc_sweep_waits_for_a_running_save(store_with_one: tuple[str, str]) -> None:
    root, _ = store_with_one
    with Store.open(root) as st:
        st.chunks.put_block(b"\x01" * 4096)  # something to sweep
        st.chunks.flush()  # format 2: its pack and index, as at the end of a save
        h = Holder(root, "shared", 2.0)  # a save in progress
        r = gc(st, grace=0)
        done = time.monotonic()
        h.wait()
    assert done - h.since > 1.5  # the sweep ran only after the 2 s "save" finished
    assert r.lock_wait_seconds > 1.0 and r.chunks_deleted == 1


def test_a_save_waits_for_the_gc_sweep(store_with_one: tuple[str, str]) -> None:
    root, _ = store_with_one
    h = Holder(root, "exclusive", 2.0)  # gc's sweep in progress
    with Store.open(root) as st:
        r = st.save(tensors(5, 1), block_size=BS)
        done = time.monotonic()
    h.wait()
    assert done - h.since > 1.5 and r.checkpoint_id  # it waited for the 2 s hold


def test_gc_mark_phase_does_not_block_saves(store_with_one: tuple[str, str]) -> None:
    """gc holds no lock while it marks: a save started meanwhile does not wait."""
    root, _ = store_with_one
    with Store.open(root) as st:
        saved: dict[str, float] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "mark" and done == 0:
                t0 = time.monotonic()
                with Store.open(root) as other:
                    other.save(tensors(11, 1), block_size=BS)
                saved["seconds"] = time.monotonic() - t0

        gc(st, progress=progress)
    assert saved["seconds"] < 5


def test_concurrent_save_and_gc_never_lose_a_chunk(tmp_path: Path) -> None:
    """Promise 4 with real processes: a save that re-uses exactly the chunks gc
    is sweeping (the weights went back to an older checkpoint) runs while gc
    forgets that checkpoint. Whatever the interleaving, the new checkpoint
    restores and verify passes."""
    root = str(tmp_path / "store")
    old_src, new_src = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    old = write_model(old_src, 1, 8)
    write_model(new_src, 2, 8)
    rng = np.random.default_rng(0)
    for _ in range(4):
        with Store.open(root, create=True) as st:
            st.save(tensors(2, 8), block_size=BS, created=time.time() - 10, force=True)
            st.save(old, block_size=BS, force=True)  # old's chunks: alive again
            st.save(tensors(2, 8), block_size=BS, force=True)  # ... and garbage after gc
        proc = subprocess.Popen(
            cli("save", old_src, "--store", root, "--block-size", "64KiB", "--force", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        time.sleep(float(rng.uniform(0.0, 0.8)))
        errors: list[BaseException] = []

        def run_gc(errors: list[BaseException] = errors) -> None:
            try:
                with Store.open(root) as st:
                    gc(st, RetentionPolicy(keep_last=1), lock_timeout=60)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=run_gc)
        t.start()
        out, err = proc.communicate(timeout=120)
        t.join(120)
        assert not errors, errors
        assert proc.returncode == 0, err
        cid = json.loads(out)["checkpoint"]
        with Store.open(root) as st:
            report = verify(st, read_data=True)
            assert report.ok, report.to_json()
            # The new checkpoint is the latest whatever the interleaving: kept.
            assert st.latest() == cid
            assert read_back(st, cid) == flat_bytes(old)
