"""The :class:`~apollo_cas.backends.base.Backend` contract on S3: reads, writes,
listing and maintenance of one store's objects; compare-and-swap is delegated to
:mod:`.cas`, requests go through :mod:`.transport`."""

from __future__ import annotations

import functools
import io
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import BackendError, BackendUnavailable, ObjectNotFound
from ...leases import expired
from ..base import TEMPORARY_FLOOR, Backend, ObjectInfo
from ._boto import AVAILABLE, bexc
from .capabilities import ConditionalWrites, conditional_writes, declared
from .cas import RefSwap
from .config import (
    CAS_LOCK_PREFIX,
    DEFAULT_LOCK_TTL,
    DEFAULT_MULTIPART_CHUNKSIZE,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_REGION,
    ClientSettings,
    Place,
    cas_mode_from_env,
    endpoint_from_env,
    parse_s3_url,
)
from .errormap import CONFLICT, INVALID_RANGE, PRECONDITION, UNSUPPORTED, error_code
from .transport import S3Transport, content_md5, new_session, server_time

#: What makes a store's :class:`~.transport.S3Transport` from the boto3 session,
#: the store's place and the client settings: the class itself, or a subclass
#: (tests pass one that injects network faults, ``tests/backends/s3faults.py``).
TransportFactory = Callable[[Any, Place, ClientSettings], S3Transport]


