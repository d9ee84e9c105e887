"""Where a full save of device tensors spends its time (a probe, not a benchmark).

Saves one generated bf16 model (``--size``, on ``--device``) into a new format-2 store
under ``--dir`` while a sampler thread records, every ``--interval`` seconds, the
innermost frames of every other thread (``sys._current_frames``): a poor man's py-spy
that shows which Python lines the feeding thread and the encode threads are on (a
thread waiting for the GIL shows where it resumes). Also the CPU seconds of each
thread group (from /proc/self/task) and the save's wall and CPU time.

    python benchmarks/probe_full_save.py --size 16GiB --dir /dev/shm/apollo-probe \\
        --out $OUT/full_save_probe.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dense_gpu import build_model, log, sync
from probe_pack_writes import AssemblingBackend
from pyspy import group

import apollo_cas
from apollo_cas.backends.local import LocalBackend
from apollo_cas.cli.common import parse_size
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store

GB = 1e9


def task_cpu(tid: int) -> float | None:
    """CPU seconds of thread ``tid`` of this process (from /proc), None once it is gone."""
    try:
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TimedBackend(AssemblingBackend):
    """A local backend that records when each pack write starts and ends; with
    ``assemble``, packs are assembled first as before 2026-12-04 (A/B runs)."""

    def __init__(self, root: Path, assemble: bool = False) -> None:
        super().__init__(root)
        self.assemble = assemble
        self.t0 = time.perf_counter()
        self.puts: list[tuple[str, float, float, int]] = []
        self._plock = threading.Lock()

    def put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        start = time.perf_counter()
        write = super().put_by_digest if self.assemble else self.plain_put_by_digest
        done = write(key_for, parts, durable=durable)
        end = time.perf_counter()
        n = sum(memoryview(p).nbytes for p in parts)
        with self._plock:
            self.puts.append((key_for(done).split("/", 1)[0], start - self.t0, end - self.t0, n))
        return done

    def plain_put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        return LocalBackend.put_by_digest(self, key_for, parts, durable=durable)

    def timeline(self, wall: float) -> dict[str, Any]:
        """When pack writes ran: first start, last end, and the share of the save's
        wall time in which at least one, and how many on average, were in flight."""
        packs = sorted((s, e, n) for kind, s, e, n in self.puts if kind == "packs")
        if not packs:
            return {}
        busy, last_end = 0.0, 0.0
        for s, e, _ in packs:
            busy += max(0.0, e - max(s, last_end))
            last_end = max(last_end, e)
        return {
            "packs": len(packs),
            "first_start_s": round(packs[0][0], 3),
            "last_end_s": round(last_end, 3),
            "any_in_flight_s": round(busy, 3),
            "mean_in_flight": round(sum(e - s for s, e, _ in packs) / wall, 2),
            "mean_put_ms": round(1000 * sum(e - s for s, e, _ in packs) / len(packs), 1),
            "puts": [[round(s, 3), round(e, 3), n] for s, e, n in packs],
        }


class Sampler(threading.Thread):
    def __init__(self, interval: float, depth: int) -> None:
        super().__init__(name="probe-sampler", daemon=True)
        self.interval = interval
        self.depth = depth
        self.stop = threading.Event()
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.samples = 0
        #: thread id -> (group, CPU seconds when first seen, last seen)
        self.cpu: dict[int, tuple[str, float, float]] = {}

    def cpu_by_group(self) -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        for g, first, last in self.cpu.values():
            out[g] += last - first
        return {g: round(v, 2) for g, v in out.items()}

    def _read_cpu(self) -> None:
        for t in threading.enumerate():
            if t.native_id is None or t is self:
                continue
            now = task_cpu(t.native_id)
            if now is None:
                continue
            g, first, _ = self.cpu.get(t.native_id, (group(t.name), now, now))
            self.cpu[t.native_id] = (g, first, now)

    def run(self) -> None:
        me = threading.get_ident()
        while not self.stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack: list[str] = []
                f: Any = frame
                while f is not None and len(stack) < self.depth:
                    code = f.f_code
                    stack.append(f"{Path(code.co_filename).name}:{f.f_lineno}:{code.co_name}")
                    f = f.f_back
                self.counts[group(names.get(ident, "?"))][" < ".join(stack)] += 1
            self.samples += 1
            if self.samples % 10 == 1:
                self._read_cpu()  # threads started and gone within 10 samples are missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-probe")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="full_save_probe.json")
    ap.add_argument(
        "--no-warm-up",
        action="store_true",
        help="time the process's first save, one-time set-up included",
    )
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="tune the allocator first, as the command line does (apollo_cas.keep_freed_memory)",
    )
    ap.add_argument(
        "--assembled-packs",
        action="store_true",
        help="assemble each pack before writing it, as before 2026-12-04 (A/B)",
    )
    args = ap.parse_args()
    tuned = apollo_cas.keep_freed_memory() if args.keep_freed_memory else False
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    model = build_model(parse_size(args.size), args.device)
    raw = sum(t.nbytes for t in model.values())
    warm_s = None
    if not args.no_warm_up:
        # The first save of a process compiles Triton's kernels (or loads them from the
        # on-disk cache, which a fresh machine lacks) and pins the fetch buffers: ~3-4 s
        # on the H200 before the first fetch. A save of a few tensors pays that here, so
        # runs compare the save itself whatever the cache held.
        t0 = time.perf_counter()
        few = dict(list(model.items())[:8])
        with Store.open(work / "warm-up", create=True) as w:
            w.save(DeviceSource(few))
        shutil.rmtree(work / "warm-up", ignore_errors=True)
        warm_s = round(time.perf_counter() - t0, 3)
        log(f"warm-up save of {len(few)} tensors: {warm_s} s")
    backend = TimedBackend(work / "store", assemble=args.assembled_packs)
    st = Store.from_backend(backend, create=True)
    backend.t0 = time.perf_counter()
    sampler = Sampler(args.interval, args.depth)
    sync(args.device)
    sampler.start()
    c0, t0 = time.process_time(), time.perf_counter()
    r = st.save(DeviceSource(model))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sampler._read_cpu()
    sampler.stop.set()
    sampler.join()
    st.close()
    shutil.rmtree(work, ignore_errors=True)
    res: dict[str, Any] = {
        "allocator_tuned": tuned,
        "assembled_packs": args.assembled_packs,
        "dir": str(work),
        "warm_up_seconds": warm_s,
        "raw_bytes": raw,
        "stored_bytes": r.stats.new_stored_bytes,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "raw_gb_s": round(raw / wall / GB, 2),
        "samples": sampler.samples,
        "pack_writes": backend.timeline(wall),
        "thread_cpu_s": sampler.cpu_by_group(),
        "top_frames": {
            g: [[n, s] for s, n in c.most_common(args.top)] for g, c in sampler.counts.items()
        },
    }
    log(f"full save {raw / GB:.1f} GB: {wall:.2f} s wall, {cpu:.1f} s CPU ({apollo_cas.__file__})")
    log(f"thread CPU: {res['thread_cpu_s']}")
    log(f"pack writes: { {k: v for k, v in res['pack_writes'].items() if k != 'puts'} }")
    for g, rows in res["top_frames"].items():
        total = sum(sampler.counts[g].values())
        print(f"-- {g} ({total} samples)")
        for n, s in rows:
            print(f"  {n:6d} {s}")
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
