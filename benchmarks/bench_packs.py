"""Store format 2 (packs) against format 1 (a chunk per object), side by side in one run.

For a generated bf16 model (default 256 MiB, 1 MiB blocks):

* objects written per save: a full save, a save with 0.5% of the blocks
  changed, a dense step (every block changes a little), on a directory, both
  formats; the target is at most stored bytes / 16 MiB + 5 per save;
* S3 requests (PUT, GET, HEAD, LIST, DELETE) per full save, dense step and
  restore on a local SeaweedFS (tests/s3server.py), both formats (``--no-s3``
  skips it);
* page-cache reads: the full save's stored bytes read through the
  restore's read path (spans of a pack, the decoder's threads) and the whole
  restore (read, decode, re-hash, write to /dev/shm), beside the same number of
  bytes read from one file with the same threads;
* a full save beside the disk's fsync'd sequential write bandwidth.

    python benchmarks/bench_packs.py --size 256MiB --out benchmarks/results/packs.json

``--full-save-only`` measures just the last point, side by side in one run: full
saves into a fresh store of format 1 and of format 2 (``--repeat`` times each,
alternating), and one sequential write of as many bytes as the save stored, with
an fsync, into the same directory; each save's stored bytes per second over that
bandwidth (issue 18's target: at least 0.85). ``--source torch`` saves torch
tensors (``--device cuda``: on the GPU, through the device path).

    python benchmarks/bench_packs.py --full-save-only --size 2GiB --dir /tmp/apollo-packs \
        --out benchmarks/results/full_save_vs_disk_vm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apollo_cas  # noqa: E402
from apollo_cas import examples  # noqa: E402
from apollo_cas.cli.common import parse_size  # noqa: E402
from apollo_cas.decoding import read_span, spans  # noqa: E402
from apollo_cas.parallel import bounded_map, default_workers  # noqa: E402
from apollo_cas.store import Store  # noqa: E402

MiB = 1 << 20
#: Passes of each page-cache read measurement (the best is kept).
READ_REPEATS = 5


def sequence(size: int, seed: int = 0) -> list[tuple[str, dict[str, np.ndarray]]]:
    """full, 0.5% of the blocks changed, a dense step (every block changes)."""
    w = examples.generate(examples.ModelShape.for_bytes(size), seed=seed)
    sparse = dict(w)
    names = sorted(w)
    total_blocks = sum(max(1, a.nbytes // MiB) for a in w.values())
    budget = max(1, total_blocks // 200)  # 0.5% of the 1 MiB blocks
    for name in names:
        if budget <= 0:
            break
        a = w[name].copy()
        flat = a.reshape(-1).view(np.uint8)
        for b in range(0, min(flat.size, budget * MiB), MiB):
            flat[b] ^= 1
            budget -= 1
        sparse[name] = a
    dense = {n: (a.view(np.uint16) ^ np.uint16(1)).view(a.dtype) for n, a in sparse.items()}
    return [("full", w), ("0.5% changed", sparse), ("dense step", dense)]


def objects(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "locks" not in p.parts and not p.name.startswith(".")
    }


def fsync_write_bandwidth(where: Path, nbytes: int) -> float:
    """GB/s of one sequential write of ``nbytes`` with an fsync at the end."""
    path = where / "fsync-probe"
    block = os.urandom(16 * MiB)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    n = path.stat().st_size
    path.unlink()
    return n / dt / 1e9


def one_file_read(path: Path, threads: int, piece: int = 16 * MiB) -> float:
    """GB/s of reading ``path`` (in the page cache) in pieces with ``threads`` threads."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def one(off: int) -> int:
        # New bytes per piece, like the read path's ranged reads (Backend.get_range).
        # A zero-filled bytearray per piece instead measured 10.4 GB/s against the
        # read path's 42.6 GB/s on the H200 host (16 threads, /dev/shm): the floor
        # must not pay for a memset the read path does not do.
        return len(os.pread(fd, min(piece, size - off), off))

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(one, range(0, size, piece)))
        return got / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def fsync_probe(where: Path, nbytes: int, repeat: int) -> dict[str, Any]:
    """The best of ``repeat`` sequential writes of ``nbytes`` with an fsync (GB/s)."""
    runs = [fsync_write_bandwidth(where, nbytes) for _ in range(max(1, repeat))]
    return {"bytes": nbytes, "runs_gb_s": [round(r, 3) for r in runs], "gb_s": round(max(runs), 3)}