class S3Backend(Backend):
    """Objects under ``prefix`` in ``bucket``; keys map to object names one to one.

    ``transport`` makes the object all requests go through (default
    :class:`~.transport.S3Transport`): the seam for wrappers that count, slow
    down or fail requests, instead of hooks into the boto3 clients.
    """

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
        transport: TransportFactory = S3Transport,
    ) -> None:
        if not AVAILABLE:
            raise BackendUnavailable(
                "the S3 backend needs boto3, which is not installed",
                "pip install 'apollo_cas[s3]' (or pip install boto3)",
            )
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.location = f"s3://{bucket}/{self.prefix}"
        self.endpoint = endpoint_url if endpoint_url is not None else endpoint_from_env()
        self.cas_mode = cas_mode_from_env(cas_mode)
        #: Declared by the configuration (``cas_mode``); no request is made here.
        self.capabilities = declared(self.cas_mode)
        self.lock_ttl = float(lock_ttl)
        self.lock_wait = float(lock_wait) if lock_wait is not None else 2 * self.lock_ttl + 30
        self.list_page_size = int(list_page_size)
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        #: Unfinished uploads younger than this are never aborted (may be in flight).
        self.temporary_floor = float(temporary_floor)
        settings = ClientSettings.resolve(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_pool_connections=max_pool_connections,
        )
        session = new_session()
        self.region = region or session.region_name or DEFAULT_REGION
        self.place = Place(self.bucket, self.prefix, self.endpoint, self.region)
        #: Every request goes through it (see ``transport`` above).
        self.transport = transport(session, self.place, settings)
        # benchmarks/bench_packs.py counts requests on this name; new code uses
        # transport.client.
        self._client: Any = self.transport.client
        self._swap = RefSwap(
            self.transport,
            lock_ttl=self.lock_ttl,
            lock_wait=self.lock_wait,
            list_page_size=self.list_page_size,
        )
        self._caps: ConditionalWrites | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Backend:
        """``S3Backend.from_url("s3://bucket/prefix")``; configuration from the environment."""
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint={self.endpoint or 'AWS'})"

    # -- reads -------------------------------------------------------------
    def get(self, key: str) -> bytes:
        return self.transport.fetch(key)[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative range {offset}+{length} for {key}")
        if length == 0:
            self.info(key)  # a missing key is an error even for an empty range
            return b""
        try:
            return self.transport.fetch(key, f"bytes={offset}-{offset + length - 1}")[0]
        except BackendError as exc:
            # Offset at or past the end (or an empty object): nothing to read,
            # like a file read past EOF.
            cause = exc.__cause__
            if cause is not None and error_code(cause) in INVALID_RANGE:
                return b""
            raise

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def info(self, key: str) -> ObjectInfo:
        k = self.place.object_name(key)
        client = self.transport.client
        resp = self.transport.call(
            "inspecting", key, lambda: client.head_object(Bucket=self.bucket, Key=k)
        )
        return ObjectInfo(size=int(resp["ContentLength"]), mtime=resp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[str]:
        full = self.place.list_prefix(prefix)
        n = len(self.prefix)
        for name, _mtime, _headers in self.transport.list_raw(full, self.list_page_size):
            rel = name[n:]
            # Lock objects of compare_and_swap are this backend's business, and
            # "directory" markers (trailing '/') are not objects of the store.
            if rel.startswith(CAS_LOCK_PREFIX) or not rel or rel.endswith("/"):
                continue
            yield rel

    # -- writes ------------------------------------------------------------
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
        k = self.place.object_name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        client = self.transport.client
        if len(body) >= self.multipart_threshold:
            self.transport.call(
                "writing",
                key,
                lambda: client.upload_fileobj(
                    io.BytesIO(body), self.bucket, k, Config=self._transfer_config()
                ),
            )
            return
        self.transport.call(
            "writing",
            key,
            lambda: client.put_object(
                Bucket=self.bucket, Key=k, Body=body, ContentMD5=content_md5(body)
            ),
        )

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        k = self.place.object_name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) < self.multipart_threshold and self._capabilities().if_none_match:
            delay = 0.05
            for _ in range(10):
                try:
                    self.transport.ensure_ready()
                    self.transport.client.put_object(
                        Bucket=self.bucket,
                        Key=k,
                        Body=body,
                        IfNoneMatch="*",
                        ContentMD5=content_md5(body),
                    )
                    return True
                except bexc.ClientError as exc:
                    code = error_code(exc)
                    if code in PRECONDITION:
                        return False
                    if code not in CONFLICT:
                        raise self.transport.translate(exc, "writing", key) from exc
                    # AWS answers 409 while another conditional write of this key
                    # is in flight; it may still fail, so wait for the outcome.
                    time.sleep(random.uniform(0, delay))
                    delay = min(delay * 2, 1.0)
                except (bexc.BotoCoreError, OSError) as exc:
                    raise self.transport.translate(exc, "writing", key) from exc
        # Without If-None-Match: HEAD then PUT. Two writers of one key write the
        # same bytes (keys are content hashes), so a lost race is harmless.
        if self.exists(key):
            return False
        self.put(key, body, durable=durable)
        return True

    def delete(self, key: str) -> None:
        k = self.place.object_name(key)
        client = self.transport.client
        # S3 answers 204 for a missing key too: idempotent by design.
        self.transport.call(
            "deleting", key, lambda: client.delete_object(Bucket=self.bucket, Key=k)
        )

    # -- compare and swap --------------------------------------------------
    def _capabilities(self) -> ConditionalWrites:
        """What this server honours: as declared, or probed once where ``auto``."""
        if self._caps is None:
            self._caps = conditional_writes(self.transport, self.capabilities.compare_and_swap)
        return self._caps

    @property
    def cas_method(self) -> str:
        """``"conditional"`` or ``"lock"``: how :meth:`compare_and_swap` works here."""
        return "conditional" if self._capabilities().compare_and_swap else "lock"

    def compare_and_swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        self.place.object_name(key)
        expected = bytes(expected) if expected is not None else None
        data = bytes(data) if data is not None else None
        with self._swap.key_lock(key):
            if self._capabilities().compare_and_swap:
                return self._swap.conditional(key, expected, data)
            return self._swap.locked(key, expected, data)

    # -- maintenance -------------------------------------------------------
    def remove_temporaries(self, older_than: float) -> int:
        """Reap what crashed writers leave on S3: expired CAS lock objects and
        unfinished multipart uploads started before ``older_than``."""
        removed = 0
        client = self.transport.client
        locks = self.transport.list_raw(self.prefix + CAS_LOCK_PREFIX, self.list_page_size)
        for name, mtime, headers in list(locks):
            if mtime < older_than and expired(mtime + self.lock_ttl, server_time(headers)):
                self.transport.call(
                    "deleting",
                    name[len(self.prefix) :],
                    functools.partial(client.delete_object, Bucket=self.bucket, Key=name),
                )
                removed += 1
        try:
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                # An upload in flight may belong to a live writer: never abort
                # one younger than the floor, whatever grace gc was given.
                headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                cutoff = min(older_than, server_time(headers) - self.temporary_floor)
                for up in page.get("Uploads", ()) or ():
                    if up["Initiated"].timestamp() < cutoff:
                        client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        removed += 1
        except bexc.ClientError as exc:
            if error_code(exc) not in UNSUPPORTED:
                raise self.transport.translate(exc, "cleaning up", "") from exc
        except (bexc.BotoCoreError, OSError) as exc:
            raise self.transport.translate(exc, "cleaning up", "") from exc
        return removed

    def close(self) -> None:
        self.transport.close()
