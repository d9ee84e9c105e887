"""How fast the pack write path alone fills a disk (a probe, not a benchmark).

A full save into format 2 is encoding threads feeding :class:`PackWriter`, whose writer
threads assemble, hash, write and fsync each pack. This probe takes the encoding away:
ready-made envelopes (slices of one random buffer, ``--bytes`` in all) go through the
real ``PackWriter`` on a ``LocalBackend`` under ``--dir``, with several writer counts and
pack sizes, beside

* the disk's floor as ``bench_packs`` measures it (one file, 16 MiB writes, one fsync);
* the same packs written as plain files by the same number of threads, each file
  temp-named, fsynced and renamed (what the disk gives that write pattern without the
  writer's Python);
* the same files with no fsync each, then one ``os.sync`` (what the per-file flushes cost).

Same run, one after the other; the disk's description (``lsblk``, the queue's settings)
goes into the JSON too, since hosts differ.

    python benchmarks/probe_pack_writes.py --dir /root/apollo-writes --out $OUT/pack_writes.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import numpy as np
from bench_packs import fsync_write_bandwidth

from apollo_cas.backends.local import LocalBackend
from apollo_cas.cli.common import parse_size
from apollo_cas.hashing import digest_hex
from apollo_cas.inventory import PackWriter

MiB = 1 << 20
GB = 1e9
#: A bf16 block's envelope in the benchmark's models is ~0.67 of its 1 MiB.
ENVELOPE = 700 * 1024


def disk_description(where: Path) -> dict[str, Any]:
    """What the host says about the disk under ``where`` (best effort)."""
    out: dict[str, Any] = {}
    for name, cmd in {
        "df": ["df", "-T", str(where)],
        "lsblk": ["lsblk", "-o", "NAME,TYPE,SIZE,ROTA,MODEL,FSTYPE,MOUNTPOINT"],
        "mount": ["findmnt", "-T", str(where)],
    }.items():
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            out[name] = repr(exc)
    queues = {}
    for q in Path("/sys/block").glob("*/queue"):
        row = {}
        for f in ("write_cache", "nr_requests", "max_sectors_kb", "scheduler", "rotational"):
            with contextlib.suppress(OSError):
                row[f] = (q / f).read_text().strip()
        queues[q.parent.name] = row
    out["queues"] = queues
    return out


class AssemblingBackend(LocalBackend):
    """The pack write path before 2026-12-04, for A/B runs: each pack assembled by
    numpy copies into its writer thread's reused buffer, hashed, then written as
    one piece."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._buffers = threading.local()

    def put_by_digest(
        self,
        key_for: Callable[[str], str],
        parts: Sequence[bytes | memoryview],
        *,
        durable: bool = True,
    ) -> str:
        need = sum(memoryview(p).nbytes for p in parts)
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < need:
            buf = self._buffers.buf = bytearray(need + need // 16)
        out = np.frombuffer(buf, np.uint8, need)
        pos = 0
        for p in parts:
            n = memoryview(p).nbytes
            out[pos : pos + n] = np.frombuffer(p, np.uint8)
            pos += n
        view = memoryview(buf)[:need]
        digest = digest_hex(view)
        self.put(key_for(digest), view, durable=durable)
        return digest


def envelopes(total: int, pool: memoryview) -> list[tuple[bytes, memoryview]]:
    """``total`` bytes of distinct envelopes cut from ``pool`` (ids are counters)."""
    out = []
    n = len(pool) // ENVELOPE
    for i in range(total // ENVELOPE):
        j = i % n
        out.append((i.to_bytes(16, "little"), pool[j * ENVELOPE : (j + 1) * ENVELOPE]))
    return out


def pack_writer_run(
    work: Path,
    items: list[tuple[bytes, memoryview]],
    pack: int,
    writers: int,
    assemble: bool = False,
) -> dict[str, Any]:
    """The real writer: append every envelope, close, the store's directory fsync."""
    root = work / f"pw-{pack // MiB}-{writers}"
    shutil.rmtree(root, ignore_errors=True)
    backend = AssemblingBackend(root) if assemble else LocalBackend(root)
    t0 = time.perf_counter()
    w = PackWriter(backend, pack, writers)
    for cid, blob in items:
        w.append(cid, blob, MiB, None)
    infos = w.close()
    backend.sync()
    dt = time.perf_counter() - t0
    stored = sum(p.size for p in infos)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "pack_mib": pack // MiB,
        "writers": writers,
        "assembled": assemble,
        "packs": len(infos),
        "seconds": round(dt, 3),
        "gb_s": round(stored / dt / GB, 3),
    }


def plain_files_run(
    work: Path, total: int, pack: int, threads: int, fsync_each: bool, pool: memoryview
) -> dict[str, Any]:
    """``total`` bytes as files of ``pack`` bytes on ``threads`` threads."""
    root = work / "plain"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    count = total // pack
    data = pool[:pack]

    def one(i: int) -> None:
        tmp, final = root / f"{i}.tmp", root / f"{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = data
            while view:
                view = view[os.write(fd, view) :]
            if fsync_each:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(count)))
    if not fsync_each:
        os.sync()
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    dt = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return {
        "pack_mib": pack // MiB,
        "threads": threads,
        "fsync_each": fsync_each,
        "seconds": round(dt, 3),
        "gb_s": round(count * pack / dt / GB, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/root/apollo-writes")
    ap.add_argument("--bytes", default="5GiB", help="bytes written per variant")
    ap.add_argument("--writers", default="1,2,4,8")
    ap.add_argument("--pack-sizes", default="16MiB,64MiB,256MiB", help="tried at 4 writers")
    ap.add_argument("--out", default="pack_writes.json")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    total = parse_size(args.bytes)
    pool = memoryview(os.urandom(512 * MiB))
    items = envelopes(total, pool)
    res: dict[str, Any] = {"bytes": total, "cpus": os.cpu_count(), "disk": disk_description(work)}
    runs: list[dict[str, Any]] = []
    res["runs"] = runs

    def record(kind: str, row: dict[str, Any]) -> None:
        row = {"kind": kind, **row}
        runs.append(row)
        print(row, flush=True)

    # Interleave the floor with the variants: a cloud disk drifts within a run.
    floor = lambda: record("floor_one_file", {"gb_s": round(fsync_write_bandwidth(work, total), 3)})  # noqa: E731
    floor()
    for w in (int(x) for x in args.writers.split(",")):
        record("pack_writer", pack_writer_run(work, items, 64 * MiB, w))
    for w in (1, 4):
        record("pack_writer", pack_writer_run(work, items, 64 * MiB, w, assemble=True))
    floor()
    for p in (parse_size(x) for x in args.pack_sizes.split(",")):
        if p != 64 * MiB:
            record("pack_writer", pack_writer_run(work, items, p, 4))
    for t in (4, 8):
        record("plain_files", plain_files_run(work, total, 64 * MiB, t, True, pool))
    record("plain_files", plain_files_run(work, total, 64 * MiB, 4, False, pool))
    floor()
    floors = [r["gb_s"] for r in runs if r["kind"] == "floor_one_file"]
    res["floor_gb_s"] = max(floors)
    for r in runs:
        r["over_floor"] = round(r["gb_s"] / res["floor_gb_s"], 3)
    Path(args.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
