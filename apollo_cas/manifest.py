"""On-disk records: the store config and checkpoint manifests (msgpack).

Each record is a frozen dataclass with an explicit ``format`` version. Encoding
is msgpack of a plain dict with short, stable keys; decoding checks the version
and every field's type, so a damaged or foreign record is reported, never
half-trusted. docs/FORMAT.md describes the same fields for other readers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import dtypes
from .errors import CorruptManifest, FormatVersionError, StoreError
from .hashing import digest_hex

STORE_FORMAT = 1
#: Store formats this code reads and writes (docs/FORMAT.md): 1 one object per
#: chunk, 2 packs and index objects.
STORE_FORMATS = (1, 2)
#: Target pack size of new format-2 stores (FORMAT.md, "Pack size").
DEFAULT_PACK_SIZE = 64 << 20
MANIFEST_FORMAT = 1
GROUP_FORMAT = 1
DEFAULT_BLOCK_SIZE = 1 << 20


def _check_format(found: Any, expected: int, what: str, where: str) -> None:
    if found != expected:
        raise FormatVersionError(
            f"{where}: {what} format version {found!r}, this apollo_cas reads version {expected}",
            "use the apollo_cas release that wrote this store, or a newer one",
        )


@dataclass(frozen=True)
class StoreConfig:
    """The ``config`` object: written once, by the first save."""

    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    chunk_hash: str = "xxh3-128"
    format: int = STORE_FORMAT
    pack_size: int = DEFAULT_PACK_SIZE  # format 2 only

    def encode(self) -> bytes:
        d: dict[str, Any] = {
            "format": self.format,
            "store_id": self.store_id,
            "created": self.created,
            "chunk_hash": self.chunk_hash,
        }
        if self.format >= 2:
            d["pack_size"] = self.pack_size
        return msgpack.packb(d)

    @classmethod
    def decode(cls, data: bytes, where: str) -> StoreConfig:
        try:
            d = msgpack.unpackb(data)
            if not isinstance(d, dict):
                raise TypeError("not a map")
        except Exception as exc:
            raise StoreError(
                f"{where}: unreadable store config ({exc})",
                "the directory is not an apollo_cas store, or its config is damaged",
            ) from exc
        if d.get("format") not in STORE_FORMATS:
            _check_format(d.get("format"), STORE_FORMATS[-1], "store", where)
        if d.get("chunk_hash") != "xxh3-128":
            raise FormatVersionError(
                f"{where}: unknown chunk hash {d.get('chunk_hash')!r}", "upgrade apollo_cas"
            )
        return cls(
            store_id=str(d["store_id"]),
            created=float(d["created"]),
            chunk_hash=str(d["chunk_hash"]),
            format=int(d["format"]),
            pack_size=int(d.get("pack_size", DEFAULT_PACK_SIZE)),
        )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its bytes are the concatenation of ``chunks`` (16-byte ids)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "n": self.name,
            "d": self.dtype,
            "s": list(self.shape),
            "b": self.nbytes,
            "c": list(self.chunks),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any], block_size: int) -> TensorEntry:
        t = cls(
            name=str(d["n"]),
            dtype=str(d["d"]),
            shape=tuple(int(x) for x in d["s"]),
            nbytes=int(d["b"]),
            chunks=tuple(bytes(c) for c in d["c"]),
        )
        dt = dtypes.lookup(t.dtype)
        count = 1
        for s in t.shape:
            count *= s
        if count * dt.itemsize != t.nbytes:
            raise ValueError(
                f"tensor {t.name}: shape {t.shape} x {dt.itemsize} != {t.nbytes} bytes"
            )
        if len(t.chunks) != -(-t.nbytes // block_size) or any(len(c) != 16 for c in t.chunks):
            raise ValueError(f"tensor {t.name}: wrong number or size of chunk ids")
        return t


@dataclass(frozen=True)
class SaveStats:
    """What one save did; kept in the manifest for ``list`` and ``stats``."""

    logical_bytes: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    seconds: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "lb": self.logical_bytes,
            "ch": self.chunks,
            "nc": self.new_chunks,
            "nr": self.new_raw_bytes,
            "ns": self.new_stored_bytes,
            "t": self.seconds,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SaveStats:
        return cls(
            int(d["lb"]), int(d["ch"]), int(d["nc"]), int(d["nr"]), int(d["ns"]), float(d["t"])
        )


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from."""

    kind: str
    location: str = ""
    rank: int | None = None
    world_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "k": self.kind,
            "l": self.location,
            "r": self.rank,
            "w": self.world_size,
            "m": dict(self.metadata),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SourceInfo:
        return cls(
            kind=str(d["k"]),
            location=str(d["l"]),
            rank=None if d["r"] is None else int(d["r"]),
            world_size=None if d["w"] is None else int(d["w"]),
            metadata={str(k): str(v) for k, v in d["m"].items()},
        )


