"""Pinned staging: the reusable buffers of :class:`Uploads` (CUDA) and their CPU twin."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.gpu.blocks import mismatches_later  # noqa: E402
from apollo_cas.gpu.staging import Uploads  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_uploads_on_the_cpu_are_the_tensor() -> None:
    t = torch.arange(10, dtype=torch.int64)
    assert torch.equal(Uploads().to_device(t, torch.device("cpu")), t)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_numpy_tables_arrive_with_their_dtype_and_shape(device: str) -> None:
    import numpy as np

    up = Uploads(slots=2)
    tables = [
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array([True, False, True]),
        np.frombuffer(bytes(range(32)), dtype=np.uint8).reshape(2, 16),
    ]
    outs = [up.from_numpy(t, torch.device(device)) for t in tables]
    for t, d in zip(tables, outs, strict=True):
        assert d.device.type == device and d.cpu().numpy().tolist() == t.tolist()
        assert d.cpu().numpy().dtype == t.dtype


def test_mismatches_on_the_cpu() -> None:
    ids = [bytes([i]) * 16 for i in range(4)]
    got = torch.frombuffer(bytearray(b"".join(ids)), dtype=torch.uint8).view(-1, 16).clone()
    got[2, 5] ^= 1
    assert mismatches_later(got, ids)() == [2]


@cuda
def test_uploads_reuse_their_buffers_without_overwriting_copies_in_flight() -> None:
    up = Uploads(slots=2)
    dev = torch.device("cuda")
    outs = []
    for i in range(12):  # more tables than slots, sizes growing past each buffer
        t = torch.arange(1000 * (i + 1), dtype=torch.int64) * (i + 3)
        outs.append((t, up.to_device(t, dev)))
    torch.cuda.synchronize()
    for t, d in outs:
        assert d.device.type == "cuda" and torch.equal(d.cpu(), t)


@cuda
def test_mismatches_later_on_the_device() -> None:
    ids = [bytes([i % 256, i // 256]) * 8 for i in range(300)]
    got = torch.frombuffer(bytearray(b"".join(ids)), dtype=torch.uint8).view(-1, 16).cuda()
    got[7, 0] ^= 0xFF
    got[299, 15] ^= 1
    assert mismatches_later(got, ids, Uploads())() == [7, 299]


@cuda
def test_uploads_count_the_wait_for_a_busy_buffer() -> None:
    """A table sent while its slot's last copy is queued behind device work waits for
    that work (``waited_s`` grows); with a free slot it does not wait."""
    dev = torch.device("cuda")
    t = torch.arange(64, dtype=torch.int64)
    one, spare = Uploads(slots=1), Uploads(slots=2)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device work, queued before the copies
    one.to_device(t, dev)
    spare.to_device(t, dev)
    spare.to_device(t, dev)  # its own second slot: no wait
    one.to_device(t, dev)  # the only slot's copy is still queued: waits
    torch.cuda.synchronize()
    assert spare.waited_s == 0.0
    assert one.waited_s > 0.0
