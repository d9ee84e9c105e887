"""The GPU restore pipeline's device steps queue their work without waiting for the
device: no operation in them synchronises the stream (a pageable host-to-device copy
does, e.g. ``torch.tensor(rows, device="cuda")``), so the host keeps running ahead of
the device across batches. Checked with ``torch.cuda.set_sync_debug_mode("warn")``,
which warns at every synchronising call and names the Python line that made it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.store import Store  # noqa: E402
from tests.gpu.test_restore import BS, same  # noqa: E402
from tests.gpu.test_restore_sparse import model, sparse_step  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (sync debug mode is a CUDA feature)"
)

#: The modules whose work is queued per batch; the verdict read and the result's
#: allocation may wait, elsewhere, by design.
QUEUED = ("device_steps.py", "sparse_steps.py", "sparse_kernels.py", "segments.py")


def test_chains_of_deltas_are_queued_without_a_stream_sync(tmp_path: Path) -> None:
    st = Store.open(tmp_path / "s", create=True)
    ms = [model()]
    for i in (1, 2):
        ms.append(sparse_step(ms[-1], i))
    for m in ms:
        st.save(m, block_size=BS)
    st.load("latest", device="cuda")  # warm-up: Triton compiles, nvCOMP loads
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = st.load("latest", device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert same({k: v.cpu() for k, v in got.items()}, ms[-1])
    where = [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
    assert not [x for x in where if x.split(":")[0] in QUEUED], where
