"""Store-level save / restore throughput to S3 (a local SeaweedFS) and, for scale, a directory.

A generated transformer-shaped bf16 model (default 512 MiB,
:func:`apollo_cas.examples.generate`) goes through :class:`apollo_cas.Store`:

* a full save (every chunk new);
* an incremental save: the attention projections (q, k) of two layers changed;
* an unchanged save (hash everything, write nothing);
* a restore of the latest checkpoint to safetensors.

Each step records wall time, logical GB/s, chunks and bytes written, and the CPU
seconds of this process and of the server (``/proc/<pid>/stat`` of ``weed``):
on a machine where client and server share the cores, the sum of the two is
what bounds throughput. The same steps run on a local directory (tmpfs when
there is one) for comparison, unless ``--no-local``.

    python benchmarks/bench_s3_store.py --size 512MiB --out benchmarks/results/s3_store.json

Without ``--endpoint`` it starts SeaweedFS on 127.0.0.1 through
``benchmarks/bench_s3.py``'s :func:`local_s3_location` (tests/s3server.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from apollo_cas import examples  # noqa: E402
from apollo_cas.cli.common import human_bytes, parse_size  # noqa: E402
from apollo_cas.parallel import default_workers  # noqa: E402
from apollo_cas.sources import open_path  # noqa: E402
from apollo_cas.store import Store  # noqa: E402

Weights = dict[str, Any]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Wall time plus client and server CPU seconds of one step."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    @contextmanager
    def measure(self, into: dict[str, Any], logical: int) -> Iterator[None]:
        server0 = proc_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        client0 = self_cpu_seconds()
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        into["seconds"] = round(dt, 3)
        into["mib_per_s"] = round(logical / dt / 2**20, 1)
        into["client_cpu_s"] = round(self_cpu_seconds() - client0, 2)
        if self.server_pid:
            into["server_cpu_s"] = round(proc_cpu_seconds(self.server_pid) - server0, 2)


def cpu_text(row: dict[str, Any]) -> str:
    text = f"cpu: client {row['client_cpu_s']:.1f}s"
    if "server_cpu_s" in row:
        text += f", server {row['server_cpu_s']:.1f}s"
    return text


def run_sequence(
    location: str,
    sequence: list[tuple[str, Weights]],
    work: Path,
    block_size: int,
    meter: Meter,
    label: str,
) -> dict[str, Any]:
    """Save each version of ``sequence`` into a new store at ``location``, then
    restore the latest to safetensors; returns the measurements."""
    logical = sum(a.nbytes for a in sequence[0][1].values())
    model = work / "model.safetensors"
    saves = []
    with Store.open(location, create=True) as st:
        for step, weights in sequence:
            # Written outside the timed region: the source file is the same for
            # both backends and comes from the page cache when saved.
            examples.write_safetensors(weights, str(model))
            row: dict[str, Any] = {"save": step}
            with open_path(model) as src, meter.measure(row, logical):
                res = st.save(src, block_size=block_size)
            s = res.stats
            row.update(
                new_chunks=s.new_chunks,
                chunks=s.chunks,
                new_stored_bytes=s.new_stored_bytes,
                unchanged=res.unchanged,
            )
            saves.append(row)
            print(
                f"{label:5s} save {step:12s} {row['seconds']:7.2f}s {row['mib_per_s']:8.1f} MiB/s"
                f"  {s.new_chunks:5d}/{s.chunks} new chunks, {human_bytes(s.new_stored_bytes)}"
                f"  {cpu_text(row)}",
                flush=True,
            )
        out = work / f"restore-{label}"
        shutil.rmtree(out, ignore_errors=True)
        restore: dict[str, Any] = {"format": "safetensors"}
        with meter.measure(restore, logical):
            st.restore("latest", out, format="safetensors")
        print(
            f"{label:5s} restore safetensors {restore['seconds']:7.2f}s "
            f"{restore['mib_per_s']:8.1f} MiB/s  {cpu_text(restore)}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    return {"saves": saves, "restore": restore}


def local_server_pid() -> int | None:
    """Pid of the local SeaweedFS server (started by ``local_s3_location``)."""
    import s3server  # tests/, put on sys.path by local_s3_location

    proc = s3server.get_server().proc
    return proc.pid if proc else None


def model_sequence(size: int) -> tuple[examples.ModelShape, list[tuple[str, Weights]]]:
    """Full, incremental (q/k projections of two layers changed), unchanged."""
    shape = examples.ModelShape.for_bytes(size)
    full = examples.generate(shape)
    layers = [1 % shape.layers, 2 % shape.layers]
    step = examples.perturb_layers(full, layers, fraction=1.0, seed=1)
    return shape, [("full", full), (f"layers {layers}", step), ("unchanged", step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB", help="model size (default 512MiB)")
    ap.add_argument("--block-size", default="1MiB")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of a local SeaweedFS")
    ap.add_argument("--store", help="s3:// location (with --endpoint)")
    ap.add_argument("--no-local", action="store_true", help="skip the local-directory run")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/s3_store.json"))
    args = ap.parse_args()
    size, block_size = parse_size(args.size), parse_size(args.block_size)

    shape, sequence = model_sequence(size)
    logical = sum(a.nbytes for a in sequence[0][1].values())
    print(
        f"model: {len(sequence[0][1])} bf16 tensors, {human_bytes(logical)}, "
        f"{human_bytes(block_size)} blocks, {default_workers()} worker threads",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="apollo-bench-s3-"))
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    try:
        ctx: Callable[[], Any]
        if args.endpoint:
            if not args.store:
                ap.error("--endpoint needs --store s3://bucket/prefix")
            os.environ["APOLLO_CAS_S3_ENDPOINT"] = args.endpoint

            @contextmanager
            def given() -> Iterator[str]:
                yield args.store

            ctx, server_desc = given, args.endpoint
        else:
            from bench_s3 import local_s3_location

            ctx, server_desc = local_s3_location, "SeaweedFS (weed server) on 127.0.0.1"
        with ctx() as location:
            server_pid = None if args.endpoint else local_server_pid()
            results["s3"] = run_sequence(
                location, sequence, work, block_size, Meter(server_pid), "s3"
            )
        if not args.no_local:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(work)
            local_dir = Path(tempfile.mkdtemp(prefix="apollo-bench-local-", dir=base))
            try:
                results["local"] = run_sequence(
                    str(local_dir / "store"), sequence, work, block_size, Meter(None), "local"
                )
                results["local"]["where"] = "tmpfs" if base == "/dev/shm" else "disk"
            finally:
                shutil.rmtree(local_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import boto3

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": default_workers(),
            "python": platform.python_version(),
            "boto3": boto3.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": "client, S3 gateway, filer and volume server share these cores",
        },
        "server": server_desc,
        "model": {
            "tensors": len(sequence[0][1]),
            "logical_bytes": logical,
            "dtype": "BF16",
            "shape": shape.__dict__,
            "block_size": block_size,
        },
        **results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
