"""Where a large restore's time goes, phase by phase (needs a CUDA GPU for the last rows).

    python benchmarks/bench_restore_phases.py 4 [WORKDIR]    # GiB of generated bf16 weights

Times: preallocating the output on tmpfs, starting 16 decode workers, restore
to /dev/shm and to disk on worker processes, load to CPU and GPU, and the raw
pageable / pinned host-to-device copy of the same number of bytes.
Results of a run: benchmarks/results/restore_phases.txt.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from apollo_cas import Store, examples
from apollo_cas.decoding import Decoder


def timed(label: str, fn: Callable[[], object]) -> None:
    t = time.perf_counter()
    fn()
    print(f"{label}: {time.perf_counter() - t:.3f}s", flush=True)


def main() -> None:
    import torch

    size = int(float(sys.argv[1]) * (1 << 30))
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "/root/rb")
    shutil.rmtree(work, ignore_errors=True)
    w = examples.generate(examples.ModelShape.for_bytes(size))
    n = sum(a.nbytes for a in w.values())
    st = Store.open(work / "store", create=True)
    timed("save", lambda: st.save(w))
    fd, p = tempfile.mkstemp(dir="/dev/shm")
    timed("fallocate shm", lambda: os.posix_fallocate(fd, 0, n))
    os.close(fd)
    os.unlink(p)
    timed(
        "spawn 16 workers (no jobs)",
        lambda: Decoder(st.chunks, 16, st.location, True).write([], iter([])),
    )
    os.environ["APOLLO_CAS_PROCESSES"] = "1"
    timed("restore flat procs -> shm", lambda: st.restore(None, "/dev/shm/rf", format="flat"))
    shutil.rmtree("/dev/shm/rf")
    timed("restore flat procs -> disk", lambda: st.restore(None, work / "rf", format="flat"))
    shutil.rmtree(work / "rf")
    timed("load cpu procs", lambda: st.load())
    torch.zeros(1, device="cuda")
    timed("load cuda procs", lambda: (st.load(device="cuda"), torch.cuda.synchronize()))
    tb = torch.from_numpy(np.ones(n, dtype=np.uint8))
    timed("pageable H2D of n bytes", lambda: (tb.to("cuda"), torch.cuda.synchronize()))
    pin = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    timed(
        "pinned H2D of n bytes",
        lambda: (pin.to("cuda", non_blocking=True), torch.cuda.synchronize()),
    )
    os.environ["APOLLO_CAS_PROCESSES"] = "0"
    timed("load cuda threads", lambda: (st.load(device="cuda"), torch.cuda.synchronize()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
