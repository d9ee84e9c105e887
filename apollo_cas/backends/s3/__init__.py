"""A store in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW, R2, ...).

Imported only when an ``s3://`` store is opened, never at package import time
(boto3 is an optional dependency). How the store's promises hold on S3 (see
docs/S3.md):

* No rename, but a single PUT is atomic: readers see the old object or the
  whole new one. Chunks and manifests are written once under their final,
  content-derived names, so a crash leaves at worst an unreferenced object
  (garbage for gc), never a torn one, and no temporaries.
* ``put_if_absent`` uses ``If-None-Match: *`` where the server honours it
  (probed once), else HEAD then PUT, which is safe because the same key always
  carries the same bytes.
* Refs change only through ``S3Backend.compare_and_swap``: one conditional
  request where the server honours ``If-Match`` (SeaweedFS 4.x does), else a
  restic-style lock-object protocol.
* Durability: S3 acknowledges a PUT only once it is stored, so every put is
  durable and ``sync`` has nothing to do.

Modules, one job each:

* :mod:`.config`: the s3:// URL, endpoint and ``APOLLO_CAS_S3_*`` settings; key
  to object-name mapping;
* :mod:`.errormap`: botocore/boto3 errors to :mod:`apollo_cas.errors`;
* :mod:`.transport`: the boto3 clients, retried reads, listing;
* :mod:`.capabilities`: which conditional requests the server honours (probe);
* :mod:`.cas`: compare-and-swap, conditional or under lock objects;
* :mod:`.backend`: :class:`S3Backend`, the backend contract on top.
"""

from __future__ import annotations

from .backend import S3Backend
from .config import CAS_LOCK_PREFIX, endpoint_from_env, parse_s3_url
from .transport import content_md5

__all__ = ["CAS_LOCK_PREFIX", "S3Backend", "content_md5", "endpoint_from_env", "parse_s3_url"]
