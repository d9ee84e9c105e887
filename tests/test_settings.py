"""The APOLLO_CAS_* variables: one reader (apollo_cas.settings), bad values are
usage errors that name the variable and what it takes, and the docs' table is
the module's."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from apollo_cas import settings
from apollo_cas.errors import UsageError
from apollo_cas.parallel import default_workers
from apollo_cas.store import Store

ROOT = Path(__file__).resolve().parent.parent

#: (variable, accessor, a bad value, a word of what it takes)
BAD = [
    (settings.FORMAT, settings.store_format, "3", "1, 2"),
    (settings.FORMAT, settings.store_format, "two", "1, 2"),
    (settings.PACK_SIZE, settings.pack_size, "64MiB", "4096"),
    (settings.PACK_SIZE, settings.pack_size, "100", "4096"),
    (settings.LOCK_TTL, settings.lock_ttl, "-5", "positive"),
    (settings.LOCK_TTL, settings.lock_ttl, "nan", "positive"),
    (settings.LOCK_TTL, settings.lock_ttl, "ten", "positive"),
    (settings.THREADS, settings.threads, "0", "integer above 0"),
    (settings.THREADS, settings.threads, "many", "integer above 0"),
    (settings.THREADS, settings.threads, "2.5", "integer above 0"),
    (settings.PROCESSES, settings.processes, "2", "auto, 0 or 1"),
    (settings.PROCESSES, settings.processes, "yes", "auto, 0 or 1"),
    (settings.WORKER_WRITES, settings.worker_writes, "write", "auto, mmap or pwrite"),
    (settings.DEBUG, settings.debug, "maybe", "true"),
    (settings.NO_PROGRESS, settings.no_progress, "sometimes", "true"),
    (settings.S3_ENDPOINT, settings.s3_endpoint, "10.0.0.5:8333", "scheme"),
    (settings.S3_CAS, settings.s3_cas, "optimistic", "auto, conditional or lock"),
    (settings.S3_CONNECT_TIMEOUT, settings.s3_connect_timeout, "5s", "seconds"),
    (settings.S3_READ_TIMEOUT, settings.s3_read_timeout, "0", "seconds"),
    (settings.S3_MAX_ATTEMPTS, settings.s3_max_attempts, "-1", "integer above 0"),
    (settings.S3_MAX_POOL, settings.s3_max_pool, "lots", "integer above 0"),
]


@pytest.mark.parametrize(("name", "read", "value", "takes"), BAD)
def test_a_bad_value_is_a_usage_error_naming_the_variable_and_what_it_takes(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    read: Callable[[], object],
    value: str,
    takes: str,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError) as err:
        read()
    text = f"{err.value.message} {err.value.hint}"
    assert name in text and repr(value) in text
    assert takes in text


@pytest.mark.parametrize("variable", settings.VARIABLES, ids=lambda v: v.name)
def test_unset_and_empty_mean_the_default(
    monkeypatch: pytest.MonkeyPatch, variable: settings.Variable
) -> None:
    readers: dict[str, Callable[[], object]] = {name: read for name, read, _, _ in BAD}
    readers[settings.STORE] = settings.store
    read = readers[variable.name]
    monkeypatch.delenv(variable.name, raising=False)
    if variable.name == settings.S3_ENDPOINT:  # falls back to the AWS SDKs' names
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    unset = read()
    monkeypatch.setenv(variable.name, "")
    assert read() == unset
    assert unset in (None, False, "auto")


def test_good_values_are_read_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        settings.FORMAT: "1",
        settings.PACK_SIZE: "65536",
        settings.LOCK_TTL: " 4.5 ",
        settings.THREADS: "3",
        settings.PROCESSES: "0",
        settings.WORKER_WRITES: "PWrite",
        settings.DEBUG: "1",
        settings.NO_PROGRESS: "off",
        settings.S3_ENDPOINT: "http://127.0.0.1:8333/",
        settings.S3_CAS: "Lock",
        settings.S3_READ_TIMEOUT: "12",
        settings.S3_MAX_POOL: "8",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert settings.store_format() == 1
    assert settings.pack_size() == 65536
    assert settings.lock_ttl() == 4.5
    assert settings.threads() == 3
    assert default_workers() == 3
    assert settings.processes() == "0"
    assert settings.worker_writes() == "pwrite"
    assert settings.debug() is True
    assert settings.no_progress() is False
    assert settings.s3_endpoint() == "http://127.0.0.1:8333"
    assert settings.s3_cas() == "lock"
    assert settings.s3_read_timeout() == 12.0
    assert settings.s3_max_pool() == 8


def test_a_bad_format_refuses_creating_a_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(settings.FORMAT, "9")
    with pytest.raises(UsageError, match=settings.FORMAT):
        Store.open(tmp_path / "store", create=True).save({})
    assert not (tmp_path / "store" / "config").exists()


def test_the_cli_reports_a_bad_variable_as_a_usage_error(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    for name, value in [(settings.DEBUG, "maybe"), (settings.THREADS, "none")]:
        res = run_cli("list", "--store", tmp_path / "nope", env={name: value})
        assert res.returncode == 2, res.stderr
        [line] = res.stderr.strip().splitlines()
        assert name in line and "Traceback" not in res.stderr


def test_the_design_table_is_the_settings_table() -> None:
    """docs/DESIGN.md lists exactly settings.VARIABLES, with the same values."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    rows = re.findall(r"^\| `(APOLLO_CAS_\w+)` \| (.*?) \| (.*?) \| (.*?) \|$", text, re.M)
    assert rows == [(v.name, v.accepted, v.default, v.sets) for v in settings.VARIABLES]


def test_only_settings_reads_apollo_cas_variables() -> None:
    reads = re.compile(r"(environ\b[^\n]*|getenv\([^\n]*)[\"']APOLLO_CAS_")
    offenders = [
        str(p.relative_to(ROOT / "apollo_cas"))
        for p in sorted((ROOT / "apollo_cas").rglob("*.py"))
        if p.name != "settings.py" and reads.search(p.read_text())
    ]
    assert offenders == []


def test_the_s3_backend_takes_its_variables_from_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backend's client is tuned by the S3 variables, and a bad one is the
    settings' usage error (one rule per variable); constructing makes no request."""
    pytest.importorskip("boto3")
    from apollo_cas.backends.s3 import S3Backend

    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv(settings.S3_ENDPOINT, "http://127.0.0.1:1/")
    monkeypatch.setenv(settings.S3_CAS, " Lock ")
    monkeypatch.setenv(settings.S3_CONNECT_TIMEOUT, "7")
    monkeypatch.setenv(settings.S3_READ_TIMEOUT, "2.5")
    monkeypatch.setenv(settings.S3_MAX_POOL, "8")
    backend = S3Backend.from_url("s3://bucket/p")
    config = backend.transport.client.meta.config
    assert backend.endpoint == "http://127.0.0.1:1" and backend.cas_mode == "lock"
    assert (config.connect_timeout, config.read_timeout) == (7.0, 2.5)
    assert config.max_pool_connections == 8
    backend.close()
    for name, value in [(settings.S3_READ_TIMEOUT, "0"), (settings.S3_MAX_ATTEMPTS, "2.5")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(UsageError) as err:
                S3Backend.from_url("s3://bucket/p")
            assert name in f"{err.value.message} {err.value.hint}"
