"""``verify``: prove that every checkpoint a ref or manifest names can be restored.

Checks, in order:

1. the store config is readable and of a known format (``Store.open`` already
   refuses an unknown version with :class:`~apollo_cas.errors.FormatVersionError`);
2. every ref (series ``latest``, tags, members of multi-rank groups) holds a checkpoint id whose manifest
   exists, hashes to its id and decodes;
3. every manifest hashes to its id and decodes;
4. every chunk a manifest needs (delta bases included) exists (format 2: in a
   pack that exists, has the size its index says, and holds its range);
5. with ``read_data`` (or a random subset), every such chunk is read, decoded
   and re-hashed (``Store.read_chunk`` raises ``CorruptChunk`` on a mismatch).

Each damaged chunk is reported with the checkpoints and tensors it breaks. A
chunk nothing references and leftovers of interrupted writes are garbage for
gc, not damage. verify holds a shared lock (like a save), so a concurrent gc
cannot delete a manifest under it and make healthy data look missing.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .codecs import chain, delta
from .errors import ApolloError, ObjectNotFound, PermissionDenied, UsageError
from .hashing import digest_hex
from .inventory import PackInventory
from .manifest import GroupRecord, Manifest, StoreConfig
from .parallel import bounded_map
from .store import Store
from .targets.assemble import block_length

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def parse_subset(text: str) -> float | int:
    """``"10%"`` -> 0.1, ``"0.25"`` -> 0.25 (a fraction), ``"500"`` -> 500 chunks."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if 0 < pct <= 100:
                return pct / 100
        elif re.fullmatch(r"\d+", t):
            if int(t) > 0:
                return int(t)
        else:
            frac = float(t)
            if 0 < frac <= 1:
                return frac
    except ValueError:
        pass
    raise UsageError(
        f"cannot read --read-data-subset {text!r}",
        "use a percentage (10%), a fraction (0.1) or a number of chunks (500)",
    )


@dataclass
class ChunkDamage:
    """A chunk that is missing or does not decode to the bytes its id names."""

    chunk: str
    reason: str
    breaks: dict[str, list[str]] = field(default_factory=dict)  # checkpoint -> tensors

    def to_json(self) -> dict[str, Any]:
        tensors = sorted({t for ts in self.breaks.values() for t in ts})
        return {
            "chunk": self.chunk,
            "reason": self.reason,
            "checkpoints": sorted(self.breaks),
            "tensors": tensors,
            "breaks": {k: sorted(v) for k, v in sorted(self.breaks.items())},
        }


@dataclass
class ManifestDamage:
    """A manifest that is unreadable, of an unknown version, or not what its id says."""

    checkpoint: str
    reason: str
    refs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "reason": self.reason, "refs": self.refs}


@dataclass
class RefDamage:
    """A ref whose value is not an id, or names a missing or damaged manifest."""

    ref: str
    target: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "target": self.target, "reason": self.reason}


@dataclass
class VerifyReport:
    """What verify checked and what it found."""

    location: str
    config: dict[str, Any] = field(default_factory=dict)
    refs_checked: int = 0
    manifests_checked: int = 0
    chunks_referenced: int = 0
    chunks_present: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    read_data: bool = False
    unreferenced_chunks: int = 0
    damaged_refs: list[RefDamage] = field(default_factory=list)
    damaged_manifests: list[ManifestDamage] = field(default_factory=list)
    damaged_chunks: list[ChunkDamage] = field(default_factory=list)
    #: checkpoint id -> refs naming it, for every checkpoint some damage breaks
    broken_checkpoints: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    locked: bool = False  # whether it ran under a shared lock

    @property
    def ok(self) -> bool:
        return not (self.damaged_refs or self.damaged_manifests or self.damaged_chunks)

    def summary(self) -> str:
        """One line: the verdict."""
        if self.ok:
            what = (
                f"{self.chunks_read} chunks read and re-hashed"
                if self.read_data
                else f"{self.chunks_referenced} chunks present"
            )
            return (
                f"store {self.location} is healthy: {self.refs_checked} refs, "
                f"{self.manifests_checked} manifests, {what}"
            )
        parts = []
        if self.damaged_chunks:
            parts.append(f"{len(self.damaged_chunks)} damaged chunk(s)")
        if self.damaged_manifests:
            parts.append(f"{len(self.damaged_manifests)} damaged manifest(s)")
        if self.damaged_refs:
            parts.append(f"{len(self.damaged_refs)} damaged ref(s)")
        return (
            f"store {self.location} is damaged: {', '.join(parts)}, breaking "
            f"{len(self.broken_checkpoints)} checkpoint(s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "location": self.location,
            "config": self.config,
            "refs_checked": self.refs_checked,
            "manifests_checked": self.manifests_checked,
            "chunks_referenced": self.chunks_referenced,
            "chunks_present": self.chunks_present,
            "read_data": self.read_data,
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "unreferenced_chunks": self.unreferenced_chunks,
            "damaged_refs": [d.to_json() for d in self.damaged_refs],
            "damaged_manifests": [d.to_json() for d in self.damaged_manifests],
            "damaged_chunks": [d.to_json() for d in self.damaged_chunks],
            "broken_checkpoints": {k: v for k, v in sorted(self.broken_checkpoints.items())},
            "locked": self.locked,
            "seconds": round(self.seconds, 4),
        }


