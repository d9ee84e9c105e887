"""Bit-exactness of the Triton XXH3-128 block kernel against the xxhash library.

Runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1 is set before triton
is imported), so CI needs no GPU. With TRITON_INTERPRET=0 and a CUDA device, the same
tests run compiled on the GPU.

Every test compares whole 16-byte digests, so a single wrong bit anywhere in the
kernel (a constant, a shift, the lane swap, a secret offset, the loop bounds, the
merge, the byte order) fails them. The lengths are chosen to walk every branch of the
long path: 0 scramble blocks or several, 0-15 trailing stripes, the final stripe
overlapping or not, the tail kernel's unaligned final stripe, and the short tails
that go to the host.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

import torch
import xxhash

from apollo_cas.gpu import xxh3_kernel as xk
from apollo_cas.gpu import xxh3_plans as xp

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"

# Triton chooses interpreter or compiler when a function is decorated, including its own
# library functions (tl.sum) at `import triton`: if something imported triton before
# this module set TRITON_INTERPRET, the kernels cannot run on the CPU in this process.
if INTERPRET and not xk.interpreted():
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set; "
        "run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

if not INTERPRET and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def _expected(buf: bytes, block_size: int) -> list[bytes]:
    return [xxhash.xxh3_128_digest(buf[i : i + block_size]) for i in range(0, len(buf), block_size)]


def _rows(digests: torch.Tensor) -> list[bytes]:
    assert digests.dtype == torch.uint8
    assert digests.dim() == 2 and digests.shape[1] == 16
    return [bytes(row) for row in digests.cpu().numpy()]


def _check(n: int, block_size: int, seed: int = 0) -> None:
    data = _random_bytes(n, seed)
    got = xk.block_digests(data.to(DEVICE), block_size)
    assert got.device.type == DEVICE
    assert _rows(got) == _expected(data.numpy().tobytes(), block_size)


# Lengths of the whole buffer: short single blocks (host short paths), one long block of
# every stripe count, exact multiples, and several blocks with odd tails on each side of
# 240 bytes and of 1024 bytes.
LENGTHS_256 = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 255, 256, 257, 512 + 240, 512 + 241]
LENGTHS_1024 = [241, 256, 319, 320, 1000, 1023, 1024, 1025, 3 * 1024 + 100, 3 * 1024 + 1000]
LENGTHS_4096 = [4096, 4096 + 7, 2 * 4096 + 240, 2 * 4096 + 1024, 2 * 4096 + 1025, 3 * 4096 + 3001]


@pytest.mark.parametrize("n", LENGTHS_256)
def test_block_256(n: int) -> None:
    _check(n, 256, seed=n)


@pytest.mark.parametrize("n", LENGTHS_1024)
def test_block_1024(n: int) -> None:
    _check(n, 1024, seed=n)


@pytest.mark.parametrize("n", LENGTHS_4096)
def test_block_4096(n: int) -> None:
    _check(n, 4096, seed=n)


@pytest.mark.parametrize("block_size", [320, 1088, 2048 + 64 * 15])
def test_block_sizes_not_multiple_of_1024(block_size: int) -> None:
    # Full blocks that end with 1..15 whole stripes after their last scramble.
    _check(3 * block_size + 777, block_size, seed=block_size)


def test_many_blocks_not_multiple_of_group() -> None:
    # 13 full blocks: the last program of the kernel re-hashes a block in its spare
    # lanes and must not write them.
    _check(13 * 256 + 5, 256, seed=13)


@pytest.mark.parametrize(
    "config",
    [
        xk.LaunchConfig(group=1),
        xk.LaunchConfig(group=2, unroll=2),
        xk.LaunchConfig(group=4, unroll=3, num_warps=2),
        xk.LaunchConfig(group=8, unroll=2, evict_first=True),
        xk.LaunchConfig(group=16, num_warps=4, num_stages=3),
    ],
    ids=repr,
)
def test_launch_configurations(config: xk.LaunchConfig) -> None:
    # 5 * 4096-byte blocks = 3 scramble blocks each, so unroll 2 and 3 leave remainders.
    block_size = 4096
    data = _random_bytes(5 * block_size + 500, config.group * 100 + config.unroll)
    got = xk.block_digests(data.to(DEVICE), block_size, config)
    assert _rows(got) == _expected(data.numpy().tobytes(), block_size)


def test_identical_blocks_give_identical_digests() -> None:
    block = _random_bytes(1024, 7)
    data = torch.cat([block, block, _random_bytes(1024, 8), block])
    rows = _rows(xk.block_digests(data.to(DEVICE), 1024))
    assert rows[0] == rows[1] == rows[3] != rows[2]


def test_other_dtypes_are_hashed_as_their_bytes() -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(3, 200, generator=gen, dtype=torch.float32)  # 2400 bytes
    got = xk.block_digests(t.to(DEVICE), 1024)
    assert _rows(got) == _expected(t.numpy().tobytes(), 1024)
    b = t.to(torch.bfloat16)
    raw = b.view(torch.int16).numpy().tobytes()
    assert _rows(xk.block_digests(b.to(DEVICE), 256)) == _expected(raw, 256)


def test_as_bytes() -> None:
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    view = xk.as_bytes(t)
    assert view.dtype == torch.uint8 and view.shape == (24,)
    assert view.numpy().tobytes() == t.numpy().tobytes()
    assert xk.as_bytes(t.t()).numpy().tobytes() == t.t().contiguous().numpy().tobytes()
    assert xk.as_bytes(torch.empty(0, dtype=torch.float64)).shape == (0,)


def test_unaligned_view_is_hashed_correctly() -> None:
    data = _random_bytes(3 * 512 + 300, 11)
    sliced = data.to(DEVICE)[3:]  # starts 3 bytes into an allocation
    got = xk.block_digests(sliced, 512)
    assert _rows(got) == _expected(data.numpy().tobytes()[3:], 512)


def test_empty_input() -> None:
    got = xk.block_digests(torch.empty(0, dtype=torch.uint8, device=DEVICE), 1024)
    assert got.shape == (0, 16) and got.dtype == torch.uint8


@pytest.mark.parametrize("block_size", [0, -64, 64, 128, 192, 240, 255, 257, 300, 1000])
def test_bad_block_size(block_size: int) -> None:
    with pytest.raises(ValueError):
        xk.block_digests(torch.zeros(4096, dtype=torch.uint8, device=DEVICE), block_size)


@pytest.mark.parametrize("block_size", [256.0, "256", True, None])
def test_block_size_must_be_int(block_size: object) -> None:
    with pytest.raises(ValueError):
        xk.block_digests(torch.zeros(4096, dtype=torch.uint8, device=DEVICE), block_size)  # type: ignore[arg-type]


def test_available_never_raises() -> None:
    assert isinstance(xk.available(), bool)


def test_secret_table_matches_spec_constants() -> None:
    # Guards the host-side table against an edited secret byte or offset.
    words = xk.secret_table_words()
    assert words[0] == 0xBE4BA423396CFEB8  # first 8 bytes of the default secret, LE
    assert words[xk.T_INIT : xk.T_INIT + 8] == [
        0xC2B2AE3D,
        0x9E3779B185EBCA87,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x85EBCA77,
        0x27D4EB2F165667C5,
        0x9E3779B1,
    ]


# ------------------------------------------------------------------ block_digests_many


def _expected_many(views: list[torch.Tensor], block_size: int) -> list[bytes]:
    rows: list[bytes] = []
    for v in views:
        rows += _expected(xk.as_bytes(v.cpu()).numpy().tobytes(), block_size)
    return rows


def _check_many(views: list[torch.Tensor], block_size: int) -> torch.Tensor:
    got = xk.block_digests_many(views, block_size)
    assert got.dtype == torch.uint8 and got.device.type == DEVICE
    assert _rows(got) == _expected_many(views, block_size)
    return got


# Every kind of view in one launch: empty, short single blocks (host), a long single
# partial block (tail kernel), exact multiples, and full blocks followed by tails of
# 1-240 bytes (host) and of more than 240 bytes (tail kernel, unaligned final stripe).
MANY_SIZES_256 = [0, 1, 17, 100, 240, 241, 255, 256, 257, 300, 512, 512 + 240, 512 + 241, 1000]
MANY_SIZES_1024 = [7, 240, 241, 1023, 1024, 1025, 2048 + 100, 3 * 1024 + 1000, 5 * 1024]


@pytest.mark.parametrize(
    ("block_size", "sizes"), [(256, MANY_SIZES_256), (1024, MANY_SIZES_1024)], ids=str
)
def test_many_odd_sizes(block_size: int, sizes: list[int]) -> None:
    views = [_random_bytes(n, 1000 + n).to(DEVICE) for n in sizes]
    _check_many(views, block_size)
    # Reversed and shuffled orders: the lowest address (the kernels' base) moves around,
    # and full blocks, long tails and short tails interleave differently.
    _check_many(views[::-1], block_size)
    order = torch.randperm(len(views), generator=torch.Generator().manual_seed(5)).tolist()
    _check_many([views[i] for i in order], block_size)


def test_many_equals_per_tensor_block_digests() -> None:
    views = [_random_bytes(n, n).to(DEVICE) for n in (700, 256 * 3 + 5, 1300)]
    many = xk.block_digests_many(views, 256)
    assert torch.equal(many, torch.cat([xk.block_digests(v, 256) for v in views]))


def test_many_views_of_one_storage() -> None:
    # Slices of one buffer at 16-byte multiples, listed high address first: offsets are
    # relative to the lowest view, wherever it sits in the list.
    buf = _random_bytes(8192, 21).to(DEVICE)
    views = [buf[4096:6000], buf[1024 : 1024 + 777], buf[16 : 16 + 256 * 4], buf[6016:8192]]
    _check_many(views, 256)


def test_many_only_short_views() -> None:
    # Nothing for the kernels: every digest comes from the host path.
    views = [_random_bytes(n, n).to(DEVICE) for n in (5, 240, 0, 129)]
    _check_many(views, 256)


def test_many_single_view_needs_no_reordering() -> None:
    view = _random_bytes(4 * 256 + 250, 3).to(DEVICE)
    _check_many([view], 256)
    plan = xp.plan_for([view], 256, view.device, cache=False)
    assert plan.perm is None and plan.n_full == 4 and plan.n_tail == 1


@pytest.mark.parametrize(
    "config",
    [
        xk.LaunchConfig(group=1),
        xk.LaunchConfig(group=4, unroll=3, num_warps=2),
        xk.LaunchConfig(group=8, unroll=2, evict_first=True),
        xk.LaunchConfig(group=16, num_warps=4, num_stages=3),
    ],
    ids=repr,
)
def test_many_launch_configurations(config: xk.LaunchConfig) -> None:
    # 4096-byte blocks = 3 scramble blocks each (remainders for unroll 2 and 3); 11 full
    # blocks in all, not a multiple of any group, so spare lanes re-hash the last one.
    sizes = [4096 * 3 + 500, 4096 * 2, 100, 4096 * 6 + 4000]
    views = [_random_bytes(n, config.group + n).to(DEVICE) for n in sizes]
    got = xk.block_digests_many(views, 4096, config)
    assert _rows(got) == _expected_many(views, 4096)


def test_many_other_dtypes_and_shapes() -> None:
    gen = torch.Generator().manual_seed(9)
    views = [
        torch.randn(3, 200, generator=gen).to(DEVICE),  # fp32, 2400 bytes
        torch.randn(17, 31, generator=gen).to(torch.bfloat16).to(DEVICE),  # 1054 bytes
        torch.arange(300, dtype=torch.int64).to(DEVICE),
    ]
    _check_many(views, 1024)


def test_many_unaligned_view_is_copied_and_not_cached() -> None:
    data = _random_bytes(3 * 512 + 300, 11).to(DEVICE)
    other = _random_bytes(1000, 12).to(DEVICE)
    xp.PLANS.clear()
    _check_many([other, data[3:]], 512)
    assert len(xp.PLANS) == 0  # the copy's address changes every call
    _check_many([other, data[16:]], 512)
    assert len(xp.PLANS) == 1


def test_many_plan_is_cached_and_sees_new_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    xp.PLANS.clear()
    views = [_random_bytes(n, n).to(DEVICE) for n in (1024 + 300, 2048, 600)]
    _check_many(views, 256)
    plan = next(iter(xp.PLANS.values()))
    # Same tensors, new bytes (a training step): same plan, new digests.
    for v in views:
        v.copy_(_random_bytes(v.numel(), v.numel() + 1).to(DEVICE))
    _check_many(views, 256)
    assert len(xp.PLANS) == 1 and next(iter(xp.PLANS.values())) is plan
    # Another block size is another plan; the cache stays bounded (block sizes the
    # other tests use, so a compiled run compiles nothing new here).
    monkeypatch.setattr(xp, "PLAN_CACHE_SIZE", 2)
    for bs in (512, 1024, 256):
        _check_many(views, bs)
    assert [k[1] for k in xp.PLANS] == [1024, 256]


def test_many_base_not_viewable_as_words_falls_back() -> None:
    if DEVICE != "cpu":
        pytest.skip("builds an odd-offset CPU storage")
    # A storage that starts 1 byte into a buffer: a view 16-byte aligned in memory has a
    # storage offset that is not a multiple of 8, so it cannot alias int64 words.
    raw = bytearray(_random_bytes(4096, 31).numpy().tobytes())
    storage = torch.frombuffer(raw, dtype=torch.uint8, offset=1)
    skip = (-storage.data_ptr()) % 16
    view = storage[skip : skip + 1500]
    assert view.data_ptr() % 16 == 0 and view.storage_offset() % 8 != 0
    _check_many([view, _random_bytes(700, 32)], 256)


def test_many_empty() -> None:
    assert xk.block_digests_many([], 1024).shape == (0, 16)
    empty = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    got = xk.block_digests_many([empty, empty], 1024)
    assert got.shape == (0, 16) and got.device.type == DEVICE


@pytest.mark.parametrize("block_size", [0, 128, 300])
def test_many_bad_block_size(block_size: int) -> None:
    with pytest.raises(ValueError):
        xk.block_digests_many([torch.zeros(4096, dtype=torch.uint8, device=DEVICE)], block_size)


@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 1, reason="needs CUDA")
def test_many_refuses_mixed_devices() -> None:  # pragma: no cover - GPU only
    with pytest.raises(ValueError, match="different devices"):
        xk.block_digests_many(
            [
                torch.zeros(512, dtype=torch.uint8, device="cuda"),
                torch.zeros(512, dtype=torch.uint8),
            ],
            256,
        )


@pytest.mark.parametrize(
    "sizes",
    [
        [256] * 5,  # every row full: one launch
        [256, 256, 100, 256, 17, 256, 256, 255],  # a few short rows (>240 and <=240)
        [3, 250, 256, 1],  # mostly short: a view each
        [],
    ],
    ids=["full", "some-short", "mostly-short", "none"],
)
def test_row_digests_hash_each_rows_prefix(sizes: list[int]) -> None:
    bs = 256
    rows = _random_bytes(len(sizes) * bs, 5).to(DEVICE).view(len(sizes), bs)
    got = xk.row_digests(rows, sizes, bs)
    host = rows.cpu().numpy()
    want = [xxhash.xxh3_128_digest(host[i, :n].tobytes()) for i, n in enumerate(sizes)]
    assert _rows(got) == want


def test_row_digests_take_the_callers_upload() -> None:
    bs = 256
    rows = _random_bytes(3 * bs, 6).to(DEVICE).view(3, bs)
    seen: list[list[int]] = []

    def upload(arr: object, device: object) -> torch.Tensor:
        seen.append(list(arr))  # type: ignore[call-overload]
        return torch.as_tensor(arr).to(device)  # type: ignore[arg-type]

    got = xk.row_digests(rows, [bs, 40, bs], bs, upload)
    assert seen == [[1]]
    assert _rows(got)[1] == xxhash.xxh3_128_digest(rows[1, :40].cpu().numpy().tobytes())
    with pytest.raises(ValueError, match="contiguous"):
        xk.row_digests(rows[:, :128], [128] * 3, bs)
