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
        if m.saved_files is not None:  # the saved-file record (exact restores) is a chunk too
            sizes[m.saved_files.chunk] = m.saved_files.size
    return sizes


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("inf")


@dataclass
class CheckpointRow:
    """One line of ``list`` / ``stats``.

    Dedup and compression are kept apart, as borg's ``info`` does: of
    ``logical_bytes`` (the checkpoint's size), ``new_raw_bytes`` were blocks the
    store lacked (dedup ratio = logical / new raw) and those took
    ``new_stored_bytes`` once compressed (compression ratio = new raw / new
    stored). A save whose blocks were all new has a dedup ratio of 1.
    """

    id: str
    created: float
    series: str
    tags: list[str]
    latest: bool
    tensors: int
    logical_bytes: int
    new_chunks: int
    new_raw_bytes: int
    new_stored_bytes: int
    dedup_ratio: float
    compression_ratio: float
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
            new_raw_bytes=st.new_raw_bytes,
            new_stored_bytes=st.new_stored_bytes,
            dedup_ratio=_ratio(m.logical_bytes, st.new_raw_bytes),
            compression_ratio=_ratio(st.new_raw_bytes, st.new_stored_bytes),
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
        for k in ("dedup_ratio", "compression_ratio"):
            if d[k] == float("inf"):
                d[k] = None  # nothing new: no ratio
        return d


def list_rows(store: Store) -> list[CheckpointRow]:
    return [CheckpointRow.of(c) for c in store.checkpoints()]


@dataclass
class StoreStats:
    """Totals of a store: what users saved vs what it costs.

    As borg's ``info``: ``logical_bytes`` is the original size of all
    checkpoints, ``compressed_bytes`` what they would take each stored on its
    own (the stored size of every chunk of every checkpoint, shared chunks
    counted once per checkpoint; a delta chunk counts its delta) and
    ``deduplicated_bytes`` what the store holds for them (each chunk once).

    Delta bases: a changed block may be stored as an XOR delta against the
    parent's block, so that older chunk stays as long as the delta does, even
    after gc forgot every checkpoint that used it directly.
    ``base_only_chunks`` / ``base_only_stored_bytes`` count those; they are why
    a ``gc --keep-last 1`` can free less than the forgotten checkpoints' new
    bytes. The compression ratio is over the chunks checkpoints use directly.
    """

    checkpoints: int
    logical_bytes: int  # sum of every checkpoint's size (original)
    compressed_bytes: int  # sum over checkpoints of their chunks' stored sizes
    deduplicated_bytes: int  # stored size of the chunks checkpoints need, each once
    unique_chunks: int  # chunks checkpoints need: used directly or as delta bases
    unique_raw_bytes: int  # decoded size of the chunks used directly
    base_only_chunks: int  # chunks kept only as delta bases of other chunks
    base_only_stored_bytes: int
    stored_bytes: int  # bytes of every chunk object or pack (referenced or not)
    stored_chunks: int
    unreferenced_chunks: int
    dedup_ratio: float  # logical / unique raw
    compression_ratio: float  # unique raw / stored size of the chunks used directly
    total_ratio: float  # logical / stored
    per_checkpoint: list[CheckpointRow] = field(default_factory=list)
    #: the same as ``base_only_stored_bytes`` (the name the packs report used)
    base_only_bytes: int = 0
    store_format: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_checkpoint"] = [r.to_json() for r in self.per_checkpoint]
        return d


def base_only(manifests: list[Manifest]) -> set[bytes]:
    """Chunks that ``manifests`` need only as delta bases (no tensor uses them)."""
    used = {c for m in manifests for t in m.tensors for c in t.chunks}
    return {b for m in manifests for b in m.bases.values()} - used


def store_stats(store: Store) -> StoreStats:
    cps = store.checkpoints()
    manifests = [c.manifest for c in cps]
    raw = _raw_sizes(manifests)
    bases = base_only(manifests)
    inventory = store.inventory
    inventory.refresh()  # what is there now, not what this process saw
    stored, stored_chunks = inventory.stored_bytes(store.workers)
    present = inventory.ids()
    needed = set(raw) | bases
    by_id = inventory.stored_sizes(needed, store.workers)
    used_stored = sum(by_id.get(c, 0) for c in raw)
    bases_stored = sum(by_id.get(c, 0) for c in bases)
    # Each checkpoint on its own: its chunks, plus the delta bases only it needs.
    compressed = sum(
        sum(by_id.get(c, 0) for t in m.tensors for c in t.chunks)
        + sum(by_id.get(c, 0) for c in base_only([m]))
        + (by_id.get(m.saved_files.chunk, 0) if m.saved_files is not None else 0)
        for m in manifests
    )
    logical = sum(m.logical_bytes for m in manifests)
    unique_raw = sum(raw.values())
    return StoreStats(
        checkpoints=len(cps),
        logical_bytes=logical,
        compressed_bytes=compressed,
        deduplicated_bytes=used_stored + bases_stored,
        unique_chunks=len(raw) + len(bases),
        unique_raw_bytes=unique_raw,
        base_only_chunks=len(bases),
        base_only_stored_bytes=bases_stored,
        stored_bytes=stored,
        stored_chunks=stored_chunks,
        unreferenced_chunks=len(present - needed),
        dedup_ratio=logical / unique_raw if unique_raw else 1.0,
        compression_ratio=unique_raw / used_stored if used_stored else 1.0,
        total_ratio=logical / stored if stored else 1.0,
        per_checkpoint=[CheckpointRow.of(c) for c in cps],
        base_only_bytes=bases_stored,
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
