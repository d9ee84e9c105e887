"""A store in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW, R2, ...).

Why boto3: it is the reference client, maintained by AWS, and the one every
S3-compatible server tests against. It talks to any endpoint, signs with the
standard credential chain (environment, profiles, SSO, instance roles), retries
transient errors with jittered exponential backoff, pools connections, and its
clients are thread-safe, so one client serves all worker threads. Multipart
uploads come with it (s3transfer). It is imported only when an ``s3://`` store
is opened, never at package import time.

How the store's promises hold on S3 (see docs/S3.md):

* No rename, but a single PUT is atomic: readers see the old object or the
  whole new one. Chunks and manifests are written once under their final,
  content-derived names, so a crash leaves at worst an unreferenced object
  (garbage for gc), never a torn one, and no temporaries.
* ``put_if_absent`` uses ``If-None-Match: *`` where the server honours it
  (probed once), else HEAD then PUT, which is safe because the same key always
  carries the same bytes.
* Refs change only through :meth:`S3Backend.compare_and_swap`. Where the server
  honours conditional writes (``If-Match`` / ``If-None-Match`` on PUT and
  ``If-Match`` on DELETE; probed once per endpoint and bucket; SeaweedFS 4.x
  does) the swap is one conditional request. Elsewhere a lock protocol like
  restic's serialises writers: each writer creates its own lock object
  ``locks/cas-<key hash>.<owner>``, lists its competitors, and proceeds only
  when it sees none (of several that see each other, the oldest waits and the
  others withdraw); a lock whose holder died expires after ``lock_ttl``
  seconds (judged by the server's clock), and a holder never writes after a
  third of that time.
* Durability: S3 acknowledges a PUT only once it is stored, so every put is
  durable and :meth:`sync` has nothing to do.

Configuration comes from the environment: the endpoint from
``APOLLO_CAS_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (none:
AWS), credentials through boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ...), the
region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or the profile (default
``us-east-1``). ``APOLLO_CAS_S3_CAS`` = ``auto`` | ``conditional`` | ``lock``
overrides the probe (all writers of one store must agree).
``APOLLO_CAS_S3_CONNECT_TIMEOUT``, ``APOLLO_CAS_S3_READ_TIMEOUT``,
``APOLLO_CAS_S3_MAX_ATTEMPTS`` and ``APOLLO_CAS_S3_MAX_POOL`` tune the client.
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import (
    ApolloError,
    BackendError,
    BackendUnavailable,
    ConcurrentUpdate,
    ObjectNotFound,
    PermissionDenied,
    StoreLocked,
    StoreNotFound,
    UsageError,
)
from .base import TEMPORARY_FLOOR, Backend, ObjectInfo

try:  # boto3 is an optional dependency (apollo_cas[s3]); see S3Backend.__init__.
    import boto3
    import boto3.exceptions
    import botocore.exceptions as bexc
    import botocore.session
    from botocore.config import Config
except ImportError:  # pragma: no cover - exercised only without boto3
    boto3 = None

log = logging.getLogger(__name__)

#: Objects of this backend's own CAS machinery (lock objects, capability probes).
#: :meth:`S3Backend.list` hides them; :meth:`S3Backend.remove_temporaries` reaps
#: the ones a crashed process left behind.
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

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_MISSING_ETAG = '"' + "0" * 32 + '"'  # an ETag no object has

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "IncompleteSignature",
    "MissingSecurityHeader",
}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_PRECONDITION = {"PreconditionFailed", "412"}
_CONFLICT = {"ConditionalRequestConflict", "409", "OperationAborted"}
_UNSUPPORTED = {"NotImplemented", "501", "400", "InvalidRequest", "InvalidArgument"}
_INVALID_RANGE = {"InvalidRange", "416"}

# Outcomes of one conditional request.
_OK, _CONFLICTED, _UNKNOWN, _NOT_SENT, _UNSUPPORTED_OUTCOME = (
    "ok",
    "conflict",
    "unknown",
    "not-sent",
    "unsupported",
)


def content_md5(body: bytes) -> str:
    """Content-MD5 for a PUT: the server then refuses a body cut short.

    Without it SeaweedFS (4.48) stores a 0-byte object when the client dies
    after sending the headers, which left empty chunks under their final names
    after a killed save (tests/faults/test_s3_crash.py).
    """
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise UsageError(
            f"{name}={raw!r} is not a number", f"unset {name} or give seconds"
        ) from None


def endpoint_from_env() -> str | None:
    """The S3 endpoint URL configured in the environment, or None for AWS."""
    for var in ("APOLLO_CAS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            if "://" not in value:
                raise UsageError(
                    f"{var}={value!r} is not a URL",
                    "give the scheme too, for example http://127.0.0.1:8333",
                )
            return value.rstrip("/")
    return None


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
class _Capabilities:
    """What the server's conditional requests can be trusted with."""

    if_none_match: bool  # PUT If-None-Match: * refuses to overwrite
    compare_and_swap: bool  # ... and PUT If-Match, DELETE If-Match work too


