"""DeviceSource on the CPU: byte views, fetch batching and view validity, hash planning.

CI has no GPU. The device-only parts are exercised through their CPU twins:
``stage_host=True`` sends CPU tensors through the same buffers and batches as
device tensors, and ``device_block_digests`` takes a stand-in kernel (xxhash per
block) so its bookkeeping — which pieces go to the kernel, which are gathered
and hashed on the host, how results map back — is checked against plain
xxhash. One test runs the real Triton kernel under its interpreter.
"""

from __future__ import annotations

import os
import random

import pytest
import xxhash

torch = pytest.importorskip("torch")

from apollo_cas.errors import InvalidName  # noqa: E402
from apollo_cas.sources.base import BlockRequest  # noqa: E402
from apollo_cas.sources.device import (  # noqa: E402
    FETCH_SLOTS,
    SHORT_INPUT_MAX,
    DeviceSource,
    byte_view,
    device_block_digests,
    host_block_digests,
    open_tensors,
    plan_fetch,
    plan_hashing,
)
from apollo_cas.sources.mapping import MappingSource  # noqa: E402


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "layers.0.q_proj.weight": torch.randn(48, 48, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(48, generator=g),
        "fp8": torch.randn(300, generator=g).to(torch.float8_e4m3fn),
        "mask": torch.rand(77, generator=g) > 0.5,
        "steps": torch.tensor(12345, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "u": torch.arange(1000, dtype=torch.int16),
    }


def test_byte_view_is_zero_copy_and_every_dtype() -> None:
    for name, t in model().items():
        v = byte_view(t)
        assert v.dtype == torch.uint8 and v.dim() == 1
        assert v.numpy().tobytes() == raw(t), name
    t = torch.zeros(8, dtype=torch.bfloat16)
    byte_view(t)[0:2] = torch.tensor([0x80, 0x3F], dtype=torch.uint8)
    assert t[0].item() == 1.0  # a write through the view reaches the tensor
    p = torch.nn.Parameter(torch.zeros(4))
    assert byte_view(p).numel() == 16
    nc = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert byte_view(nc).numpy().tobytes() == raw(nc)


def test_tensors_sorted_and_read() -> None:
    m = model()
    src = DeviceSource(m)
    assert [t.name for t in src.tensors()] == sorted(m)
    for t in src.tensors():
        assert t.nbytes == len(raw(m[t.name]))
        assert bytes(t.read(0, t.nbytes)) == raw(m[t.name])
        assert t.dtype.itemsize == m[t.name].element_size()
    assert not src.on_device
    assert src.block_digests(256) is None  # CPU: the pipeline hashes while reading
    assert set(src.live_tensors()) == set(m)


def test_bad_names_are_refused() -> None:
    with pytest.raises(InvalidName):
        DeviceSource({"../x": torch.zeros(1)})


def _all_requests(src: DeviceSource, bs: int) -> list[BlockRequest]:
    return [
        BlockRequest(ti, o, min(bs, t.nbytes - o))
        for ti, t in enumerate(src.tensors())
        for o in range(0, t.nbytes, bs)
    ]


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("buffer_bytes", [256, 1000, 1 << 20])
def test_fetch_returns_requested_bytes(stage: bool, buffer_bytes: int) -> None:
    m = model()
    src = DeviceSource(m, buffer_bytes=buffer_bytes, stage_host=stage)
    reqs = _all_requests(src, 128)
    random.Random(1).shuffle(reqs)
    reqs.append(BlockRequest(0, 5, 0))
    seen = set()
    for i, view in src.fetch(reqs):
        r = reqs[i]
        t = src.tensors()[r.tensor]
        assert bytes(view) == raw(m[t.name])[r.offset : r.offset + r.length]
        seen.add(i)
    assert seen == set(range(len(reqs)))
    if stage:
        assert src.device_to_host_bytes == sum(r.length for r in reqs)


def test_fetch_view_validity_window() -> None:
    """Each view stays intact until the consumer asks for the item after the next;
    a whole batch stays intact until the first item of the following batch is done."""
    m = {"a": torch.arange(4096, dtype=torch.int32), "b": torch.arange(2048, dtype=torch.int64)}
    src = DeviceSource(m, buffer_bytes=1024, stage_host=True)
    reqs = _all_requests(src, 256)
    held: list[tuple[int, memoryview]] = []
    for i, view in src.fetch(reqs):
        held.append((i, view))
        # Previous item (the "next item plus one" promise) still holds its bytes.
        for j, v in held[-2:]:
            r = reqs[j]
            want = raw(m[src.tensors()[r.tensor].name])[r.offset : r.offset + r.length]
            assert bytes(v) == want, (i, j)
    # Buffers of 1024 bytes hold 4 blocks: 128 requests need many refills.
    assert len(reqs) == 128


def test_fetch_batches_and_coalescing() -> None:
    src = DeviceSource(
        {"a": torch.zeros(1000, dtype=torch.uint8), "b": torch.zeros(10)}, stage_host=True
    )
    reqs = [
        BlockRequest(0, 0, 100),
        BlockRequest(0, 100, 100),
        BlockRequest(1, 0, 40),
        BlockRequest(0, 300, 100),
        BlockRequest(0, 400, 100),
    ]
    bs = plan_fetch(reqs, src.tensors(), 250, stage_host=True)
    assert [[it[0] for it in b.items] for b in bs] == [[0, 1, 2], [3, 4]]
    assert bs[0].copies == [(0, 0, 200, 0), (1, 0, 40, 200)]  # adjacent blocks: one copy
    assert bs[1].copies == [(0, 300, 200, 0)]
    with pytest.raises(ValueError, match="out of range"):
        list(src.fetch([BlockRequest(0, 990, 20)]))


def test_fetch_batches_views_hold_until_release() -> None:
    """A held batch keeps its bytes while the next two are handed out; the buffer it
    holds is refilled only after release, and asking for one batch too many first
    is an error rather than a silent overwrite."""
    m = {"a": torch.arange(4096, dtype=torch.int32)}  # 16 KiB: 16 batches of 1 KiB
    src = DeviceSource(m, buffer_bytes=1024, stage_host=True)
    reqs = _all_requests(src, 256)
    want = raw(m["a"])

    def intact(batch: object) -> bool:
        return all(
            bytes(v) == want[reqs[i].offset : reqs[i].offset + reqs[i].length]
            for i, v in batch.items  # type: ignore[attr-defined]
        )

    gen = src.fetch_batches(reqs)
    held = [next(gen) for _ in range(FETCH_SLOTS)]
    assert all(intact(b) for b in held)
    with pytest.raises(RuntimeError, match="still holds its buffer"):
        next(gen)
    gen = src.fetch_batches(reqs)
    first = next(gen)
    order = [i for i, _ in first.items]
    kept = [first, next(gen), next(gen)]
    first.release()
    first.release()  # idempotent
    fourth = next(gen)  # reuses the first batch's buffer
    assert intact(fourth) and intact(kept[1]) and intact(kept[2])
    for b in [kept[1], kept[2], fourth]:
        order += [i for i, _ in b.items]
        b.release()
    for b in gen:
        order += [i for i, _ in b.items]
        assert intact(b)
        b.release()
    assert order == list(range(len(reqs)))


def test_default_fetch_batches_copies_out_of_short_lived_views() -> None:
    """A source with only ``fetch`` (views valid for one step) still gives batches
    whose bytes survive until release."""
    m = {"a": torch.arange(1000, dtype=torch.int32)}
    inner = DeviceSource(m, buffer_bytes=256, stage_host=True)

    class OnlyFetch(MappingSource):
        def fetch(self, requests):  # type: ignore[no-untyped-def]
            return inner.fetch(requests)

    src = OnlyFetch({"a": m["a"]})
    reqs = _all_requests(inner, 64)
    batches = list(src.fetch_batches(reqs))
    got = b"".join(bytes(v) for b in batches for _, v in b.items)
    assert got == raw(m["a"])
    assert [i for b in batches for i, _ in b.items] == list(range(len(reqs)))


def test_fetch_stopped_early_then_again() -> None:
    m = {"a": torch.arange(4096, dtype=torch.int32)}
    src = DeviceSource(m, buffer_bytes=512, stage_host=True)
    reqs = _all_requests(src, 128)
    it = src.fetch(reqs)
    next(it)
    it.close()
    assert b"".join(bytes(v) for _, v in src.fetch(reqs)) == raw(m["a"])


# ------------------------------------------------------------------------- hashing


def test_plan_hashing() -> None:
    bs = 1024
    plan = plan_hashing([0, 10, 1023, 1024, 2048 + 100, 2048 + 300, 5000], bs)
    launched = dict(plan.launches)
    assert launched == {3: 1024, 4: 2048, 5: 2348, 6: 5000}
    assert set(plan.gathers) == {(1, 0, 10), (2, 0, 1023), (4, 2048, 100)}
    assert [n for _, n in plan.launches] == sorted(launched.values(), reverse=True)


def fake_kernel(data: torch.Tensor, block_size: int) -> torch.Tensor:
    """What the Triton kernel returns, computed with xxhash (and its short-input rule)."""
    b = data.numpy().tobytes()
    rows = []
    for o in range(0, len(b), block_size):
        block = b[o : o + block_size]
        assert len(block) == block_size or len(block) > SHORT_INPUT_MAX, "short tail sent to kernel"
        rows.append(xxhash.xxh3_128_digest(block))
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(-1, 16)


@pytest.mark.parametrize("bs", [256, 1024])
def test_device_block_digests_bookkeeping(bs: int) -> None:
    rng = random.Random(7)
    sizes = [0, 1, 17, 240, 241, bs - 1, bs, bs + 1, bs + 240, bs + 241, 3 * bs, 5 * bs + 77]
    sizes += [rng.randrange(0, 8 * bs) for _ in range(20)]
    views = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    stats: dict[str, int] = {}
    got = device_block_digests(views, bs, kernel=fake_kernel, stats=stats)
    want = host_block_digests([v.numpy().data for v in views], bs, workers=2)
    assert got == want
    assert stats["gathered_bytes"] == sum(n for _, _, n in plan_hashing(sizes, bs).gathers)


def fake_many(views: list[torch.Tensor], block_size: int) -> torch.Tensor:
    """What ``block_digests_many`` returns: every view's rows, in order."""
    return torch.cat([fake_kernel(v, block_size) for v in views])


@pytest.mark.parametrize("bs", [256, 1024])
def test_device_block_digests_one_call(bs: int) -> None:
    """The default path: one ``many`` call for every tensor, rows mapped back."""
    rng = random.Random(8)
    sizes = [0, 1, 240, 241, bs - 1, bs, bs + 1, bs + 240, bs + 241, 3 * bs, 5 * bs + 77]
    sizes += [rng.randrange(0, 8 * bs) for _ in range(20)]
    views = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    calls: list[list[int]] = []

    def many(vs: list[torch.Tensor], b: int) -> torch.Tensor:
        calls.append([int(v.numel()) for v in vs])
        return fake_many(vs, b)

    stats: dict[str, int] = {}
    got = device_block_digests(views, bs, many=many, stats=stats)
    assert got == host_block_digests([v.numpy().data for v in views], bs, workers=2)
    assert len(calls) == 1 and stats["launches"] == 1
    assert sorted(calls[0], reverse=True) == [n for _, n in plan_hashing(sizes, bs).launches]
    # Only tensors ending in a short tail are sliced; the others are passed as they are.
    assert all(n % bs == 0 or n % bs > SHORT_INPUT_MAX for n in calls[0])


def test_device_block_digests_checks_row_count() -> None:
    views = [torch.zeros(1024, dtype=torch.uint8)]
    with pytest.raises(RuntimeError, match="digests"):
        device_block_digests(views, 256, many=lambda vs, b: torch.zeros((3, 16), dtype=torch.uint8))
    with pytest.raises(ValueError):
        device_block_digests(views, 256, many=fake_many, kernel=fake_kernel)


def test_device_block_digests_keeps_zero_bytes() -> None:
    """Digests that end in zero bytes stay 16 bytes long (no string stripping)."""

    def zeros(vs: list[torch.Tensor], b: int) -> torch.Tensor:
        return torch.zeros((sum(-(-v.numel() // b) for v in vs), 16), dtype=torch.uint8)

    got = device_block_digests([torch.zeros(600, dtype=torch.uint8)], 256, many=zeros)
    assert got[0][:2] == [bytes(16), bytes(16)] and len(got[0]) == 3


def test_host_block_digests() -> None:
    data = bytes(range(256)) * 10
    got = host_block_digests([memoryview(data), memoryview(b"")], 1000, workers=3)
    assert got == [[xxhash.xxh3_128_digest(data[o : o + 1000]) for o in range(0, 2560, 1000)], []]


def test_real_kernel_under_interpreter() -> None:
    """The real Triton kernel, interpreted on the CPU, through the same bookkeeping."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernel on the CPU")
    pytest.importorskip("triton")
    from apollo_cas.gpu import xxh3_kernel

    bs = 256
    sizes = [100, 256, 256 + 17, 512 + 241, 1000]
    views = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    want = host_block_digests([v.numpy().data for v in views], bs, workers=1)
    assert device_block_digests(views, bs, kernel=xxh3_kernel.block_digests) == want
    assert device_block_digests(views, bs, many=xxh3_kernel.block_digests_many) == want


# -------------------------------------------------------------------- open_tensors


def test_open_tensors_cpu_gives_mapping_source() -> None:
    import numpy as np

    src = open_tensors({"a": torch.zeros(3), "b": np.zeros(2)})
    assert isinstance(src, MappingSource)
    assert src.info.kind == "mapping"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_open_tensors_cuda_gives_device_source() -> None:  # pragma: no cover - GPU only
    src = open_tensors({"a": torch.zeros(3, device="cuda"), "b": torch.zeros(2)})
    assert isinstance(src, DeviceSource) and src.on_device
    d = src.block_digests(256)
    assert d is not None and d[0] == [xxhash.xxh3_128_digest(raw(torch.zeros(3)))]
