"""Every ``APOLLO_CAS_*`` environment variable, read in one place.

Each accessor reads the environment when it is called, not at import: tests
and long-lived processes (a vLLM server) change it between calls. Unset and
empty mean the same (the default). Any other value the variable does not take
is a :class:`~apollo_cas.errors.UsageError` that names the variable and the
values it takes, instead of being ignored or read as something else.
:data:`VARIABLES` is the table docs/DESIGN.md prints (a test keeps the two in
step). The S3 backend (``backends/s3/config.py``) reads the S3 ones through
the ``s3_*`` accessors and applies its own defaults; the test suites' own
variables (``APOLLO_CAS_REQUIRE_S3``, ``APOLLO_CAS_FAULT_*``) are not the
package's and live with the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError
from .manifest import STORE_FORMATS

STORE = "APOLLO_CAS_STORE"
FORMAT = "APOLLO_CAS_FORMAT"
PACK_SIZE = "APOLLO_CAS_PACK_SIZE"
LOCK_TTL = "APOLLO_CAS_LOCK_TTL"
THREADS = "APOLLO_CAS_THREADS"
PROCESSES = "APOLLO_CAS_PROCESSES"
WORKER_WRITES = "APOLLO_CAS_WORKER_WRITES"
DEBUG = "APOLLO_CAS_DEBUG"
NO_PROGRESS = "APOLLO_CAS_NO_PROGRESS"
S3_ENDPOINT = "APOLLO_CAS_S3_ENDPOINT"
S3_CAS = "APOLLO_CAS_S3_CAS"
S3_CONNECT_TIMEOUT = "APOLLO_CAS_S3_CONNECT_TIMEOUT"
S3_READ_TIMEOUT = "APOLLO_CAS_S3_READ_TIMEOUT"
S3_MAX_ATTEMPTS = "APOLLO_CAS_S3_MAX_ATTEMPTS"
S3_MAX_POOL = "APOLLO_CAS_S3_MAX_POOL"

_FORMATS = tuple(str(f) for f in STORE_FORMATS)
_MIN_PACK, _MAX_PACK = 4096, 1 << 30
_FLAG_ON = ("1", "true", "yes", "on")
_FLAG_OFF = ("0", "false", "no", "off")
_FLAG_VALUES = "1/true/yes/on or 0/false/no/off"
S3_CAS_MODES = ("auto", "conditional", "lock")
PROCESS_MODES = ("auto", "0", "1")
WRITE_MODES = ("auto", "mmap", "pwrite")


@dataclass(frozen=True)
class Variable:
    """One variable: its name, the values it takes, its default, what it sets."""

    name: str
    accepted: str
    default: str
    sets: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        STORE,
        "a directory or s3://bucket/prefix",
        "none",
        "the store of CLI commands and vLLM workers",
    ),
    Variable(FORMAT, " or ".join(_FORMATS), "2", "the format of stores created from now on"),
    Variable(
        PACK_SIZE,
        "bytes, 4096 to 1 GiB",
        "64 MiB",
        "the pack size of format-2 stores created from now on",
    ),
    Variable(LOCK_TTL, "seconds, above 0", "1800", "the lease of the locks this process takes"),
    Variable(THREADS, "an integer above 0", "all cores", "threads of save and restore pools"),
    Variable(
        PROCESSES,
        "auto, 0 or 1",
        "auto",
        "restore decoding in worker processes: when large, never, always",
    ),
    Variable(
        WORKER_WRITES,
        "auto, mmap or pwrite",
        "auto",
        "how restore worker processes write outputs: a shared mapping (auto, mmap) or pwrite",
    ),
    Variable(DEBUG, _FLAG_VALUES, "off", "a traceback after an error message"),
    Variable(NO_PROGRESS, _FLAG_VALUES, "off", "no progress bars, even on a terminal"),
    Variable(
        S3_ENDPOINT,
        "a URL with its scheme",
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS",
        "the S3 server",
    ),
    Variable(
        S3_CAS,
        "auto, conditional or lock",
        "auto",
        "how refs are compare-and-swapped on S3 (docs/S3.md)",
    ),
    Variable(S3_CONNECT_TIMEOUT, "seconds, above 0", "5", "S3 connect timeout"),
    Variable(S3_READ_TIMEOUT, "seconds, above 0", "12", "S3 read timeout"),
    Variable(S3_MAX_ATTEMPTS, "an integer above 0", "4", "attempts per S3 request"),
    Variable(S3_MAX_POOL, "an integer above 0", "64", "S3 connections per process"),
)


def _raw(name: str) -> str | None:
    """The variable's value with surrounding blanks removed; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _bad(name: str, value: str, accepted: str) -> UsageError:
    return UsageError(f"{name}={value!r} is not valid", f"give {accepted}, or unset it")


def _positive_int(name: str) -> int | None:
    value = _raw(name)
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise _bad(name, value, "an integer above 0")
    return int(value)


def _positive_seconds(name: str) -> float | None:
    value = _raw(name)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise _bad(name, value, "a number of seconds above 0")
    return seconds


