"""The original tool's flat format: ``weights.bin`` + ``weights.json``.

weights.json maps each tensor name to ``{offset, size, shape, dtype}`` with
dtypes spelled as the tool wrote them (``"torch.bfloat16"``); tensors are laid
out back to back in sorted-name order, as the tool did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .. import dtypes
from ..decoding import Decoder
from ..manifest import Manifest
from .assemble import Placement, write_chunks
from .files import commit_all, pending_files, prepare_dir

WEIGHTS = "weights.bin"
INDEX = "weights.json"


def flat_index(manifest: Manifest) -> tuple[list[Placement], dict[str, dict[str, object]]]:
    placements, index, offset = [], {}, 0
    for t in sorted(manifest.tensors, key=lambda t: t.name):
        placements.append(Placement(t, 0, offset))
        index[t.name] = {
            "offset": offset,
            "size": t.nbytes,
            "shape": list(t.shape),
            "dtype": dtypes.lookup(t.dtype).torch_str,
        }
        offset += t.nbytes
    return placements, index


def restore_flat(
    decoder: Decoder,
    manifest: Manifest,
    to: Path,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``weights.bin`` then ``weights.json`` into directory ``to``."""
    prepare_dir(to)
    placements, index = flat_index(manifest)
    size = sum(t.nbytes for t in manifest.tensors)
    with pending_files([(to / WEIGHTS, size)]) as files:
        write_chunks(decoder, [files[0].output], placements, manifest.block_size, progress)
        # The old index would describe the new weights.bin wrongly: drop it first.
        commit_all(
            files,
            remove_first=[to / INDEX],
            index=(to / INDEX, json.dumps(index, indent=1).encode()),
        )
    return [to / WEIGHTS, to / INDEX]
