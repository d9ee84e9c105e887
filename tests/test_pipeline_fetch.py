"""The save path of a device source: blocks encoded in place, in their batch buffers.

The pipeline hands a fetched batch's views straight to the encoding threads and
releases the batch (letting the source refill its buffer) only when every task on
it has finished. A source that scribbles over a batch's bytes the moment it is
released catches a pipeline that releases early: a block would then hash wrong on
the host (``CorruptChunk``) or be stored with other bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.errors import CorruptChunk  # noqa: E402
from apollo_cas.gpu.blocks import host_block_digests  # noqa: E402
from apollo_cas.sources.base import BlockRequest, FetchedBatch  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from apollo_cas.verify import verify  # noqa: E402

BS = 4096


class Scribbling(DeviceSource):
    """Hashes like a GPU (all ids first), stages through the buffers on the CPU, and
    overwrites each batch's bytes when it is released."""

    def __init__(self, tensors: dict[str, torch.Tensor], fail_at: int | None = None) -> None:
        super().__init__(tensors, buffer_bytes=8 * BS, stage_host=True)
        self.released = 0
        self.fail_at = fail_at

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        return host_block_digests([t.bytes.numpy().data for t in self.tensors()], block_size)

    def fetch_batches(self, requests: Sequence[BlockRequest]) -> Iterator[FetchedBatch]:
        for batch in super().fetch_batches(requests):
            if self.fail_at is not None and self.released == self.fail_at:
                # The bytes of one block differ from what was hashed (a weight moved).
                _, v = batch.items[0]
                v.cast("B")[0] ^= 0xFF
            yield FetchedBatch(batch.items, self._scribble_then(batch))

    def _scribble_then(self, batch: FetchedBatch) -> object:
        def release() -> None:
            for _, v in batch.items:
                v.cast("B")[:] = b"\xa5" * v.nbytes
            self.released += 1
            batch.release()

        return release


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        f"layer{i}": (0.02 * torch.randn(50 * BS // 2 + 7, generator=g)).to(torch.bfloat16)
        for i in range(6)
    }


@pytest.mark.parametrize("fmt", [1, 2])
def test_batches_are_released_only_after_their_blocks_are_encoded(tmp_path: Path, fmt: int) -> None:
    w = weights()
    st = Store.open(tmp_path / "s", create=True, workers=2, format=fmt)
    src = Scribbling(w)
    r = st.save(src, block_size=BS)
    assert src.released >= 30  # the buffers were refilled many times
    assert r.stats.new_chunks == r.stats.chunks
    got = st.load()
    for k, v in w.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
    assert verify(st, read_data=True).ok


def test_a_block_that_differs_from_its_digest_fails_the_save(tmp_path: Path) -> None:
    """The failing task stops the save with nothing committed, and leaves the source
    usable: its fetch lock released and its buffers drained, so the next save works."""
    w = weights()
    st = Store.open(tmp_path / "s", create=True, workers=2)
    src = Scribbling(w, fail_at=5)
    with pytest.raises(CorruptChunk, match="changed during the save"):
        st.save(src, block_size=BS)
    assert st.checkpoint_ids() == []
    src.fail_at = None
    src.released = 0
    st.save(src, block_size=BS)
    got = st.load()
    for k, v in w.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