def _flag(name: str) -> bool:
    value = _raw(name)
    if value is None:
        return False
    if value.lower() in _FLAG_ON:
        return True
    if value.lower() in _FLAG_OFF:
        return False
    raise _bad(name, value, _FLAG_VALUES)


def store() -> str | None:
    """``APOLLO_CAS_STORE``: the default store location (the CLI's ``--store`` reads it
    through click's ``envvar``, under the same name). Not stripped, as click does not."""
    return os.environ.get(STORE) or None


def store_format() -> int | None:
    """``APOLLO_CAS_FORMAT``: the format of a store created now, None for the default."""
    value = _raw(FORMAT)
    if value is None:
        return None
    if value not in _FORMATS:
        raise UsageError(
            f"{FORMAT}={value!r} is not a store format",
            f"use one of {', '.join(_FORMATS)}, or unset it",
        )
    return int(value)


def pack_size() -> int | None:
    """``APOLLO_CAS_PACK_SIZE``: the target pack size (bytes) of a format-2 store
    created now (tests and benchmarks use small ones), None for the default."""
    value = _raw(PACK_SIZE)
    if value is None:
        return None
    if not value.isdigit() or not _MIN_PACK <= int(value) <= _MAX_PACK:
        raise UsageError(
            f"{PACK_SIZE}={value!r} is not a pack size",
            "give a number of bytes between 4096 and 1 GiB, or unset it",
        )
    return int(value)


def lock_ttl() -> float | None:
    """``APOLLO_CAS_LOCK_TTL``: the lease (seconds) of the locks this process takes."""
    value = _raw(LOCK_TTL)
    if value is None:
        return None
    try:
        ttl = float(value)
    except ValueError:
        ttl = -1.0
    if not ttl > 0:  # also NaN
        raise UsageError(f"{LOCK_TTL}={value!r} is not a positive number of seconds", "unset it")
    return ttl


def _choice(name: str, modes: tuple[str, ...]) -> str | None:
    """The variable's value, one of ``modes`` (any case), or None when unset."""
    value = _raw(name)
    if value is None:
        return None
    if value.lower() not in modes:
        raise _bad(name, value, ", ".join(modes[:-1]) + " or " + modes[-1])
    return value.lower()


def threads() -> int | None:
    """``APOLLO_CAS_THREADS``: the threads of every pool, None for all cores."""
    return _positive_int(THREADS)


def processes() -> str:
    """``APOLLO_CAS_PROCESSES``: ``auto`` (worker processes for large restores),
    ``0`` (threads only) or ``1`` (processes whenever the backend allows)."""
    return _choice(PROCESSES, PROCESS_MODES) or "auto"


def worker_writes() -> str:
    """``APOLLO_CAS_WORKER_WRITES``: how a restore's worker processes write the outputs,
    ``mmap`` (through a shared mapping; ``auto`` is this for now) or ``pwrite``. An A/B
    knob: on the H200 host 16 processes wrote one tmpfs file at 4.69 GB/s mapped and
    2.81 with pwrite, while on the 2-core CI machine pwrite took half the system CPU
    per byte (benchmarks/probe_shm_writes.py)."""
    return _choice(WORKER_WRITES, WRITE_MODES) or "auto"


def debug() -> bool:
    """``APOLLO_CAS_DEBUG``: print a traceback after an error's message."""
    return _flag(DEBUG)


def no_progress() -> bool:
    """``APOLLO_CAS_NO_PROGRESS``: no progress bars, even when stderr is a terminal."""
    return _flag(NO_PROGRESS)


def s3_endpoint() -> str | None:
    """The S3 endpoint: ``APOLLO_CAS_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3``,
    else ``AWS_ENDPOINT_URL`` (the AWS SDKs' names), else None for AWS itself."""
    for name in (S3_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = _raw(name)
        if value is not None:
            if "://" not in value:
                raise UsageError(
                    f"{name}={value!r} is not a URL",
                    "give the scheme too, for example http://127.0.0.1:8333",
                )
            return value.rstrip("/")
    return None


def s3_cas() -> str | None:
    """``APOLLO_CAS_S3_CAS``: ``auto``, ``conditional`` or ``lock``; None when unset."""
    return _choice(S3_CAS, S3_CAS_MODES)


def s3_connect_timeout() -> float | None:
    """``APOLLO_CAS_S3_CONNECT_TIMEOUT`` in seconds; None for the backend's default."""
    return _positive_seconds(S3_CONNECT_TIMEOUT)


def s3_read_timeout() -> float | None:
    """``APOLLO_CAS_S3_READ_TIMEOUT`` in seconds; None for the backend's default."""
    return _positive_seconds(S3_READ_TIMEOUT)


def s3_max_attempts() -> int | None:
    """``APOLLO_CAS_S3_MAX_ATTEMPTS``: attempts per request; None for the default."""
    return _positive_int(S3_MAX_ATTEMPTS)


def s3_max_pool() -> int | None:
    """``APOLLO_CAS_S3_MAX_POOL``: connections per process; None for the default."""
    return _positive_int(S3_MAX_POOL)
