"""Saved-file records: what writes the files a checkpoint was saved from again,
byte for byte (issue 19).

A checkpoint keeps tensors, not files; restore normally writes them in a
canonical form (sorted names, ``{"format":"pt"}``, data aligned to 4 KiB), so a
saved ``model.safetensors`` came back with another sha256. For checkpoints
saved from files (a safetensors file, shards plus their index, the original
tool's ``weights.bin`` + ``weights.json``) save also records, per file, its
name, size, the bytes before the first tensor (the safetensors header with its
8-byte length and padding; nothing for ``weights.bin``), where each tensor
starts, and any bytes no tensor covers; and the file that names the others
(the index JSON, ``weights.json``) as it was. Restore then writes the same
files under the same names (:mod:`apollo_cas.targets.exact`).

The record is stored as one content-addressed chunk named from the manifest
(``saved_files``), not inline: a sharded model's headers total megabytes, and
every ``list``, ``stats`` and gc pass decodes every manifest; a chunk is read
only by an exact restore, is checked against its id like any chunk, is kept by
gc and checked by verify through :meth:`Manifest.chunk_ids`, and is shared by
every checkpoint of a run whose file layout does not change (docs/FORMAT.md).

A file that cannot be recorded exactly (more uncovered bytes than
:data:`MAX_GAP_BYTES`, an odd name, a file that changed while it was read) makes
a *refused* record that keeps only the reason, so ``restore --exact`` can say
why; tensors are saved either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .errors import CorruptManifest, InvalidName, SourceError
from .formats import flat
from .formats import safetensors as st_format
from .manifest import Manifest, MsgpackRecord, SavedFilesRef

RECORD_FORMAT = 1
RECORD = MsgpackRecord(
    "saved-file record", CorruptManifest, "restore with --no-exact; run 'apollo-cas verify'"
)
#: Bytes per file that no tensor or header covers and that a record keeps inline.
#: Files written by the safetensors library and the original tool have none; a
#: hand-made file with padding between tensors has a few bytes per tensor.
MAX_GAP_BYTES = 1 << 20
KINDS = ("safetensors", "seed")


@dataclass(frozen=True)
class SavedFile:
    """One data file: its bytes are ``header`` at 0, each tensor's bytes at its
    offset, and ``gaps`` (offset, bytes) for whatever else the file held."""

    name: str
    size: int
    header: bytes
    tensors: tuple[tuple[str, int], ...]  # (tensor name, byte offset in the file)
    gaps: tuple[tuple[int, bytes], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "n": self.name,
            "z": self.size,
            "h": self.header,
            "t": [[n, o] for n, o in self.tensors],
            "g": [[o, b] for o, b in self.gaps],
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SavedFile:
        return cls(
            name=str(d["n"]),
            size=int(d["z"]),
            header=bytes(d["h"]),
            tensors=tuple((str(n), int(o)) for n, o in d["t"]),
            gaps=tuple((int(o), bytes(b)) for o, b in d["g"]),
        )


@dataclass(frozen=True)
class FileSet:
    """The files one checkpoint was saved from (or why they cannot be rewritten exactly)."""

    kind: str  # "safetensors" or "seed" (the original tool's directory)
    files: tuple[SavedFile, ...] = ()
    #: The file that names the others (written last), as (name, bytes).
    index: tuple[str, bytes] | None = None
    #: Why these files cannot be written again exactly; None when they can.
    refused: str | None = None
    format: int = RECORD_FORMAT

    @classmethod
    def refuse(cls, kind: str, reason: str) -> FileSet:
        return cls(kind=kind, refused=reason)

    @property
    def restore_format(self) -> str:
        """The restore format this record's files are: safetensors or flat."""
        return "flat" if self.kind == "seed" else "safetensors"

    def names(self) -> list[str]:
        return [f.name for f in self.files] + ([self.index[0]] if self.index else [])

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": self.format,
                "kind": self.kind,
                "files": [f.to_wire() for f in self.files],
                "index": None if self.index is None else {"n": self.index[0], "d": self.index[1]},
                "refused": self.refused,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, where: str) -> FileSet:
        """Parse a record; anything malformed is :class:`CorruptManifest` naming ``where``."""
        d = RECORD.unpack(data, where)
        if d.get("format") != RECORD_FORMAT:
            raise CorruptManifest(
                f"{where}: saved-file record format {d.get('format')!r}, this apollo_cas "
                f"reads version {RECORD_FORMAT}",
                "use a newer apollo_cas, or restore with --no-exact",
            )
        try:
            idx = d["index"]
            fs = cls(
                kind=str(d["kind"]),
                files=tuple(SavedFile.from_wire(f) for f in d["files"]),
                index=None if idx is None else (str(idx["n"]), bytes(idx["d"])),
                refused=None if d["refused"] is None else str(d["refused"]),
            )
            if fs.kind not in KINDS:
                raise ValueError(f"unknown kind {fs.kind!r}")
            problem = _layout_problem(fs)
            if problem:
                raise ValueError(problem)
        except Exception as exc:
            raise CorruptManifest(
                f"{where}: malformed saved-file record ({exc})",
                "restore with --no-exact; run 'apollo-cas verify'",
            ) from exc
        return fs

    def check(self, sizes: Mapping[str, int]) -> str | None:
        """Why the record does not fit tensors of these byte sizes, or None if it does:
        every tensor placed at least once, inside its file, and nothing else placed."""
        placed: set[str] = set()
        for f in self.files:
            spans = [(0, len(f.header))] + [(o, o + len(b)) for o, b in f.gaps]
            for name, offset in f.tensors:
                if name not in sizes:
                    return f"{f.name} places tensor {name!r}, which the checkpoint lacks"
                if offset < len(f.header) or offset + sizes[name] > f.size:
                    return f"{f.name}: tensor {name!r} at {offset} does not fit the file"
                placed.add(name)
                spans.append((offset, offset + sizes[name]))
            pos = 0
            for begin, end in sorted(spans):
                if begin > pos:
                    break
                pos = max(pos, end)
            if pos < f.size:  # every byte must come from somewhere, never from a zero fill
                return f"{f.name}: bytes from {pos} are not recorded"
        missing = sorted(set(sizes) - placed)
        if missing:
            return f"tensor {missing[0]!r} is in no recorded file"
        return None