def _ref_targets(store: Store, report: VerifyReport) -> list[tuple[str, str]]:
    """(display name, raw target) of every ref: series, tags, and each member of
    a multi-rank group. Unreadable refs are reported here."""
    out = []
    keys = [
        (f"latest@{k[len(layout.SERIES_PREFIX) :]}", k)
        for k in sorted(store.backend.list(layout.SERIES_PREFIX))
    ]
    keys += [
        (f"tag {k[len(layout.TAGS_PREFIX) :]}", k)
        for k in sorted(store.backend.list(layout.TAGS_PREFIX))
    ]
    for name, key in keys:
        try:
            raw = store.backend.get(key)
        except ObjectNotFound:
            continue  # deleted while we listed (untag)
        out.append((name, raw.decode("ascii", "replace").strip()))
    for key in sorted(store.backend.list(layout.GROUPS_PREFIX)):
        name = f"group {key[len(layout.GROUPS_PREFIX) :]}"
        try:
            rec = GroupRecord.decode(store.backend.get(key), key)
        except ObjectNotFound:
            continue
        except ApolloError as exc:
            report.refs_checked += 1
            report.damaged_refs.append(RefDamage(name, "", exc.message))
            continue
        out += [(f"{name} rank {r}", cid) for r, cid in sorted(rec.members.items())]
    return out


def _load(store: Store, cid: str) -> Manifest | str:
    """The manifest, or the reason it cannot be used."""
    try:
        data = store.backend.get(layout.manifest_key(cid))
    except ObjectNotFound:
        return "manifest is missing"
    if digest_hex(data) != cid:
        return "content does not hash to its id (corrupt)"
    try:
        return Manifest.decode(data, layout.manifest_key(cid))
    except ApolloError as exc:  # CorruptManifest, FormatVersionError
        return exc.message


def _bases_problem(m: Manifest) -> str | None:
    """Why the manifest's delta bases cannot all be followed (a loop, a chain too long)."""
    fine: set[bytes] = set()
    for start in m.bases:
        if start in fine:
            continue
        try:
            fine.update(chain.walk(start, m.bases.get))
        except chain.ChainError as exc:
            return f"its delta bases cannot be followed: {exc}"
    return None


def verify(
    store: Store,
    *,
    read_data: bool = False,
    subset: float | int | None = None,
    progress: ProgressFn | None = None,
    seed: int | None = None,
    lock: bool = True,
) -> VerifyReport:
    """Check the whole store; see the module docstring. Never modifies the store.

    ``subset`` (a fraction in (0, 1] or a number of chunks) reads a random sample
    of the chunks and implies ``read_data``.
    """
    with ExitStack() as stack:
        locked = False
        if lock:
            try:
                stack.enter_context(store.locks.hold("shared", "verify"))
                locked = True
            except PermissionDenied:
                # A store we may read but not write (a read-only mount, read-only
                # credentials): check it anyway; only a concurrent gc could cause
                # a false alarm, and the report says it ran unlocked.
                pass
        report = _verify(store, read_data, subset, progress, seed)
        report.locked = locked
        return report


