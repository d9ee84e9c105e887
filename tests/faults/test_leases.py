"""Freeze a real ``apollo-cas save`` (SIGSTOP) past its lease while gc runs, then resume it.

The save runs in its own pid namespace (``unshare --pid``: a container on the
same host, same hostname), so gc cannot judge it by pid and must wait for its
lease, which ``APOLLO_CAS_LOCK_TTL`` makes a few seconds long. The save stops
itself right after syncing its chunks, before its commit (the wrapper below
patches the backend's ``sync``, as the named-step kills of test_crash.py do);
gc then takes the expired lock and sweeps; SIGCONT resumes the save.

* The save found every chunk present (its weights went back to a checkpoint
  that gc forgets): its chunks are swept; on resuming it must not commit
  (exit 1, one line, ``latest`` unchanged, the store verifies).
* The save wrote new chunks: they are young, gc's grace window keeps them; on
  resuming the save takes its lock again, finds them and commits (exit 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from apollo_cas import procinfo
from apollo_cas.locks import Locks
from apollo_cas.store import Store

from .test_crash import cli_env, run, run_ok

TTL = 4.0

STOPPER = r"""
import os, signal, sys
from apollo_cas.backends import local
real_sync = local.LocalBackend.sync
def sync(self):
    real_sync(self)
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen: every thread, the lease renewal too
local.LocalBackend.sync = sync
from apollo_cas.cli.main import cli, run
sys.exit(run(cli, sys.argv[1:]))
"""


def container_prefix() -> list[str]:
    exe = shutil.which("unshare")
    prefix = [exe or "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if exe is None or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("cannot create a pid namespace here (needs unshare and privileges)")
    return prefix


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class FrozenSave:
    """``apollo-cas save`` in its own pid namespace, stopped before its commit."""

    def __init__(self, *args: object) -> None:
        env = {**cli_env(), "APOLLO_CAS_LOCK_TTL": str(TTL)}
        # sh is the namespace's init (pid 1 ignores the SIGSTOP it sends itself).
        script = f'{sys.executable} -c "$0" "$@"; exit $?'
        self.proc = subprocess.Popen(
            [*container_prefix(), "sh", "-c", script, STOPPER, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "stopping", (line, self.proc.stderr and self.proc.stderr.read())
        self.pid = self._stopped_python()

    def _stopped_python(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for pid in descendants(self.proc.pid):
                if procinfo.process_state(pid) == "T":
                    return pid
            time.sleep(0.01)
        raise AssertionError("the save never stopped")

    def resume(self) -> tuple[int, str]:
        os.kill(self.pid, signal.SIGCONT)
        _, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.integers(0, 256, 1 << 20, dtype=np.uint8), "b": rng.random(999)}


def frozen_save_then_gc(store: Path, src: Path, *gc_args: str) -> tuple[int, str]:
    save = FrozenSave("save", src, "--store", store, "--block-size", "64KiB")
    try:
        with Store.open(store) as st:
            [lock] = st.locks.all()
            assert lock.pid_ns != procinfo.current().pid_ns  # foreign: judged by its lease
            assert Locks(st.backend).clear_stale() == 0  # its lease still runs
        gc = run_ok("gc", "--store", store, "--json", *gc_args)  # waits for the lease, sweeps
        assert json.loads(gc.stdout)["lock_wait_seconds"] > 0.5  # it waited for the lease
        return save.resume()
    finally:
        save.kill()


def test_a_frozen_save_whose_chunks_were_swept_does_not_commit(tmp_path: Path) -> None:
    container_prefix()
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    save_file(weights(1), str(src))
    run_ok("save", src, "--store", store, "--block-size", "64KiB")
    save_file(weights(2), str(src))
    latest = json.loads(run_ok("save", src, "--store", store, "--json").stdout)["checkpoint"]
    save_file(weights(1), str(src))  # back to the first: every chunk is present, then swept
    rc, err = frozen_save_then_gc(store, src, "--keep-last", "1")
    assert rc == 1, err
    assert err.count("\n") == 1 and "removed meanwhile by gc" in err, err
    with Store.open(store) as st:
        assert st.latest() == latest and st.checkpoint_ids() == [latest]
    assert json.loads(run_ok("verify", "--store", store, "--read-data", "--json").stdout)["ok"]
    run_ok("save", src, "--store", store, "--block-size", "64KiB")  # rerun: writes them anew
    assert json.loads(run_ok("verify", "--store", store, "--read-data", "--json").stdout)["ok"]


def test_a_frozen_save_keeps_its_young_chunks_and_commits(tmp_path: Path) -> None:
    container_prefix()
    store, src = tmp_path / "store", tmp_path / "model.safetensors"
    save_file(weights(1), str(src))
    run_ok("save", src, "--store", store, "--block-size", "64KiB")
    fresh = weights(3)
    save_file(fresh, str(src))
    rc, err = frozen_save_then_gc(store, src)
    assert rc == 0, err
    assert json.loads(run_ok("verify", "--store", store, "--read-data", "--json").stdout)["ok"]
    out = tmp_path / "out"
    run_ok("restore", "--store", store, "--to", out, "--format", "flat")
    index = json.loads((out / "weights.json").read_text())
    data = (out / "weights.bin").read_bytes()
    for name, arr in fresh.items():
        e = index[name]
        assert data[e["offset"] : e["offset"] + e["size"]] == arr.tobytes()
    assert run("gc", "--store", store, "--grace", "0s").returncode == 0
