"""A worker limit every pool of a save honours, and CPU seconds beside wall seconds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apollo_cas.backends.local import LocalBackend
from apollo_cas.parallel import bounded_map, default_workers, worker_limit
from apollo_cas.sources import open_mapping
from apollo_cas.sources.base import BlockRequest, Source, SourceTensor
from apollo_cas.store import Store


def test_worker_limit_caps_every_pool_in_its_context() -> None:
    seen: set[int] = set()

    def task(i: int) -> int:
        seen.add(threading.get_ident())
        return i

    with worker_limit(1):
        assert default_workers() == 1
        assert list(bounded_map(task, range(50), 8)) == list(range(50))
    assert seen == {threading.get_ident()}
    assert default_workers() >= 1


class Watched(Source):
    """A source that records the threads reading it and the limit its hooks see."""

    def __init__(self, inner: Source, device_path: bool) -> None:
        self.inner = inner
        self.info = inner.info
        self.device_path = device_path
        self.threads: set[int] = set()
        self.hook_workers: list[int] = []

    def tensors(self) -> Sequence[SourceTensor]:
        return self.inner.tensors()

    def block_digests(self, block_size: int) -> list[list[bytes]] | None:
        self.hook_workers.append(default_workers())  # what a device source's pools get
        if not self.device_path:
            return None
        from apollo_cas.sources.device import host_block_digests

        views = [t.read(0, t.nbytes) for t in self.tensors()]
        return host_block_digests(views, block_size)

    def fetch(self, requests: Sequence[BlockRequest]) -> Iterator[tuple[int, memoryview]]:
        self.hook_workers.append(default_workers())
        return self.inner.fetch(requests)


@pytest.mark.parametrize("device_path", [False, True])
def test_a_store_with_one_worker_saves_on_one_thread(tmp_path: Path, device_path: bool) -> None:
    rng = np.random.default_rng(0)
    w = {f"t{i}": rng.standard_normal(50_000).astype(np.float32) for i in range(4)}
    src = Watched(open_mapping(w), device_path)
    real_tensors = src.inner.tensors()

    class Spy(SourceTensor):
        def __init__(self, t: SourceTensor) -> None:
            self.t, self.name, self.dtype, self.shape, self.nbytes = (
                t,
                t.name,
                t.dtype,
                t.shape,
                t.nbytes,
            )

        def read(self, offset: int, length: int) -> memoryview:
            src.threads.add(threading.get_ident())
            return self.t.read(offset, length)

    spies = [Spy(t) for t in real_tensors]
    src.tensors = lambda: spies  # type: ignore[method-assign]
    st = Store.open(tmp_path / "s", create=True, workers=1)
    r = st.save(src, block_size=16384)
    assert src.threads == {threading.get_ident()}
    assert src.hook_workers and set(src.hook_workers) == {1}
    assert r.stats.new_chunks > 0 and r.cpu_seconds > 0
    got = st.load()
    for k, v in w.items():
        assert np.array_equal(got[k].numpy(), v)


def test_cli_save_workers_and_cpu_seconds(
    tmp_path: Path, run_cli: Callable[..., Any], write_safetensors: Callable[..., Path]
) -> None:
    g = torch.Generator().manual_seed(0)
    src = write_safetensors({"w": torch.randn(300_000, generator=g)}, tmp_path / "m.safetensors")
    store = tmp_path / "s"
    p = run_cli("save", src, "--store", store, "--workers", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["cpu_seconds"] > 0 and out["seconds"] > 0
    p = run_cli("save", src, "--store", store, "--workers", "0")
    assert p.returncode == 2 and "--workers" in p.stderr
    assert "--workers" in run_cli("save", "--help").stdout


class SlowSync(LocalBackend):
    """A local backend whose durability barrier takes 0.3 s (a seam)."""

    def sync(self) -> None:
        time.sleep(0.3)
        super().sync()


def test_a_save_reports_the_seconds_of_each_phase(tmp_path: Path) -> None:
    st = Store.from_backend(SlowSync(str(tmp_path / "s")), create=True)
    r = st.save({"w": np.arange(100_000, dtype=np.float32)})
    assert list(r.phases) == ["open", "encode", "flush", "commit"]
    assert r.phases["flush"] >= 0.3  # the slow barrier is where the packs go durable
    assert abs(sum(r.phases.values()) - r.seconds) < 0.05
    assert r.to_json()["phases"].keys() == r.phases.keys()


def test_a_device_source_save_reports_its_ids_and_gpu_delta_phases(tmp_path: Path) -> None:
    from apollo_cas.sources.device import DeviceSource

    class HostHashed(DeviceSource):  # CPU tensors hashed all at once, as on a GPU
        def block_digests(self, block_size: int) -> list[list[bytes]] | None:
            from apollo_cas.gpu.blocks import host_block_digests

            return host_block_digests([t.bytes.numpy().data for t in self.tensors()], block_size)

    st = Store.open(tmp_path / "s", create=True)
    st.device_delta = "always"
    w = {"w": torch.randn(4 * 65536 + 100).to(torch.bfloat16)}
    st.save(HostHashed(w), block_size=65536)
    w["w"].mul_(1.01)
    r = st.save(HostHashed(w), block_size=65536)
    assert list(r.phases) == ["open", "ids", "gpu_delta", "encode", "flush", "commit"]
    assert st.last_device_delta is not None and st.last_device_delta.blocks == 8
