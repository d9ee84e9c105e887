"""Fixtures of the backend tests: the local SeaweedFS S3 server (see tests/s3server.py).

tests/conftest.py belongs to the whole suite; other test directories get the same
fixtures with ``from s3server import s3_env, s3_location, s3_server  # noqa: F401``.
"""

from __future__ import annotations

from s3server import s3_env, s3_location, s3_server

__all__ = ["s3_env", "s3_location", "s3_server"]
