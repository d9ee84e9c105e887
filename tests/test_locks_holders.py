"""Who holds a lock, and when it may be removed (issue 11 items 1, 13, 18).

* A lock of a process in another pid namespace (a container on the same host,
  same hostname) or another boot is *foreign*: its pid means nothing here, so
  it counts until its lease expires. Locks written without the namespace
  fields (older versions) are judged the same way.
* A lock object with a field this version does not know is a newer writer's
  lock, not damage: it is read and respected. An object that cannot be read
  at all counts (as the kind its name says) until it has not been rewritten
  for a TTL.
* Releasing a lock never replaces the error that ended the block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apollo_cas import procinfo
from apollo_cas.backends import Backend
from apollo_cas.backends.base import ObjectInfo
from apollo_cas.backends.local import LocalBackend
from apollo_cas.errors import BackendUnavailable, StoreLocked
from apollo_cas.gc import gc
from apollo_cas.locks import Locks
from apollo_cas.store import Store
from tests.backends.wrappers import ForwardingBackend

BS = 4096
LINUX_PROC = os.path.isdir("/proc/self/ns") and bool(procinfo.current().boot_id)


def lock_files(root: Path) -> list[str]:
    d = root / "locks"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "store"
    with Store.open(r, create=True) as st:
        st.save({"w": np.arange(4 * BS, dtype=np.uint8)}, block_size=BS)
    return r


def write_lock(root: Path, kind: str, **fields: object) -> Path:
    """A lock object as another process wrote it: this host, a dead pid, an hour of lease."""
    me = procinfo.current()
    lock_id = f"{kind[0]}-{'cd' * 16}"
    now = time.time()
    d: dict[str, object] = {
        "lock_id": lock_id,
        "kind": kind,
        "host": me.host,
        "pid": 2**22 + 11,  # above the default pid_max: no such process here
        "start": "12345",
        "created": now - 5,
        "expires": now + 3600,
        "purpose": "save default",
        "boot_id": me.boot_id,
        "pid_ns": me.pid_ns,
    }
    d.update(fields)
    for k in [k for k, v in d.items() if v is None]:
        del d[k]
    path = root / "locks" / lock_id
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(d))
    return path


def blocked(root: Path, kind: str = "shared") -> bool:
    """Whether taking a ``kind`` lock now fails for a conflict."""
    try:
        with Locks(LocalBackend(root)).hold(kind, "probe", timeout=0.2):
            return False
    except StoreLocked:
        return True


# ---------------------------------------------------------------------------
# item 1: pid namespaces and boots


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc")
@pytest.mark.parametrize(
    "where",
    [
        {"pid_ns": "pid:[4026530001]"},  # another container on this host
        {"boot_id": "00000000-0000-4000-8000-000000000000"},  # before a reboot, or a twin host
        {"boot_id": None, "pid_ns": None},  # written by an older apollo_cas
    ],
    ids=["other-pid-namespace", "other-boot", "old-format"],
)
def test_a_lock_whose_pid_cannot_be_judged_here_counts_until_it_expires(
    root: Path, where: dict[str, object]
) -> None:
    path = write_lock(root, "exclusive", **where)
    with Store.open(root) as st:
        assert st.locks.clear_stale() == 0  # `apollo-cas unlock` leaves it
        assert path.exists()
        assert blocked(root)  # a save waits for it
        with pytest.raises(StoreLocked):
            gc(st, lock_timeout=0.3)
    assert path.exists()
    # Once its lease has run out it is stale like any foreign lock.
    d = json.loads(path.read_text())
    d["expires"] = time.time() - 1
    path.write_text(json.dumps(d))
    assert not blocked(root)
    assert not path.exists()


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc")
def test_a_dead_holder_of_this_namespace_is_still_cleared_at_once(root: Path) -> None:
    path = write_lock(root, "exclusive")  # same host, boot and namespace; pid gone
    assert not blocked(root)
    assert not path.exists()


HOLDER = textwrap.dedent("""
    import json, sys, time
    from apollo_cas.backends.local import LocalBackend
    from apollo_cas import procinfo
    from apollo_cas.locks import Locks
    with Locks(LocalBackend(sys.argv[1])).hold(sys.argv[2], "holder in a container", timeout=30):
        print(json.dumps(procinfo.current().__dict__), flush=True)
        sys.stdin.readline()
""")


def unshare_pid() -> list[str] | None:
    """A command prefix that runs a process in a new pid namespace, if permitted here."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = [exe, "--pid", "--fork", "--mount-proc", "--kill-child"]
    p = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if p.returncode == 0 else None


@pytest.fixture
def container() -> list[str]:
    prefix = unshare_pid()
    if prefix is None:
        pytest.skip("cannot create a pid namespace here (needs unshare and privileges)")
    return prefix


class InContainer:
    """A real process holding a store lock from inside its own pid namespace."""

    def __init__(self, prefix: list[str], root: Path, kind: str) -> None:
        env = {**os.environ, "APOLLO_CAS_LOCK_TTL": "3600"}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", HOLDER, str(root), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.me = json.loads(self.proc.stdout.readline())

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


@pytest.fixture
def holder(container: list[str], root: Path) -> Iterator[InContainer]:
    h = InContainer(container, root, "shared")
    yield h
    if h.proc.poll() is None:
        h.proc.kill()
        h.proc.wait()


