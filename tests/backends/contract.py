"""The contract every backend meets (apollo_cas/backends/base.py), as one test class.

A backend's test module subclasses :class:`BackendContract` and provides two
fixtures: ``make_backend`` (a factory: each call returns a backend on the same
store; for backends that share state across instances, a new instance each
time) and ``location`` (what ``open_backend`` takes, for the multi-process
tests; ``None`` where processes cannot share a store)::

    class TestLocalBackend(BackendContract):
        @pytest.fixture
        def location(self, tmp_path): return str(tmp_path / "store")

        @pytest.fixture
        def make_backend(self, location): return lambda: LocalBackend(location)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apollo_cas import layout
from apollo_cas.backends import Backend
from apollo_cas.backends.base import CAS_METHODS
from apollo_cas.errors import ObjectNotFound
from apollo_cas.hashing import digest_hex

REPO = Path(__file__).resolve().parents[2]

HEX_A = "ab" + "0" * 30
HEX_B = "ab" + "1" * 30
HEX_C = "cd" + "2" * 30


def read_or_none(backend: Backend, key: str) -> bytes | None:
    try:
        return backend.get(key)
    except ObjectNotFound:
        return None


def increment(backend: Backend, key: str) -> int:
    """Add one to the decimal counter at ``key`` through compare_and_swap; returns the tries."""
    tries = 0
    while True:
        tries += 1
        current = read_or_none(backend, key)
        new = str(int(current or b"0") + 1).encode()
        if backend.compare_and_swap(key, current, new):
            return tries


# Run in a subprocess: open the store by location and increment a counter N times.
_INCREMENT_SCRIPT = """
import sys
from apollo_cas.backends import open_backend
from apollo_cas.errors import ObjectNotFound

location, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
backend = open_backend(location)
for _ in range(count):
    while True:
        try:
            current = backend.get(key)
        except ObjectNotFound:
            current = None
        new = str(int(current or b"0") + 1).encode()
        if backend.compare_and_swap(key, current, new):
            break
