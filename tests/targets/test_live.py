"""Hot restore into live tensors, on the CPU.

Manifests are built by hand (chunk ids from xxhash) and chunks served from a
dict, so these tests depend only on the manifest records and the live target.
The device write path (pinned buffers, batches, coalesced copies) is driven
directly with CPU tensors, which it supports for this purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import xxhash

torch = pytest.importorskip("torch")

from apollo_cas import dtypes  # noqa: E402
from apollo_cas.errors import TargetError  # noqa: E402
from apollo_cas.manifest import Manifest, SourceInfo, TensorEntry  # noqa: E402
from apollo_cas.targets import live  # noqa: E402

BS = 256


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def make_checkpoint(
    tensors: dict[str, torch.Tensor], bs: int = BS
) -> tuple[Manifest, dict[bytes, bytes]]:
    chunks: dict[bytes, bytes] = {}
    entries = []
    for name in sorted(tensors):
        t = tensors[name]
        b = raw(t)
        ids = []
        for o in range(0, len(b), bs):
            cid = xxhash.xxh3_128_digest(b[o : o + bs])
            chunks[cid] = b[o : o + bs]
            ids.append(cid)
        entries.append(
            TensorEntry(name, dtypes.from_torch(t.dtype).name, tuple(t.shape), len(b), tuple(ids))
        )
    m = Manifest(
        series="default",
        created=0.0,
        block_size=bs,
        tensors=tuple(entries),
        source=SourceInfo(kind="mapping"),
    )
    return m, chunks


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed": torch.randn(40, 32, generator=g).to(torch.bfloat16),  # 2560 B: 10 blocks
        "q": torch.randn(32, 33, generator=g),  # 4224 B: 16.5 blocks
        "norm": torch.randn(32, generator=g),  # 128 B: one short block
        "mask": torch.rand(300, generator=g) > 0.5,
        "i8": torch.randint(-128, 127, (1000,), dtype=torch.int8, generator=g),
    }


def by_id(chunks: dict[bytes, bytes]) -> Callable[[bytes, int | None], bytes]:
    """A chunk reader over a dict (the size check is the store's; these tests
    check the target's own)."""
    return lambda cid, _size=None: chunks[cid]


def clone(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.items()}


def test_writes_only_changed_blocks_and_verifies() -> None:
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = clone(saved)
    live_t["embed"][0, 0] += 1  # block 0 of embed
    live_t["q"][31, 32] = 7.0  # last (partial) block of q
    live_t["q"][10, 0] = -1.0  # one middle block
    live_t["norm"][3] = 0.5
    reads: list[bytes] = []

    def read_chunk(cid: bytes, size: int | None = None) -> bytes:
        reads.append(cid)
        return chunks[cid]

    rep = live.restore_live(live_t, manifest, read_chunk, workers=2)
    for k in saved:
        assert torch.equal(live_t[k], saved[k]), k
    assert rep.blocks_written == 4 == len(reads)
    assert rep.bytes_written == 256 + (4224 - 16 * 256) + 256 + 128
    assert rep.blocks_checked == sum(len(e.chunks) for e in manifest.tensors)
    assert rep.verified and not rep.dry_run and rep.device == "cpu"
    assert "paused" in rep.notice and rep.to_dict()["blocks_written"] == 4


def test_unchanged_writes_nothing() -> None:
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    rep = live.restore_live(clone(saved), manifest, by_id(chunks))
    assert rep.blocks_written == 0 and rep.bytes_written == 0 and rep.verified


def test_dry_run_counts_without_writing() -> None:
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = clone(saved)
    live_t["i8"].fill_(0)
    before = raw(live_t["i8"])
    rep = live.restore_live(live_t, manifest, by_id(chunks), dry_run=True)
    assert rep.dry_run and rep.blocks_written == 4 and rep.bytes_written == 0
    assert raw(live_t["i8"]) == before


def test_parameters_are_written_in_place() -> None:
    saved = {"w": torch.randn(100, 10)}
    manifest, chunks = make_checkpoint(saved)
    p = torch.nn.Parameter(torch.zeros(100, 10))
    live.restore_live({"w": p}, manifest, by_id(chunks))
    assert torch.equal(p.data, saved["w"]) and p.requires_grad


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.pop("norm"), "'norm' is missing"),
        (lambda m: m.__setitem__("extra", torch.zeros(1)), "'extra' is not in the checkpoint"),
        (lambda m: m.__setitem__("q", torch.zeros(33, 32)), "shape"),
        (lambda m: m.__setitem__("q", torch.zeros(32, 33, dtype=torch.float64)), "dtype"),
        (lambda m: m.__setitem__("q", torch.zeros(33, 32).t()), "not contiguous"),
        (lambda m: m.__setitem__("q", [1, 2]), "not a tensor"),
    ],
)
def test_mismatch_refused_before_writing(change, match: str) -> None:  # type: ignore[no-untyped-def]
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = clone(saved)
    live_t["embed"].fill_(0)
    change(live_t)
    with pytest.raises(TargetError, match=match) as ei:
        live.restore_live(live_t, manifest, by_id(chunks))
    assert "nothing was written" in str(ei.value)
    assert live_t["embed"].abs().sum() == 0


def test_wrong_chunk_length() -> None:
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = clone(saved)
    live_t["i8"].fill_(1)
    with pytest.raises(TargetError, match="expected 256"):
        live.restore_live(live_t, manifest, lambda cid, _size: chunks[cid][:-1])


def test_verification_failure_is_reported() -> None:
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = clone(saved)
    live_t["i8"].fill_(1)

    def corrupt(cid: bytes, size: int | None = None) -> bytes:
        return bytes(len(chunks[cid]))  # right length, wrong bytes

    with pytest.raises(TargetError, match="verification failed: 4 block"):
        live.restore_live(live_t, manifest, corrupt)


def test_device_write_path_on_cpu() -> None:
    """Batches of pinned-buffer slots, coalesced runs, two buffers in turn."""
    saved = model()
    manifest, chunks = make_checkpoint(saved)
    live_t = {k: torch.zeros_like(v) for k, v in saved.items()}
    names = sorted(live_t)
    views = [live.byte_view(live_t[n]) for n in names]
    entries = list(manifest.tensors)
    todo = [(ti, bi) for ti, e in enumerate(entries) for bi in range(len(e.chunks))]
    written: list[int] = []
    live.BlockWrites(
        views,
        entries,
        BS,
        by_id(chunks),
        buffer_bytes=3 * BS,
        workers=2,
        progress=written.append,
    ).write_device(todo)
    for k in saved:
        assert torch.equal(live_t[k], saved[k]), k
    assert sum(written) == sum(e.nbytes for e in entries)
    assert len(written) > 2  # several batches through the two buffers


def test_coalesce() -> None:
    batch = [(0, 0, 256, 0), (0, 1, 256, 256), (0, 3, 256, 512), (1, 4, 100, 768)]
    assert live.coalesce(batch, 256) == [(0, 0, 512, 0), (0, 3, 256, 512), (1, 4, 100, 768)]
