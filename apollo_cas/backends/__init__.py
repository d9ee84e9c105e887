"""Storage backends behind one small interface, and the URL -> backend factory."""

from __future__ import annotations

from .base import Backend, Capabilities, ObjectInfo


def open_backend(location: str) -> Backend:
    """Return the backend for a directory path, ``memory://`` or ``s3://bucket/prefix``.

    The S3 client is imported only when an s3:// location is used.
    """
    if location.startswith("s3://"):
        from .s3 import S3Backend

        return S3Backend.from_url(location)
    if location.startswith("memory://"):
        from .memory import MemoryBackend

        return MemoryBackend(location)
    from .local import LocalBackend

    return LocalBackend(location)


__all__ = ["Backend", "Capabilities", "ObjectInfo", "open_backend"]
