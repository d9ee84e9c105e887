"""The repository core: config, refs and tags, manifests, the chunk inventory, the commit.

:class:`Repository` owns everything a store *is* (design review, move 1); the
:class:`~apollo_cas.store.Store` facade composes it with the save path and the
restore targets. Nothing here imports a source, a target or the decoder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from . import codecs, frontend, layout, settings
from .backends import Backend
from .chunkstore import ChunkStore
from .errors import (
    AmbiguousRef,
    ConcurrentUpdate,
    CorruptManifest,
    InvalidName,
    ObjectNotFound,
    RefNotFound,
    Refused,
    StoreNotFound,
)
from .filesets import same_files
from .hashing import digest_hex
from .inventory import ChunkInventory, open_inventory
from .manifest import (
    DEFAULT_PACK_SIZE,
    GroupRecord,
    Manifest,
    SourceInfo,
    StoreConfig,
)

_CAS_RETRIES = 20

#: The format new stores are created in (docs/FORMAT.md); ``APOLLO_CAS_FORMAT=1``
#: creates format-1 stores (for tools that read chunk objects directly).
DEFAULT_FORMAT = 2


def new_store_format() -> int:
    """The format a store created now gets: ``APOLLO_CAS_FORMAT``, else the default."""
    return settings.store_format() or DEFAULT_FORMAT


def new_pack_size() -> int:
    """The target pack size a format-2 store created now gets:
    ``APOLLO_CAS_PACK_SIZE`` (bytes; tests and benchmarks use small ones), else 64 MiB."""
    return settings.pack_size() or DEFAULT_PACK_SIZE


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint id with its manifest and the refs that name it."""

    checkpoint_id: str
    manifest: Manifest
    tags: tuple[str, ...] = ()
    latest_of: tuple[str, ...] = ()