def same_files(saved: SavedFilesRef | None, parent: Manifest | None) -> bool:
    """Whether a save's file record adds nothing to the parent checkpoint's.

    Records are compared only when both exist: saving the same tensors from
    memory, or reading back a rewritten restore, is no change; the same tensors
    in a file whose header changed are a new checkpoint.
    """
    return saved is None or parent is None or parent.saved_files in (None, saved)


def _valid_name(name: str) -> bool:
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
        and len(name.encode()) <= 255
    )


def _layout_problem(fs: FileSet) -> str | None:
    """What makes a record unwritable regardless of the tensors, or None."""
    if fs.refused is not None:
        return "a refused record lists files" if fs.files or fs.index else None
    names = fs.names()
    for n in names:
        if not _valid_name(n):
            return f"file name {n!r} is not a plain name in one directory"
    if len(set(names)) != len(names):
        return "a file name appears twice"
    if not fs.files:
        return "no data files"
    for f in fs.files:
        if f.size < len(f.header):
            return f"{f.name}: header longer than the file"
        for off, data in f.gaps:
            if off < 0 or off + len(data) > f.size:
                return f"{f.name}: recorded bytes at {off} lie outside the file"
    return None


# ---------------------------------------------------------------------------
# building records from files (called by the sources)


def _gaps(fd: int, size: int, covered: list[tuple[int, int]]) -> tuple[tuple[int, bytes], ...]:
    """The bytes of ``[0, size)`` outside ``covered`` (half-open ranges), read from ``fd``.
    Raises ValueError when there are more than :data:`MAX_GAP_BYTES`."""
    spans, pos = [], 0
    for begin, end in sorted(covered):
        if begin > pos:
            spans.append((pos, begin))
        pos = max(pos, end)
    if pos < size:
        spans.append((pos, size))
    total = sum(e - b for b, e in spans)
    if total > MAX_GAP_BYTES:
        raise ValueError(
            f"{total} bytes not covered by tensors (an exact record keeps at most {MAX_GAP_BYTES})"
        )
    out = []
    for b, e in spans:
        data = os.pread(fd, e - b, b)
        if len(data) != e - b:
            raise ValueError("file shrank while it was read")
        out.append((b, data))
    return tuple(out)


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ValueError("file shrank while it was read")
    return data


