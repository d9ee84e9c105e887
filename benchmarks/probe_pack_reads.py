"""Why the packs read at half the speed of one file (a probe for issues 13 and 18).

The restore's read path (``pack_reader`` in windows of chunks, one reader call per
contiguous group on a thread each) read a 17 GB checkpoint's 11.5 GB of packs from the
page cache at 18.9 GB/s on the H200 host, where one file of the same size read at
39-41 GB/s with the same 16 threads. This probe separates the causes, in one run, on
one store in ``--dir`` (tmpfs: the page cache):

* ``one_file``: the packs' bytes as one file, 64 MiB pieces into reused buffers;
* ``packs_whole``: every pack file read the same way (the file layout alone);
* ``reader_w{W}_{dest}``: the chunks through ``pack_reader`` in windows of ``W``
  chunks, into a reused numpy arena or a pinned one (``dest``), a new pool per window
  (as ``bench_gpu_restore.read_floor``) and one pool kept (as the pipeline);
* ``locate``: only the index lookups and run building of the same windows.

Each variant runs ``--repeat`` times; the best is kept (a shared host is noisy).

    python benchmarks/probe_pack_reads.py --size 16GiB --out $OUT/pack_reads.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_restore import threads_timed

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.gpu.chunkplan import slices
from apollo_cas.gpu.readers import Arena, pack_reader
from apollo_cas.store import Store

GB = 1e9
PIECE = 64 << 20


def model(size: int) -> dict[str, np.ndarray]:
    """bf16-like weights (uint16 with a narrow exponent range, like a trained model)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in examples.ModelShape.for_bytes(size).tensor_shapes().items():
        a = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02
        out[name] = (a.view(np.uint32) >> 16).astype(np.uint16).reshape(shape)
    return out


def pieces_read(
    paths: list[Path], threads: int, region: Callable[[int], Any] | None = None
) -> tuple[int, float]:
    """Every file in ``paths`` read in 64 MiB pieces by ``threads`` threads into reused
    buffers: a bytearray per thread, or slices of one pre-faulted ``region(n)`` (numpy,
    pinned) as big as the arena of a 256 MiB batch pair."""
    jobs = [
        (p, o, min(PIECE, p.stat().st_size - o))
        for p in paths
        for o in range(0, p.stat().st_size, PIECE)
    ]
    if region is None:
        bufs: list[Any] = [bytearray(PIECE) for _ in range(threads)]
    else:
        big = region(PIECE * threads)
        arr = big.numpy() if hasattr(big, "numpy") else big
        arr[:] = 0
        bufs = [arr[i * PIECE : (i + 1) * PIECE] for i in range(threads)]
    lock = threading.Lock()
    total = [0]

    def work(i: int) -> None:
        buf = memoryview(bufs[i])
        n = 0
        while True:
            with lock:
                if not jobs:
                    break
                path, off, length = jobs.pop()
            fd = os.open(path, os.O_RDONLY)
            try:
                n += os.preadv(fd, [buf[:length]], off)
            finally:
                os.close(fd)
        with lock:
            total[0] += n

    dt = threads_timed(work, threads)
    return total[0], dt


def reader_read(
    st: Store,
    ids: list[bytes],
    threads: int,
    window: int,
    alloc: Callable[[int], Any] | None,
    keep_pool: bool,
    locate_only: bool = False,
) -> tuple[int, float]:
    reader = pack_reader(st.chunks.locate_many, st.backend.get_range, st.backend.root)  # type: ignore[attr-defined]
    arena = Arena(alloc)
    cap = 0
    for i in range(0, len(ids), window):
        cap = max(cap, sum(st.chunks.locate(c).length for c in ids[i : i + window]))
    arena.reset(cap + window * 64 + (1 << 20))
    # Fault the arena in once, as the pipeline's stays: claim all of it and zero it.
    whole = arena.claim(cap + window * 64 + (1 << 20))
    assert whole is not None
    np.frombuffer(whole, dtype=np.uint8)[:] = 0
    pool = ThreadPoolExecutor(threads) if keep_pool else None

    def group(win: list[bytes], sl: slice) -> int:
        if locate_only:
            return sum(st.chunks.locate(c).length for c in win[sl])
        return sum(len(b) for b in reader(win[sl], arena))

    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), window):
        win = ids[i : i + window]
        arena.reset(cap)
        sls = slices(len(win), threads)
        if pool is not None:
            n += sum(pool.map(lambda sl, w=win: group(w, sl), sls))
        else:
            with ThreadPoolExecutor(threads) as p:
                n += sum(p.map(lambda sl, w=win: group(w, sl), sls))
    dt = time.perf_counter() - t0
    if pool is not None:
        pool.shutdown()
    return n, dt