def torch_weights(w: dict[str, np.ndarray], device: str) -> dict[str, Any]:
    """The same weights as torch tensors on ``device`` (bf16 kept as bf16)."""
    import torch

    out = {}
    for k, a in w.items():
        t = (
            torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            if a.dtype.itemsize == 2
            else None
        )
        out[k] = (t if t is not None else torch.from_numpy(a)).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def full_save_vs_disk(
    work: Path, weights: dict[str, Any], repeat: int, formats: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """Full saves of ``weights`` into fresh stores of each format under ``work``,
    alternating, beside the fsync'd sequential write bandwidth of ``work``."""
    workers = default_workers()
    saves: dict[int, list[dict[str, Any]]] = {f: [] for f in formats}
    stored = 0
    for _ in range(max(1, repeat)):
        for fmt in formats:
            root = work / f"full-f{fmt}"
            shutil.rmtree(root, ignore_errors=True)
            with Store.open(root, create=True, format=fmt, workers=workers) as st:
                c0, t0 = time.process_time(), time.perf_counter()
                r = st.save(weights, block_size=MiB)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            shutil.rmtree(root, ignore_errors=True)
            stored = r.stats.new_stored_bytes
            saves[fmt].append(
                {
                    "seconds": round(dt, 3),
                    "cpu_seconds": round(cpu, 2),
                    "logical_bytes": r.stats.logical_bytes,
                    "stored_bytes": stored,
                    "stored_gb_s": round(stored / dt / 1e9, 3),
                }
            )
            print(f"full save format {fmt}: {saves[fmt][-1]}", flush=True)
    probe = fsync_probe(work, max(stored, 256 * MiB), repeat)
    print(f"fsync'd sequential write: {probe}", flush=True)
    out: dict[str, Any] = {"threads": workers, "fsync_write": probe}
    for fmt, rows in saves.items():
        best = min(rows, key=lambda r: r["seconds"])
        out[f"format_{fmt}"] = {
            "runs": rows,
            "best_seconds": best["seconds"],
            "best_stored_gb_s": best["stored_gb_s"],
            "stored_vs_fsync_write": round(best["stored_gb_s"] / probe["gb_s"], 3),
        }
    if 1 in saves and 2 in saves:
        out["format_2_over_format_1_seconds"] = round(
            out["format_2"]["best_seconds"] / out["format_1"]["best_seconds"], 3
        )
    return out


def local_run(fmt: int, work: Path, seq: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    root = work / f"store-f{fmt}"
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"format": fmt, "saves": []}
    workers = default_workers()
    with Store.open(root, create=True, format=fmt, workers=workers) as st:
        full_id = ""
        for label, w in seq:
            before = objects(root)
            t0 = time.perf_counter()
            r = st.save(w, block_size=MiB)
            dt = time.perf_counter() - t0
            full_id = full_id or r.checkpoint_id or ""
            new = len(objects(root) - before)
            stored = r.stats.new_stored_bytes
            out["saves"].append(
                {
                    "save": label,
                    "seconds": round(dt, 3),
                    "logical_gb_s": round(r.stats.logical_bytes / dt / 1e9, 3),
                    "stored_gb_s": round(stored / dt / 1e9, 3),
                    "new_chunks": r.stats.new_chunks,
                    "stored_bytes": stored,
                    "objects_written": new,
                    "target_objects": stored // (16 * MiB) + 5,
                }
            )
        # Page-cache reads of the full save (every chunk a full envelope, in
        # tensor order in format 2) through the restore's read path.
        m = st.manifest(full_id)
        jobs = [(0, 0, c) for t in m.tensors for c in t.chunks]
        stored_bytes = 0
        for cid in {j[2] for j in jobs}:
            loc = st.chunks.locate(cid)
            stored_bytes += loc.length if loc.length >= 0 else st.backend.info(loc.key).size
        span_list = list(spans(st.chunks, jobs))
        for s in span_list:  # warm the page cache
            read_raw(st, s)
        # The best of READ_REPEATS passes: one pass of a small model is ~10 ms, too
        # short to compare on a shared machine; the one-file floor gets the same.
        raw_s = float("inf")
        for _ in range(READ_REPEATS):
            t0 = time.perf_counter()
            got = sum(bounded_map(lambda s: read_raw(st, s), span_list, workers))
            raw_s = min(raw_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        decoded = sum(
            bounded_map(lambda s: sum(map(len, read_span(st.chunks, s))), span_list, workers)
        )
        dec_s = time.perf_counter() - t0
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
        dest = Path(tempfile.mkdtemp(dir=shm, prefix="apollo-bench-"))
        t0 = time.perf_counter()
        st.restore(full_id, dest, format="flat")
        restore_s = time.perf_counter() - t0
        shutil.rmtree(dest)
        probe = root / "one-file"
        block = os.urandom(16 * MiB)
        with open(probe, "wb") as f:
            for off in range(0, stored_bytes, len(block)):
                f.write(block[: stored_bytes - off])
        one_file_read(probe, workers)  # into the page cache
        one = max(one_file_read(probe, workers) for _ in range(READ_REPEATS))
        probe.unlink()
        out["reads"] = {
            "threads": workers,
            "requests": len(span_list),
            "chunks": len(jobs),
            "stored_bytes": got,
            "read_path_gb_s": round(got / raw_s / 1e9, 3),
            "read_decode_verify_gb_s": round(decoded / dec_s / 1e9, 3),
            "restore_flat_to_shm_gb_s": round(m.logical_bytes / restore_s / 1e9, 3),
            "one_file_same_bytes_gb_s": round(one, 3),
            "read_path_vs_one_file": round(got / raw_s / 1e9 / one, 3),
        }
        out["gc_keep_last_1"] = gc_measure(st, seq[-1][1], work / f"fresh-f{fmt}", fmt)
    out["fsync_write_gb_s"] = round(fsync_write_bandwidth(work, 256 * MiB), 3)
    full = out["saves"][0]
    out["full_save_stored_vs_fsync_write"] = round(full["stored_gb_s"] / out["fsync_write_gb_s"], 3)
    shutil.rmtree(root, ignore_errors=True)
    return out


def gc_measure(st: Store, last: dict[str, np.ndarray], fresh: Path, fmt: int) -> dict[str, Any]:
    """``gc --keep-last 1 --max-unused 0`` twice: on the sequence (the dense step
    is kept with the delta bases it needs), against a fresh store holding only
    that checkpoint; then after an unrelated full save, the fraction of the
    unreachable chunk bytes it reclaims."""
    from apollo_cas import reports
    from apollo_cas.gc import gc
    from apollo_cas.retention import RetentionPolicy

    def dead_bytes() -> int:
        st.inventory.refresh()
        live: set[bytes] = set()
        for c in st.checkpoint_ids():
            live |= st.manifest(c).chunk_ids()
        return sum(st.inventory.stored_sizes(st.inventory.ids() - live, st.workers).values())

    policy = RetentionPolicy(keep_last=1)
    gc(st, policy, max_unused=0.0, grace=0.0)
    after = reports.store_stats(st)
    shutil.rmtree(fresh, ignore_errors=True)
    with Store.open(fresh, create=True, format=fmt) as f:
        f.save(last, block_size=MiB)
        alone = reports.store_stats(f).stored_bytes
    shutil.rmtree(fresh, ignore_errors=True)
    other = examples.generate(
        examples.ModelShape.for_bytes(sum(a.nbytes for a in last.values())), seed=99
    )
    st.save(other, block_size=MiB)
    before = reports.store_stats(st).stored_bytes
    t0 = time.perf_counter()
    # Forget the dense step too: everything but the unrelated save is unreachable.
    r = gc(st, policy, max_unused=0.0, grace=0.0)
    gc_s = time.perf_counter() - t0
    left = reports.store_stats(st).stored_bytes
    unreachable = before - sum(
        st.inventory.stored_sizes(st.manifest(st.resolve("latest")).chunk_ids(), 1).values()
    )
    return {
        "stored_after_gc_of_the_sequence": after.stored_bytes,
        "kept_only_as_delta_bases_bytes": after.base_only_bytes,
        "fresh_store_with_only_the_kept_checkpoint": alone,
        "unreachable_before_second_gc": unreachable,
        "reclaimed_fraction_of_unreachable": round((before - left) / unreachable, 4)
        if unreachable
        else None,
        "dead_chunk_bytes_left": dead_bytes(),
        "second_gc_seconds": round(gc_s, 3),
        "packs": r.packs,
    }


def read_raw(st: Store, span: Any) -> int:
    key, first, items = span
    if items[0][4] < 0:
        return sum(len(st.backend.get(key)) for _ in items)
    end = max(it[3] + it[4] for it in items)
    return len(st.backend.get_range(key, first, end - first))


@contextmanager
def counting(backend: Any) -> Iterator[Counter[str]]:
    """Count the S3 API calls a backend's boto3 client makes."""
    calls: Counter[str] = Counter()

    def hook(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    events = backend._client.meta.events
    events.register("before-call.s3", hook)
    try:
        yield calls
    finally:
        events.unregister("before-call.s3", hook)


def s3_run(fmt: int, seq: list[tuple[str, dict[str, np.ndarray]]], work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_s3 import local_s3_location

    out: dict[str, Any] = {"format": fmt}
    with local_s3_location() as location, Store.open(location, create=True, format=fmt) as st:
        st.backend._capabilities()  # the one-off capability probe, not counted
        full_id = ""
        for label, w in seq:
            with counting(st.backend) as calls:
                r = st.save(w, block_size=MiB)
            full_id = full_id or r.checkpoint_id or ""
            out[label] = dict(calls)
        dest = work / f"s3-restore-f{fmt}"
        with counting(st.backend) as calls:
            st.restore(full_id, dest, format="flat")
        out["restore full save"] = dict(calls)
        shutil.rmtree(dest, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--dir", default=None, help="work directory on the disk to measure")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--full-save-only", action="store_true", help="see the module docstring")
    ap.add_argument(
        "--repeat", type=int, default=2, help="full saves per format (--full-save-only)"
    )
    ap.add_argument("--source", choices=("numpy", "torch"), default="numpy")
    ap.add_argument("--device", default="cpu", help="torch device of --source torch")
    ap.add_argument("--formats", default="1,2", help="store formats of --full-save-only")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="tune the allocator first, as the command line does (apollo_cas.keep_freed_memory)",
    )
    ap.add_argument("--out", default="benchmarks/results/packs.json")
    args = ap.parse_args()
    tuned = apollo_cas.keep_freed_memory() if args.keep_freed_memory else False
    size = parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-packs-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("APOLLO_CAS_PROCESSES", "auto")
    if args.full_save_only:
        w: dict[str, Any] = dict(examples.generate(examples.ModelShape.for_bytes(size), seed=0))
        if args.source == "torch":
            w = torch_weights(w, args.device)
        res = {
            "machine": platform.node(),
            "cpus": os.cpu_count(),
            "source": args.source if args.source == "numpy" else f"torch on {args.device}",
            "size_bytes": sum(int(a.nbytes) for a in w.values()),
            "work_dir": str(work),
            "allocator_tuned": tuned,
            "full_save_vs_disk": full_save_vs_disk(
                work, w, args.repeat, tuple(int(f) for f in args.formats.split(","))
            ),
        }
        print(json.dumps(res, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        return
    seq = sequence(size)
    result: dict[str, Any] = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "size_bytes": sum(a.nbytes for a in seq[0][1].values()),
        "work_dir": str(work),
        "local": [local_run(fmt, work, seq) for fmt in (1, 2)],
    }
    if not args.no_s3:
        result["s3"] = [s3_run(fmt, seq, work) for fmt in (1, 2)]
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