def _safetensors_file(path: Path) -> tuple[SavedFile, dict[str, int]]:
    """One file's record and its tensors' byte lengths, from a second read of the file."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        header, start = st_format.read_header(path, size, lambda o, n: _pread(fd, o, n))
        entries = st_format.parse_entries(path, header, size - start)
        tensors = [(e.name, start + e.begin) for e in entries]
        covered = [(0, start)] + [(start + e.begin, start + e.end) for e in entries]
        lengths = {e.name: e.end - e.begin for e in entries}
        gaps = _gaps(fd, size, covered)
        head = _pread(fd, 0, start)
    return SavedFile(path.name, size, head, tuple(tensors), gaps), lengths


def _plain_names(kind: str, names: Sequence[str]) -> FileSet | None:
    for n in names:
        if not _valid_name(n):
            return FileSet.refuse(kind, f"file name {n!r} cannot be written back as it is")
    if len(set(names)) != len(names):
        return FileSet.refuse(kind, "two saved files have the same name")
    return None


def _finish(fs: FileSet, sizes: Mapping[str, int], lengths: Mapping[str, int]) -> FileSet:
    """The record if it fits the tensors the source read, else a refusal."""
    if any(sizes.get(n) != ln for n, ln in lengths.items()) or set(lengths) != set(sizes):
        return FileSet.refuse(fs.kind, "the files changed while they were saved")
    problem = fs.check(sizes) or _layout_problem(fs)
    return fs if problem is None else FileSet.refuse(fs.kind, problem)


def safetensors_record(
    files: Sequence[Path], index: Path | None, sizes: Mapping[str, int]
) -> FileSet:
    """The record of safetensors ``files`` (and their ``index``) holding tensors of
    ``sizes`` (name -> bytes, as the source parsed them)."""
    kind = "safetensors"
    refused = _plain_names(kind, [p.name for p in files] + ([index.name] if index else []))
    if refused:
        return refused
    saved, lengths = [], {}
    for p in files:
        try:
            sf, file_lengths = _safetensors_file(p)
        except (OSError, ValueError, SourceError, InvalidName) as exc:
            return FileSet.refuse(kind, f"{p.name}: {exc}")
        saved.append(sf)
        lengths.update(file_lengths)
    idx = None
    if index is not None:
        try:
            idx = (index.name, index.read_bytes())
        except OSError as exc:
            return FileSet.refuse(kind, f"{index.name}: {exc.strerror}")
    return _finish(FileSet(kind, tuple(saved), idx), sizes, lengths)


def seed_record(directory: Path, sizes: Mapping[str, int]) -> FileSet:
    """The record of the original tool's checkpoint in ``directory``."""
    kind = "seed"
    index_path, weights_path = directory / flat.INDEX, directory / flat.WEIGHTS
    try:
        index_bytes = index_path.read_bytes()
        index = flat.loads_index(index_bytes, index_path)
        with open(weights_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # In the index's order, as it is in the file the record writes back.
            entries = flat.parse_index(index, index_path, weights_path, size)
            tensors = [(e.name, e.offset) for e in entries]
            lengths = {e.name: e.size for e in entries}
            gaps = _gaps(f.fileno(), size, [(e.offset, e.offset + e.size) for e in entries])
    except (OSError, ValueError, SourceError, InvalidName) as exc:
        return FileSet.refuse(kind, f"{directory.name}: {exc}")
    weights = SavedFile(flat.WEIGHTS, size, b"", tuple(tensors), gaps)
    return _finish(FileSet(kind, (weights,), (flat.INDEX, index_bytes)), sizes, lengths)


__all__ = [
    "MAX_GAP_BYTES",
    "RECORD_FORMAT",
    "FileSet",
    "SavedFile",
    "safetensors_record",
    "same_files",
    "seed_record",
]