def best(fn: Callable[[], tuple[int, float]], repeat: int) -> dict[str, Any]:
    runs = [fn() for _ in range(repeat)]
    n, dt = min(runs, key=lambda r: r[1])
    return {
        "bytes": n,
        "seconds": round(dt, 4),
        "gb_per_s": round(n / dt / GB, 2),
        "all_seconds": [round(r[1], 4) for r in runs],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-pack-reads")
    ap.add_argument("--threads", default="16,32")
    ap.add_argument("--windows", default="512,2048")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/pack_reads.json")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    res: dict[str, Any] = {"size": a.size, "cpus": os.cpu_count(), "rows": {}}
    pinned: Callable[[int], Any] | None = None
    try:
        import torch

        if torch.cuda.is_available():

            def pinned(n: int) -> Any:
                return torch.empty(n, dtype=torch.uint8, pin_memory=True)

            res["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    if "device" in res:  # generating 17 GB on the GPU takes seconds, numpy a minute
        from bench_gpu_restore import build_model

        w: Any = build_model(parse_size(a.size), "cuda")
    else:
        w = model(parse_size(a.size))
    with Store.open(root / "store", create=True, format=2) as st:
        t0 = time.perf_counter()
        r = st.save(w, block_size=1 << 20)
        res["save_seconds"] = round(time.perf_counter() - t0, 3)
        del w
        if "device" in res:
            torch.cuda.empty_cache()
        m = st.manifest(r.checkpoint_id)
        ids = list(dict.fromkeys(c for e in m.tensors for c in e.chunks))
        packs = sorted({st.chunks.locate(c).key for c in ids})
        paths = [root / "store" / k for k in packs]
        sizes = [p.stat().st_size for p in paths]
        res["packs"] = len(paths)
        res["pack_mib_median"] = round(float(np.median(sizes)) / (1 << 20), 1)
        res["chunks"] = len(ids)
        one = root / "one-file"
        with open(one, "wb") as f:
            for p in paths:
                f.write(p.read_bytes())
        print(
            f"store: {len(ids)} chunks in {len(paths)} packs, {sum(sizes) / GB:.2f} GB", flush=True
        )
        rows = res["rows"]

        def row(name: str, fn: Callable[[], tuple[int, float]]) -> None:
            rows[name] = best(fn, a.repeat)
            print(f"{name:40s} {rows[name]}", flush=True)

        def numpy_region(n: int) -> Any:
            return np.empty(n, dtype=np.uint8)

        for t in map(int, a.threads.split(",")):
            row(f"one_file_t{t}", lambda t=t: pieces_read([one], t))
            row(f"one_file_numpy_t{t}", lambda t=t: pieces_read([one], t, numpy_region))
            if pinned is not None:
                row(f"one_file_pinned_t{t}", lambda t=t: pieces_read([one], t, pinned))
            row(f"packs_whole_t{t}", lambda t=t: pieces_read(paths, t))
            for win in map(int, a.windows.split(",")):
                row(
                    f"locate_w{win}_t{t}",
                    lambda t=t, win=win: reader_read(st, ids, t, win, None, True, True),
                )
                row(
                    f"reader_w{win}_numpy_newpool_t{t}",
                    lambda t=t, win=win: reader_read(st, ids, t, win, None, False),
                )
                row(
                    f"reader_w{win}_numpy_t{t}",
                    lambda t=t, win=win: reader_read(st, ids, t, win, None, True),
                )
                if pinned is not None:
                    row(
                        f"reader_w{win}_pinned_t{t}",
                        lambda t=t, win=win: reader_read(st, ids, t, win, pinned, True),
                    )
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
