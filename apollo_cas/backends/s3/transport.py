"""The boto3 clients of one S3 store and the requests made through them.

Two clients share one session and configuration: :attr:`S3Transport.client`
retries (botocore's standard mode) and serves every idempotent request;
:attr:`S3Transport.client_once` makes one attempt, for conditional writes,
whose blind retry could mistake our own landed write for a conflict (the
compare-and-swap code retries them itself, knowing what each outcome means).

Every one-shot request whose outcome the backend judges itself (conditional
writes, writes under a compare-and-swap lease, capability probes) goes through
:meth:`S3Transport.attempt`, every other one through :meth:`S3Transport.call`
or the read and list helpers. A subclass, handed to ``S3Backend(transport=...)``,
may override them to inject faults or latency (``tests/backends/s3faults.py``);
nothing needs to hook into the clients.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from ...errors import ApolloError
from ._boto import Config, bexc, boto3, botocore
from .config import ClientSettings, Place
from .errormap import Outcome, outcome_of, translate

# botocore parses its S3 service model (megabytes of JSON) once per session:
# about 0.3 s of CPU for every backend opened. The parsed models are the same
# for every session, so sessions share one loader; credentials, profiles and
# region are still read per session, from the environment at open time.
_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def new_session() -> Any:
    """A boto3 session sharing the parsed service models of earlier ones."""
    global _LOADER
    core = botocore.session.Session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


def content_md5(body: bytes) -> str:
    """Content-MD5 for a PUT: the server then refuses a body cut short.

    Without it SeaweedFS (4.48) stores a 0-byte object when the client dies
    after sending the headers, which left empty chunks under their final names
    after a killed save (tests/faults/test_s3_crash.py).
    """
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def server_time(headers: dict[str, Any]) -> float:
    """The server's clock from a response's Date header (local clock if absent)."""
    date = headers.get("date")
    if date:
        try:
            return parsedate_to_datetime(str(date)).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()


def _drop_expect_header(request: Any, **_: Any) -> None:
    """Send bodies without ``Expect: 100-continue``.

    The handshake only saves sending a body the server would refuse, which for
    objects of a few MiB costs less than the extra round trip; and SeaweedFS 4.48
    answers it wrongly when overwriting an empty object (botocore then waits for
    the read timeout on every such PUT).
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]


class S3Transport:
    """Requests to one store's bucket; every failure leaves as an ApolloError."""

    def __init__(self, session: Any, place: Place, settings: ClientSettings) -> None:
        self.place = place
        options: dict[str, Any] = {
            "connect_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
            "max_pool_connections": settings.max_pool,
            "tcp_keepalive": True,
            "retries": {"mode": "standard", "total_max_attempts": settings.max_attempts},
            # Path-style URLs work on every S3-compatible server; virtual hosts
            # need DNS for each bucket, which local servers lack.
            "s3": {"addressing_style": "path" if place.endpoint else "auto"},
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
        # A Session is not thread-safe but clients are: both are made here, once.
        self.client: Any = session.client(
            "s3", endpoint_url=place.endpoint, region_name=place.region, config=config
        )
        self.client_once: Any = session.client(
            "s3",
            endpoint_url=place.endpoint,
            region_name=place.region,
            config=config.merge(Config(retries={"mode": "standard", "total_max_attempts": 1})),
        )
        for client in (self.client, self.client_once):
            client.meta.events.register("before-sign.s3", _drop_expect_header)
        self._ready = False
        self._ready_lock = threading.Lock()

    def translate(self, exc: BaseException, what: str, key: str) -> ApolloError:
        return translate(exc, what, key, self.place)

    def ensure_ready(self) -> None:
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
                self.client.list_objects_v2(
                    Bucket=self.place.bucket, Prefix=self.place.prefix, MaxKeys=1
                )
            except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
                raise self.translate(exc, "opening", "") from exc
            self._ready = True

    def call(self, what: str, key: str, fn: Callable[[], Any]) -> Any:
        """Run one client call; errors become :class:`ApolloError` subclasses."""
        self.ensure_ready()
        try:
            return fn()
        except (bexc.BotoCoreError, bexc.ClientError, boto3.exceptions.Boto3Error, OSError) as exc:
            raise self.translate(exc, what, key) from exc

    def attempt(
        self, what: str, key: str, fn: Callable[[], Any]
    ) -> tuple[Outcome, BaseException | None]:
        """Run one request (never auto-retried); classify its outcome, keep its error.

        Errors that say nothing about the request's fate (denied, bad keys, ...)
        are raised as they are.
        """
        self.ensure_ready()
        try:
            fn()
            return Outcome.OK, None
        except (bexc.ClientError, bexc.BotoCoreError, OSError) as exc:
            outcome = outcome_of(exc)
            if outcome is None:
                raise self.translate(exc, what, key) from exc
            return outcome, exc

    def fetch(self, key: str, range_header: str | None = None) -> tuple[bytes, str | None]:
        """GET ``key`` (optionally a byte range): its bytes and ETag.

        botocore retries the request but not a body cut off mid-stream, so the
        whole GET is retried here a few times.
        """
        kwargs: dict[str, Any] = {"Bucket": self.place.bucket, "Key": self.place.object_name(key)}
        if range_header:
            kwargs["Range"] = range_header
        last: BaseException | None = None
        for attempt in range(3):
            resp = self.call("reading", key, lambda: self.client.get_object(**kwargs))
            try:
                body = resp["Body"].read()
            except (bexc.BotoCoreError, OSError) as exc:
                last = exc
                time.sleep(0.1 * (attempt + 1))
                continue
            return body, resp.get("ETag")
        assert last is not None
        raise self.translate(last, "reading", key) from last

    def list_raw(
        self, full_prefix: str, page_size: int
    ) -> Iterator[tuple[str, float, dict[str, Any]]]:
        """(object name, LastModified epoch s, response headers) under ``full_prefix``."""
        self.ensure_ready()
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.place.bucket,
            Prefix=full_prefix,
            PaginationConfig={"PageSize": page_size},
        )
        rel = full_prefix[len(self.place.prefix) :]
        try:
            for page in pages:
                headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                for obj in page.get("Contents", ()) or ():
                    yield obj["Key"], obj["LastModified"].timestamp(), headers
        except (bexc.BotoCoreError, bexc.ClientError, OSError) as exc:
            raise self.translate(exc, "listing", rel) from exc

    def delete_quietly(self, name: str) -> bool:
        """Delete the object ``name`` (a full name), best effort: whether it worked."""
        try:
            self.client.delete_object(Bucket=self.place.bucket, Key=name)
        except (bexc.BotoCoreError, bexc.ClientError, OSError):
            return False
        return True

    def close(self) -> None:
        for client in (self.client, self.client_once):
            close = getattr(client, "close", None)  # botocore >= 1.24
            if close is not None:
                close()
