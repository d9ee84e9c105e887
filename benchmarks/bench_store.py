"""Save / restore throughput, bytes stored and dedup on a generated model sequence.

A transformer-shaped bf16 model (default 2 GiB) is saved as a sequence: a full
save, three saves with a few layers' attention fine-tuned, one with nothing
changed; then the latest is restored to safetensors, to the flat format and
into memory. Prints a table and writes JSON.

    python benchmarks/bench_store.py --size 2GiB --out benchmarks/results/store.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apollo_cas import examples, reports
from apollo_cas.cli.common import human_bytes, parse_size
from apollo_cas.parallel import default_workers
from apollo_cas.sources import open_path
from apollo_cas.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--block-size", default="1MiB")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/store.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    bs = parse_size(args.block_size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="apollo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)

    shape = examples.ModelShape.for_bytes(size)
    weights = examples.generate(shape)
    logical = sum(a.nbytes for a in weights.values())
    sequence = [("full", weights)]
    cur = weights
    for step, layers in enumerate([[1], [2, 3], [shape.layers - 1]], start=1):
        cur = examples.perturb_layers(
            cur, [n % shape.layers for n in layers], fraction=0.1, seed=step
        )
        sequence.append((f"layers {layers}", cur))
    sequence.append(("unchanged", cur))

    rows = []
    model = work / "model.safetensors"
    with Store.open(store_dir, create=True) as st:
        for label, w in sequence:
            examples.write_safetensors(w, str(model))
            with open_path(model) as src:
                t0 = time.perf_counter()
                r = st.save(src, block_size=bs)
                dt = time.perf_counter() - t0
            s = r.stats
            rows.append(
                {
                    "save": label,
                    "seconds": round(dt, 3),
                    "gb_per_s": round(logical / dt / 1e9, 3),
                    "new_chunks": s.new_chunks,
                    "chunks": s.chunks,
                    "new_stored_bytes": s.new_stored_bytes,
                    "unchanged": r.unchanged,
                }
            )
            print(
                f"save {label:14s} {dt:7.2f}s {logical / dt / 1e9:6.2f} GB/s  "
                f"{s.new_chunks:6d}/{s.chunks} new  {human_bytes(s.new_stored_bytes)}",
                flush=True,
            )
        stats = reports.store_stats(st)

        restores = {}
        for fmt in ("safetensors", "flat"):
            out = work / f"restore-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            st.restore("latest", out, format=fmt)
            dt = time.perf_counter() - t0
            restores[fmt] = {"seconds": round(dt, 3), "gb_per_s": round(logical / dt / 1e9, 3)}
            print(f"restore {fmt:12s} {dt:7.2f}s {logical / dt / 1e9:6.2f} GB/s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        loaded = st.load("latest")
        dt = time.perf_counter() - t0
        restores["memory"] = {"seconds": round(dt, 3), "gb_per_s": round(logical / dt / 1e9, 3)}
        print(f"restore {'memory':12s} {dt:7.2f}s {logical / dt / 1e9:6.2f} GB/s", flush=True)
        del loaded

    # The CLI's own wall time for an unchanged save (start-up included).
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "apollo_cas.cli.main",
            "save",
            str(model),
            "--store",
            str(store_dir),
            "--json",
        ],
        check=True,
        capture_output=True,
    )
    cli_unchanged = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "apollo_cas.cli.main", "list", "--store", str(store_dir)],
        check=True,
        capture_output=True,
    )
    cli_list = time.perf_counter() - t0
    print(f"cli: unchanged save {cli_unchanged:.2f}s, list {cli_list:.2f}s")

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": default_workers(),
        },
        "model": {
            "tensors": len(weights),
            "logical_bytes": logical,
            "dtype": "BF16",
            "shape": shape.__dict__,
            "block_size": bs,
        },
        "saves": rows,
        "restores": restores,
        "store": {
            "stored_bytes": stats.stored_bytes,
            "logical_bytes": stats.logical_bytes,
            "dedup_ratio": round(stats.dedup_ratio, 3),
            "compression_ratio": round(stats.compression_ratio, 3),
            "total_ratio": round(stats.total_ratio, 3),
        },
        "cli_seconds": {"unchanged_save": round(cli_unchanged, 3), "list": round(cli_list, 3)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["store"]))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
