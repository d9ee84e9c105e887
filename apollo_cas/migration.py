"""Converting a format-1 store (a chunk per object) to format 2 (packs), crash-safely.

Under the exclusive lock (no save, gc or verify runs):

1. every chunk object is copied, verified (decoded and re-hashed), into packs
   in the tensor order of the checkpoints, newest first, so restoring the
   latest reads long ranges; then one index object names them. A format-1
   reader ignores ``packs/`` and ``index/``: until step 2 the store is a
   format-1 store with some garbage beside it;
2. the config is replaced by one that says format 2 (one atomic put);
3. the chunk objects are deleted.

Killed in step 1, a new ``migrate`` reuses what the index already lists;
killed in step 3, a new ``migrate`` (or ``gc``) finds a format-2 store with
leftover chunk objects and deletes those the index lists. ``dry_run`` returns
the plan and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codecs, layout
from .inventory import LooseInventory, PackIndex
from .manifest import DEFAULT_PACK_SIZE, StoreConfig
from .pack_objects import PackWriter, write_index
from .parallel import bounded_map
from .store import Store

ProgressFn = Callable[[str, int, int], None]


@dataclass
class MigrationReport:
    """What ``migrate`` did (or, with ``dry_run``, would do)."""

    dry_run: bool
    from_format: int
    to_format: int = 2
    chunks: int = 0  # chunk objects to move
    chunk_bytes: int = 0
    packs_written: int = 0
    already_packed: int = 0  # found in an index of an interrupted migration
    chunk_objects_deleted: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "from_format": self.from_format,
            "to_format": self.to_format,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "packs_written": self.packs_written,
            "already_packed": self.already_packed,
            "chunk_objects_deleted": self.chunk_objects_deleted,
            "seconds": round(self.seconds, 4),
        }


def _order(store: Store, present: set[bytes]) -> list[bytes]:
    """Chunks in the tensor order of the checkpoints, newest first, then the
    ones no checkpoint names (moved too: gc reclaims them from packs)."""
    out: dict[bytes, None] = {}
    for c in reversed(store.checkpoints()):
        m = c.manifest
        for t in m.tensors:
            for cid in t.chunks:
                if cid in present:
                    out.setdefault(cid)
        for base in m.bases.values():
            if base in present:
                out.setdefault(base)
    return list(out) + sorted(present - set(out))


def migrate(
    store: Store,
    *,
    dry_run: bool = False,
    pack_size: int = DEFAULT_PACK_SIZE,
    lock_timeout: float = 600.0,
    progress: ProgressFn | None = None,
) -> MigrationReport:
    """Convert ``store`` to format 2 (see the module docstring)."""
    t0 = time.perf_counter()
    step = progress or (lambda stage, done, total: None)
    cfg = StoreConfig.decode(store.backend.get(layout.CONFIG_KEY), store.location)
    report = MigrationReport(dry_run=dry_run, from_format=cfg.format)
    loose = LooseInventory(store.backend)
    if dry_run:
        present = loose.ids()
        needed = _order(store, present)
        sizes = loose.stored_sizes(needed, store.workers)
        report.chunks, report.chunk_bytes = len(needed), sum(sizes.values())
        report.packs_written = -(-report.chunk_bytes // pack_size) if needed else 0
        report.chunk_objects_deleted = len(needed) if cfg.format == 1 else 0
        report.seconds = time.perf_counter() - t0
        return report
    with store.locks.hold("exclusive", "migrate", timeout=lock_timeout):
        present = loose.ids()
        if cfg.format == 1:
            idx = PackIndex.load(store.backend, store.workers)  # an interrupted migration's
            needed = _order(store, present)
            todo = [c for c in needed if c not in idx.chunks]
            report.chunks, report.already_packed = len(needed), len(needed) - len(todo)
            writer = PackWriter(store.backend, pack_size)
            try:

                def load(cid: bytes) -> tuple[bytes, bytes]:
                    blob = loose.read_envelope(cid)
                    store.chunks.decode(cid, blob)  # never carry damage into a pack
                    return cid, blob

                for i, (cid, blob) in enumerate(bounded_map(load, todo, store.workers)):
                    base = codecs.base_of(blob)
                    raw = codecs.info(blob)[1]
                    writer.append(cid, blob, raw, bytes.fromhex(base) if base else None)
                    report.chunk_bytes += len(blob)
                    step("pack", i + 1, len(todo))
                infos = writer.close()
            except BaseException:
                writer.abandon()
                raise
            store.backend.sync()
            if infos:
                write_index(store.backend, infos)
            report.packs_written = len(infos)
            # Step 2: the store is format 2 from here on (one atomic replace).
            new = StoreConfig(
                store_id=cfg.store_id,
                created=cfg.created,
                chunk_hash=cfg.chunk_hash,
                format=2,
                pack_size=pack_size,
            )
            store.backend.put(layout.CONFIG_KEY, new.encode())
            store.repo.open_config(create=False)
        # Step 3: chunk objects the index lists are now copies.
        idx = PackIndex.load(store.backend, store.workers)
        gone = [c for c in present if c in idx.chunks]
        loose.delete(gone, store.workers)
        store.backend.sync()
        report.chunk_objects_deleted = len(gone)
    store.chunks.forget_known()
    report.seconds = time.perf_counter() - t0
    return report
