"""Read-only views of a store: statistics and per-tensor diffs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import layout
from .manifest import Manifest, TensorEntry
from .store import Checkpoint, Store


def chunk_sizes(t: TensorEntry, block_size: int) -> list[int]:
    """Raw size of each chunk of a tensor (the last one may be short)."""
    n = len(t.chunks)
    return [block_size] * (n - 1) + [t.nbytes - block_size * (n - 1)] if n else []


def _raw_sizes(manifests: list[Manifest]) -> dict[bytes, int]:
    sizes: dict[bytes, int] = {}
    for m in manifests:
        for t in m.tensors:
            for cid, n in zip(t.chunks, chunk_sizes(t, m.block_size), strict=True):
                sizes[cid] = n
    return sizes


@dataclass
class CheckpointRow:
    """One line of ``list`` / ``stats``."""

    id: str
    created: float
    series: str
    tags: list[str]
    latest: bool
    tensors: int
    logical_bytes: int
    new_chunks: int
    new_stored_bytes: int
    dedup_ratio: float
    source: dict[str, Any]
    parent: str | None

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointRow:
        m = c.manifest
        st = m.stats
        return cls(
            id=c.checkpoint_id,
            created=m.created,
            series=m.series,
            tags=list(c.tags),
            latest=bool(c.latest_of),
            tensors=len(m.tensors),
            logical_bytes=m.logical_bytes,
            new_chunks=st.new_chunks,
            new_stored_bytes=st.new_stored_bytes,
            dedup_ratio=(m.logical_bytes / st.new_stored_bytes)
            if st.new_stored_bytes
            else float("inf"),
            source={
                "kind": m.source.kind,
                "location": m.source.location,
                "rank": m.source.rank,
                "world_size": m.source.world_size,
                "metadata": m.source.metadata,
            },
            parent=m.parent,
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["dedup_ratio"] == float("inf"):
            d["dedup_ratio"] = None
        return d


def list_rows(store: Store) -> list[CheckpointRow]:
    return [CheckpointRow.of(c) for c in store.checkpoints()]


@dataclass
class StoreStats:
    """Totals of a store: what users saved vs what it costs."""

    checkpoints: int
    logical_bytes: int  # sum of every checkpoint's size
    unique_chunks: int  # chunks referenced by some checkpoint
    unique_raw_bytes: int  # their decoded size
    stored_bytes: int  # bytes of every chunk object or pack (referenced or not)
    stored_chunks: int
    unreferenced_chunks: int
    dedup_ratio: float  # logical / unique raw
    compression_ratio: float  # unique raw / stored
    total_ratio: float  # logical / stored
    per_checkpoint: list[CheckpointRow] = field(default_factory=list)
    #: stored bytes of chunks no checkpoint's tensors name, kept only as delta bases
    base_only_bytes: int = 0
    base_only_chunks: int = 0
    store_format: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_checkpoint"] = [r.to_json() for r in self.per_checkpoint]
        return d


def store_stats(store: Store) -> StoreStats:
    cps = store.checkpoints()
    manifests = [c.manifest for c in cps]
    raw = _raw_sizes(manifests)
    for m in manifests:
        for b in m.bases.values():
            raw.setdefault(b, 0)
    inventory = store.inventory
    stored, stored_chunks = inventory.stored_bytes(store.workers)
    present = inventory.ids()
    in_tensors = {c for m in manifests for t in m.tensors for c in t.chunks}
    base_only = {b for m in manifests for b in m.bases.values()} - in_tensors
    base_only_sizes = inventory.stored_sizes(base_only, store.workers)
    logical = sum(m.logical_bytes for m in manifests)
    unique_raw = sum(raw.values())
    return StoreStats(
        checkpoints=len(cps),
        logical_bytes=logical,
        unique_chunks=len(raw),
        unique_raw_bytes=unique_raw,
        stored_bytes=stored,
        stored_chunks=stored_chunks,
        unreferenced_chunks=len(present - set(raw)),
        dedup_ratio=logical / unique_raw if unique_raw else 1.0,
        compression_ratio=unique_raw / stored if stored else 1.0,
        total_ratio=logical / stored if stored else 1.0,
        per_checkpoint=[CheckpointRow.of(c) for c in cps],
        base_only_bytes=sum(base_only_sizes.values()),
        base_only_chunks=len(base_only_sizes),
        store_format=inventory.format,
    )


@dataclass
class TensorChange:
    name: str
    status: str  # added | removed | changed | retyped
    blocks_changed: int
    blocks_total: int
    bytes_changed: int
    nbytes: int


@dataclass
class Diff:
    a: str
    b: str
    tensors_total: int
    tensors_changed: int
    bytes_changed: int
    bytes_total: int
    changes: list[TensorChange]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def diff(store: Store, ref_a: str, ref_b: str, series: str = layout.DEFAULT_SERIES) -> Diff:
    """Which tensors differ between two checkpoints, by how many blocks and bytes."""
    ia, ib = store.resolve(ref_a, series), store.resolve(ref_b, series)
    ma, mb = store.manifest(ia), store.manifest(ib)
    ta = {t.name: t for t in ma.tensors}
    tb = {t.name: t for t in mb.tensors}
    changes: list[TensorChange] = []
    for name in sorted(set(ta) | set(tb)):
        a, b = ta.get(name), tb.get(name)
        if a is None and b is not None:
            n = len(b.chunks)
            changes.append(TensorChange(name, "added", n, n, b.nbytes, b.nbytes))
        elif b is None and a is not None:
            n = len(a.chunks)
            changes.append(TensorChange(name, "removed", n, n, a.nbytes, a.nbytes))
        elif a is not None and b is not None:
            if (a.dtype, a.shape) != (b.dtype, b.shape) or ma.block_size != mb.block_size:
                n = len(b.chunks)
                changes.append(TensorChange(name, "retyped", n, n, b.nbytes, b.nbytes))
                continue
            sizes = chunk_sizes(b, mb.block_size)
            diffs = [i for i, (x, y) in enumerate(zip(a.chunks, b.chunks, strict=True)) if x != y]
            if diffs:
                changes.append(
                    TensorChange(
                        name,
                        "changed",
                        len(diffs),
                        len(b.chunks),
                        sum(sizes[i] for i in diffs),
                        b.nbytes,
                    )
                )
    return Diff(
        a=ia,
        b=ib,
        tensors_total=len(set(ta) | set(tb)),
        tensors_changed=len(changes),
        bytes_changed=sum(c.bytes_changed for c in changes),
        bytes_total=mb.logical_bytes,
        changes=changes,
    )
