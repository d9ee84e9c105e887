"""Which thread limits a dense step's GPU delta save, and who holds the GIL (a probe).

Builds a generated bf16 model on the GPU (``--size``), saves it in full into a new
store under ``--dir``, takes one dense step through the GPU delta path as a warm-up,
then one more dense step per mode:

- ``plain``: no profiler (the wall time to set the others beside);
- ``idle``: under ``py-spy record --idle --native``: where every thread is, running or
  waiting (a thread waiting for the GIL shows ``take_gil``);
- ``gil``: under ``py-spy record --gil``: only the thread holding the GIL;
- ``native``: ``--idle --native`` (C frames: ``take_gil``, CUDA calls, zstd); py-spy
  then pauses the process for every sample, so this step runs slower;
- ``torch``: under ``torch.profiler`` (CUDA): how long the GPU was busy (the union of
  its kernels' and copies' intervals, and per stream), and the kernels by total time,
  to set the GPU's own work beside the step's wall time.

Each mode's JSON has the save's wall and CPU time, the CPU seconds of each thread
group (from /proc), the GPU delta path's own timings, and per thread group the most
common innermost frames. Without ``--py-spy`` only ``plain`` runs.

    python benchmarks/probe_dense_threads.py --size 16GiB --py-spy /tmp/site/bin/py-spy \\
        --out $OUT/dense_threads.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dense_gpu import HostHashed, build_model, dense_step, log, sync
from probe_full_save import task_cpu
from pyspy import Recording, group, summarize

from apollo_cas.cli.common import parse_size
from apollo_cas.codecs import CodecPolicy
from apollo_cas.sources.device import DeviceSource
from apollo_cas.store import Store


class ThreadCpu(threading.Thread):
    """CPU seconds per thread group over a stretch, read from /proc every 50 ms."""

    def __init__(self) -> None:
        super().__init__(name="probe-cpu", daemon=True)
        self.stop = threading.Event()
        self.seen: dict[int, tuple[str, float, float]] = {}

    def poll(self) -> None:
        for t in threading.enumerate():
            if t.native_id is None or t is self:
                continue
            now = task_cpu(t.native_id)
            if now is not None:
                g, first, _ = self.seen.get(t.native_id, (group(t.name), now, now))
                self.seen[t.native_id] = (g, first, now)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.poll()

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g, first, last in self.seen.values():
            out[g] = round(out.get(g, 0.0) + last - first, 2)
        return out


class Steps:
    """Dense steps that all start from the weights of the full save, so each step's
    deltas (against that save: ``--max-depth 1`` makes every delta's parent the chain's
    root) are as dense as the first one's. Stepping on from the last step instead, the
    weights drift further from the root every step: in a run of 2026-12-03 the stored
    bytes grew from 0.148 GB to 0.585 GB over six steps, and the encoders' CPU seconds
    from 3.3 to 40, which made every later comparison unfair to the later row."""

    def __init__(self, model: dict[str, Any], dev: str, drift: bool) -> None:
        self.model, self.dev = model, dev
        self.base = None if drift else {k: t.clone() for k, t in model.items()}
        self.count = 0

    def next(self) -> None:
        if self.base is not None:
            for k, t in self.model.items():
                t.copy_(self.base[k])
        self.count += 1
        dense_step(self.model, self.dev, seed=self.count)
        sync(self.dev)


def one_step(st: Store, steps: Steps, rec: Recording | TorchTrace | None) -> dict[str, Any]:
    steps.next()
    model, dev = steps.model, steps.dev
    src = (DeviceSource if dev.startswith("cuda") else HostHashed)(model)
    cpu = ThreadCpu()
    cpu.start()
    ctx = rec if rec is not None else _Nothing()
    with ctx:
        c0, t0 = time.process_time(), time.perf_counter()
        r = st.save(src, force=True)
        wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        cpu.poll()
    cpu.stop.set()
    cpu.join()
    src.close()
    d = st.last_device_delta.to_dict() if st.last_device_delta else {}
    pipe = d.get("pipeline") or {}
    row: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu_s, 2),
        "thread_cpu_s": cpu.by_group(),
        "device_s": d.get("device_s"),
        # The GPU path's own span (its pipeline run); the rest of wall_s is the save's
        # own work before and after it (block ids, index, manifest, commit).
        "delta_path_s": d.get("decode_s"),
        "phases": {k: round(v, 3) for k, v in r.phases.items()},
        "kernel_pieces": d.get("kernel_pieces"),
        "stored_bytes": r.stats.new_stored_bytes,
        "steps_host": d.get("steps_host"),
        "steps": d.get("steps"),
        "pipeline": {k: pipe.get(k) for k in ("read_s", "arena_wait_s", "queue_s", "finish_s")},
        "error": d.get("error"),
    }
    if isinstance(rec, TorchTrace):
        row["gpu"] = rec.summary()
    elif rec is not None:
        row["py_spy_error"] = rec.error
        if rec.error is None:
            row["threads"] = summarize(rec.path)
    return row


class TorchTrace:
    """One step under ``torch.profiler``: the GPU's busy time, per stream and by kernel."""

    def __init__(self, trace: Path | None) -> None:
        self.trace = trace
        self.prof: Any = None
        self.error: str | None = None

    def __enter__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.prof.__exit__(*exc)

    def summary(self) -> dict[str, Any]:
        try:
            evs = [
                e
                for e in self.prof.profiler.kineto_results.events()
                if "cuda" in str(e.device_type()).lower() and e.duration_ns() > 0
            ]
        except Exception as exc:  # an API of this torch that differs: say so, keep the run
            return {"error": repr(exc)}
        if self.trace is not None:
            self.prof.export_chrome_trace(str(self.trace))

        def union(spans: list[tuple[int, int]]) -> float:
            busy, end = 0, -1
            for a, b in sorted(spans):
                if b <= end:
                    continue
                busy += b - max(a, end)
                end = b
            return busy / 1e9

        spans = [(e.start_ns(), e.end_ns()) for e in evs]
        streams: dict[str, list[tuple[int, int]]] = {}
        names: dict[str, list[float]] = {}
        for e in evs:
            sid = str(getattr(e, "device_resource_id", lambda: -1)())
            streams.setdefault(sid, []).append((e.start_ns(), e.end_ns()))
            got = names.setdefault(e.name()[:90], [0.0, 0])
            got[0] += e.duration_ns() / 1e9
            got[1] += 1
        first = min(a for a, _ in spans) if spans else 0
        last = max(b for _, b in spans) if spans else 0
        top = sorted(names.items(), key=lambda kv: -kv[1][0])[:30]
        return {
            "gpu_span_s": round((last - first) / 1e9, 4),
            "gpu_busy_s": round(union(spans), 4),
            "busy_by_stream_s": {k: round(union(v), 4) for k, v in streams.items()},
            "by_name": [[n, round(t, 4), c] for n, (t, c) in top],
        }


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16GiB")
    ap.add_argument("--dir", default="/dev/shm/apollo-threads")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code")
    ap.add_argument("--py-spy", default=None, help="py-spy's binary (none: plain only)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--modes", default="plain,idle,gil,native", help="of plain,idle,gil,native")
    ap.add_argument(
        "--switch-intervals",
        default="",
        help="also plain steps with each Store.device_delta_switch_interval (seconds, "
        "comma-separated; 0: None, Python's own), in --rounds alternating rounds after the modes",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trace", type=Path, default=None, help="torch mode: a chrome trace here")
    ap.add_argument(
        "--device-timing",
        action="store_true",
        help="Store.device_delta_timing: CUDA events between the steps of every piece",
    )
    ap.add_argument("--max-depth", type=int, default=1, help="the store's delta chain depth")
    ap.add_argument(
        "--drift",
        action="store_true",
        help="step on from the last step's weights (default: every step from the full save's)",
    )
    ap.add_argument(
        "--kernel-ab",
        action="store_true",
        help="also plain steps with Store.device_delta_kernels on and off, in --rounds rounds",
    )
    ap.add_argument(
        "--batch-ab",
        default="",
        help="also plain steps at each Store.device_delta_batch_bytes (sizes, comma-separated), "
        "in --rounds alternating rounds",
    )
    ap.add_argument(
        "--workers-ab",
        default="",
        help="also plain steps with each Store.workers (comma-separated), in --rounds rounds",
    )
    ap.add_argument(
        "--read-threads-ab",
        default="",
        help="also plain steps with each Store.device_delta_read_threads (comma-separated; "
        "0: the pipeline's default), in --rounds rounds",
    )
    ap.add_argument(
        "--parent-batch-ab",
        default="",
        help="also plain steps at each Store.device_delta_parent_batch_bytes (sizes, "
        "comma-separated; 0: one piece), in --rounds alternating rounds",
    )
    ap.add_argument("--out", default="dense_threads.json")
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    dev = args.device
    cuda = dev.startswith("cuda")
    model = build_model(parse_size(args.size), dev)
    # Every step's parent at the same depth (1: a delta on the full save), so steps
    # compare alike: with the default depth 4 each step decodes a longer chain than
    # the one before until the chain restarts from its root.
    policy = dataclasses.replace(CodecPolicy(), max_delta_depth=args.max_depth)
    st = Store.open(work / "store", create=True, policy=policy)
    st.save((DeviceSource if cuda else HostHashed)(model))
    st.device_delta = "auto" if cuda else "always"
    st.device_delta_timing = args.device_timing
    steps = Steps(model, dev, args.drift)
    import apollo_cas

    res: dict[str, Any] = {"size": args.size, "device": dev, "apollo_cas": apollo_cas.__file__}

    def dump() -> None:  # after every step, so a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    res["warm_up"] = one_step(st, steps, None)
    log(f"warm-up dense step: {res['warm_up']['wall_s']} s")
    options = {
        "plain": {},
        "idle": {"idle": True},
        "gil": {"gil": True},
        "native": {"idle": True, "native": True},
        "torch": {"torch": True},
    }
    modes = [m for m in args.modes.split(",") if m]
    for label in modes:
        if label not in options:
            ap.error(f"--modes: {label!r} is not one of {', '.join(options)}")
    for label in modes:
        opts = options[label]
        if opts.get("torch"):
            res[label] = row = one_step(st, steps, TorchTrace(args.trace))
            log(f"{label}: {row['wall_s']} s wall, GPU {json.dumps(row['gpu'])[:2000]}")
            dump()
            continue
        if opts and not args.py_spy:
            log(f"{label}: skipped (no --py-spy)")
            continue
        rec = None
        if opts:
            rate = args.rate // 2 if opts.get("native") else args.rate
            rec = Recording(args.py_spy, work / f"{label}.txt", rate=rate, **opts)
        res[label] = row = one_step(st, steps, rec)
        log(f"{label}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, {row['thread_cpu_s']}")
        for g, s in (row.get("threads") or {}).items():
            log(f"-- {g} ({s['threads']} threads, {s['samples']} samples)")
            for n, f in s["top"][:8]:
                log(f"  {n:6d} {f}")
        if row.get("py_spy_error"):
            log(f"py-spy: {row['py_spy_error']}")
        dump()
    intervals = [float(x) for x in args.switch_intervals.split(",") if x]
    for rnd in range(args.rounds if intervals else 0):
        for iv in intervals:
            st.device_delta_switch_interval = iv or None
            try:
                row = one_step(st, steps, None)
            finally:
                st.device_delta_switch_interval = None
            row["switch_interval_s"] = iv or sys.getswitchinterval()
            res.setdefault("switch_intervals", []).append(row)
            log(f"switch interval {iv * 1e3:g} ms, round {rnd}: {row['wall_s']} s wall")
            dump()
    for rnd in range(args.rounds if args.kernel_ab else 0):
        for kernels in (True, False):
            st.device_delta_kernels = kernels
            row = one_step(st, steps, None)
            row["kernels"] = kernels
            res.setdefault("kernel_ab", []).append(row)
            log(f"kernels {kernels}, round {rnd}: {row['wall_s']} s wall, {row['cpu_s']} CPU s")
            dump()
        st.device_delta_kernels = True
    variants = [
        ("batch_bytes", "device_delta_batch_bytes", parse_size(x))
        for x in args.batch_ab.split(",")
        if x
    ]
    variants += [("workers", "workers", int(x)) for x in args.workers_ab.split(",") if x]
    variants += [
        ("read_threads", "device_delta_read_threads", int(x) or None)
        for x in args.read_threads_ab.split(",")
        if x
    ]
    variants += [
        ("parent_batch_bytes", "device_delta_parent_batch_bytes", parse_size(x) or None)
        for x in args.parent_batch_ab.split(",")
        if x
    ]
    for rnd in range(args.rounds if variants else 0):
        for key, attr, value in variants:
            old = getattr(st, attr)
            setattr(st, attr, value)
            try:
                row = one_step(st, steps, None)
            finally:
                setattr(st, attr, old)
            row[key] = value
            res.setdefault("variants", []).append(row)
            log(f"{key} {value}, round {rnd}: {row['wall_s']} s wall, {row['cpu_s']} CPU s")
            dump()
    st.close()
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