@dataclass(frozen=True)
class Manifest:
    """One checkpoint. Its id is the XXH3-128 of its encoding."""

    series: str
    created: float
    block_size: int
    tensors: tuple[TensorEntry, ...]
    source: SourceInfo
    parent: str | None = None
    stats: SaveStats = field(default_factory=SaveStats)
    #: chunk id -> id of the chunk it is a delta against, for every delta-coded
    #: chunk this checkpoint needs (transitively), so gc can keep bases without
    #: reading chunk headers.
    bases: dict[bytes, bytes] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def logical_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def chunk_ids(self) -> set[bytes]:
        """Every chunk this checkpoint needs, delta bases included."""
        ids = {c for t in self.tensors for c in t.chunks}
        ids.update(self.bases.values())
        return ids

    def tensor(self, name: str) -> TensorEntry | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": self.format,
                "series": self.series,
                "created": self.created,
                "parent": self.parent,
                "block_size": self.block_size,
                "source": self.source.to_wire(),
                "stats": self.stats.to_wire(),
                "tensors": [t.to_wire() for t in self.tensors],
                "bases": self.bases,
            },
            use_bin_type=True,
        )

    def checkpoint_id(self) -> str:
        return digest_hex(self.encode())

    @classmethod
    def decode(cls, data: bytes, where: str) -> Manifest:
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(d, dict):
                raise TypeError("not a map")
        except Exception as exc:
            raise CorruptManifest(
                f"{where}: unreadable manifest ({exc})",
                "run apollo-cas verify; restore an older checkpoint",
            ) from exc
        _check_format(d.get("format"), MANIFEST_FORMAT, "manifest", where)
        try:
            bs = int(d["block_size"])
            return cls(
                series=str(d["series"]),
                created=float(d["created"]),
                parent=None if d["parent"] is None else str(d["parent"]),
                block_size=bs,
                source=SourceInfo.from_wire(d["source"]),
                stats=SaveStats.from_wire(d["stats"]),
                tensors=tuple(TensorEntry.from_wire(t, bs) for t in d["tensors"]),
                bases={bytes(k): bytes(v) for k, v in d["bases"].items()},
            )
        except Exception as exc:
            raise CorruptManifest(
                f"{where}: malformed manifest ({exc})",
                "run apollo-cas verify; restore an older checkpoint",
            ) from exc


@dataclass(frozen=True)
class GroupRecord:
    """A checkpoint saved by several tensor-parallel ranks: one manifest per rank.

    Stored at ``groups/<series>/<name>``; each rank adds itself by
    compare-and-swap, so ranks on different hosts can save concurrently.
    """

    series: str
    name: str
    world_size: int
    members: dict[int, str]  # rank -> checkpoint id
    created: float = field(default_factory=time.time)
    format: int = GROUP_FORMAT

    @property
    def complete(self) -> bool:
        return sorted(self.members) == list(range(self.world_size))

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": self.format,
                "series": self.series,
                "name": self.name,
                "world_size": self.world_size,
                "created": self.created,
                "members": {int(r): c for r, c in sorted(self.members.items())},
            }
        )

    @classmethod
    def decode(cls, data: bytes, where: str) -> GroupRecord:
        try:
            d = msgpack.unpackb(data, strict_map_key=False)
        except Exception as exc:
            raise CorruptManifest(
                f"{where}: unreadable group record ({exc})",
                "delete it; the rank checkpoints are intact",
            ) from exc
        if not isinstance(d, dict):
            raise CorruptManifest(f"{where}: group record is not a map")
        _check_format(d.get("format"), GROUP_FORMAT, "group", where)
        try:
            return cls(
                series=str(d["series"]),
                name=str(d["name"]),
                world_size=int(d["world_size"]),
                members={int(r): str(c) for r, c in d["members"].items()},
                created=float(d["created"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptManifest(f"{where}: malformed group record ({exc})") from exc
