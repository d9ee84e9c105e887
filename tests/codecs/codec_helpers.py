"""Data makers and a tiny in-memory chunk store for the codec tests.

numpy only (no torch): bf16 is the upper 16 bits of float32 with
round-to-nearest-even, exactly what ``torch.Tensor.to(torch.bfloat16)`` does
for finite values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from apollo_cas import codecs
from apollo_cas.errors import CorruptChunk, ObjectNotFound
from apollo_cas.hashing import digest

WIDTHS = (1, 2, 4, 8)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def weights(n_elems: int, dtype: str, seed: int = 0, std: float = 0.02) -> bytes:
    """Transformer-like weights (normal, std ``std``) as raw little-endian bytes."""
    x = np.random.default_rng(seed).standard_normal(n_elems).astype(np.float32) * std
    if dtype == "bf16":
        return f32_to_bf16(x).tobytes()
    if dtype == "fp16":
        return x.astype(np.float16).tobytes()
    if dtype == "fp32":
        return x.tobytes()
    if dtype == "fp64":
        return x.astype(np.float64).tobytes()
    raise ValueError(dtype)


def dense_step(master: np.ndarray, seed: int, scale: float = 1e-4) -> np.ndarray:
    """fp32 master weights moved by ``scale`` x their RMS (Gaussian noise)."""
    rms = float(np.sqrt(np.mean(master.astype(np.float64) ** 2)))
    noise = np.random.default_rng(seed).standard_normal(master.shape).astype(np.float32)
    return master + noise * np.float32(rms * scale)


class MemStore:
    """Chunks by id; ``read`` resolves delta bases and verifies hashes like the real store."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.reads = 0

    def put(
        self, raw: bytes, policy: codecs.CodecPolicy, itemsize: int, base: codecs.Base | None = None
    ) -> bytes:
        cid = digest(raw)
        self.blobs.setdefault(cid, codecs.encode(raw, policy, itemsize, base=base))
        return cid

    def read(self, cid: bytes) -> bytes:
        self.reads += 1
        if cid not in self.blobs:
            raise ObjectNotFound(f"chunk {cid.hex()} not found")
        raw = codecs.decode(self.blobs[cid], f"chunk {cid.hex()}", load_base=self.loader())
        if digest(raw) != cid:
            raise CorruptChunk(f"chunk {cid.hex()} does not hash to its name")
        return raw

    def loader(self) -> Callable[[str], bytes]:
        return lambda h: self.read(bytes.fromhex(h))

    def base(self, cid: bytes) -> codecs.Base:
        return codecs.Base(
            chunk_id=cid, raw=lambda: self.read(cid), depth=codecs.delta_depth(self.blobs[cid])
        )
