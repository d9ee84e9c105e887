"""The GPU restore pipeline's device steps queue their work without waiting for the
device: no operation in them synchronises the stream (a pageable host-to-device copy
does, e.g. ``torch.tensor(rows, device="cuda")``), so the host keeps running ahead of
the device across batches. Checked with ``torch.cuda.set_sync_debug_mode("warn")``,
which warns at every synchronising call and names the Python line that made it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.gpu import delta_ops  # noqa: E402
from apollo_cas.sources.device import DeviceSource  # noqa: E402
from apollo_cas.store import Store  # noqa: E402
from tests.gpu.test_restore import BS, same  # noqa: E402
from tests.gpu.test_restore_sparse import model, sparse_step  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (sync debug mode is a CUDA feature)"
    ),
]


@pytest.fixture(autouse=True)
def _compiled_kernels() -> None:
    # Other modules of tests/gpu set TRITON_INTERPRET=1 when they are imported (their
    # kernels run on the CPU), which may be after this module's marks were evaluated:
    # so this is checked when each test runs. The interpreter cannot run these kernels
    # on CUDA tensors (an InterpreterError on the H200, 2026-12-04, `pytest tests/gpu`).
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is on in this process; run with TRITON_INTERPRET=0")


#: The modules whose work is queued per batch; the verdict read and the result's
#: allocation may wait, elsewhere, by design.
QUEUED = (
    "device_steps.py",
    "sparse_steps.py",
    "sparse_kernels.py",
    "segments.py",
    "xxh3_plans.py",  # every batch's verification plan is new (its row buffers move)
)


def test_chains_of_deltas_are_queued_without_a_stream_sync(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "s", create=True)
    ms = [model()]
    for i in (1, 2):
        ms.append(sparse_step(ms[-1], i))
    for m in ms:
        st.save(m, block_size=BS)
    st.load("latest", device="cuda")  # warm-up: Triton compiles, nvCOMP loads
    torch.cuda.synchronize()
    got, where = syncs_of(lambda: st.load("latest", device="cuda"))
    assert same({k: v.cpu() for k, v in got.items()}, ms[-1])
    assert not [x for x in where if x[0] in QUEUED], where


def syncs_of(fn: Callable[[], object]) -> tuple[object, list[tuple[str, int]]]:
    """``fn()``'s result, and the (file name, line) of each synchronising call in it."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [(Path(w.filename).name, w.lineno) for w in seen if "synchroniz" in str(w.message)]
    return got, where


def test_torch_steps_send_the_sparse_counts_without_a_stream_sync(tmp_path: Path) -> None:
    """A dense save through the torch steps (the path where the kernels cannot run)
    sends codec 4's row counts by the pinned uploads, not by a pageable copy."""
    st = Store.open(tmp_path / "s", create=True, workers=2)
    st.device_delta = "always"
    st.device_delta_kernels = False
    ms = [model()]
    for i in (1, 2, 3):
        ms.append(sparse_step(ms[-1], i))

    def save(m: dict[str, torch.Tensor]) -> None:
        src = DeviceSource({k: v.cuda() for k, v in m.items()})
        try:
            st.save(src, block_size=BS, force=True)
        finally:
            src.close()

    save(ms[0])
    save(ms[1])  # warm-up of the delta path
    _, where = syncs_of(lambda: save(ms[2]))
    stats = st.last_device_delta
    assert stats is not None and stats.error is None and stats.kernel_pieces == 0
    assert stats.blocks > 0
    lines, first = inspect.getsourcelines(delta_ops.sparse_planes)
    inside = [x for x in where if x[0] == "delta_ops.py" and first <= x[1] < first + len(lines)]
    assert not inside, where
    assert same(st.load("latest"), ms[2])
