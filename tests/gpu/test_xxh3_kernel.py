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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"

# Triton chooses interpreter or compiler when a function is decorated, including its own
# library functions (tl.sum) at `import triton`: if something imported triton before
# this module set TRITON_INTERPRET, the kernels cannot run on the CPU in this process.
if INTERPRET and type(xk._xxh3_full_blocks_kernel).__name__ != "InterpretedFunction":
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
    got = xk._block_digests(data.to(DEVICE), block_size, config)
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
    words = xk._secret_table_words()
    assert words[0] == 0xBE4BA423396CFEB8  # first 8 bytes of the default secret, LE
    assert words[xk._T_INIT : xk._T_INIT + 8] == [
        0xC2B2AE3D,
        0x9E3779B185EBCA87,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x85EBCA77,
        0x27D4EB2F165667C5,
        0x9E3779B1,
    ]
