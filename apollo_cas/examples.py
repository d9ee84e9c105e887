"""Built-in example weights: a transformer-shaped model and its next versions.

Used by ``apollo-cas demo``, the benchmarks and the tests, so that every number
in the README comes from data anyone can regenerate. Pure numpy (no torch):
bf16 is produced as the upper 16 bits of float32, which is what a cast with
round-toward-zero gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats.safetensors import header_bytes

BF16 = "BF16"
F32 = "F32"


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder-only transformer."""

    vocab: int = 8192
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 4
    kv_heads_ratio: int = 4  # hidden / kv width (grouped-query attention)

    @classmethod
    def for_bytes(cls, target: int, itemsize: int = 2, min_layers: int = 1) -> ModelShape:
        """A shape whose weights take about ``target`` bytes (hidden grows with size).

        With ``min_layers``, a narrower model is taken when the usual width would
        leave fewer layers (the embeddings alone can fill a small target); below
        :meth:`smallest` of that many layers the result is larger than ``target``.
        """
        hidden = (
            4096
            if target >= 8 << 30
            else 2048
            if target >= 1 << 30
            else 1024
            if target >= 128 << 20
            else 512
            if target >= 16 << 20
            else 256
        )
        while True:
            base = cls._base(hidden)
            per_layer = base.layer_elements() * itemsize
            fixed = base.fixed_elements() * itemsize
            layers = max(1, round((target - fixed) / per_layer))
            if layers >= min_layers or hidden <= 256:
                break
            hidden //= 2
        return cls(base.vocab, hidden, base.intermediate, max(layers, min_layers))

    @classmethod
    def smallest(cls, layers: int) -> ModelShape:
        """The smallest shape :meth:`for_bytes` makes with ``layers`` layers."""
        base = cls._base(256)
        return cls(base.vocab, base.hidden, base.intermediate, layers)

    @classmethod
    def _base(cls, hidden: int) -> ModelShape:
        return cls(
            vocab=32000 if hidden >= 2048 else 8192 if hidden >= 512 else 4096,
            hidden=hidden,
            intermediate=int(hidden * 2.75) // 64 * 64,
            layers=1,
        )

    def nbytes(self, itemsize: int = 2) -> int:
        """Bytes of all weights of this shape."""
        return (self.fixed_elements() + self.layers * self.layer_elements()) * itemsize

    def layer_elements(self) -> int:
        h, kv, i = self.hidden, self.hidden // self.kv_heads_ratio, self.intermediate
        return h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h

    def fixed_elements(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, kv, i = self.hidden, self.hidden // self.kv_heads_ratio, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.vocab, h),
        }
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                }
            )
        return shapes


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def generate(shape: ModelShape, dtype: str = BF16, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights as numpy arrays: bf16 as uint16 bit patterns, fp32 as float32.

    Matrices are normal with std 0.02, norms near 1, like a trained model's
    statistics; what matters here is the byte distribution zstd sees.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, s in shape.tensor_shapes().items():
        if name.endswith("norm.weight"):
            x = 1.0 + 0.05 * rng.standard_normal(s, dtype=np.float32)
        else:
            x = 0.02 * rng.standard_normal(s, dtype=np.float32)
        out[name] = to_bf16_bits(x) if dtype == BF16 else x
    return out


def perturb_layers(
    weights: dict[str, np.ndarray], layers: list[int], fraction: float = 1.0, seed: int = 1
) -> dict[str, np.ndarray]:
    """A fine-tuning step touching only ``layers``' attention projections.

    ``fraction`` of each touched tensor's rows change (from the start), the
    way a behavioural update leaves most of the model alone.
    """
    rng = np.random.default_rng(seed)
    out = dict(weights)
    for name, w in weights.items():
        if any(
            f"layers.{n}.self_attn.q_proj" in name or f"layers.{n}.self_attn.k_proj" in name
            for n in layers
        ):
            w = w.copy()
            rows = max(1, int(w.shape[0] * fraction))
            w[:rows] ^= rng.integers(1, 4, size=(rows, *w.shape[1:]), dtype=w.dtype)
            out[name] = w
    return out


def write_safetensors(weights: dict[str, np.ndarray], path: str, dtype: str = BF16) -> None:
    """Write ``weights`` as one safetensors file (bf16 bit patterns tagged BF16)."""
    names = sorted(weights)
    entries = [
        _Entry(
            n,
            BF16 if dtype == BF16 and weights[n].dtype == np.uint16 else F32,
            tuple(weights[n].shape),
            weights[n].nbytes,
        )
        for n in names
    ]
    head, _ = header_bytes(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for n in names:
            f.write(np.ascontiguousarray(weights[n]).tobytes())


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
