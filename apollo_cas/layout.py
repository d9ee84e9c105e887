"""Where every object of a store lives: the whole key layout in one place.

Keys are ``/``-separated relative names; backends map them to files or objects.

::

    config                          StoreConfig (msgpack), written once by the first save
    chunks/<ab>/<32 hex>            format 1: one chunk, named by XXH3-128 of its raw bytes
    packs/<ab>/<32 hex>             format 2: chunk envelopes + trailer, named by XXH3-128 of the pack
    index/<32 hex>                  format 2: where chunks are in packs, named by XXH3-128 of itself
    manifests/<32 hex>              one checkpoint manifest, named by XXH3-128 of its bytes
    groups/<series>/<name>          a multi-rank checkpoint: rank -> checkpoint id
    refs/series/<series>            id of the newest checkpoint of a series ("latest")
    refs/tags/<tag>                 id of a tagged checkpoint; gc keeps it
    locks/<lock id>                 shared / exclusive locks (JSON, with owner and expiry)

Chunk fan-out is one level of 256 directories (restic's choice): 100k chunks put
about 400 entries in a directory and 10M chunks 40k, which ext4/xfs handle with
hashed directories, while listing stays 256 calls. Content-derived names mean no
object is ever overwritten with different bytes, which is what makes the S3
backend (no rename) keep the same promises.
"""

from __future__ import annotations

import re

from .errors import InvalidName

CONFIG_KEY = "config"
CHUNKS_PREFIX = "chunks/"
PACKS_PREFIX = "packs/"
INDEX_PREFIX = "index/"
MANIFESTS_PREFIX = "manifests/"
GROUPS_PREFIX = "groups/"
SERIES_PREFIX = "refs/series/"
TAGS_PREFIX = "refs/tags/"
LOCKS_PREFIX = "locks/"

DEFAULT_SERIES = "default"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# Tags, series and lock ids: a single path component of safe characters. No
# leading dot (hidden files, "." and ".."), no slash, no NUL, bounded length.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=-]{0,127}$")


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise InvalidName."""
    if not isinstance(name, str) or not _NAME.match(name) or name in {"latest"}:
        raise InvalidName(
            f"invalid {what} name {name!r}",
            "use 1-128 letters, digits, '_', '-', '.', '@', '+', '=', not starting with "
            "'.' or '-', and not the reserved word 'latest'",
        )
    return name


def check_hex_id(hex_id: str, what: str = "id") -> str:
    """Return ``hex_id`` if it is 32 lowercase hex characters."""
    if not isinstance(hex_id, str) or not _HEX32.match(hex_id):
        raise InvalidName(f"invalid {what} {hex_id!r}", "expected 32 lowercase hex characters")
    return hex_id


def is_hex_id(text: str) -> bool:
    """Whether ``text`` is a full id (32 lowercase hex characters)."""
    return bool(_HEX32.match(text))


def chunk_key(hex_id: str) -> str:
    return f"{CHUNKS_PREFIX}{hex_id[:2]}/{check_hex_id(hex_id, 'chunk id')}"


def pack_key(hex_id: str) -> str:
    return f"{PACKS_PREFIX}{hex_id[:2]}/{check_hex_id(hex_id, 'pack id')}"


def index_key(hex_id: str) -> str:
    return INDEX_PREFIX + check_hex_id(hex_id, "index id")


def pack_id_from_key(key: str) -> str | None:
    """The pack id of a ``packs/..`` key, or None for anything else."""
    name = key.rsplit("/", 1)[-1]
    return name if key.startswith(PACKS_PREFIX) and _HEX32.match(name) else None


def index_id_from_key(key: str) -> str | None:
    """The index id of an ``index/..`` key, or None for anything else."""
    name = key[len(INDEX_PREFIX) :]
    return name if key.startswith(INDEX_PREFIX) and _HEX32.match(name) else None


def manifest_key(hex_id: str) -> str:
    return MANIFESTS_PREFIX + check_hex_id(hex_id, "checkpoint id")


def group_key(series: str, name: str) -> str:
    return f"{GROUPS_PREFIX}{check_name(series, 'series')}/{check_name(name, 'group')}"


def rank_series(series: str, rank: int) -> str:
    """The series one tensor-parallel rank saves into: each rank has its own
    tensors, so its own ``latest`` and parent chain."""
    return check_name(f"{series}.rank{rank}", "series")


def series_key(series: str) -> str:
    return SERIES_PREFIX + check_name(series, "series")


def tag_key(tag: str) -> str:
    return TAGS_PREFIX + check_name(tag, "tag")


def lock_key(lock_id: str) -> str:
    return LOCKS_PREFIX + check_name(lock_id, "lock")


def chunk_id_from_key(key: str) -> str | None:
    """The chunk id of a ``chunks/..`` key, or None for anything else (temp files)."""
    name = key.rsplit("/", 1)[-1]
    return name if key.startswith(CHUNKS_PREFIX) and _HEX32.match(name) else None


_BAD_TENSOR_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def check_tensor_name(name: str) -> str:
    """Tensor names end up in file headers and, for some targets, file names:
    refuse separators, control characters and dot-only names."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 1024
        or _BAD_TENSOR_CHARS.search(name)
        or name.strip(".") == ""
    ):
        raise InvalidName(
            f"invalid tensor name {name!r}",
            "tensor names must be 1-1024 printable characters without '/' or '\\'",
        )
    return name
