"""Where restore time goes: chunk reads per thread count, and each stage alone.

Builds a store from generated bf16 weights (a full checkpoint and a dense
step stored as XOR deltas), then times, for 1..N threads: reading + decoding
+ verifying every chunk of each checkpoint, and the stages alone (file read,
zstd frames, byte-plane interleave, hash). Scaling that stops short of the
core count points at work done under the GIL.

    python benchmarks/bench_restore.py --size 2GiB --out benchmarks/results/restore.json
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
from apollo_cas.hashing import digest
from apollo_cas.layout import chunk_key
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/restore.json")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-restore-"))
    shutil.rmtree(work, ignore_errors=True)
    w = examples.generate(examples.ModelShape.for_bytes(parse_size(args.size)))
    logical = sum(a.nbytes for a in w.values())
    st = Store.open(work / "store", create=True)
    full = st.save(w).checkpoint_id
    rng = np.random.default_rng(1)
    dense = {}
    for k, a in w.items():
        f = (a.astype(np.uint32) << 16).view(np.float32)
        f = f * (1 + 1e-3 * rng.standard_normal(f.shape, dtype=np.float32))
        dense[k] = examples.to_bf16_bits(f)
    delta = st.save(dense).checkpoint_id
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1)))
    out: dict[str, object] = {"cores": cores, "logical_bytes": logical}
    for label, cid in (("full", full), ("delta", delta)):
        ids = [c for t in st.manifest(cid).tensors for c in t.chunks]
        cs = ChunkStore(st.backend, st.chunks.policy)
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
    blobs = [st.backend.get(chunk_key(c.hex())) for c in ids[:512]]
    raws = [st.read_chunk(c) for c in ids[:512]]
    nb = sum(len(r) for r in raws)
    from apollo_cas import codecs

    stages = {
        "file_read": lambda c: st.backend.get(chunk_key(c.hex())),
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