# One probe per (endpoint, bucket) and process: all backends on it see one server.
_CAPS_CACHE: dict[tuple[str | None, str], _Capabilities] = {}
_CAPS_LOCK = threading.Lock()

# botocore parses its S3 service model (megabytes of JSON) once per session:
# about 0.3 s of CPU for every backend opened. The parsed models are the same
# for every session, so sessions share one loader; credentials, profiles and
# region are still read per session, from the environment at open time.
_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _new_session() -> Any:
    global _LOADER
    core = botocore.session.Session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


class _Lease:
    """A held CAS lock: may be used to write only while young enough."""

    def __init__(self, started: float, ttl: float) -> None:
        self.started = started
        self.ttl = ttl

    def fresh(self) -> bool:
        # A third of the TTL for the read-compare step; the write itself is one
        # request bounded by the connect + read timeouts, well inside the rest.
        return time.monotonic() - self.started < self.ttl / 3


class S3Backend(Backend):
    """Objects under ``prefix`` in ``bucket``; keys map to object names one to one."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        cas_mode: str | None = None,
        max_pool_connections: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_wait: float | None = None,
        list_page_size: int = 1000,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        temporary_floor: float = TEMPORARY_FLOOR,
    ) -> None:
        if boto3 is None:
            raise BackendUnavailable(
                "the S3 backend needs boto3, which is not installed",
                "pip install 'apollo_cas[s3]' (or pip install boto3)",
            )
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.location = f"s3://{bucket}/{self.prefix}"
        self.endpoint = endpoint_url if endpoint_url is not None else endpoint_from_env()
        mode = (cas_mode or os.environ.get("APOLLO_CAS_S3_CAS", "") or "auto").strip().lower()
        if mode not in ("auto", "conditional", "lock"):
            raise UsageError(
                f"unknown S3 compare-and-swap mode {mode!r}",
                "APOLLO_CAS_S3_CAS must be auto, conditional or lock",
            )
        self.cas_mode = mode
        self.lock_ttl = float(lock_ttl)
        self.lock_wait = float(lock_wait) if lock_wait is not None else 2 * self.lock_ttl + 30
        self.list_page_size = int(list_page_size)
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        #: Unfinished uploads younger than this are never aborted (may be in flight).
        self.temporary_floor = float(temporary_floor)

        connect = connect_timeout or _env_float(
            "APOLLO_CAS_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT
        )
        read = read_timeout or _env_float("APOLLO_CAS_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT)
        attempts = max_attempts or int(
            _env_float("APOLLO_CAS_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)
        )
        pool = max_pool_connections or int(_env_float("APOLLO_CAS_S3_MAX_POOL", DEFAULT_MAX_POOL))

        # A Session is not thread-safe but clients are: make both here, once.
        session = _new_session()
        self.region = region or session.region_name or DEFAULT_REGION
        options: dict[str, Any] = {
            "connect_timeout": connect,
            "read_timeout": read,
            "max_pool_connections": pool,
            "tcp_keepalive": True,
            "retries": {"mode": "standard", "total_max_attempts": attempts},
            # Path-style URLs work on every S3-compatible server; virtual hosts
            # need DNS for each bucket, which local servers lack.
            "s3": {"addressing_style": "path" if self.endpoint else "auto"},
        }
        # Chunk ids are hashes of the raw bytes and every read is verified, so
        # transport checksums add nothing; recent botocore sends them by default
        # in aws-chunked form, which several S3-compatible servers reject.
        checksum_opts = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        try:
            config = Config(**options, **checksum_opts)
        except TypeError:  # botocore < 1.36 has neither option, nor the default
            config = Config(**options)
        self._client: Any = session.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, config=config
        )
        # Conditional writes must not be retried blindly: a retry of a write that
        # did land looks like a conflict. The CAS code retries them itself.
        self._client_once: Any = session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            config=config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1})),
        )
        for client in (self._client, self._client_once):
            client.meta.events.register("before-sign.s3", _drop_expect_header)
        self._ready = False
        self._ready_lock = threading.Lock()
        self._caps: _Capabilities | None = None
        # Threads of this process take turns on a key before competing with other
        # processes through S3: fewer conflicts and lock-object round trips.
        self._key_locks = [threading.Lock() for _ in range(64)]

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Backend:
        """``S3Backend.from_url("s3://bucket/prefix")``; configuration from the environment."""
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint={self.endpoint or 'AWS'})"

    # -- helpers -----------------------------------------------------------
    @property
    def _endpoint_desc(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    def _key(self, key: str) -> str:
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

    def _list_prefix(self, prefix: str) -> str:
        parts = prefix.split("/")
        if (
            prefix.startswith("/")
            or "\0" in prefix
            or any(p in ("", ".", "..") for p in parts[:-1])
            or parts[-1] in (".", "..")
        ):
            raise BackendError(f"refusing prefix {prefix!r} outside the store {self.location}")
        return self.prefix + prefix

    def _translate(self, exc: BaseException, what: str, key: str) -> ApolloError:
        """Map a botocore/boto3 error to the package's hierarchy, with a hint."""
        if isinstance(exc, ApolloError):
            return exc
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        if isinstance(exc, boto3.exceptions.S3UploadFailedError) and exc.__context__ is not None:
            return self._translate(exc.__context__, what, key)
        if isinstance(exc, bexc.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", "") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NO_BUCKET:
                return StoreNotFound(
                    f"bucket {self.bucket!r} does not exist at {self._endpoint_desc}",
                    f"create it first (for example: aws s3 mb s3://{self.bucket}"
                    + (f" --endpoint-url {self.endpoint}" if self.endpoint else "")
                    + ") or fix the store URL and APOLLO_CAS_S3_ENDPOINT",
                )
            if code in _NOT_FOUND:
                return ObjectNotFound(f"{key} is missing in {self.location}")
            if code in _BAD_CREDENTIALS:
                return BackendUnavailable(
                    f"{self._endpoint_desc} rejected the credentials ({code}) while {what} {where}",
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that "
                    "they belong to this endpoint and region",
                )
            if code == "RequestTimeTooSkewed":
                return BackendUnavailable(
                    f"this machine's clock differs too much from {self._endpoint_desc}'s "
                    f"while {what} {where}",
                    "synchronise the clock (NTP) and run the command again",
                )
            if code in _DENIED:
                return PermissionDenied(
                    f"access denied while {what} {where}",
                    "the credentials lack permission on this bucket or prefix: allow "
                    "s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket",
                )
            overloaded = code in ("SlowDown", "ServiceUnavailable", "InternalError", "Throttling")
            if overloaded or (isinstance(status, int) and (status >= 500 or status == 429)):
                return BackendUnavailable(
                    f"{self._endpoint_desc} kept failing ({code or status}) while {what} {where}",
                    "the object store is overloaded or down; run the command again later",
                )
            message = str(err.get("Message", "") or "").splitlines()[0:1]
            detail = f": {message[0]}" if message else ""
            return BackendError(f"S3 error {code or status} while {what} {where}{detail}")
        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
            return BackendUnavailable(
                f"no S3 credentials found while {what} {where}",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            )
        if isinstance(
            exc,
            (
                bexc.EndpointConnectionError,
                bexc.ConnectTimeoutError,
                bexc.ReadTimeoutError,
                bexc.ConnectionClosedError,
                bexc.ConnectionError,
                bexc.HTTPClientError,
                bexc.ResponseStreamingError,
                bexc.IncompleteReadError,
            ),
        ):
            if isinstance(exc, bexc.ConnectTimeoutError):
                first = "connection timed out"
            elif isinstance(exc, bexc.EndpointConnectionError):
                first = "connection failed"
            elif isinstance(exc, bexc.ReadTimeoutError):
                first = "no answer within the read timeout"
            else:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
            return BackendUnavailable(
                f"cannot reach {self._endpoint_desc} while {what} {where} ({first})",
                "check that the S3 server is up and that APOLLO_CAS_S3_ENDPOINT or "
                "AWS_ENDPOINT_URL points at it",
            )
        if isinstance(exc, bexc.BotoCoreError):
            return BackendError(f"S3 client error while {what} {where}: {exc}")
        if isinstance(exc, OSError):
            return BackendUnavailable(
                f"network error while {what} {where}: {exc}",
                "check the network and the S3 endpoint",
            )
        raise exc

    def _call(self, what: str, key: str, fn: Callable[[], Any]) -> Any:
        """Run one client call; errors become :class:`ApolloError` subclasses."""
        self._ensure_ready()
        try:
            return fn()
        except (bexc.BotoCoreError, bexc.ClientError, boto3.exceptions.Boto3Error, OSError) as exc:
            raise self._translate(exc, what, key) from exc

    def _ensure_ready(self) -> None:
        """Check once that the bucket exists and the credentials work (clear errors early).

        A LIST of the prefix, not HEAD bucket: HEAD responses have no body, so a
        missing bucket, bad keys and a denied request would all look alike.
        """
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            try:
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
                raise self._translate(exc, "opening", "") from exc
            self._ready = True

    @staticmethod
    def _code(exc: BaseException) -> str:
        if isinstance(exc, bexc.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", "") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code or str(status or "")
        return ""

    def _fetch(self, key: str, range_header: str | None = None) -> tuple[bytes, str | None]:
        """GET ``key`` (optionally a byte range): its bytes and ETag.

        botocore retries the request but not a body cut off mid-stream, so the
        whole GET is retried here a few times.
        """
        k = self._key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": k}
        if range_header:
            kwargs["Range"] = range_header
        last: BaseException | None = None
        for attempt in range(3):
            resp = self._call("reading", key, lambda: self._client.get_object(**kwargs))
            try:
                body = resp["Body"].read()
            except (bexc.BotoCoreError, OSError) as exc:
                last = exc
                time.sleep(0.1 * (attempt + 1))
                continue
            return body, resp.get("ETag")
        assert last is not None
        raise self._translate(last, "reading", key) from last

    # -- Backend: reads ----------------------------------------------------
    def get(self, key: str) -> bytes:
        return self._fetch(key)[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative range {offset}+{length} for {key}")
        if length == 0:
            self.info(key)  # a missing key is an error even for an empty range
            return b""
        try:
            return self._fetch(key, f"bytes={offset}-{offset + length - 1}")[0]
        except BackendError as exc:
            # Offset at or past the end (or an empty object): nothing to read,
            # like a file read past EOF.
            cause = exc.__cause__
            if cause is not None and self._code(cause) in _INVALID_RANGE:
                return b""
            raise

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def info(self, key: str) -> ObjectInfo:
        k = self._key(key)
        resp = self._call(
            "inspecting", key, lambda: self._client.head_object(Bucket=self.bucket, Key=k)
        )
        return ObjectInfo(size=int(resp["ContentLength"]), mtime=resp["LastModified"].timestamp())

    def _list_raw(self, full_prefix: str) -> Iterator[tuple[str, float, dict[str, Any]]]:
        """(object name, LastModified epoch s, response headers) under ``full_prefix``."""
        self._ensure_ready()
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=full_prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        rel = full_prefix[len(self.prefix) :]
        try:
            for page in pages:
                headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                for obj in page.get("Contents", ()) or ():
                    yield obj["Key"], obj["LastModified"].timestamp(), headers
        except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
            raise self._translate(exc, "listing", rel) from exc

    def list(self, prefix: str) -> Iterator[str]:
        full = self._list_prefix(prefix)
        n = len(self.prefix)
        for name, _mtime, _headers in self._list_raw(full):
            rel = name[n:]
            # Lock objects of compare_and_swap are this backend's business, and
            # "directory" markers (trailing '/') are not objects of the store.
            if rel.startswith(CAS_LOCK_PREFIX) or not rel or rel.endswith("/"):
                continue
            yield rel

    # -- Backend: writes ---------------------------------------------------
    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=8,
            use_threads=True,
        )

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        # S3 stores an object only when the whole upload has arrived (a single
        # PUT, or the completion of a multipart upload): the put is atomic, and
        # acknowledged only once durable, so ``durable`` changes nothing.
        k = self._key(key)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) >= self.multipart_threshold:
            self._call(
                "writing",
                key,
                lambda: self._client.upload_fileobj(
                    io.BytesIO(body), self.bucket, k, Config=self._transfer_config()
                ),
            )
            return
        self._call(
            "writing",
            key,
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=k, Body=body, ContentMD5=content_md5(body)
            ),
        )

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        k = self._key(key)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) < self.multipart_threshold and self._capabilities().if_none_match:
            delay = 0.05
            for _ in range(10):
                try:
                    self._ensure_ready()
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=k,
                        Body=body,
                        IfNoneMatch="*",
                        ContentMD5=content_md5(body),
                    )
                    return True
                except bexc.ClientError as exc:
                    code = self._code(exc)
                    if code in _PRECONDITION:
                        return False
                    if code not in _CONFLICT:
                        raise self._translate(exc, "writing", key) from exc
                    # AWS answers 409 while another conditional write of this key
                    # is in flight; it may still fail, so wait for the outcome.
                    time.sleep(random.uniform(0, delay))
                    delay = min(delay * 2, 1.0)
                except (bexc.BotoCoreError, OSError) as exc:
                    raise self._translate(exc, "writing", key) from exc
        # Without If-None-Match: HEAD then PUT. Two writers of one key write the
        # same bytes (keys are content hashes), so a lost race is harmless.
        if self.exists(key):
            return False
        self.put(key, body, durable=durable)
        return True

    def delete(self, key: str) -> None:
        k = self._key(key)
        # S3 answers 204 for a missing key too: idempotent by design.
        self._call("deleting", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=k))

    # -- conditional-request capabilities ----------------------------------
    def _capabilities(self) -> _Capabilities:
        """What this server honours, probed once (forced by ``cas_mode`` if set)."""
        if self.cas_mode == "conditional":
            return _Capabilities(True, True)
        if self.cas_mode == "lock":
            return _Capabilities(False, False)
        if self._caps is not None:
            return self._caps
        cache_key = (self.endpoint, self.bucket)
        with _CAPS_LOCK:
            caps = _CAPS_CACHE.get(cache_key)
            if caps is None:
                caps = self._probe()
                _CAPS_CACHE[cache_key] = caps
                log.info(
                    "S3 %s: If-None-Match %s, compare-and-swap via %s",
                    self._endpoint_desc,
                    "honoured" if caps.if_none_match else "ignored",
                    "conditional writes" if caps.compare_and_swap else "lock objects",
                )
        self._caps = caps
        return caps

    @property
    def cas_method(self) -> str:
        """``"conditional"`` or ``"lock"``: how :meth:`compare_and_swap` works here."""
        return "conditional" if self._capabilities().compare_and_swap else "lock"

    def _attempt(
        self, what: str, key: str, fn: Callable[[], Any]
    ) -> tuple[str, BaseException | None]:
        """Run one request (never auto-retried); classify its outcome, keep its error.

        Errors that say nothing about the request's fate (denied, bad keys, ...)
        are raised as they are.
        """
        self._ensure_ready()
        try:
            fn()
            return _OK, None
        except bexc.ClientError as exc:
            code = self._code(exc)
            if code in _PRECONDITION or code in _CONFLICT or code in _NOT_FOUND:
                return _CONFLICTED, exc
            if code in _UNSUPPORTED:
                return _UNSUPPORTED_OUTCOME, exc
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int) and (status >= 500 or status == 429):
                return _UNKNOWN, exc  # may or may not have been applied
            raise self._translate(exc, what, key) from exc
        except (bexc.EndpointConnectionError, bexc.ConnectTimeoutError) as exc:
            return _NOT_SENT, exc  # no connection: the request never reached the server
        except (bexc.BotoCoreError, OSError) as exc:
            return _UNKNOWN, exc

    def _probe(self) -> _Capabilities:
        """Try conditional requests on a scratch object and see which ones the server honours.

        A server that ignores the headers overwrites or deletes anyway, one that
        does not know them answers 400/501; either way it gets the lock protocol.
        """
        key = f"{CAS_LOCK_PREFIX}probe-{uuid.uuid4().hex}"
        k = self._key(key)
        bucket = self.bucket
        c = self._client_once

        def outcome(result: tuple[str, BaseException | None]) -> str:
            # A network failure says nothing about the server: raise rather than
            # cache a wrong answer (writers must all take the same CAS path).
            kind, exc = result
            if kind in (_UNKNOWN, _NOT_SENT) and exc is not None:
                raise self._translate(exc, "probing", key) from exc
            return kind

        def put(body: bytes, **cond: str) -> str:
            return outcome(
                self._attempt(
                    "probing",
                    key,
                    lambda: c.put_object(
                        Bucket=bucket, Key=k, Body=body, ContentMD5=content_md5(body), **cond
                    ),
                )
            )

        def delete(**cond: str) -> str:
            return outcome(
                self._attempt("probing", key, lambda: c.delete_object(Bucket=bucket, Key=k, **cond))
            )

        def etag() -> str | None:
            try:
                return str(self._client.head_object(Bucket=bucket, Key=k)["ETag"])
            except bexc.ClientError as exc:
                if self._code(exc) in _NOT_FOUND:
                    return None
                raise self._translate(exc, "probing", key) from exc

        self._ensure_ready()
        try:
            if put(b"probe-0", IfNoneMatch="*") != _OK:  # creates
                return _Capabilities(False, False)
            if put(b"probe-1", IfNoneMatch="*") != _CONFLICTED:  # must not overwrite
                return _Capabilities(False, False)
            none_match_ok = self.get(key) == b"probe-0"
            caps_no = _Capabilities(none_match_ok, False)
            if not none_match_ok:
                return caps_no
            if put(b"probe-2", IfMatch=_MISSING_ETAG) != _CONFLICTED:
                return caps_no
            current = etag()
            if current is None or put(b"probe-3", IfMatch=current) != _OK:
                return caps_no
            if self.get(key) != b"probe-3":
                return caps_no
            if delete(IfMatch=_MISSING_ETAG) != _CONFLICTED or etag() is None:
                return caps_no
            current = etag()
            if current is None or delete(IfMatch=current) != _OK or etag() is not None:
                return caps_no
            return _Capabilities(True, True)
        finally:
            # A leftover probe is reaped by remove_temporaries.
            with suppress(bexc.BotoCoreError, bexc.ClientError, OSError):
                self._client.delete_object(Bucket=bucket, Key=k)

    # -- compare and swap --------------------------------------------------
    def _key_lock(self, key: str) -> threading.Lock:
        return self._key_locks[hash(key) % len(self._key_locks)]

    def _read_current(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            return self._fetch(key)
        except ObjectNotFound:
            return None, None

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        self._key(key)
        expected = bytes(expected) if expected is not None else None
        data = bytes(data) if data is not None else None
        with self._key_lock(key):
            if self._capabilities().compare_and_swap:
                return self._cas_conditional(key, expected, data)
            return self._cas_locked(key, expected, data)

    def _cas_conditional(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Read value and ETag; write only if the ETag is unchanged (If-Match / If-None-Match).

        Equal values mean equal ETags, so a value that went A -> B -> A still
        swaps, which is what compare-and-swap on values means.
        """
        k = self._key(key)
        c = self._client_once
        deadline = time.monotonic() + max(60.0, self.lock_wait)
        failures = 0
        delay = 0.01
        while True:
            current, etag = self._read_current(key)
            if current != expected:
                return False
            if data is None and current is None:
                return True  # "delete if absent": nothing to do
            op: Callable[[], Any]
            if data is None:
                op = functools.partial(c.delete_object, Bucket=self.bucket, Key=k, IfMatch=etag)
            elif current is None:
                op = functools.partial(
                    c.put_object,
                    Bucket=self.bucket,
                    Key=k,
                    Body=data,
                    IfNoneMatch="*",
                    ContentMD5=content_md5(data),
                )
            else:
                op = functools.partial(
                    c.put_object,
                    Bucket=self.bucket,
                    Key=k,
                    Body=data,
                    IfMatch=etag,
                    ContentMD5=content_md5(data),
                )

            outcome, exc = self._attempt("updating", key, op)
            if outcome == _OK:
                return True
            if outcome == _UNSUPPORTED_OUTCOME:
                raise BackendError(
                    f"{self._endpoint_desc} refused a conditional write to {self.location}{key}",
                    "set APOLLO_CAS_S3_CAS=lock for this store (on every writer)",
                ) from exc
            if outcome in (_UNKNOWN, _NOT_SENT):
                failures += 1
                if failures >= DEFAULT_MAX_ATTEMPTS and exc is not None:
                    raise self._translate(exc, "updating", key) from exc
            if outcome == _UNKNOWN:
                # The request may have been applied. If the key now holds what we
                # wrote, count it as ours: a writer that set the same bytes at the
                # same instant would leave the same state.
                after, _ = self._read_current(key)
                if after == data:
                    return True
                if after != expected:
                    return False
            if time.monotonic() > deadline:
                raise ConcurrentUpdate(
                    f"{key} in {self.location} kept changing while updating it",
                    "too many writers at once; run the command again",
                )
            # Conflict: the next read sees the new value. Back off only when the
            # value came back equal (someone wrote the same bytes) or after errors.
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.5)

    def _cas_locked(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Compare and swap under a lock object, for servers without conditional writes."""
        while True:
            with self._cas_lock(key) as lease:
                current, _ = self._read_current(key)
                if current != expected:
                    return False
                if data is None and current is None:
                    return True
                if not lease.fresh():
                    continue  # too slow to write safely: take the lock again
                self._write_under_lease(key, data, lease)
                return True

    def _write_under_lease(self, key: str, data: bytes | None, lease: _Lease) -> None:
        k = self._key(key)
        c = self._client_once

        def op() -> Any:
            if data is None:
                return c.delete_object(Bucket=self.bucket, Key=k)
            return c.put_object(Bucket=self.bucket, Key=k, Body=data, ContentMD5=content_md5(data))

        # The write is idempotent while we hold the lock, so it may be retried,
        # but only while the lease is young: a request sent after that could land
        # after another writer took over an expired lock.
        delay = 0.05
        while True:
            outcome, exc = self._attempt("updating", key, op)
            if outcome == _OK:
                return
            assert exc is not None
            if outcome == _UNSUPPORTED_OUTCOME or not lease.fresh():
                raise self._translate(exc, "updating", key) from exc
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    @contextmanager
    def _cas_lock(self, key: str) -> Iterator[_Lease]:
        """Hold the lock for ``key``: restic-style lock objects with owners and expiry.

        Each contender writes its own object ``locks/cas-<hash>.<uuid>``, then
        lists them all. With S3's read-after-write and list-after-write
        consistency, two contenders cannot both see a list without the other,
        so at most one proceeds. When several see each other, the oldest (by the
        server's LastModified, then name) waits for the rest to withdraw, and the
        others withdraw and retry after a random backoff. Locks older than
        ``lock_ttl`` by the server's clock belong to dead holders and are removed.
        """
        base = f"{CAS_LOCK_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}."
        full_base = self._key(base + "x")[:-1]
        record = json.dumps(
            {
                "kind": "compare-and-swap",
                "key": key,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "ttl": self.lock_ttl,
            }
        ).encode()
        deadline = time.monotonic() + self.lock_wait
        backoff = 0.01
        while True:
            mine = base + uuid.uuid4().hex
            mine_full = self._key(mine)
            started = time.monotonic()
            self._call(
                "locking",
                mine,
                functools.partial(
                    self._client.put_object,
                    Bucket=self.bucket,
                    Key=mine_full,
                    Body=record,
                    ContentMD5=content_md5(record),
                ),
            )
            lease = _Lease(started, self.lock_ttl)
            acquired = False
            blocker = ""
            try:
                while True:
                    live, my_stamp = self._live_locks(full_base, mine_full)
                    if not live and my_stamp is not None:
                        acquired = True
                        break
                    if not live:
                        break  # our own lock is not listed yet: start over
                    oldest: tuple[tuple[float, str], str] = min(live)
                    blocker = oldest[1]
                    if (
                        my_stamp is None
                        or oldest[0] < my_stamp
                        or not lease.fresh()
                        or time.monotonic() > deadline
                    ):
                        break  # withdraw: someone older is competing (or we aged)
                    # We are the oldest: the others withdraw; look again shortly.
                    time.sleep(random.uniform(0.005, 0.03))
                if acquired:
                    yield lease
                    return
            finally:
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=mine_full)
                except (bexc.BotoCoreError, bexc.ClientError, OSError):
                    # Left behind, it expires after lock_ttl and gc reaps it.
                    log.warning("could not remove lock object %s%s", self.location, mine)
            if time.monotonic() > deadline:
                raise StoreLocked(
                    f"{key} in {self.location} is locked by another writer "
                    f"(lock object {blocker[len(self.prefix) :]})",
                    f"another apollo-cas process is updating it; a lock left by a crashed "
                    f"process expires after {self.lock_ttl:.0f} s",
                )
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 0.25)  # a ref update takes a few requests

    def _live_locks(
        self, full_base: str, mine_full: str
    ) -> tuple[builtins.list[tuple[tuple[float, str], str]], tuple[float, str] | None]:
        """Competing live locks as ((stamp, name), name) and our own stamp; reaps dead ones."""
        live: builtins.list[tuple[tuple[float, str], str]] = []
        mine: tuple[float, str] | None = None
        server_now: float | None = None
        entries = list(self._list_raw(full_base))
        for name, mtime, headers in entries:
            if server_now is None:
                server_now = _server_time(headers)
            stamp = (mtime, name)
            if name == mine_full:
                mine = stamp
                continue
            if server_now - mtime > self.lock_ttl:
                with suppress(bexc.BotoCoreError, bexc.ClientError, OSError):
                    self._client.delete_object(Bucket=self.bucket, Key=name)
                continue
            live.append((stamp, name))
        return live, mine

    # -- maintenance -------------------------------------------------------
    def remove_temporaries(self, older_than: float) -> int:
        """Reap what crashed writers leave on S3: expired CAS lock objects and
        unfinished multipart uploads started before ``older_than``."""
        removed = 0
        for name, mtime, headers in list(self._list_raw(self.prefix + CAS_LOCK_PREFIX)):
            if mtime < older_than and _server_time(headers) - mtime > self.lock_ttl:
                self._call(
                    "deleting",
                    name[len(self.prefix) :],
                    functools.partial(self._client.delete_object, Bucket=self.bucket, Key=name),
                )
                removed += 1
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                # An upload in flight may belong to a live writer: never abort
                # one younger than the floor, whatever grace gc was given.
                headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                cutoff = min(older_than, _server_time(headers) - self.temporary_floor)
                for up in page.get("Uploads", ()) or ():
                    if up["Initiated"].timestamp() < cutoff:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        removed += 1
        except bexc.ClientError as exc:
            if self._code(exc) not in _UNSUPPORTED:
                raise self._translate(exc, "cleaning up", "") from exc
        except (bexc.BotoCoreError, OSError) as exc:
            raise self._translate(exc, "cleaning up", "") from exc
        return removed

    def close(self) -> None:
        for client in (self._client, self._client_once):
            close = getattr(client, "close", None)  # botocore >= 1.24
            if close is not None:
                close()


def _drop_expect_header(request: Any, **_: Any) -> None:
    """Send bodies without ``Expect: 100-continue``.

    The handshake only saves sending a body the server would refuse, which for
    objects of a few MiB costs less than the extra round trip; and SeaweedFS 4.48
    answers it wrongly when overwriting an empty object (botocore then waits for
    the read timeout on every such PUT).
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _server_time(headers: dict[str, Any]) -> float:
    """The server's clock from a response's Date header (local clock if absent)."""
    date = headers.get("date")
    if date:
        try:
            return parsedate_to_datetime(str(date)).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()