def _verify(
    store: Store,
    read_data: bool,
    subset: float | int | None,
    progress: ProgressFn | None,
    seed: int | None,
) -> VerifyReport:
    t0 = time.perf_counter()
    step = progress or (lambda stage, done, total: None)
    report = VerifyReport(location=store.location, read_data=read_data or subset is not None)
    cfg = StoreConfig.decode(store.backend.get(layout.CONFIG_KEY), store.location)
    report.config = {
        "store_id": cfg.store_id,
        "format": cfg.format,
        "chunk_hash": cfg.chunk_hash,
        "created": cfg.created,
    }

    # -- manifests ---------------------------------------------------------------
    ids = store.checkpoint_ids()
    step("manifests", 0, len(ids))
    manifests: dict[str, Manifest] = {}
    bad_manifest: dict[str, str] = {}
    for i, (cid, got) in enumerate(
        zip(ids, bounded_map(lambda c: _load(store, c), ids, store.workers), strict=True)
    ):
        if isinstance(got, Manifest):
            manifests[cid] = got
        else:
            bad_manifest[cid] = got
        step("manifests", i + 1, len(ids))
    report.manifests_checked = len(ids)

    # -- refs --------------------------------------------------------------------
    refs_of: dict[str, list[str]] = {}
    for name, target in _ref_targets(store, report):
        report.refs_checked += 1
        try:
            layout.check_hex_id(target, "ref target")
        except UsageError:
            report.damaged_refs.append(RefDamage(name, target[:64], "not a checkpoint id"))
            continue
        refs_of.setdefault(target, []).append(name)
        if target in bad_manifest:
            report.damaged_refs.append(
                RefDamage(name, target, f"its manifest is damaged: {bad_manifest[target]}")
            )
        elif target not in manifests:
            got = _load(store, target)  # not listed: missing (or named oddly)
            if isinstance(got, Manifest):
                manifests[target] = got
            else:
                bad_manifest[target] = got
                report.damaged_refs.append(
                    RefDamage(name, target, f"names a checkpoint whose {got}")
                )
    for cid, reason in sorted(bad_manifest.items()):
        if reason == "manifest is missing" and cid not in refs_of:
            continue
        report.damaged_manifests.append(ManifestDamage(cid, reason, sorted(refs_of.get(cid, []))))
        report.broken_checkpoints[cid] = sorted(refs_of.get(cid, []))

    # -- delta bases: no loops, no chain longer than the format allows --------------
    for cid, m in sorted(manifests.items()):
        problem = _bases_problem(m)
        if problem is not None:
            report.damaged_manifests.append(
                ManifestDamage(cid, problem, sorted(refs_of.get(cid, [])))
            )
            report.broken_checkpoints[cid] = sorted(refs_of.get(cid, []))

    # -- chunks: existence ---------------------------------------------------------
    needed: set[bytes] = set()
    #: chunk -> every length a place names it for (more than one: some place is wrong)
    sizes: dict[bytes, set[int]] = {}
    for m in manifests.values():
        needed |= m.chunk_ids()
        for t in m.tensors:
            for i, c in enumerate(t.chunks):
                sizes.setdefault(c, set()).add(block_length(t, i, m.block_size))
    inventory = store.inventory
    inventory.refresh(reread=True)  # what is there now, under our lock, not what this process saw
    present = inventory.ids()
    report.chunks_referenced = len(needed)
    report.chunks_present = len(present & needed)
    report.unreferenced_chunks = len(present - needed)
    damaged: dict[bytes, str] = {c: "missing" for c in needed - present}
    misplaced: dict[bytes, int] = {}  # chunk -> its length, where places disagree on it
    if isinstance(inventory, PackInventory):  # format 2: packs gone or cut short
        damaged.update(
            {c: why for c, why in inventory.damaged(store.workers).items() if c in needed}
        )

    # -- chunks: content -----------------------------------------------------------
    if report.read_data:
        to_read = sorted((needed & present) - set(damaged))
        if subset is not None:
            n = subset if isinstance(subset, int) else max(1, round(len(to_read) * subset))
            if n < len(to_read):
                to_read = sorted(random.Random(seed).sample(to_read, n))

        def check(cid: bytes) -> tuple[bytes, int, str | None]:
            # One length asked for everywhere: read() checks it (before decoding).
            # Several: read without, and judge each place below.
            want = sizes.get(cid, set())
            try:
                size = next(iter(want)) if len(want) == 1 else None
                return cid, len(store.read_chunk(cid, size)), None
            except ApolloError as exc:  # CorruptChunk, or an I/O error on this chunk
                return cid, 0, exc.message

        step("read", 0, len(to_read))
        for i, (chunk, size, err) in enumerate(bounded_map(check, to_read, store.workers)):
            report.chunks_read += 1
            report.bytes_read += size
            if err is not None:
                damaged[chunk] = err
            elif len(sizes.get(chunk, ())) > 1:
                misplaced[chunk] = size
                others = sorted(sizes[chunk] - {size})
                damaged[chunk] = (
                    f"chunk {chunk.hex()} is {size} bytes, but checkpoints name it for blocks of "
                    + ", ".join(map(str, others))
                    + " bytes"
                )
            if i % 256 == 0 or i + 1 == len(to_read):
                step("read", i + 1, len(to_read))

    # -- what the damage breaks -----------------------------------------------------
    if damaged:
        by_id = {cid: ChunkDamage(cid.hex(), reason) for cid, reason in sorted(damaged.items())}
        for cp, m in manifests.items():
            for t in m.tensors:
                for bi, c in enumerate(t.chunks):
                    # A chunk is broken if it, or any base in its delta chain, is damaged;
                    # one of several lengths breaks only the places that need another.
                    fits = misplaced.get(c) == block_length(t, bi, m.block_size)
                    link: bytes | None = c
                    hops = 0
                    while link is not None and hops <= delta.MAX_DEPTH:
                        hit = by_id.get(link)
                        if hit is not None and not (link == c and fits):
                            names = hit.breaks.setdefault(cp, [])
                            if t.name not in names:
                                names.append(t.name)
                            report.broken_checkpoints[cp] = sorted(refs_of.get(cp, []))
                        link = m.bases.get(link)
                        hops += 1
            rec = m.saved_files  # its damage breaks the exact restore, not the tensors
            if rec is not None and rec.chunk in by_id:
                by_id[rec.chunk].breaks.setdefault(cp, []).append("(saved-file record)")
                report.broken_checkpoints[cp] = sorted(refs_of.get(cp, []))
        report.damaged_chunks = list(by_id.values())
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["ChunkDamage", "ManifestDamage", "RefDamage", "VerifyReport", "parse_subset", "verify"]
