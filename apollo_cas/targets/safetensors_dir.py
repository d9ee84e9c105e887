"""safetensors output, streamed: one file, or shards plus an index.

``safetensors.save_file`` needs every tensor in memory; a 50+ GB restore
cannot afford that. The format is simple enough to stream: each file's header
comes from :func:`apollo_cas.formats.safetensors.header_bytes`, then each chunk
is decoded on the pool and written at its offset.

Layouts:

* ``hf``: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` when larger than the shard size;
* ``vllm-sharded``: vLLM's per-rank layout
  ``model-rank-{rank}-part-{part}.safetensors`` (ShardedStateLoader), for
  weights taken from vLLM's own parameters (fused, tensor-parallel names).

``__metadata__`` always holds ``{"format": "pt"}``: transformers releases
before 5 refuse a metadata block without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..decoding import Decoder, pwrite_all
from ..errors import UsageError
from ..formats import safetensors as st_format
from ..formats.safetensors import INDEX, SINGLE
from ..manifest import Manifest, TensorEntry
from .assemble import Placement, write_chunks
from .files import commit_all, pending_files, prepare_dir, stale_outputs

DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default ("5GB")


def plan_shards(tensors: list[TensorEntry], max_size: int) -> list[list[TensorEntry]]:
    """Consecutive tensors (sorted names keep a layer together) up to ``max_size`` per shard."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def restore_safetensors(
    decoder: Decoder,
    manifest: Manifest,
    to: Path,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    layout: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write the checkpoint as safetensors into directory ``to``; returns the files."""
    if max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    prepare_dir(to)
    tensors = sorted(manifest.tensors, key=lambda t: t.name)
    src = manifest.source
    if layout == "auto":
        layout = "vllm-sharded" if src.rank is not None and src.kind == "handles" else "hf"
    if layout not in ("hf", "vllm-sharded"):
        raise UsageError(f"unknown safetensors layout {layout!r}", "use hf or vllm-sharded")
    groups = plan_shards(tensors, max_shard_size) if tensors else [[]]
    if layout == "vllm-sharded":
        rank = src.rank or 0
        names = [st_format.vllm_shard_name(rank, i) for i in range(len(groups))]
        stale_pattern = st_format.vllm_shard_pattern(rank)
    elif len(groups) == 1:
        names = [SINGLE]
        stale_pattern = st_format.HF_SHARD
    else:
        n = len(groups)
        names = [st_format.hf_shard_name(i, n) for i in range(n)]
        stale_pattern = st_format.HF_NAMES
    metadata = {"format": "pt"}
    specs, placements, headers = [], [], []
    for i, group in enumerate(groups):
        head, offsets = st_format.header_bytes(group, metadata)
        headers.append(head)
        specs.append((to / names[i], len(head) + sum(t.nbytes for t in group)))
        placements += [
            Placement(t, i, len(head) + off) for t, off in zip(group, offsets, strict=True)
        ]
    stale = stale_outputs(to, stale_pattern, names)
    with pending_files(specs) as files:
        for f, head in zip(files, headers, strict=True):
            pwrite_all(f.fd, head, 0)
        write_chunks(decoder, [f.output for f in files], placements, manifest.block_size, progress)
        index = None
        if layout == "hf" and len(groups) > 1:
            weight_map = {t.name: names[i] for i, g in enumerate(groups) for t in g}
            total = sum(t.nbytes for t in tensors)
            index = (to / INDEX, st_format.index_bytes(weight_map, total))
        # The old index names the old shards; vLLM loads only what an index
        # lists, so it goes first and the new one (if any) comes last.
        commit_all(files, remove_first=[to / INDEX], index=index, remove_after=stale)
    return [to / n for n in names] + ([to / INDEX] if index else [])
