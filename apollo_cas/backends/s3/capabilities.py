"""Which conditional requests an S3 server honours, probed once per endpoint and bucket.

Where the server honours ``If-None-Match: *`` on PUT, creates are one request;
where it also honours ``If-Match`` on PUT and DELETE (SeaweedFS 4.x does), a
compare-and-swap is one conditional request. A server that ignores the headers
overwrites or deletes anyway, one that does not know them answers 400/501;
either way it gets the lock protocol.

The configuration declares the answer (``cas_mode`` / ``APOLLO_CAS_S3_CAS``:
``conditional`` or ``lock``, see :func:`declared`); the server is probed only
when it says ``auto``, the default.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

from ..base import CAS_AUTO, CAS_CONDITIONAL, CAS_LOCK_OBJECTS, Capabilities
from ._boto import bexc
from .config import CAS_LOCK_PREFIX
from .errormap import NOT_FOUND, Outcome, error_code
from .transport import S3Transport, content_md5

log = logging.getLogger(__name__)

_MISSING_ETAG = '"' + "0" * 32 + '"'  # an ETag no object has


@dataclass(frozen=True)
class ConditionalWrites:
    """What the server's conditional requests can be trusted with."""

    if_none_match: bool  # PUT If-None-Match: * refuses to overwrite
    compare_and_swap: bool  # ... and PUT If-Match, DELETE If-Match work too


def declared(cas_mode: str) -> Capabilities:
    """What an S3 store with this ``cas_mode`` declares, from configuration alone
    (no request). ``put_if_absent`` is promised atomic only where conditional
    creates are configured: with ``lock`` it checks, then writes, and with
    ``auto`` that depends on the probe."""
    if cas_mode not in (CAS_AUTO, CAS_CONDITIONAL, CAS_LOCK_OBJECTS):
        raise ValueError(f"unknown S3 compare-and-swap mode {cas_mode!r}")
    return Capabilities(
        shareable_across_processes=True,
        atomic_create=cas_mode == CAS_CONDITIONAL,
        compare_and_swap=cas_mode,
    )


# One probe per (endpoint, bucket) and process: all backends on it see one server.
_CACHE: dict[tuple[str | None, str], ConditionalWrites] = {}
_CACHE_LOCK = threading.Lock()


def conditional_writes(transport: S3Transport, cas_mode: str) -> ConditionalWrites:
    """What this server honours: as ``cas_mode`` declares, or (``auto``) probed
    once per process."""
    if cas_mode == CAS_CONDITIONAL:
        return ConditionalWrites(True, True)
    if cas_mode == CAS_LOCK_OBJECTS:
        return ConditionalWrites(False, False)
    place = transport.place
    cache_key = (place.endpoint, place.bucket)
    with _CACHE_LOCK:
        caps = _CACHE.get(cache_key)
        if caps is None:
            caps = probe(transport)
            _CACHE[cache_key] = caps
            log.info(
                "S3 %s: If-None-Match %s, compare-and-swap via %s",
                place.endpoint_desc,
                "honoured" if caps.if_none_match else "ignored",
                "conditional writes" if caps.compare_and_swap else "lock objects",
            )
    return caps


def probe(transport: S3Transport) -> ConditionalWrites:
    """Try conditional requests on a scratch object and see which ones the server honours."""
    key = f"{CAS_LOCK_PREFIX}probe-{uuid.uuid4().hex}"
    k = transport.place.object_name(key)
    bucket = transport.place.bucket
    c = transport.client_once

    def outcome(result: tuple[Outcome, BaseException | None]) -> Outcome:
        # A network failure says nothing about the server: raise rather than
        # cache a wrong answer (writers must all take the same CAS path).
        kind, exc = result
        if kind in (Outcome.UNKNOWN, Outcome.NOT_SENT) and exc is not None:
            raise transport.translate(exc, "probing", key) from exc
        return kind

    def put(body: bytes, **cond: str) -> Outcome:
        return outcome(
            transport.attempt(
                "probing",
                key,
                lambda: c.put_object(
                    Bucket=bucket, Key=k, Body=body, ContentMD5=content_md5(body), **cond
                ),
            )
        )

    def delete(**cond: str) -> Outcome:
        return outcome(
            transport.attempt("probing", key, lambda: c.delete_object(Bucket=bucket, Key=k, **cond))
        )

    def etag() -> str | None:
        try:
            return str(transport.client.head_object(Bucket=bucket, Key=k)["ETag"])
        except bexc.ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return None
            raise transport.translate(exc, "probing", key) from exc

    def read() -> bytes:
        return transport.fetch(key)[0]

    transport.ensure_ready()
    try:
        if put(b"probe-0", IfNoneMatch="*") != Outcome.OK:  # creates
            return ConditionalWrites(False, False)
        if put(b"probe-1", IfNoneMatch="*") != Outcome.CONFLICT:  # must not overwrite
            return ConditionalWrites(False, False)
        none_match_ok = read() == b"probe-0"
        caps_no = ConditionalWrites(none_match_ok, False)
        if not none_match_ok:
            return caps_no
        if put(b"probe-2", IfMatch=_MISSING_ETAG) != Outcome.CONFLICT:
            return caps_no
        current = etag()
        if current is None or put(b"probe-3", IfMatch=current) != Outcome.OK:
            return caps_no
        if read() != b"probe-3":
            return caps_no
        if delete(IfMatch=_MISSING_ETAG) != Outcome.CONFLICT or etag() is None:
            return caps_no
        current = etag()
        if current is None or delete(IfMatch=current) != Outcome.OK or etag() is not None:
            return caps_no
        return ConditionalWrites(True, True)
    finally:
        # A leftover probe is reaped by remove_temporaries.
        transport.delete_quietly(k)
