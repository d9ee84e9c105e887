"""Where restore time goes: chunk reads per thread count, and each stage alone.

Builds a store from generated bf16 weights (a full checkpoint and a dense
step stored as XOR deltas), then times, for 1..N threads: reading + decoding
+ verifying every chunk of each checkpoint, and the stages alone (file read,
zstd frames, byte-plane interleave, hash). Scaling that stops short of the
core count points at work done under the GIL.

``--max-shard-size`` also restores the full checkpoint to safetensors once per
shard size given (comma-separated), the sizes taking turns over
``--shard-rounds`` rounds, so one run puts one shard beside several: writers
in one tmpfs file wait on its inode lock (benchmarks/results/
h200_2026-12-03/shm_writes.json), which several shards side by side avoid.
``--only-shards`` skips everything else.

    python benchmarks/bench_restore.py --size 2GiB --out benchmarks/results/restore.json
    python benchmarks/bench_restore.py --size 32GiB --only-shards --max-shard-size 1TB,5GiB,2GiB \\
        --dir /dev/shm/apollo-bench --out shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from apollo_cas import examples
from apollo_cas.chunkstore import ChunkStore
from apollo_cas.cli.common import parse_size
from apollo_cas.errors import UsageError
from apollo_cas.hashing import digest
from apollo_cas.parallel import bounded_map
from apollo_cas.store import Store


def rate(nbytes: int, fn, items, threads: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in bounded_map(fn, items, threads):
        pass
    return nbytes / (time.perf_counter() - t0) / 1e9


_STORE: Store | None = None


def _init(path: str) -> None:
    global _STORE
    _STORE = Store.open(path, workers=1)


def _read_batch(ids: list[bytes]) -> int:
    assert _STORE is not None
    return sum(len(_STORE.read_chunk(c)) for c in ids)


def shard_restores(
    st: Store, cid: str, sizes: list[str], rounds: int, dest: Path, logical: int
) -> list[dict[str, object]]:
    """Restore ``cid`` to safetensors once per shard size per round, the sizes
    taking turns so each sees the same machine state; wall seconds of each."""
    walls: dict[str, list[float]] = {size: [] for size in sizes}
    shards: dict[str, int] = {}
    for _ in range(rounds):
        for size in sizes:
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            files = st.restore(cid, dest, format="safetensors", max_shard_size=parse_size(size))
            walls[size].append(round(time.perf_counter() - t0, 4))
            shards[size] = sum(1 for f in files if f.endswith(".safetensors"))
    shutil.rmtree(dest, ignore_errors=True)
    decoder = st.decoder(logical)
    rows: list[dict[str, object]] = []
    for size in sizes:
        best = round(logical / min(walls[size]) / 1e9, 3)
        rows.append(
            {
                "max_shard_size": size,
                "shards": shards[size],
                "bytes": logical,
                "processes": decoder.processes,
                "workers": decoder.workers,
                "walls_s": walls[size],
                "best_gb_s": best,
            }
        )
        print(
            f"restore safetensors, max shard size {size} ({shards[size]} shards): "
            f"{best} GB/s best of {rounds}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/restore.json")
    ap.add_argument(
        "--max-shard-size",
        default="",
        help="comma-separated shard sizes (1TB: one file) to restore to safetensors with",
    )
    ap.add_argument("--shard-rounds", type=int, default=3, help="restores per shard size")
    ap.add_argument("--only-shards", action="store_true", help="time only --max-shard-size")
    args = ap.parse_args(argv)
    sizes = [x.strip() for x in args.max_shard_size.split(",") if x.strip()]
    for size in sizes:
        try:
            if parse_size(size) <= 0:
                raise ValueError(size)
        except (UsageError, ValueError):
            ap.error(f"--max-shard-size: {size!r} is not a positive size")
    if args.only_shards and not sizes:
        ap.error("--only-shards needs --max-shard-size")
    if args.shard_rounds < 1:
        ap.error("--shard-rounds must be at least 1")
    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-restore-"))
    shutil.rmtree(work, ignore_errors=True)
    w = examples.generate(examples.ModelShape.for_bytes(parse_size(args.size)))
    logical = sum(a.nbytes for a in w.values())
    st = Store.open(work / "store", create=True)
    full = st.save(w).checkpoint_id
    cores = os.cpu_count() or 1
    out: dict[str, object] = {"cores": cores, "logical_bytes": logical}
    if sizes:
        if args.only_shards:
            del w  # a large model's weights would crowd the restores' tmpfs out of memory
        out["safetensors_by_shard_size"] = shard_restores(
            st, full, sizes, args.shard_rounds, work / "shards", logical
        )
    if args.only_shards:
        _write(args.out, out)
        st.close()
        shutil.rmtree(work, ignore_errors=True)
        return
    rng = np.random.default_rng(1)
    dense = {}
    for k, a in w.items():
        f = (a.astype(np.uint32) << 16).view(np.float32)
        f = f * (1 + 1e-3 * rng.standard_normal(f.shape, dtype=np.float32))
        dense[k] = examples.to_bf16_bits(f)
    delta = st.save(dense).checkpoint_id
    counts = sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1)))
    for label, cid in (("full", full), ("delta", delta)):
        ids = [c for t in st.manifest(cid).tensors for c in t.chunks]
        # The store's inventory: without it a format-2 store's chunks (in packs) are not found.
        cs = ChunkStore(st.backend, st.chunks.policy, st.chunks.inventory)
        res = {}
        for n in counts:
            res[n] = round(rate(logical, cs.read, ids, n), 3)
        out[f"read_chunk_{label}_gb_s"] = res
        print(label, "read_chunk GB/s by threads:", res, flush=True)
        # The same work in processes: the ceiling once the GIL is out of the way.
        import multiprocessing as mp

        batches = [ids[i : i + 64] for i in range(0, len(ids), 64)]
        pres = {}
        for n in counts:
            with mp.get_context("fork").Pool(
                n, initializer=_init, initargs=(str(work / "store"),)
            ) as pool:
                t0 = time.perf_counter()
                pool.map(_read_batch, batches)
                pres[n] = round(logical / (time.perf_counter() - t0) / 1e9, 3)
        out[f"read_chunk_{label}_processes_gb_s"] = pres
        print(label, "read_chunk in processes GB/s:", pres, flush=True)
    ids = [c for t in st.manifest(full).tensors for c in t.chunks]
    blobs = [st.chunks.get_blob(c) for c in ids[:512]]
    raws = [st.read_chunk(c) for c in ids[:512]]
    nb = sum(len(r) for r in raws)
    from apollo_cas import codecs

    stages = {
        "file_read": lambda c: st.chunks.get_blob(c),
        "decode": lambda b: codecs.decode(b),
        "hash": lambda r: digest(r),
        "copy_tobytes": lambda r: np.frombuffer(r, dtype=np.uint8).copy().tobytes(),
    }
    inputs = {"file_read": ids[:512], "decode": blobs, "hash": raws, "copy_tobytes": raws}
    for name, fn in stages.items():
        res = {n: round(rate(nb, fn, inputs[name], n), 3) for n in counts}
        out[f"stage_{name}_gb_s"] = res
        print(name, res, flush=True)
    for n in counts:
        s2 = Store.open(work / "store", workers=n)
        t0 = time.perf_counter()
        s2.restore(delta, work / f"r{n}", format="flat")
        out.setdefault("restore_flat_delta_gb_s", {})[n] = round(
            logical / (time.perf_counter() - t0) / 1e9, 3
        )  # type: ignore[union-attr]
        shutil.rmtree(work / f"r{n}")
    print("restore flat (delta ckpt) GB/s:", out["restore_flat_delta_gb_s"])
    _write(args.out, out)
    shutil.rmtree(work, ignore_errors=True)


def _write(path: str, out: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
