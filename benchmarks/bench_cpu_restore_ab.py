"""CPU restores of one store by two checkouts of apollo_cas, side by side in one run.

Builds a store of a generated bf16 model (``--size``) with the current code, then,
in ``--rounds`` rounds, for each checkout of ``--trees`` (the current one is ``.``)
and each format (flat, safetensors): one process that restores latest into
``--dir`` four times and keeps the best of the last three (wall and CPU seconds).
Each restore is checked against the manifest by the restore itself (every chunk is
re-hashed). Processes alternate so both checkouts see the same machine state.

    git worktree add /tmp/old HEAD~1
    python benchmarks/bench_cpu_restore_ab.py --trees /tmp/old,. --size 1GiB \\
        --out benchmarks/results/cpu_restore_ab.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from apollo_cas import examples
from apollo_cas.cli.common import parse_size
from apollo_cas.store import Store

CHILD = """
import shutil, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from apollo_cas.store import Store
st = Store.open(Path(sys.argv[2]))
dest = Path(sys.argv[3])
times = []
for _ in range(4):
    t0, c0 = time.perf_counter(), time.process_time()
    st.restore("latest", dest, format=sys.argv[4])
    times.append((time.perf_counter() - t0, time.process_time() - c0))
    shutil.rmtree(dest)
print(min(t[0] for t in times[1:]), min(t[1] for t in times[1:]))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, help="checkouts, comma-separated ('.': this one)")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-cpu-restore-ab")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="cpu_restore_ab.json")
    args = ap.parse_args(argv)
    trees = [str(Path(t).resolve()) for t in args.trees.split(",") if t]
    for t in trees:
        if not (Path(t) / "apollo_cas" / "__init__.py").is_file():
            ap.error(f"--trees: {t} is not a checkout of apollo_cas (no apollo_cas/__init__.py)")
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    weights = examples.generate(examples.ModelShape.for_bytes(parse_size(args.size)))
    raw = sum(a.nbytes for a in weights.values())
    with Store.open(work / "store", create=True) as st:
        st.save(weights)
    del weights
    rows: dict[str, dict[str, list[list[float]]]] = {t: {} for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            for fmt in ("flat", "safetensors"):
                cmd = [
                    sys.executable,
                    "-c",
                    CHILD,
                    tree,
                    str(work / "store"),
                    str(work / "out"),
                    fmt,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                wall, cpu = map(float, out.split())
                rows[tree].setdefault(fmt, []).append([round(wall, 4), round(cpu, 4)])
    res: dict[str, Any] = {"size": args.size, "raw_bytes": raw, "rounds": args.rounds, "trees": {}}
    for tree, by_fmt in rows.items():
        res["trees"][tree] = summary = {}
        for fmt, runs in by_fmt.items():
            walls = sorted(r[0] for r in runs)
            cpus = sorted(r[1] for r in runs)
            summary[fmt] = {
                "runs": runs,
                "wall_median_s": walls[len(walls) // 2],
                "cpu_median_s": cpus[len(cpus) // 2],
                "gb_per_s": round(raw / walls[len(walls) // 2] / 1e9, 3),
            }
            print(
                f"{tree} {fmt}: {summary[fmt]['wall_median_s']} s wall, "
                f"{summary[fmt]['cpu_median_s']} CPU s, {summary[fmt]['gb_per_s']} GB/s"
            )
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
