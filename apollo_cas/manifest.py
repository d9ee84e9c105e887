"""On-disk records: the store config and checkpoint manifests (msgpack).

Each record is a frozen dataclass with an explicit ``format`` version. Encoding
is msgpack of a plain dict with short, stable keys; decoding checks the version
and every field's type, so a damaged or foreign record is reported, never
half-trusted. docs/FORMAT.md describes the same fields for other readers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import dtypes
from .errors import ApolloError, CorruptManifest, FormatVersionError, StoreError
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
class MsgpackRecord:
    """A kind of msgpack-encoded record: its name in messages, the error that
    bytes which are not such a record raise, and that error's hint."""

    what: str
    error: type[ApolloError]
    hint: str

    def unpack(self, data: bytes, where: str, strict_map_key: bool = True) -> dict[Any, Any]:
        """The map encoded in ``data``; bytes that do not decode, or decode to
        anything but a map, raise ``error`` naming ``where``."""
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=strict_map_key)
            if not isinstance(d, dict):
                raise TypeError("not a map")
        except Exception as exc:
            raise self.error(f"{where}: unreadable {self.what} ({exc})", self.hint) from exc
        return d


CONFIG_RECORD = MsgpackRecord(
    "store config",
    StoreError,
    "the directory is not an apollo_cas store, or its config is damaged",
)
MANIFEST_RECORD = MsgpackRecord(
    "manifest", CorruptManifest, "run apollo-cas verify; restore an older checkpoint"
)
GROUP_RECORD = MsgpackRecord(
    "group record", CorruptManifest, "delete it; the rank checkpoints are intact"
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
        d = CONFIG_RECORD.unpack(data, where)
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
        name, nbytes = d["n"], d["b"]
        if not isinstance(name, str) or not dtypes.is_int(nbytes):
            raise ValueError(f"tensor {name!r}: name or size of the wrong type")
        dt = dtypes.lookup(d["d"])
        t = cls(
            name=name,
            dtype=d["d"],
            shape=dtypes.check_shape(d["s"], dt, nbytes, f"tensor {name}"),
            nbytes=nbytes,
            chunks=tuple(bytes(c) for c in d["c"]),
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
class SavedFilesRef:
    """Where a checkpoint saved from files keeps the record that writes them again
    byte for byte (:mod:`apollo_cas.filesets`): the files' kind (``safetensors``
    or ``seed``), the record's chunk id and its raw size."""

    kind: str
    chunk: bytes
    size: int

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.kind, "c": self.chunk, "b": self.size}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SavedFilesRef:
        ref = cls(kind=str(d["k"]), chunk=bytes(d["c"]), size=int(d["b"]))
        if len(ref.chunk) != 16 or ref.size < 0:
            raise ValueError("saved_files: bad chunk id or size")
        return ref


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
    #: The saved files' record (names, headers, tensor offsets) for exact
    #: restores; None for tensors from memory and for checkpoints saved before it.
    saved_files: SavedFilesRef | None = None
    format: int = MANIFEST_FORMAT

    @property
    def logical_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def chunk_ids(self) -> set[bytes]:
        """Every chunk this checkpoint needs, delta bases included."""
        ids = {c for t in self.tensors for c in t.chunks}
        ids.update(self.bases.values())
        if self.saved_files is not None:
            ids.add(self.saved_files.chunk)
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
                # Optional keys are absent when unset, so such manifests keep their bytes.
                **self._optional_wire(),
            },
            use_bin_type=True,
        )

    def _optional_wire(self) -> dict[str, Any]:
        if self.saved_files is None:
            return {}
        return {"saved_files": self.saved_files.to_wire()}

    def checkpoint_id(self) -> str:
        return digest_hex(self.encode())

    def encode_checked(self, where: str) -> bytes:
        """The encoding, once :meth:`decode` (the reader's own checks) accepts it
        and gives this manifest back. A manifest this program could not read
        would make ``list``, ``gc`` and ``stats`` fail for the whole store, so it
        is refused before it is written (``where`` names the source)."""
        hint = "nothing was saved; the source describes its tensors wrongly"
        try:
            data = self.encode()
        except (OverflowError, TypeError, ValueError) as exc:  # msgpack: ints past 64 bits
            raise CorruptManifest(
                f"{where}: the checkpoint cannot be encoded ({exc})", hint
            ) from exc
        try:
            back = Manifest.decode(data, where)
        except CorruptManifest as exc:
            raise CorruptManifest(
                exc.message.replace("malformed manifest", "the checkpoint would be unreadable"),
                hint,
            ) from exc
        if back != self:
            raise CorruptManifest(
                f"{where}: the checkpoint would not read back as written",
                "nothing was saved; report this with the source",
            )
        return data

    @classmethod
    def decode(cls, data: bytes, where: str) -> Manifest:
        d = MANIFEST_RECORD.unpack(data, where, strict_map_key=False)
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
                tensors=_unique(TensorEntry.from_wire(t, bs) for t in d["tensors"]),
                bases={bytes(k): bytes(v) for k, v in d["bases"].items()},
                saved_files=(
                    None
                    if d.get("saved_files") is None
                    else SavedFilesRef.from_wire(d["saved_files"])
                ),
            )
        except Exception as exc:
            raise CorruptManifest(
                f"{where}: malformed manifest ({exc})",
                "run apollo-cas verify; restore an older checkpoint",
            ) from exc


def _unique(tensors: Iterable[TensorEntry]) -> tuple[TensorEntry, ...]:
    out = tuple(tensors)
    names = {t.name for t in out}
    if len(names) != len(out):
        twice = sorted(n for n in names if sum(t.name == n for t in out) > 1)
        raise ValueError(f"tensor {twice[0]!r} appears twice")
    return out


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
        d = GROUP_RECORD.unpack(data, where, strict_map_key=False)
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
