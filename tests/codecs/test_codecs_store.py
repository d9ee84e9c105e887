"""Deltas through the real store: dense bf16 steps, gc of older checkpoints in between.

The store offers the parent's block as the delta base and records every
(chunk -> base) edge in the manifest; gc must keep bases that kept chunks
need even after the checkpoints that introduced them are forgotten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from codec_helpers import dense_step, f32_to_bf16

from apollo_cas import codecs

store_mod = pytest.importorskip("apollo_cas.store")
gc_mod = pytest.importorskip("apollo_cas.gc")
retention = pytest.importorskip("apollo_cas.retention")
verify_mod = pytest.importorskip("apollo_cas.verify")
torch = pytest.importorskip("torch")


def bf16_tensors(master: dict[str, np.ndarray]) -> dict[str, object]:
    return {
        k: torch.from_numpy(f32_to_bf16(v).astype(np.int16)).view(torch.bfloat16)
        for k, v in master.items()
    }


def test_dense_steps_with_gc_in_between(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    master = {
        f"layer{i}.weight": rng.standard_normal(1 << 16).astype(np.float32) * 0.02 for i in range(3)
    }
    policy = codecs.CodecPolicy(max_delta_depth=2)
    raw_per_save = sum(v.size * 2 for v in master.values())
    with store_mod.Store.open(tmp_path / "s", create=True, policy=policy) as st:
        for step in range(6):
            if step:
                master = {
                    k: dense_step(v, step * 10 + j) for j, (k, v) in enumerate(master.items())
                }
            tensors = bf16_tensors(master)
            res = st.save(tensors, block_size=1 << 16, force=True)
            if step:
                # Every block changed, yet a delta step costs a few percent of its
                # size; at the depth limit (every third step) the store offers the
                # chain's root as base, so no step is re-encoded in full.
                fraction = res.stats.new_stored_bytes / raw_per_save
                assert fraction < 0.15, (step, fraction)
            gc_mod.gc(st, retention.RetentionPolicy(keep_last=1), grace=0.0)
            loaded = st.load("latest")
            for k, t in tensors.items():
                assert torch.equal(loaded[k].view(torch.int16), t.view(torch.int16)), (step, k)
            report = verify_mod.verify(st, read_data=True)
            assert report.ok, report
        manifest = st.manifest(st.resolve("latest"))
        # Every chunk of the latest step is a delta whose chain, kept by gc,
        # ends in a full chunk within the depth limit.
        for t in manifest.tensors:
            for cid in t.chunks:
                depth = 0
                while cid in manifest.bases:
                    cid = manifest.bases[cid]
                    depth += 1
                assert 1 <= depth <= policy.max_delta_depth
                assert codecs.delta_depth(st.chunks.get_blob(cid)) == 0
