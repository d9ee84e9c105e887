"""The backend contract on a real S3 server (SeaweedFS started by the tests), both
compare-and-swap paths, and S3's own failure modes: missing bucket, wrong or
missing credentials, no permission, unreachable or hung endpoints."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from s3server import BUCKET, S3Server

from apollo_cas.backends import Backend, open_backend
from apollo_cas.backends.s3 import CAS_LOCK_PREFIX, S3Backend, parse_s3_url
from apollo_cas.errors import (
    ApolloError,
    BackendError,
    BackendUnavailable,
    ObjectNotFound,
    PermissionDenied,
    StoreLocked,
    StoreNotFound,
    UsageError,
)

from .contract import HEX_A, HEX_B, REPO, BackendContract
from .s3faults import ANSWER_LOST, NOT_SENT, FaultyTransport

pytestmark = pytest.mark.s3


class TestS3Backend(BackendContract):
    """The contract with the path the server supports (conditional writes on SeaweedFS)."""

    @pytest.fixture
    def location(self, s3_location: str) -> str:
        return s3_location

    @pytest.fixture
    def make_backend(self, location: str) -> Iterator[Callable[[], Backend]]:
        made: list[Backend] = []

        def make() -> Backend:
            b = open_backend(location)
            made.append(b)
            return b

        yield make
        for b in made:
            b.close()


class TestS3BackendLockProtocol(TestS3Backend):
    """The contract again with the lock-object protocol that servers without
    conditional writes get (forced through the environment, so the subprocesses
    of the multi-process test use it too)."""

    @pytest.fixture
    def location(self, s3_location: str, monkeypatch: pytest.MonkeyPatch) -> str:
        monkeypatch.setenv("APOLLO_CAS_S3_CAS", "lock")
        return s3_location

    # Only what the lock protocol changes runs twice; plain reads and writes do
    # not depend on it (and CI time is short).
    test_missing_key_is_object_not_found = None  # type: ignore[assignment]
    test_put_get_replace = None  # type: ignore[assignment]
    test_put_accepts_memoryview_and_non_durable = None  # type: ignore[assignment]
    test_binary_values_empty_and_large = None  # type: ignore[assignment]
    test_put_is_atomic_for_readers = None  # type: ignore[assignment]
    test_get_range = None  # type: ignore[assignment]
    test_list_by_prefix = None  # type: ignore[assignment]
    test_delete_is_idempotent = None  # type: ignore[assignment]
    test_info = None  # type: ignore[assignment]

    def test_uses_lock_objects(self, backend: Backend) -> None:
        assert isinstance(backend, S3Backend)
        assert backend.cas_method == "lock"


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def s3(s3_location: str) -> Iterator[S3Backend]:
    b = S3Backend.from_url(s3_location)
    yield b
    b.close()


def raw_client(server: S3Server) -> Any:
    return server.client()


def object_names(server: S3Server, prefix: str) -> list[str]:
    """Every object under ``prefix`` as the server lists it (lock objects included)."""
    listing = raw_client(server).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for obj in listing.get("Contents", [])]


def lock_object_name(backend: S3Backend, key: str, owner: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{backend.prefix}{CAS_LOCK_PREFIX}{digest}.{owner}"


# ---------------------------------------------------------------------------
# configuration and URLs


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_url("s3://my.bucket-1/ckpt") == ("my.bucket-1", "ckpt/")
    for bad in ("s3://", "s3:///x", "s3://b", "s3://bucket/a/../b", "s3://bucket/a//b", "x://b"):
        with pytest.raises(UsageError):
            parse_s3_url(bad)


def test_s3_configuration_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoint precedence, region default; constructing a backend makes no request."""
    for var in ("APOLLO_CAS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    b = S3Backend.from_url("s3://bucket/p")
    assert b.endpoint is None and b.region == "us-east-1" and b.location == "s3://bucket/p/"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-endpoint:1")
    assert S3Backend.from_url("s3://bucket").endpoint == "http://aws-endpoint:1"
    monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", "http://ours:2/")
    assert S3Backend.from_url("s3://bucket").endpoint == "http://ours:2"
    monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", "ours:2")
    with pytest.raises(UsageError, match="scheme"):
        S3Backend.from_url("s3://bucket")
    monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", "http://ours:2")
    monkeypatch.setenv("APOLLO_CAS_S3_CAS", "sometimes")
    with pytest.raises(UsageError, match="APOLLO_CAS_S3_CAS"):
        S3Backend.from_url("s3://bucket")


def test_capabilities_are_declared_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compare-and-swap way comes from ``cas_mode`` / ``APOLLO_CAS_S3_CAS``, with
    no request (the endpoint here does not exist); only ``auto`` probes, at the
    first swap. Creates are promised atomic only with conditional writes."""
    monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("APOLLO_CAS_S3_CAS", raising=False)
    auto = S3Backend.from_url("s3://bucket/p").capabilities
    assert (auto.compare_and_swap, auto.atomic_create) == ("auto", False)
    lock = S3Backend.from_url("s3://bucket/p", cas_mode="lock").capabilities
    assert (lock.compare_and_swap, lock.atomic_create) == ("lock", False)
    monkeypatch.setenv("APOLLO_CAS_S3_CAS", "conditional")
    cond = S3Backend.from_url("s3://bucket/p")
    assert (cond.capabilities.compare_and_swap, cond.capabilities.atomic_create) == (
        "conditional",
        True,
    )
    assert cond.cas_method == "conditional"  # declared: no probe, so no request either
    for caps in (auto, lock, cond.capabilities):
        assert caps.shareable_across_processes and caps.files_root is None


def test_boto3_is_not_imported_with_the_package() -> None:
    code = (
        "import sys, apollo_cas, apollo_cas.backends; "
        "from apollo_cas.backends import open_backend; open_backend('memory://'); "
        "sys.exit('boto3' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO).returncode == 0


# ---------------------------------------------------------------------------
# how compare-and-swap works on SeaweedFS


def test_seaweedfs_takes_the_conditional_write_path(s3: S3Backend, s3_server: S3Server) -> None:
    """SeaweedFS 4.x honours If-None-Match / If-Match on PUT and If-Match on
    DELETE: the probe finds that, and leaves no probe object behind."""
    assert s3.cas_method == "conditional"
    raw = object_names(s3_server, s3.prefix)
    assert raw == []


def _race(client: Any, key: str, cond: dict[str, str], threads: int) -> list[int]:
    """``threads`` conditional PUTs of ``key`` at once; returns who succeeded."""
    import botocore.exceptions

    wins: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def put(i: int) -> None:
        barrier.wait()
        try:
            client.put_object(Bucket=BUCKET, Key=key, Body=str(i).encode(), **cond)
            wins.append(i)
        except botocore.exceptions.ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] not in (409, 412):
                errors.append(exc)

    ts = [threading.Thread(target=put, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return wins


def test_seaweedfs_conditional_writes_are_atomic(s3_server: S3Server) -> None:
    """The conditional path is only as good as the server's conditional writes:
    racing PUTs with If-None-Match: * (or If-Match on one ETag) have one winner."""
    client = raw_client(s3_server)
    for condition in ("IfNoneMatch", "IfMatch"):
        for _round in range(3):
            key = f"race/{uuid.uuid4().hex}"
            cond = {"IfNoneMatch": "*"}
            if condition == "IfMatch":
                client.put_object(Bucket=BUCKET, Key=key, Body=b"base")
                cond = {"IfMatch": client.head_object(Bucket=BUCKET, Key=key)["ETag"]}
            wins = _race(client, key, cond, threads=4)
            assert len(wins) == 1, (condition, wins)
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert body == str(wins[0]).encode()
            client.delete_object(Bucket=BUCKET, Key=key)


def test_stale_lock_of_a_dead_writer_expires(
    s3_location: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lock protocol: a lock object left by a crashed writer blocks the ref only
    until it expires (by the server's clock); list never shows it; gc reaps leftovers."""
    b = S3Backend.from_url(s3_location, cas_mode="lock", lock_ttl=1)
    key = "refs/series/default"
    client = raw_client(s3_server)
    dead = lock_object_name(b, key, "dead" + uuid.uuid4().hex[:8])
    client.put_object(Bucket=BUCKET, Key=dead, Body=json.dumps({"pid": 1}).encode())
    leftover = lock_object_name(b, "refs/tags/other", "dead2")
    client.put_object(Bucket=BUCKET, Key=leftover, Body=b"{}")
    assert list(b.list("")) == [] and list(b.list("locks/")) == []

    t0 = time.monotonic()
    assert b.compare_and_swap(key, None, b"m1")
    waited = time.monotonic() - t0
    assert 0.5 < waited < 10, waited
    assert b.get(key) == b"m1"
    # The dead lock was removed by the writer that found it expired.
    names = object_names(s3_server, b.prefix + CAS_LOCK_PREFIX)
    assert names == [leftover]
    assert b.remove_temporaries(time.time() + 60) == 1
    assert object_names(s3_server, b.prefix + CAS_LOCK_PREFIX) == []


def test_live_lock_gives_store_locked(s3_location: str, s3_server: S3Server) -> None:
    b = S3Backend.from_url(s3_location, cas_mode="lock", lock_ttl=60, lock_wait=0.5)
    key = "refs/series/default"
    holder = lock_object_name(b, key, "holder")
    raw_client(s3_server).put_object(Bucket=BUCKET, Key=holder, Body=b"{}")
    t0 = time.monotonic()
    with pytest.raises(StoreLocked) as info:
        b.compare_and_swap(key, None, b"m1")
    assert time.monotonic() - t0 < 10
    assert "locked by another writer" in str(info.value)
    assert holder[len(b.prefix) :] in str(info.value)
    assert not b.exists(key)
    # A live lock is not garbage.
    assert b.remove_temporaries(time.time() + 60) == 0


def test_lock_protocol_and_conditional_writers_see_the_same_values(s3_location: str) -> None:
    conditional = S3Backend.from_url(s3_location)
    locked = S3Backend.from_url(s3_location, cas_mode="lock")
    assert conditional.compare_and_swap("refs/tags/t", None, b"1")
    assert locked.compare_and_swap("refs/tags/t", b"1", b"2")
    assert conditional.get("refs/tags/t") == b"2"


# ---------------------------------------------------------------------------
# objects


def test_list_paginates(s3_location: str) -> None:
    b = S3Backend.from_url(s3_location, list_page_size=2)
    keys = [f"chunks/ab/ab{i:030d}" for i in range(5)]
    for k in keys:
        b.put(k, b"x")
    assert sorted(b.list("chunks/")) == keys


def test_multipart_upload_and_leftover_uploads(s3_location: str, s3_server: S3Server) -> None:
    """Objects above the threshold go up in parts (still atomic: visible on
    completion); uploads a crash left unfinished are aborted by remove_temporaries."""
    mib = 1024 * 1024
    b = S3Backend.from_url(s3_location, multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    data = os.urandom(11 * mib + 5)
    b.put(f"chunks/ab/{HEX_A}", data)
    assert b.get(f"chunks/ab/{HEX_A}") == data
    assert b.put_if_absent(f"chunks/ab/{HEX_B}", data) is True
    assert b.put_if_absent(f"chunks/ab/{HEX_B}", data) is False
    assert b.get_range(f"chunks/ab/{HEX_B}", 6 * mib, 10) == data[6 * mib : 6 * mib + 10]

    client = raw_client(s3_server)
    up = client.create_multipart_upload(Bucket=BUCKET, Key=b.prefix + "chunks/cd/unfinished")
    assert b.remove_temporaries(time.time() - 3600) == 0  # too young
    # An upload younger than the floor may be in flight: even "grace 0" leaves it.
    assert b.remove_temporaries(time.time() + 60) == 0
    b.temporary_floor = 0.0  # as if the floor had passed
    time.sleep(1.1)  # the server's clock (its Date header) counts whole seconds
    assert b.remove_temporaries(time.time() + 60) == 1
    left = client.list_multipart_uploads(Bucket=BUCKET, Prefix=b.prefix).get("Uploads", [])
    assert up["UploadId"] not in [u["UploadId"] for u in left]
    assert sorted(b.list("")) == [f"chunks/ab/{HEX_A}", f"chunks/ab/{HEX_B}"]


def test_many_threads_share_one_backend(s3: S3Backend) -> None:
    """One client, many threads (the store's worker pools): all transfers intact."""
    payloads = {f"chunks/ab/ab{i:030x}": os.urandom(200_000 + i) for i in range(48)}
    errors: list[BaseException] = []

    def work(items: list[tuple[str, bytes]]) -> None:
        try:
            for k, v in items:
                s3.put(k, v)
                assert s3.get(k) == v
        except BaseException as exc:
            errors.append(exc)

    items = list(payloads.items())
    ts = [threading.Thread(target=work, args=(items[i::16],)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert sorted(s3.list("chunks/")) == sorted(payloads)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/../../b", "", "a\\b"])
def test_keys_that_would_escape_are_refused(s3: S3Backend, s3_server: S3Server, key: str) -> None:
    with pytest.raises(BackendError, match="refusing"):
        s3.put(key, b"x")
    with pytest.raises(BackendError, match="refusing"):
        s3.get(key)
    assert object_names(s3_server, s3.prefix) == []


def test_list_prefix_that_would_escape_is_refused(s3: S3Backend) -> None:
    with pytest.raises(BackendError, match="refusing"):
        list(s3.list("../"))


# ---------------------------------------------------------------------------
# failures: one clear error each


def test_missing_bucket(s3_env: dict[str, str]) -> None:
    b = S3Backend.from_url("s3://no-such-bucket-apollo/ckpt")
    with pytest.raises(StoreNotFound) as info:
        b.get("config")
    msg = str(info.value)
    assert "no-such-bucket-apollo" in msg and "does not exist" in msg
    assert "aws s3 mb s3://no-such-bucket-apollo" in msg
    assert "\n" not in msg
    with pytest.raises(StoreNotFound):
        b.exists("config")  # HEAD alone could not tell; the first request checks the bucket


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [("unknown-key", "whatever"), ("apollo-test-admin", "wrong-secret")],
    ids=["unknown-key", "wrong-secret"],
)
def test_wrong_credentials(
    s3_location: str, monkeypatch: pytest.MonkeyPatch, key_id: str, secret: str
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    b = S3Backend.from_url(s3_location)
    with pytest.raises(BackendUnavailable) as info:
        b.put("config", b"x")
    msg = str(info.value)
    assert "rejected the credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert "\n" not in msg


def test_no_credentials(s3_location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    b = S3Backend.from_url(s3_location)
    with pytest.raises(BackendUnavailable, match="no S3 credentials"):
        b.get("config")


def test_read_only_credentials(
    s3_location: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = S3Backend.from_url(s3_location)
    writer.put("config", b"c")
    for k, v in s3_server.env(readonly=True).items():
        monkeypatch.setenv(k, v)
    reader = S3Backend.from_url(s3_location)
    assert reader.get("config") == b"c"
    with pytest.raises(PermissionDenied) as info:
        reader.put("config", b"x")
    assert "access denied" in str(info.value) and "s3:PutObject" in str(info.value)
    with pytest.raises(PermissionDenied):
        reader.compare_and_swap("refs/series/default", None, b"m")
    assert writer.get("config") == b"c"


def test_unreachable_endpoint_fails_within_a_minute(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    b = S3Backend.from_url(f"s3://{BUCKET}/x")
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        b.get("config")
    assert time.monotonic() - t0 < 60
    assert f"127.0.0.1:{port}" in str(info.value) and "APOLLO_CAS_S3_ENDPOINT" in str(info.value)


def test_hung_endpoint_times_out(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections but never answers: bounded by the read
    timeout times the attempts (defaults: 4 x 12 s; shortened here)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # never accepted: the kernel completes handshakes, nobody answers
    try:
        port = listener.getsockname()[1]
        monkeypatch.setenv("APOLLO_CAS_S3_ENDPOINT", f"http://127.0.0.1:{port}")
        b = S3Backend.from_url(f"s3://{BUCKET}/x", read_timeout=0.5, max_attempts=2)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            b.get("config")
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()


def test_errors_are_apollo_errors_with_one_line(s3: S3Backend) -> None:
    with pytest.raises(ObjectNotFound) as info:
        s3.get("manifests/" + HEX_A)
    assert isinstance(info.value, ApolloError) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# compare-and-swap when a request's fate is unknown (faults injected through a
# transport that fails the request before it is sent, or after the real server
# applied it: tests/backends/s3faults.py)


def faulty(location: str, mode: str) -> tuple[S3Backend, FaultyTransport]:
    b = S3Backend.from_url(location, cas_mode=mode, transport=FaultyTransport)
    assert isinstance(b.transport, FaultyTransport)
    return b, b.transport


@pytest.mark.parametrize("mode", ["conditional", "lock"])
def test_cas_write_applied_but_response_lost(s3_location: str, mode: str) -> None:
    """The swap reached the server, the answer did not: read back, counted as done
    (not reported as a lost race, which would make the caller redo its update)."""
    b, faults = faulty(s3_location, mode)
    key = "refs/series/default"
    assert b.compare_and_swap(key, None, b"1")
    faults.fail_next(1, ANSWER_LOST)  # after the server applied the PUT
    assert b.compare_and_swap(key, b"1", b"2") is True
    assert faults.injected == 1
    assert b.get(key) == b"2"
    assert b.compare_and_swap(key, b"1", b"3") is False


@pytest.mark.parametrize("mode", ["conditional", "lock"])
def test_cas_write_never_sent_is_retried(s3_location: str, mode: str) -> None:
    b, faults = faulty(s3_location, mode)
    key = "refs/series/default"
    assert b.compare_and_swap(key, None, b"1")
    faults.fail_next(2, NOT_SENT)
    assert b.compare_and_swap(key, b"1", b"2") is True
    assert faults.injected == 2
    assert b.get(key) == b"2"


def test_cas_gives_up_when_the_server_stays_unreachable(s3_location: str) -> None:
    b, faults = faulty(s3_location, "conditional")
    key = "refs/series/default"
    assert b.compare_and_swap(key, None, b"1")
    faults.fail_next(100, NOT_SENT)
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        b.compare_and_swap(key, b"1", b"2")
    assert b.get(key) == b"1"
