"""The original tool's flat format: ``weights.bin`` + ``weights.json``.

The layout and the index's bytes come from :mod:`apollo_cas.formats.flat`
(tensors back to back in sorted-name order, dtypes spelled as the tool wrote
them); this module streams the decoded chunks into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..decoding import Decoder
from ..formats import flat
from ..manifest import Manifest
from .assemble import Placement, write_chunks
from .files import commit_all, pending_files, prepare_dir


def restore_flat(
    decoder: Decoder,
    manifest: Manifest,
    to: Path,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``weights.bin`` then ``weights.json`` into directory ``to``."""
    prepare_dir(to)
    laid_out = flat.layout(manifest.tensors)
    placements = [Placement(t, 0, e.offset) for t, e in laid_out]
    size = sum(t.nbytes for t in manifest.tensors)
    weights, index = to / flat.WEIGHTS, to / flat.INDEX
    with pending_files([(weights, size)]) as files:
        write_chunks(decoder, [files[0].output], placements, manifest.block_size, progress)
        # The old index would describe the new weights.bin wrongly: drop it first.
        commit_all(
            files,
            remove_first=[index],
            index=(index, flat.dumps_index(e for _, e in laid_out)),
        )
    return [weights, index]