backend.close()
"""


class BackendContract:
    """Every backend passes these. Subclasses provide ``make_backend`` and ``location``."""

    #: Threads of the concurrent tests; kept small: CI has 2 cores.
    threads = 4
    increments = 5
    processes = 2

    @pytest.fixture
    def location(self) -> str | None:
        return None

    @pytest.fixture
    def make_backend(self) -> Callable[[], Backend]:
        raise NotImplementedError("a backend test class provides make_backend")

    @pytest.fixture
    def backend(self, make_backend: Callable[[], Backend]) -> Iterator[Backend]:
        b = make_backend()
        yield b
        b.close()

    # -- reads of missing keys ----------------------------------------------
    def test_missing_key_is_object_not_found(self, backend: Backend) -> None:
        for call in (
            lambda: backend.get("manifests/" + HEX_A),
            lambda: backend.get_range("manifests/" + HEX_A, 0, 10),
            lambda: backend.info("manifests/" + HEX_A),
        ):
            with pytest.raises(ObjectNotFound) as info:
                call()
            assert isinstance(info.value, FileNotFoundError)
            assert "manifests/" + HEX_A in str(info.value)
        assert not backend.exists("manifests/" + HEX_A)

    # -- put / get ----------------------------------------------------------
    def test_put_get_replace(self, backend: Backend) -> None:
        backend.put("config", b"one")
        assert backend.get("config") == b"one"
        assert backend.exists("config")
        backend.put("config", b"two, longer")
        assert backend.get("config") == b"two, longer"
        backend.put("config", b"3")  # shorter: no tail of the old value survives
        assert backend.get("config") == b"3"

    def test_put_accepts_memoryview_and_non_durable(self, backend: Backend) -> None:
        data = bytearray(b"x" * 1000 + b"y" * 24)
        backend.put(f"chunks/ab/{HEX_A}", memoryview(data)[500:], durable=False)
        backend.sync()
        assert backend.get(f"chunks/ab/{HEX_A}") == bytes(data[500:])

    def test_binary_values_empty_and_large(self, backend: Backend) -> None:
        empty_key, big_key = f"chunks/ab/{HEX_A}", f"chunks/ab/{HEX_B}"
        big = bytes(range(256)) * 16 + os.urandom(3 * 1024 * 1024 + 7)
        backend.put(empty_key, b"")
        backend.put(big_key, big)
        assert backend.get(empty_key) == b""
        assert backend.info(empty_key).size == 0
        assert backend.get(big_key) == big
        assert backend.info(big_key).size == len(big)
        assert backend.get_range(big_key, 1000, 5000) == big[1000:6000]
        assert backend.get_range(empty_key, 0, 10) == b""

    def test_put_is_atomic_for_readers(self, make_backend: Callable[[], Backend]) -> None:
        """Readers racing a writer see the whole old value or the whole new one."""
        writer, reader = make_backend(), make_backend()
        a, b = b"A" * (2 * 1024 * 1024), b"B" * (2 * 1024 * 1024 + 3)
        writer.put("refs/series/default", a)
        stop = threading.Event()
        seen: list[bytes] = []
        errors: list[BaseException] = []

        def write() -> None:
            try:
                i = 0
                while not stop.is_set():
                    writer.put("refs/series/default", b if i % 2 == 0 else a)
                    i += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=write)
        t.start()
        try:
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:
                value = reader.get("refs/series/default")
                assert value in (a, b), f"torn read of {len(value)} bytes"
                seen.append(value[:1])
        finally:
            stop.set()
            t.join()
        assert not errors
        assert seen

    # -- put_if_absent ------------------------------------------------------
    def test_put_if_absent(self, backend: Backend) -> None:
        key = f"chunks/ab/{HEX_A}"
        assert backend.put_if_absent(key, b"payload") is True
        assert backend.put_if_absent(key, b"other") is False
        assert backend.get(key) == b"payload"
        assert backend.put_if_absent(f"manifests/{HEX_B}", memoryview(b"m")) is True
        assert backend.get(f"manifests/{HEX_B}") == b"m"

    def test_put_by_digest_stores_the_pieces_under_their_hash(self, backend: Backend) -> None:
        """A pack goes to the backend as its pieces (envelopes where they lie, then
        the trailer): the object is their concatenation, named by its XXH3-128."""
        big = os.urandom(300_000)
        parts = [b"head", memoryview(big)[1000:250_000], bytearray(b"mid"), b"", b"tail"]
        whole = b"".join(bytes(p) for p in parts)
        pid = backend.put_by_digest(layout.pack_key, parts, durable=False)
        backend.sync()
        assert pid == digest_hex(whole)
        assert backend.get(layout.pack_key(pid)) == whole
        assert list(backend.list("packs/")) == [layout.pack_key(pid)]  # no temporary left
        assert backend.put_by_digest(layout.pack_key, [whole]) == pid  # same bytes, same object
        assert backend.get(layout.pack_key(pid)) == whole
        assert backend.put_by_digest(layout.pack_key, []) == digest_hex(b"")

    def test_put_if_absent_concurrent_writers_of_one_chunk(
        self, make_backend: Callable[[], Backend]
    ) -> None:
        key = f"chunks/cd/{HEX_C}"
        payload = os.urandom(64 * 1024)
        backends = [make_backend() for _ in range(self.threads)]
        results: list[bool] = []
        barrier = threading.Barrier(len(backends))

        def run(b: Backend) -> None:
            barrier.wait()
            results.append(b.put_if_absent(key, payload))

        ts = [threading.Thread(target=run, args=(b,)) for b in backends]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(results) == len(backends)
        assert any(results)  # someone wrote it; a lost race is harmless (same bytes)
        assert backends[0].get(key) == payload

    # -- ranges -------------------------------------------------------------
    def test_get_range(self, backend: Backend) -> None:
        key = f"chunks/ab/{HEX_A}"
        data = bytes(range(200))
        backend.put(key, data)
        assert backend.get_range(key, 0, 10) == data[:10]
        assert backend.get_range(key, 50, 100) == data[50:150]
        assert backend.get_range(key, 190, 100) == data[190:]  # truncated at the end
        assert backend.get_range(key, 199, 1) == data[199:]
        assert backend.get_range(key, 200, 10) == b""  # at the end
        assert backend.get_range(key, 500, 10) == b""  # past the end
        assert backend.get_range(key, 5, 0) == b""

    # -- list ---------------------------------------------------------------
    KEYS = (
        "config",
        f"chunks/ab/{HEX_A}",
        f"chunks/ab/{HEX_B}",
        f"chunks/cd/{HEX_C}",
        f"manifests/{HEX_A}",
        "refs/series/default",
        "refs/series/rank-1",
        "refs/tags/v1",
    )

    def test_list_by_prefix(self, backend: Backend) -> None:
        for k in self.KEYS:
            backend.put(k, k.encode())
        assert sorted(backend.list("")) == sorted(self.KEYS)
        assert sorted(backend.list("chunks/")) == sorted(k for k in self.KEYS if "chunks/" in k)
        assert sorted(backend.list("chunks/ab/")) == [f"chunks/ab/{HEX_A}", f"chunks/ab/{HEX_B}"]
        assert sorted(backend.list("refs/")) == [
            "refs/series/default",
            "refs/series/rank-1",
            "refs/tags/v1",
        ]
        # Prefixes need not end at a '/'.
        assert sorted(backend.list("refs/series/r")) == ["refs/series/rank-1"]
        assert sorted(backend.list("chunks/c")) == [f"chunks/cd/{HEX_C}"]
        assert sorted(backend.list("conf")) == ["config"]
        assert list(backend.list("groups/")) == []
        assert list(backend.list("nothing-here")) == []

    def test_list_shows_no_temporaries_or_internal_objects(self, backend: Backend) -> None:
        """After every kind of write, list shows exactly the keys written."""
        backend.put("config", b"c")
        backend.put(f"chunks/ab/{HEX_A}", b"x", durable=False)
        backend.put_if_absent(f"chunks/ab/{HEX_B}", b"y")
        backend.put_if_absent(f"chunks/ab/{HEX_B}", b"y")
        assert backend.compare_and_swap("refs/series/default", None, b"1")
        assert backend.compare_and_swap("refs/series/default", b"1", b"2")
        assert backend.compare_and_swap("refs/tags/gone", None, b"1")
        assert backend.compare_and_swap("refs/tags/gone", b"1", None)
        backend.sync()
        assert sorted(backend.list("")) == sorted(
            ["config", f"chunks/ab/{HEX_A}", f"chunks/ab/{HEX_B}", "refs/series/default"]
        )
        assert list(backend.list("locks/")) == []

    # -- delete -------------------------------------------------------------
    def test_delete_is_idempotent(self, backend: Backend) -> None:
        key = f"manifests/{HEX_A}"
        backend.put(key, b"m")
        backend.delete(key)
        assert not backend.exists(key)
        backend.delete(key)  # missing: not an error
        backend.delete(f"groups/{HEX_B}")  # never existed, parent missing too
        with pytest.raises(ObjectNotFound):
            backend.get(key)
        assert list(backend.list("manifests/")) == []

    # -- info ---------------------------------------------------------------
    def test_info(self, backend: Backend) -> None:
        before = time.time()
        backend.put(f"manifests/{HEX_A}", b"12345")
        after = time.time()
        info = backend.info(f"manifests/{HEX_A}")
        assert info.size == 5
        # Object stores keep whole seconds and run their own clock.
        assert before - 5 <= info.mtime <= after + 5

    # -- compare and swap ---------------------------------------------------
    def test_compare_and_swap_semantics(self, backend: Backend) -> None:
        key = "refs/series/default"
        assert backend.compare_and_swap(key, None, b"m1") is True  # create
        assert backend.get(key) == b"m1"
        assert backend.compare_and_swap(key, None, b"m2") is False  # exists already
        assert backend.compare_and_swap(key, b"wrong", b"m2") is False
        assert backend.get(key) == b"m1"
        assert backend.compare_and_swap(key, b"m1", b"m2") is True
        assert backend.get(key) == b"m2"
        assert backend.compare_and_swap(key, b"m2", b"m2") is True  # same value: fine
        assert backend.compare_and_swap(key, b"m1", None) is False  # stale delete
        assert backend.get(key) == b"m2"
        assert backend.compare_and_swap(key, b"m2", None) is True  # delete
        assert not backend.exists(key)
        assert backend.compare_and_swap(key, b"m2", b"m3") is False  # gone
        assert not backend.exists(key)
        # A -> B -> A: compare-and-swap compares values, so A swaps again.
        assert backend.compare_and_swap(key, None, b"A")
        assert backend.compare_and_swap(key, b"A", b"B")
        assert backend.compare_and_swap(key, b"B", b"A")
        assert backend.compare_and_swap(key, b"A", b"C")
        assert backend.get(key) == b"C"

    def test_compare_and_swap_delete_if_absent(self, backend: Backend) -> None:
        """expected=None, data=None on a key (and directory) that never existed: done."""
        assert backend.compare_and_swap("refs/tags/never", None, None) is True
        assert not backend.exists("refs/tags/never")
        assert list(backend.list("refs/")) == []

    def test_compare_and_swap_empty_and_binary_values(self, backend: Backend) -> None:
        key = "refs/tags/binary"
        blob = bytes(range(256)) * 4
        assert backend.compare_and_swap(key, None, b"")
        assert backend.get(key) == b""
        assert backend.compare_and_swap(key, None, blob) is False  # b"" exists, is not None
        assert backend.compare_and_swap(key, b"", blob)
        assert backend.get(key) == blob
        assert backend.compare_and_swap(key, blob, b"")
        assert backend.get(key) == b""

    def test_concurrent_compare_and_swap_from_threads(
        self, make_backend: Callable[[], Backend]
    ) -> None:
        """Each thread has its own backend object (own connections): no lost update."""
        key = "refs/series/counter"
        backends = [make_backend() for _ in range(self.threads)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(backends))

        def run(b: Backend) -> None:
            try:
                barrier.wait()
                for _ in range(self.increments):
                    increment(b, key)
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=run, args=(b,)) for b in backends]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        assert int(backends[0].get(key)) == self.threads * self.increments

    def test_concurrent_compare_and_swap_shared_object(self, backend: Backend) -> None:
        """Threads sharing one backend object: no lost update either."""
        key = "refs/series/shared"
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for _ in range(self.increments):
                    increment(backend, key)
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=run) for _ in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        assert int(backend.get(key)) == self.threads * self.increments

    def test_concurrent_compare_and_swap_from_processes(
        self, location: str | None, make_backend: Callable[[], Backend]
    ) -> None:
        """Several processes, plus a thread here, increment one counter: no lost update."""
        if location is None:
            pytest.skip("this backend's stores live in one process")
        key = "refs/series/counter-mp"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _INCREMENT_SCRIPT, location, key, str(self.increments)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(self.processes)
        ]
        here = make_backend()
        for _ in range(self.increments):
            increment(here, key)
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode(errors="replace")[-3000:]
        assert int(here.get(key)) == (self.processes + 1) * self.increments

    # -- what the backend declares ----------------------------------------
    def test_capabilities_are_declared(self, backend: Backend, location: str | None) -> None:
        """Callers above ``backends/`` read these flags, never the type or the URL,
        so each must hold: shareable exactly where another process can open the
        location, and ``files_root`` a directory holding each key as a file."""
        caps = backend.capabilities
        assert caps.compare_and_swap in CAS_METHODS
        assert caps.shareable_across_processes == (location is not None)
        if caps.files_root is not None:
            backend.put(f"chunks/ab/{HEX_A}", b"as a file")
            assert (Path(caps.files_root) / "chunks" / "ab" / HEX_A).read_bytes() == b"as a file"

    # -- optional hooks -----------------------------------------------------
    def test_sync_close_remove_temporaries(self, make_backend: Callable[[], Backend]) -> None:
        b = make_backend()
        b.put("config", b"c", durable=False)
        b.sync()
        assert b.remove_temporaries(time.time() - 3600) == 0
        assert b.get("config") == b"c"
        b.close()
