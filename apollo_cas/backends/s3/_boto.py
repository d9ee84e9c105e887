"""boto3 and botocore, imported only when an ``s3://`` store is opened.

Why boto3: it is the reference client, maintained by AWS, and the one every
S3-compatible server tests against. It talks to any endpoint, signs with the
standard credential chain (environment, profiles, SSO, instance roles), retries
transient errors with jittered exponential backoff, pools connections, and its
clients are thread-safe, so one client serves all worker threads. Multipart
uploads come with it (s3transfer).

It is an optional dependency (``apollo_cas[s3]``): without it this module still
imports, :data:`AVAILABLE` is false and :class:`~.backend.S3Backend` refuses to
open with a hint, so the CLI reports a missing extra rather than a traceback.
"""

from __future__ import annotations

try:
    import boto3
    import boto3.exceptions
    import botocore.exceptions as bexc
    import botocore.session
    from botocore.config import Config
except ImportError:  # pragma: no cover - exercised only without boto3
    boto3 = bexc = botocore = Config = None

AVAILABLE = boto3 is not None

__all__ = ["AVAILABLE", "Config", "bexc", "boto3", "botocore"]
