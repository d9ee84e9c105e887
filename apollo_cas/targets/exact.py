"""Exact restore: the files a checkpoint was saved from, byte for byte, same names.

The record (:mod:`apollo_cas.filesets`) gives each file's name, size, header
bytes, tensor offsets and uncovered bytes; tensors are decoded into place on
the pool like any restore. Output appears only when complete, as in
:mod:`.files`: data files under temporary names, fsynced, renamed; the file
that names the others (``model.safetensors.index.json``, ``weights.json``)
removed first and written last.

When the exact form is used (:func:`choose_form`): for a checkpoint with a
record, unless the caller asks for another format (``--format``), another
safetensors layout (``--layout`` other than auto), a shard size
(``--max-shard-size``) or the rewritten form (``--no-exact``). Checkpoints of
tensors from memory, a GPU, handles or ``.pt`` files, and checkpoints saved
before records existed, have no record and restore rewritten, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..decoding import Decoder, pwrite_all
from ..errors import CorruptChunk, CorruptManifest, UsageError
from ..filesets import FileSet
from ..formats import flat
from ..formats import safetensors as st_format
from ..manifest import Manifest
from .assemble import Placement, write_chunks
from .files import commit_all, pending_files, prepare_dir

_SAVED_FORMAT = {"safetensors": "safetensors", "seed": "flat"}


@dataclass(frozen=True)
class Form:
    """How a restore writes its files: the format, and whether they are the saved
    files byte for byte (``exact``) or rewritten, with why not (``reason``)."""

    format: str
    exact: bool
    reason: str | None = None


def choose_form(
    manifest: Manifest,
    checkpoint: str,
    read_chunk: Callable[[bytes], bytes],
    *,
    format: str | None,
    layout: str,
    max_shard_size: int | None,
    exact: bool | None,
) -> tuple[Form, FileSet | None]:
    """Exact or rewritten, from what the checkpoint holds and what the caller asked;
    with the verified record when exact.

    ``exact=True`` that cannot be honoured is a :class:`UsageError` naming why;
    ``None`` picks exact whenever it can. A damaged record is an error, never a
    quiet fall back to another file.
    """
    form = _form(manifest, checkpoint, format, layout, max_shard_size, exact)
    if not form.exact:
        return form, None
    record = load_record(read_chunk, manifest, f"checkpoint {checkpoint}")
    if record.refused is None:
        return form, record
    if exact:
        raise UsageError(
            f"--exact: checkpoint {checkpoint[:12]}'s files cannot be written back exactly "
            f"({record.refused})",
            "drop --exact to get the rewritten form",
        )
    return Form(form.format, False, record.refused), None


def _form(
    manifest: Manifest,
    checkpoint: str,
    format: str | None,
    layout: str,
    max_shard_size: int | None,
    exact: bool | None,
) -> Form:
    if format not in (None, "flat", "safetensors"):
        raise UsageError(f"unknown restore format {format!r}", "use flat or safetensors")
    ref = manifest.saved_files
    saved = None if ref is None else _SAVED_FORMAT.get(ref.kind)
    fmt = format or saved or "safetensors"
    if exact is False:
        return Form(fmt, False, "the rewritten form was asked for (--no-exact)")
    if saved is None:
        kind = manifest.source.kind
        if ref is not None:
            why = f"checkpoint {checkpoint[:12]} has saved files of unknown kind {ref.kind!r}"
        elif kind in _SAVED_FORMAT:
            why = f"checkpoint {checkpoint[:12]} was saved before apollo_cas recorded saved files"
        else:
            why = f"checkpoint {checkpoint[:12]} holds tensors saved from {kind}, not files"
        if exact:
            raise UsageError(
                f"--exact: {why}, so there are no saved files to write back",
                "drop --exact to get the rewritten form",
            )
        return Form(fmt, False, why)
    asked = []
    if fmt != saved:
        asked.append(f"--format {fmt} (saved as {saved})")
    if fmt == "safetensors" and layout != "auto":
        asked.append(f"--layout {layout}")
    if fmt == "safetensors" and max_shard_size is not None:
        asked.append("--max-shard-size")
    if asked:
        why = "another form was asked for: " + ", ".join(asked)
        if exact:
            raise UsageError(
                f"--exact cannot be honoured: {why}",
                "drop --exact, or drop the options that ask for another form",
            )
        return Form(fmt, False, why)
    return Form(fmt, True)


def load_record(read_chunk: Callable[[bytes], bytes], manifest: Manifest, where: str) -> FileSet:
    """The checkpoint's saved-file record, verified against its id, size and tensors."""
    ref = manifest.saved_files
    assert ref is not None
    data = read_chunk(ref.chunk)  # hashed against its id: a flipped byte is CorruptChunk
    if len(data) != ref.size:
        raise CorruptChunk(
            f"{where}: saved-file record {ref.chunk.hex()} has {len(data)} bytes, "
            f"the manifest says {ref.size}",
            "restore with --no-exact; run 'apollo-cas verify'",
        )
    record = FileSet.decode(data, f"{where}: record {ref.chunk.hex()}")
    if record.kind != ref.kind:
        raise CorruptManifest(
            f"{where}: saved-file record is of {record.kind} files, the manifest says {ref.kind}",
            "restore with --no-exact; run 'apollo-cas verify'",
        )
    if record.refused is None:
        problem = record.check({t.name: t.nbytes for t in manifest.tensors})
        if problem:
            raise CorruptManifest(
                f"{where}: saved-file record does not match the checkpoint ({problem})",
                "restore with --no-exact; run 'apollo-cas verify'",
            )
    return record


def restore_exact(
    decoder: Decoder,
    manifest: Manifest,
    record: FileSet,
    to: Path,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write the recorded files into directory ``to``; returns them, the index last."""
    prepare_dir(to)
    by_name = {t.name: t for t in manifest.tensors}
    specs = [(to / f.name, f.size) for f in record.files]
    placements = [
        Placement(by_name[name], i, offset)
        for i, f in enumerate(record.files)
        for name, offset in f.tensors
    ]
    names = {f.name for f in record.files}
    if record.kind == "seed":
        remove_first, stale = [to / flat.INDEX], []
    else:
        remove_first = [to / st_format.INDEX]
        # The names the rewritten safetensors target writes: an exact restore
        # drops stale ones as that target does, so an older restore's shards
        # do not linger.
        stale = [
            p for p in to.iterdir() if st_format.HF_NAMES.match(p.name) and p.name not in names
        ]
    if record.index is not None:
        remove_first.append(to / record.index[0])
    with pending_files(specs) as files:
        for f, saved in zip(files, record.files, strict=True):
            if saved.header:
                pwrite_all(f.fd, saved.header, 0)
            for offset, data in saved.gaps:
                pwrite_all(f.fd, data, offset)
        write_chunks(decoder, [f.output for f in files], placements, manifest.block_size, progress)
        index = None if record.index is None else (to / record.index[0], record.index[1])
        commit_all(files, remove_first=remove_first, index=index, remove_after=stale)
    return [to / f.name for f in record.files] + ([to / record.index[0]] if record.index else [])
