"""botocore and boto3 errors mapped to :mod:`apollo_cas.errors`, in one place.

Every error leaving the S3 backend passes :func:`translate`: the store and the
CLI see only the package's own hierarchy, each with a one-line message naming
the object and a hint saying what to do. Conditional requests, whose failures
mean "someone else won" as often as "broken", are sorted by :func:`outcome_of`
instead.
"""

from __future__ import annotations

import enum

from ...errors import (
    ApolloError,
    BackendError,
    BackendUnavailable,
    ObjectNotFound,
    PermissionDenied,
    StoreNotFound,
)
from ._boto import bexc, boto3
from .config import Place

# S3 error codes (or HTTP statuses, for responses without a body) by meaning.
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
NO_BUCKET = frozenset({"NoSuchBucket"})
BAD_CREDENTIALS = frozenset(
    {
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
)
DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"})
PRECONDITION = frozenset({"PreconditionFailed", "412"})
CONFLICT = frozenset({"ConditionalRequestConflict", "409", "OperationAborted"})
UNSUPPORTED = frozenset({"NotImplemented", "501", "400", "InvalidRequest", "InvalidArgument"})
INVALID_RANGE = frozenset({"InvalidRange", "416"})
OVERLOADED = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "Throttling"})


class Outcome(enum.Enum):
    """The fate of one conditional request, as far as the client can tell."""

    OK = "ok"
    CONFLICT = "conflict"  # the condition failed: another writer got there first
    UNKNOWN = "unknown"  # may or may not have been applied
    NOT_SENT = "not-sent"  # never reached the server
    UNSUPPORTED = "unsupported"  # the server does not know the condition


def error_code(exc: BaseException) -> str:
    """The S3 error code of a client error (else its HTTP status), or ""."""
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code or str(status or "")
    return ""


def _is_server_failure(status: object) -> bool:
    return isinstance(status, int) and (status >= 500 or status == 429)


def outcome_of(exc: BaseException) -> Outcome | None:
    """What a failed conditional request says about its fate; None for errors
    that say nothing about it (denied, bad keys, ...), which are raised as they are."""
    if isinstance(exc, bexc.ClientError):
        code = error_code(exc)
        if code in PRECONDITION or code in CONFLICT or code in NOT_FOUND:
            return Outcome.CONFLICT
        if code in UNSUPPORTED:
            return Outcome.UNSUPPORTED
        if _is_server_failure(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")):
            return Outcome.UNKNOWN
        return None
    if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError)):
        return Outcome.NOT_SENT  # no connection: the request never reached the server
    if isinstance(exc, (bexc.BotoCoreError, OSError)):
        return Outcome.UNKNOWN
    return None


def translate(exc: BaseException, what: str, key: str, place: Place) -> ApolloError:
    """Map a botocore/boto3 error to the package's hierarchy, with a hint.

    ``what`` is the operation as a message says it ("reading", "writing", ...);
    errors of any other kind are raised as they are.
    """
    if isinstance(exc, ApolloError):
        return exc
    where = f"s3://{place.bucket}/{place.prefix}{key}"
    server = place.endpoint_desc
    if isinstance(exc, boto3.exceptions.S3UploadFailedError) and exc.__context__ is not None:
        return translate(exc.__context__, what, key, place)
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in NO_BUCKET:
            return StoreNotFound(
                f"bucket {place.bucket!r} does not exist at {server}",
                f"create it first (for example: aws s3 mb s3://{place.bucket}"
                + (f" --endpoint-url {place.endpoint}" if place.endpoint else "")
                + ") or fix the store URL and APOLLO_CAS_S3_ENDPOINT",
            )
        if code in NOT_FOUND:
            return ObjectNotFound(f"{key} is missing in {place.location}")
        if code in BAD_CREDENTIALS:
            return BackendUnavailable(
                f"{server} rejected the credentials ({code}) while {what} {where}",
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that "
                "they belong to this endpoint and region",
            )
        if code == "RequestTimeTooSkewed":
            return BackendUnavailable(
                f"this machine's clock differs too much from {server}'s while {what} {where}",
                "synchronise the clock (NTP) and run the command again",
            )
        if code in DENIED:
            return PermissionDenied(
                f"access denied while {what} {where}",
                "the credentials lack permission on this bucket or prefix: allow "
                "s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket",
            )
        if code in OVERLOADED or _is_server_failure(status):
            return BackendUnavailable(
                f"{server} kept failing ({code or status}) while {what} {where}",
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
            f"cannot reach {server} while {what} {where} ({first})",
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