class Repository:
    """Config, refs, manifests (cached) and chunks of one store."""

    def __init__(self, backend: Backend, policy: codecs.CodecPolicy, workers: int) -> None:
        self.backend = backend
        self.workers = workers
        self.config: StoreConfig | None = None
        self._planned: StoreConfig | None = None  # an unborn store's config-to-be
        self.chunks = ChunkStore(backend, policy)
        self._manifests: dict[str, Manifest] = {}
        # Format 1 until open_config has read the store's config.

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def inventory(self) -> ChunkInventory:
        """The chunks present, in this store's format (its config is read first if
        nothing has read it yet: a ``Store(backend)`` that gc or verify walks must
        not take a format-2 store for a format-1 one)."""
        if self.config is None and self._planned is None:
            # unborn: nothing stored yet, in either format
            with contextlib.suppress(StoreNotFound):
                self.open_config(create=False)
        return self.chunks.inventory

    @property
    def format(self) -> int:
        return self.config.format if self.config else 1

    def _use(self, cfg: StoreConfig) -> None:
        if self.config is None or self.config.format != cfg.format:
            self.chunks.inventory = open_inventory(
                self.backend, cfg.format, cfg.pack_size, self.workers
            )
        self.config = cfg

    def open_config(
        self, create: bool, fmt: int | None = None, pack_size: int | None = None
    ) -> StoreConfig:
        """Read (with ``create``: first write) the config; chooses the inventory."""
        where = self.location
        try:
            cfg = StoreConfig.decode(self.backend.get(layout.CONFIG_KEY), where)
        except ObjectNotFound:
            if not create:
                raise StoreNotFound(
                    f"no apollo_cas store at {where}",
                    f"check {frontend.store_origin()}; a store is created by its first save",
                ) from None
            new = self._planned or self.plan_config(fmt, pack_size)
            self.backend.put_if_absent(layout.CONFIG_KEY, new.encode())
            # Another process may have created it first: what is there wins.
            cfg = StoreConfig.decode(self.backend.get(layout.CONFIG_KEY), where)
            if cfg.format != new.format:
                # Our chunks were written in the layout we planned, not this one.
                raise ConcurrentUpdate(
                    f"another process created {where} in store format {cfg.format} while this "
                    f"save wrote format {new.format}; nothing was committed",
                    "run the save again",
                ) from None
        self._use(cfg)
        return cfg

    def plan_config(self, fmt: int | None = None, pack_size: int | None = None) -> StoreConfig:
        """The config an unborn store gets at its first commit (``unborn.py``), used
        from now on: the first save's chunks go into that format's layout before
        the config that names the format exists."""
        if self._planned is None:
            self._planned = StoreConfig(
                format=fmt or new_store_format(), pack_size=pack_size or new_pack_size()
            )
        self._use(self._planned)
        return self._planned

    # -- refs ----------------------------------------------------------------
    def read_ref(self, key: str) -> str | None:
        """The checkpoint id a ref names, None if there is no such ref."""
        try:
            value = self.backend.get(key).decode("ascii", "replace").strip()
        except ObjectNotFound:
            return None
        try:
            return layout.check_hex_id(value, "ref target")
        except InvalidName:
            # Not its content: a ref of a hostile store may hold anyone's secret.
            raise CorruptManifest(
                f"ref {key} in {self.location} is damaged (it does not hold a checkpoint id)",
                "point it at a good checkpoint with 'apollo-cas tag'",
            ) from None

    def latest(self, series: str = layout.DEFAULT_SERIES) -> str | None:
        """The id of the newest checkpoint of ``series``, or None."""
        return self.read_ref(layout.series_key(series))

    def series(self) -> dict[str, str]:
        out = {}
        for key in self.backend.list(layout.SERIES_PREFIX):
            name = key[len(layout.SERIES_PREFIX) :]
            target = self.read_ref(key)
            if target:
                out[name] = target
        return out

    def tags(self) -> dict[str, str]:
        out = {}
        for key in self.backend.list(layout.TAGS_PREFIX):
            target = self.read_ref(key)
            if target:
                out[key[len(layout.TAGS_PREFIX) :]] = target
        return out

    def tag(
        self, ref: str, name: str, *, force: bool = False, series: str = layout.DEFAULT_SERIES
    ) -> str:
        """Point tag ``name`` at ``ref``. An existing tag moves only with ``force``.

        The caller holds a shared lock (``Store.tag``), so the checkpoint
        resolved here still exists when the tag is written.
        """
        key = layout.tag_key(name)
        target = self.resolve(ref, series)
        for _ in range(_CAS_RETRIES):
            current = self.read_ref(key)
            if current is not None and current != target and not force:
                raise Refused(
                    f"tag {name!r} already names {current[:12]}",
                    "pick another name, or pass --force to move it",
                )
            expected = self.backend.get(key) if current is not None else None
            if self.backend.compare_and_swap(key, expected, target.encode()):
                return target
        raise ConcurrentUpdate(f"tag {name!r} kept changing", "retry")

    def untag(self, name: str) -> None:
        """Delete a tag (the checkpoint stays until gc's retention drops it)."""
        key = layout.tag_key(name)
        try:
            old = self.backend.get(key)
        except ObjectNotFound:
            raise RefNotFound(
                f"no tag {name!r} in {self.location}", "see 'apollo-cas list'"
            ) from None
        self.backend.compare_and_swap(key, old, None)

    # -- manifests -----------------------------------------------------------
    def checkpoint_ids(self) -> list[str]:
        return [
            k[len(layout.MANIFESTS_PREFIX) :]
            for k in self.backend.list(layout.MANIFESTS_PREFIX)
            if len(k) == len(layout.MANIFESTS_PREFIX) + 32
        ]

    def manifest(self, checkpoint_id: str) -> Manifest:
        """Load and check one manifest (its bytes must hash to its id)."""
        cached = self._manifests.get(checkpoint_id)
        if cached is not None:
            return cached
        key = layout.manifest_key(checkpoint_id)
        try:
            data = self.backend.get(key)
        except ObjectNotFound:
            raise CorruptManifest(
                f"checkpoint {checkpoint_id} is referenced but its manifest is missing",
                "run 'apollo-cas verify'",
            ) from None
        if digest_hex(data) != checkpoint_id:
            raise CorruptManifest(
                f"manifest {checkpoint_id} is corrupt (content does not match its id)",
                "run 'apollo-cas verify'; restore another checkpoint",
            )
        m = Manifest.decode(data, key)
        self._manifests[checkpoint_id] = m
        return m

    def resolve(self, ref: str | None, series: str = layout.DEFAULT_SERIES) -> str:
        """Turn ``latest``, a tag, or a unique id prefix into a checkpoint id."""
        ref = ref or "latest"
        if ref == "latest" or ref.startswith("latest@"):
            s = ref.split("@", 1)[1] if "@" in ref else series
            target = self.latest(s)
            if target is None:
                raise RefNotFound(
                    f"series {s!r} in {self.location} has no checkpoint yet",
                    "save one first, or name a checkpoint id or tag",
                )
            return target
        low = ref.lower()
        if layout.is_hex_id(low) and self.backend.exists(layout.manifest_key(low)):
            # A full id: one existence check, not a listing of every manifest.
            return low
        try:
            target = self.read_ref(layout.tag_key(ref))
        except InvalidName:
            target = None
        if target:
            return target
        # Any unique prefix, down to one character, as the help says (git wants
        # four, but a store holds far fewer checkpoints than a repository commits).
        if low and all(c in "0123456789abcdef" for c in low):
            hits = [c for c in self.checkpoint_ids() if c.startswith(low)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise AmbiguousRef(
                    f"{ref!r} matches {len(hits)} checkpoints", "give more characters of the id"
                )
        raise RefNotFound(
            f"no checkpoint or tag {ref!r} in {self.location}",
            "see 'apollo-cas list' for ids and tags",
        )

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first, with the refs naming it."""
        tags: dict[str, list[str]] = {}
        for t, cid in self.tags().items():
            tags.setdefault(cid, []).append(t)
        latest: dict[str, list[str]] = {}
        for s, cid in self.series().items():
            latest.setdefault(cid, []).append(s)
        out = []
        for cid in self.checkpoint_ids():
            m = self._listed_manifest(cid)
            if m is not None:
                tagged, latest_of = (
                    tuple(sorted(tags.get(cid, []))),
                    tuple(sorted(latest.get(cid, []))),
                )
                out.append(Checkpoint(cid, m, tagged, latest_of))
        out.sort(key=lambda c: (c.manifest.created, c.checkpoint_id))
        return out

    def _listed_manifest(self, checkpoint_id: str) -> Manifest | None:
        """A manifest found by listing, or None if it vanished since and no ref names it.

        Listing and loading take no lock: a save that lost the ref race deletes
        the manifest it just wrote (no ref ever named it), and gc or forget
        delete forgotten ones. Only a manifest that a ref names and that is
        missing is damage.
        """
        try:
            return self.manifest(checkpoint_id)
        except CorruptManifest:
            key = layout.manifest_key(checkpoint_id)
            if self.backend.exists(key) or checkpoint_id in self._ref_targets():
                raise
            return None

    def _ref_targets(self) -> set[str]:
        return set(self.tags().values()) | set(self.series().values())

    # -- multi-rank groups ---------------------------------------------------------
    def join_group(self, name: str, series: str, info: SourceInfo, cid: str) -> GroupRecord:
        """Add this rank's checkpoint to group ``name`` by compare-and-swap."""
        base_series = series.rsplit(".rank", 1)[0]
        key = layout.group_key(base_series, name)
        world = info.world_size or 1
        rank = info.rank or 0
        for _ in range(_CAS_RETRIES):
            try:
                old: bytes | None = self.backend.get(key)
            except ObjectNotFound:
                old = None
            rec = (
                GroupRecord.decode(old, key)
                if old is not None
                else GroupRecord(series=base_series, name=name, world_size=world, members={})
            )
            if rec.world_size != world:
                raise Refused(
                    f"group {name!r} has world size {rec.world_size}, this rank says {world}",
                    "use another --group name for a different parallel layout",
                )
            rec = replace(rec, members={**rec.members, rank: cid})
            if self.backend.compare_and_swap(key, old, rec.encode()):
                return rec
        raise ConcurrentUpdate(f"group {name!r} kept changing", "retry")

    def groups(self) -> list[GroupRecord]:
        """Every multi-rank checkpoint, oldest first."""
        out = []
        for key in self.backend.list(layout.GROUPS_PREFIX):
            try:
                out.append(GroupRecord.decode(self.backend.get(key), key))
            except ObjectNotFound:
                continue
        return sorted(out, key=lambda g: (g.created, g.series, g.name))

    def group(self, name: str, series: str = layout.DEFAULT_SERIES) -> GroupRecord:
        key = layout.group_key(series, name)
        try:
            return GroupRecord.decode(self.backend.get(key), key)
        except ObjectNotFound:
            raise RefNotFound(
                f"no group {name!r} in series {series!r} of {self.location}",
                "see 'apollo-cas list'",
            ) from None

    def commit(
        self, manifest: Manifest, parent_id: str | None, force: bool, dated: bool = False
    ) -> tuple[str, Manifest, bool]:
        """Write the manifest durably, then move the series ref by compare-and-swap.

        If another save moved the ref first, re-parent onto it (or, if it
        recorded the same content, add nothing): neither checkpoint is lost or
        recorded twice. A ``dated`` checkpoint (its time came from the source)
        older than the latest is recorded beside it (:meth:`_commit_beside`).
        Every manifest passes the reader's own checks before it is written.
        """
        key = layout.series_key(manifest.series)
        where = f"save of {manifest.source.location or manifest.source.kind}"
        for _ in range(_CAS_RETRIES):
            if (
                dated
                and parent_id is not None
                and manifest.created < self.manifest(parent_id).created
            ):
                return self._commit_beside(manifest, where)
            data = manifest.encode_checked(where)
            cid = digest_hex(data)
            wrote = self.backend.put_if_absent(layout.manifest_key(cid), data)
            expected = parent_id.encode() if parent_id else None
            if self.backend.compare_and_swap(key, expected, cid.encode()):
                self._manifests[cid] = manifest
                return cid, manifest, False
            if wrote:
                # Lost the race: this manifest names the old parent and no ref
                # names it. Left in place it would list as a second copy of this
                # checkpoint; the re-parented one below replaces it.
                self.backend.delete(layout.manifest_key(cid))
            parent_id = self.latest(manifest.series)
            if parent_id is None:
                continue
            other = self.manifest(parent_id)
            if (
                other.tensors == manifest.tensors
                and same_files(manifest.saved_files, other)
                and not force
            ):
                return parent_id, other, True
            manifest = replace(manifest, parent=parent_id)
        raise ConcurrentUpdate(
            f"series {manifest.series!r} kept moving while saving",
            "too many concurrent saves to one series; retry",
        )

    def _commit_beside(self, manifest: Manifest, where: str) -> tuple[str, Manifest, bool]:
        """Record a checkpoint older than the series' latest (an imported one)
        without moving ``latest``: latest never goes back in time, or the next
        restore would hand back old weights. Its parent is the newest checkpoint
        of the series taken before it; no ref names it, retention treats it by
        its time like any other."""
        before = [
            (m.created, cid)
            for cid in self.checkpoint_ids()
            if (m := self.manifest(cid)).series == manifest.series and m.created <= manifest.created
        ]
        manifest = replace(manifest, parent=max(before)[1] if before else None)
        data = manifest.encode_checked(where)
        cid = digest_hex(data)
        self.backend.put_if_absent(layout.manifest_key(cid), data)
        self._manifests[cid] = manifest
        return cid, manifest, False
