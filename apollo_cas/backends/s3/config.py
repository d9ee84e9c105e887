"""Where an S3 store lives and how its client is tuned, read in one place.

The store URL (``s3://bucket/prefix``), the endpoint (``APOLLO_CAS_S3_ENDPOINT``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; none: AWS), the compare-and-swap
mode (``APOLLO_CAS_S3_CAS`` = ``auto`` | ``conditional`` | ``lock``, which all
writers of one store must agree on) and the client's timeouts, attempts and
pool (``APOLLO_CAS_S3_CONNECT_TIMEOUT``, ``APOLLO_CAS_S3_READ_TIMEOUT``,
``APOLLO_CAS_S3_MAX_ATTEMPTS``, ``APOLLO_CAS_S3_MAX_POOL``). Credentials and
region come through boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``; default region ``us-east-1``), so they
are not read here. Also here: how a store key becomes an object name, and which
keys and prefixes are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ... import settings
from ...errors import BackendError, UsageError

#: Objects of the backend's own compare-and-swap machinery (lock objects,
#: capability probes). ``S3Backend.list`` hides them; ``remove_temporaries``
#: reaps the ones a crashed process left behind.
CAS_LOCK_PREFIX = "locks/cas-"

DEFAULT_REGION = "us-east-1"
# Timeouts and attempts are chosen so that an unreachable endpoint fails within
# about a minute, never hangs: refused connections fail at once (4 attempts plus
# at most 7 s of backoff), a black-holed address costs 4 x 5 s, and a server
# that accepts but never answers 4 x 12 s.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 12.0
DEFAULT_MAX_ATTEMPTS = 4
#: Enough connections for the store's upload/download thread pools (a pool per
#: host; requests beyond it wait for a free connection instead of failing).
DEFAULT_MAX_POOL = 64
DEFAULT_LOCK_TTL = 60.0
DEFAULT_MULTIPART_THRESHOLD = 256 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 64 * 1024 * 1024

CAS_MODES = settings.S3_CAS_MODES

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


def endpoint_from_env() -> str | None:
    """The S3 endpoint URL configured in the environment, or None for AWS
    (:func:`apollo_cas.settings.s3_endpoint`; kept under this name because the
    package exports it)."""
    return settings.s3_endpoint()


def cas_mode_from_env(cas_mode: str | None = None) -> str:
    """``cas_mode`` if given (checked), else ``APOLLO_CAS_S3_CAS``, else ``auto``."""
    if not cas_mode:
        return settings.s3_cas() or "auto"
    # An argument is the caller's, not the environment's: the message names the
    # parameter, not the variable (settings checks the variable's own values).
    mode = cas_mode.strip().lower()
    if mode not in CAS_MODES:
        raise UsageError(
            f"unknown S3 compare-and-swap mode {cas_mode!r}",
            f"cas_mode must be {', '.join(CAS_MODES[:-1])} or {CAS_MODES[-1]}",
        )
    return mode


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix/")``."""
    if not url.startswith("s3://"):
        raise UsageError(f"{url!r} is not an s3:// URL", "write s3://bucket or s3://bucket/prefix")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or any(c in url for c in "?#\0\\"):
        raise UsageError(
            f"invalid S3 store URL {url!r}",
            "write s3://bucket or s3://bucket/prefix (bucket: letters, digits, '.', '-', '_')",
        )
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(
            f"invalid prefix in S3 store URL {url!r}",
            "use '/'-separated names without empty, '.' or '..' parts",
        )
    return bucket, (prefix + "/" if prefix else "")


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts, attempts and connection pool of the boto3 clients."""

    connect_timeout: float
    read_timeout: float
    max_attempts: int
    max_pool: int

    @classmethod
    def resolve(
        cls,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
        max_pool_connections: int | None = None,
    ) -> ClientSettings:
        """The arguments given (not None or 0), else the environment (read and
        checked by :mod:`apollo_cas.settings`), else the defaults."""
        return cls(
            connect_timeout or settings.s3_connect_timeout() or DEFAULT_CONNECT_TIMEOUT,
            read_timeout or settings.s3_read_timeout() or DEFAULT_READ_TIMEOUT,
            max_attempts or settings.s3_max_attempts() or DEFAULT_MAX_ATTEMPTS,
            max_pool_connections or settings.s3_max_pool() or DEFAULT_MAX_POOL,
        )


@dataclass(frozen=True)
class Place:
    """One store on one server: the bucket, the prefix ("" or ending in "/"),
    the endpoint (None: AWS) and the region; and how its keys become object names."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def endpoint_desc(self) -> str:
        """The server, as error messages name it."""
        return self.endpoint or f"AWS S3 ({self.region})"

    def object_name(self, key: str) -> str:
        """The object name of ``key``; refuses keys that are not plain relative names."""
        if (
            not isinstance(key, str)
            or not key
            or key.startswith("/")
            or "\0" in key
            or "\\" in key
            or any(part in ("", ".", "..") for part in key.split("/"))
        ):
            raise BackendError(f"refusing key {key!r} outside the store {self.location}")
        return self.prefix + key

    def list_prefix(self, prefix: str) -> str:
        """The object-name prefix that lists keys starting with ``prefix``."""
        parts = prefix.split("/")
        if (
            prefix.startswith("/")
            or "\0" in prefix
            or any(p in ("", ".", "..") for p in parts[:-1])
            or parts[-1] in (".", "..")
        ):
            raise BackendError(f"refusing prefix {prefix!r} outside the store {self.location}")
        return self.prefix + prefix