def test_a_save_in_another_pid_namespace_keeps_its_lock_against_gc(
    holder: InContainer, root: Path
) -> None:
    """The data-loss case of item 1: a save in a container (same hostname,
    another pid namespace) holds its shared lock; gc must not judge it by a pid
    that means nothing here, delete it and sweep."""
    assert holder.me["pid_ns"] != procinfo.current().pid_ns
    assert holder.me["host"] == procinfo.current().host
    [name] = lock_files(root)
    with Store.open(root) as st:
        st.chunks.put_block(b"\x01" * BS)  # something gc would sweep
        st.chunks.flush()  # format 2: in a pack and its index, as by a save's end
        assert st.locks.clear_stale() == 0
        with pytest.raises(StoreLocked, match="shared lock by pid"):
            gc(st, grace=0, lock_timeout=1.0)
    assert lock_files(root) == [name]
    holder.release()
    assert lock_files(root) == []
    with Store.open(root) as st:
        assert gc(st, grace=0, lock_timeout=5).chunks_deleted == 1


# ---------------------------------------------------------------------------
# item 13: lock objects of newer writers, and unreadable ones


def test_a_lock_with_a_field_this_version_does_not_know_is_respected(root: Path) -> None:
    me = procinfo.current()
    # A live exclusive holder (this very process, as a newer version would
    # record it) with an extra field.
    path = write_lock(
        root, "exclusive", pid=me.pid, start=me.start, lease_version=2, fencing_token=17
    )
    with Store.open(root) as st:
        [lk] = st.locks.all()
        assert lk.kind == "exclusive" and lk.pid == me.pid
        assert st.locks.clear_stale() == 0
    assert blocked(root)  # a save does not walk past the exclusive holder
    assert path.exists()


def test_an_unreadable_lock_counts_until_it_has_not_been_rewritten_for_a_ttl(root: Path) -> None:
    path = root / "locks" / ("e-" + "ef" * 16)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x00\x01 not json from this version")
    assert blocked(root)
    assert path.exists()
    old = time.time() - 2 * 3600
    os.utime(path, (old, old))
    assert not blocked(root)
    assert not path.exists()


# ---------------------------------------------------------------------------
# item 18: the lock's cleanup never masks the error that ended the block


class DiesAfter(ForwardingBackend):
    """A backend whose server "dies" after ``n`` chunk writes (chunk objects in
    format 1, packs in format 2): every call fails then."""

    def __init__(self, inner: Backend, n: int) -> None:
        super().__init__(inner)
        self.left, self.dead = n, False

    def _check(self, what: str, key: str) -> None:
        if self.dead:
            raise BackendUnavailable(f"cannot reach the server while {what} {key}")

    def get(self, key: str) -> bytes:
        self._check("reading", key)
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._check("reading", key)
        return super().get_range(key, offset, length)

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._check("writing", key)
        if key.startswith(("chunks/", "packs/")):
            self.left -= 1
            if self.left < 0:
                self.dead = True
                self._check("writing", key)
        super().put(key, data, durable=durable)

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        self._check("checking", key)
        if self.inner.exists(key):
            return False
        self.put(key, data, durable=durable)
        return True

    def exists(self, key: str) -> bool:
        self._check("checking", key)
        return super().exists(key)

    def info(self, key: str) -> ObjectInfo:
        self._check("inspecting", key)
        return super().info(key)

    def delete(self, key: str) -> None:
        self._check("deleting", key)
        super().delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        self._check("listing", prefix)
        return super().list(prefix)

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        self._check("updating", key)
        return super().compare_and_swap(key, expected, data)

    def sync(self) -> None:
        self._check("syncing", "")
        super().sync()


@pytest.mark.parametrize("fmt,written", [(1, "chunks/"), (2, "packs/")])
def test_the_error_of_a_dead_server_names_the_write_not_the_lock_cleanup(
    tmp_path: Path, fmt: int, written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store this save creates, in the format under test.
    monkeypatch.setenv("APOLLO_CAS_FORMAT", str(fmt))
    monkeypatch.setenv("APOLLO_CAS_PACK_SIZE", str(BS))  # format 2: a pack per block
    backend = DiesAfter(LocalBackend(tmp_path / "store"), 3)
    st = Store(backend, workers=1)
    data = np.random.default_rng(5).integers(0, 256, 16 * BS, dtype=np.uint8)
    with pytest.raises(BackendUnavailable) as exc:
        st.save({"w": data}, block_size=BS)
    assert f"writing {written}" in str(exc.value), str(exc.value)
    assert "locks/" not in str(exc.value)


def test_lock_objects_stay_readable_and_safe_for_older_versions(root: Path) -> None:
    """Older versions delete a lock with any key they do not know, and judge a
    lock of their own hostname by its pid: new locks carry exactly the old keys,
    and a host an old reader does not recognise (so it waits for the lease)."""
    with Locks(LocalBackend(root)).hold("shared", "save") as lease:
        d = json.loads((root / "locks" / lease.lock_id).read_bytes())
        legacy = {"lock_id", "kind", "host", "pid", "start", "created", "expires", "purpose"}
        assert set(d) == legacy
        if LINUX_PROC:
            me = procinfo.current()
            assert d["host"] == f"{me.host} boot={me.boot_id} pidns={me.pid_ns}"
            [lk] = Locks(LocalBackend(root)).all()
            assert (lk.host, lk.boot_id, lk.pid_ns) == (me.host, me.boot_id, me.pid_ns)
