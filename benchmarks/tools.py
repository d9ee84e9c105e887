"""One small adapter per tool that the side-by-side benchmark (``compare.py``) runs.

Every save and restore runs outside the benchmark's own process, so its peak
memory is its own: a sampler thread reads ``/proc/PID/status`` every 10 ms for
the peak RSS (``VmHWM``, which counts file pages the process maps) and the peak
of anonymous memory (``RssAnon``: what the tool allocates itself); CPU time
comes from ``os.wait4``.

Two kinds of tools:

* command-line tools, timed as users run them, process start included:
  ``apollo-cas save FILE`` / ``apollo-cas restore --to DIR``, ``restic``,
  ``borg``. They read the source file the benchmark wrote.
* in-process tools, timed around the call in a long-lived Python worker that
  already holds the weights as torch tensors (as a trainer does): apollo_cas'
  ``Store.save`` / ``Store.load``, ``torch.save`` / ``torch.load``,
  safetensors ``save_file`` / ``load_file``, and the original tool's method
  (a faithful Python re-implementation of ``apollo-checkpoint.rs``: dump every
  tensor to a new ``weights.bin``, diff it in 4 KiB blocks against the
  previous one, keep or delete it). Their peak memory is reported both whole
  (it includes the weights held) and as the extra over what the process held
  before the call.

``python benchmarks/tools.py worker`` is the worker (one JSON request per line).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xxhash

HERE = Path(__file__).resolve()
RESTIC_PASSWORD = "apollo-bench"  # restic always encrypts; the key is irrelevant here
SEED_BLOCK_SIZE = 4096  # the original tool's default --block-size


# -- measuring child processes --------------------------------------------------------


@dataclass
class Proc:
    """One measured child process."""

    wall_seconds: float
    cpu_seconds: float  # user + system, all threads (from wait4)
    max_rss: int  # bytes: peak RSS (VmHWM), file pages the process mapped included
    peak_anon: int  # bytes: peak of RssAnon, the memory the process allocated itself
    returncode: int
    stdout: str
    stderr: str


def _status_kib(pid: int | str, *keys: str) -> list[int]:
    """Fields of /proc/PID/status in KiB (0 where missing or the process is gone)."""
    found = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return [found[k] for k in keys]


class PeakSampler:
    """Samples a process's VmHWM and RssAnon every 10 ms in a thread.

    Why not ``ru_maxrss``: Linux carries the high-water mark over ``exec``, and
    Python spawns children with vfork, so a child's ``ru_maxrss`` starts at
    *this* process's RSS (gigabytes of weights here). VmHWM belongs to the
    child's own address space, which ``exec`` makes anew.
    """

    def __init__(self, pid: int | str) -> None:
        self.pid = pid
        self.hwm = self.anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        hwm, anon = _status_kib(self.pid, "VmHWM", "RssAnon")
        self.hwm = max(self.hwm, hwm * 1024)
        self.anon = max(self.anon, anon * 1024)

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(0.01)

    def stop(self) -> tuple[int, int]:
        """Stop sampling; (peak RSS, peak anonymous RSS) in bytes."""
        self._done.set()
        self._thread.join()
        return self.hwm, self.anon


def run_measured(
    cmd: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> Proc:
    """Run ``cmd``, return its wall/CPU time, peak memory and output.

    Output goes to temporary files, not pipes, so a chatty tool can never block
    on a full pipe while we wait for it.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=cwd)
        sampler = PeakSampler(p.pid)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        hwm, anon = sampler.stop()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        proc = Proc(
            wall,
            usage.ru_utime + usage.ru_stime,
            hwm,
            anon,
            p.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {tail}")
    return proc


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated bytes as ``du -s`` counts them, apparent bytes) of a directory tree."""
    alloc = apparent = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:  # hard links count once, like du
                continue
            seen.add((st.st_dev, st.st_ino))
            alloc += st.st_blocks * 512
            apparent += st.st_size if not os.path.isdir(os.path.join(root, name)) else 0
    return alloc, apparent


# -- digests: proof that every restore returned the saved weights ---------------------


def digest_tensors(items: Iterable[tuple[str, Any]]) -> str:
    """XXH3-128 over (name, raw bytes) in name order; bytes-likes or contiguous arrays."""
    h = xxhash.xxh3_128()
    for name, data in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(b"\0")
        h.update(
            memoryview(data).cast("B")
            if not isinstance(data, np.ndarray)
            else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        )
    return h.hexdigest()


def digest_arrays(weights: Mapping[str, np.ndarray]) -> str:
    return digest_tensors(weights.items())


def _torch_bytes(t: Any) -> np.ndarray:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def digest_torch(tensors: Mapping[str, Any]) -> str:
    return digest_tensors((k, _torch_bytes(v)) for k, v in tensors.items())


def read_safetensors_entries(path: Path) -> tuple[list[Any], int]:
    """The tensors of a safetensors file (``HeaderEntry``: name, dtype, shape, and
    ``[begin, end)`` after the header) and the byte offset where the data starts."""
    from apollo_cas.formats import safetensors as st_format

    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        header, start = st_format.read_header(path, size, lambda o, n: os.pread(fd, n, o))
    return st_format.parse_entries(path, header, size - start), start


def digest_safetensors(path: Path) -> str:
    """Digest of the tensors in a safetensors file (any layout or padding)."""
    entries, start = read_safetensors_entries(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return digest_tensors((e.name, view[start + e.begin : start + e.end]) for e in entries)
        finally:
            view.release()


def digest_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- the adapters ---------------------------------------------------------------------


@dataclass
class Op:
    """One measured save or restore."""

    seconds: float  # the number reported: wall for CLI tools, in-process for the others
    wall_seconds: float  # of the whole child process
    cpu_seconds: float
    max_rss: int
    peak_anon: int
    extra_rss: int | None = None  # in-process tools: peak minus RSS before the call
    digest: str | None = None  # restores: digest of what came back
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("seconds", "wall_seconds", "cpu_seconds"):
            d[k] = round(d[k], 4)
        return d


class Tool(ABC):
    """A tool under test, bound to one repository directory per sequence."""

    key: str  # short id used in JSON and on the command line
    label: str  # for tables
    family: str  # "apollo_cas", "restic", "borg", "original", "torch.save", "safetensors"
    timing: str  # "wall" (process start included) or "in-process"
    restore_to: str  # "file" or "memory"
    deduplicates: bool = False  # restic, borg, apollo_cas: bytes grow with what changed

    def __init__(self) -> None:
        self.repo = Path()
        self.work = Path()

    def missing(self) -> str | None:
        """Why the tool cannot run here (with how to fix it), or None."""
        return None

    def version(self) -> str:
        return ""

    def startup_cmd(self) -> list[str] | None:
        """A command that starts the tool and does nothing, to time start-up."""
        return None

    def prepare(self, work: Path) -> None:
        """Create an empty repository under ``work``."""
        self.work = work / self.key
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.repo = self.work / "repo"
        self.init()

    def init(self) -> None:
        self.repo.mkdir()

    @abstractmethod
    def save(self, src: Path, step: int) -> Op: ...

    @abstractmethod
    def restore(self, out: Path) -> Op:
        """Restore the latest save into ``out`` (a file there, or memory in the worker)."""

    def stored_bytes(self) -> tuple[int, int]:
        return disk_usage(self.repo)

    def cache_bytes(self) -> int:
        """Bytes a tool keeps outside its repository (restic's and borg's local caches)."""
        return 0

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _wall_op(p: Proc, **info: Any) -> Op:
    return Op(p.wall_seconds, p.wall_seconds, p.cpu_seconds, p.max_rss, p.peak_anon, info=info)


def _which(cmd: str, how: str) -> str | None:
    return None if shutil.which(cmd) else f"{cmd} not found; install it with: {how}"


def _version_of(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


class ApolloCli(Tool):
    """``apollo-cas save FILE --store S`` and ``apollo-cas restore --to DIR`` (safetensors)."""

    key = "apollo-cli"
    label = "apollo_cas (CLI)"
    family = "apollo_cas"
    timing = "wall"
    restore_to = "file"
    deduplicates = True

    def missing(self) -> str | None:
        return _which("apollo-cas", "pip install -e . (in the repository root)")

    def version(self) -> str:
        return _version_of(["apollo-cas", "--version"])

    def startup_cmd(self) -> list[str]:
        return ["apollo-cas", "--version"]

    def init(self) -> None:
        pass  # the first save creates the store

    def save(self, src: Path, step: int) -> Op:
        p = run_measured(["apollo-cas", "save", str(src), "--store", str(self.repo), "--json"])
        r = json.loads(p.stdout)
        return _wall_op(
            p,
            internal_seconds=r.get("seconds"),
            new_chunks=r.get("new_chunks"),
            chunks=r.get("chunks"),
            new_stored_bytes=r.get("new_stored_bytes"),
            unchanged=r.get("unchanged"),
        )

    def restore(self, out: Path) -> Op:
        p = run_measured(
            [
                "apollo-cas",
                "restore",
                "latest",
                "--store",
                str(self.repo),
                "--to",
                str(out),
                "--json",
            ]
        )
        op = _wall_op(p, internal_seconds=json.loads(p.stdout).get("seconds"))
        op.digest = digest_safetensors(out / "model.safetensors")
        return op


class Restic(Tool):
    """restic with its defaults (repository v2: zstd "auto"), or ``--compression max``."""

    family = "restic"
    timing = "wall"
    restore_to = "file"
    deduplicates = True

    def __init__(self, compression: str = "auto") -> None:
        super().__init__()
        self.compression = compression
        self.key = "restic" if compression == "auto" else f"restic-{compression}"
        self.label = (
            "restic (default: zstd auto)"
            if compression == "auto"
            else f"restic (--compression {compression})"
        )

    def missing(self) -> str | None:
        return _which("restic", "apt-get install -y restic")

    def version(self) -> str:
        return _version_of(["restic", "version"])

    def startup_cmd(self) -> list[str]:
        return ["restic", "version"]

    def _cmd(self, *args: str) -> list[str]:
        return [
            "restic",
            "-r",
            str(self.repo),
            "--cache-dir",
            str(self.work / "cache"),
            "--compression",
            self.compression,
            *args,
        ]

    @property
    def _env(self) -> dict[str, str]:
        return {"RESTIC_PASSWORD": RESTIC_PASSWORD}

    def init(self) -> None:
        # "stable" is repository version 2 in restic >= 0.14 (the one with compression).
        run_measured(self._cmd("init", "--repository-version", "2"), env=self._env)

    def save(self, src: Path, step: int) -> Op:
        p = run_measured(
            self._cmd("backup", "--json", "--quiet", src.name), env=self._env, cwd=src.parent
        )
        summary = {}
        for line in p.stdout.splitlines():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if msg.get("message_type") == "summary":
                    summary = msg
        return _wall_op(p, data_added=summary.get("data_added"))

    def restore(self, out: Path) -> Op:
        out.mkdir(parents=True, exist_ok=True)
        p = run_measured(self._cmd("restore", "latest", "--target", str(out)), env=self._env)
        op = _wall_op(p)
        op.digest = _only_file_digest(out)
        return op

    def cache_bytes(self) -> int:
        return disk_usage(self.work / "cache")[0] if (self.work / "cache").exists() else 0


class Borg(Tool):
    """borg with its default compression (lz4), or ``--compression zstd,3``.

    Repositories are created with ``--encryption none``: borg's fastest mode
    (restic cannot turn encryption off). Its cache and config live in the
    tool's work directory (``BORG_BASE_DIR``), not in the user's home.
    """

    family = "borg"
    timing = "wall"
    restore_to = "file"
    deduplicates = True

    def __init__(self, compression: str = "lz4") -> None:
        super().__init__()
        self.compression = compression
        self.key = "borg" if compression == "lz4" else "borg-" + compression.replace(",", "")
        self.label = (
            "borg (default: lz4)" if compression == "lz4" else f"borg (--compression {compression})"
        )
        self.archives = 0

    def missing(self) -> str | None:
        return _which("borg", "apt-get install -y borgbackup")

    def version(self) -> str:
        return _version_of(["borg", "--version"])

    def startup_cmd(self) -> list[str]:
        return ["borg", "--version"]

    @property
    def _env(self) -> dict[str, str]:
        return {
            "BORG_BASE_DIR": str(self.work / "home"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self) -> None:
        run_measured(["borg", "init", "--encryption", "none", str(self.repo)], env=self._env)
        self.archives = 0

    def save(self, src: Path, step: int) -> Op:
        self.archives = step
        p = run_measured(
            [
                "borg",
                "create",
                "--compression",
                self.compression,
                f"{self.repo}::v{step:03d}",
                src.name,
            ],
            env=self._env,
            cwd=src.parent,
        )
        return _wall_op(p)

    def restore(self, out: Path) -> Op:
        out.mkdir(parents=True, exist_ok=True)
        p = run_measured(
            ["borg", "extract", f"{self.repo}::v{self.archives:03d}"], env=self._env, cwd=out
        )
        op = _wall_op(p)
        op.digest = _only_file_digest(out)
        return op

    def cache_bytes(self) -> int:
        home = self.work / "home"
        return disk_usage(home)[0] if home.exists() else 0


def _only_file_digest(out: Path) -> str:
    """Digest of the single file a backup tool restored somewhere under ``out``."""
    files = [Path(r) / f for r, _, fs in os.walk(out) for f in fs]
    if len(files) != 1:
        raise RuntimeError(f"expected one restored file under {out}, found {len(files)}")
    return digest_file(files[0])


class Worker:
    """A long-lived Python process with torch imported that runs in-process ops.

    Long-lived like the trainer it stands for: the interpreter and torch start
    once (their start-up is reported separately), every op then loads the
    source weights untimed and times only the call.
    """

    def __init__(self) -> None:
        # Closed in close(); a file, not a pipe, so a chatty worker never blocks on stderr.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        # No malloc tuning here (a fixed mmap threshold made every 1 MiB buffer of
        # apollo_cas' pipeline a fresh mmap: 2x its CPU time, measured); the worker
        # calls malloc_trim after each op instead, so freed tensors do not hide the
        # next op's allocations from its peak-memory measurement.
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )

    def call(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"benchmark worker died during {args}: {tail}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark worker failed during {args}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._err.close()


class InProcess(Tool):
    """A tool timed inside a Python worker that already holds the weights as tensors."""

    timing = "in-process"
    worker: str  # the worker's name for this tool
    _workers: ClassVar[dict[str, Worker]] = {}  # one per tool for the whole run

    def startup_cmd(self) -> list[str]:
        return [sys.executable, "-c", "import torch"]

    def version(self) -> str:
        import torch

        return f"torch {torch.__version__}"

    def start(self) -> None:
        """Start this tool's worker now (so its start-up is outside every timing)."""
        if self.key not in self._workers:
            self._workers[self.key] = Worker()
            self._workers[self.key].call({"op": "ping"})

    def _run(self, op: str, src: Path | None = None, step: int = 0) -> Op:
        self.start()
        args = {
            "tool": self.worker,
            "op": op,
            "repo": str(self.repo),
            "step": step,
            "src": str(src) if src else None,
        }
        r = self._workers[self.key].call(args)
        return Op(
            r["seconds"],
            r["seconds"],
            r["cpu_seconds"],
            r["max_rss"],
            r["peak_anon"],
            extra_rss=r["extra_rss"],
            digest=r.get("digest"),
            info=r.get("info", {}),
        )

    def save(self, src: Path, step: int) -> Op:
        return self._run("save", src, step)

    def restore(self, out: Path) -> Op:
        return self._run("restore")

    @classmethod
    def start_workers(cls, tools: Iterable[Tool]) -> None:
        """Start every in-process tool's worker at once (they import torch in parallel)."""
        todo = [t for t in tools if isinstance(t, InProcess) and t.key not in cls._workers]
        for t in todo:
            cls._workers[t.key] = Worker()
        for t in todo:
            cls._workers[t.key].call({"op": "ping"})

    @classmethod
    def stop_workers(cls) -> None:
        for w in cls._workers.values():
            w.close()
        cls._workers.clear()


class ApolloApi(InProcess):
    """``Store.save(state_dict)`` and ``Store.load("latest")`` (tensors in memory)."""

    key = "apollo-api"
    label = "apollo_cas (Python API)"
    family = "apollo_cas"
    restore_to = "memory"
    worker = "apollo"
    deduplicates = True

    def version(self) -> str:
        import apollo_cas

        return f"apollo_cas {getattr(apollo_cas, '__version__', '?')}"

    def startup_cmd(self) -> list[str]:
        return [sys.executable, "-c", "import torch; from apollo_cas import Store"]

    def init(self) -> None:
        pass


class Original(InProcess):
    """The original ``apollo-checkpoint`` method, re-implemented faithfully (bf16 made to work)."""

    key = "original"
    label = "original tool's method"
    family = "original"
    restore_to = "memory"
    worker = "seed"


class TorchSave(InProcess):
    """``torch.save(state_dict, ckpt-N.pt)`` every time; restore is ``torch.load``."""

    key = "torch-save"
    label = "torch.save"
    family = "torch.save"
    restore_to = "memory"
    worker = "torch"


class SafetensorsSave(InProcess):
    """safetensors ``save_file`` every time; restore is ``load_file``."""

    key = "safetensors"
    label = "safetensors save_file"
    family = "safetensors"
    restore_to = "memory"
    worker = "safetensors"

    def version(self) -> str:
        import safetensors

        return f"safetensors {safetensors.__version__}"


def all_tools() -> list[Tool]:
    """Every tool, in table order."""
    return [
        ApolloCli(),
        ApolloApi(),
        Original(),
        TorchSave(),
        SafetensorsSave(),
        Restic("auto"),
        Restic("max"),
        Borg("lz4"),
        Borg("zstd,3"),
    ]


#: Run by default. ``restic --compression max`` is left out: it compresses
#: about 1.6 MB/s on this project's 2-core machines (200 MB of bf16 weights
#: took 126 s), so one 1 GiB sequence would take most of an hour. ``--tools``
#: adds it back.
DEFAULT_TOOLS = (
    "apollo-cli",
    "apollo-api",
    "original",
    "torch-save",
    "safetensors",
    "restic",
    "borg",
    "borg-zstd3",
)


# -- the worker (runs in the child process) -------------------------------------------


def load_source(path: Path) -> dict[str, Any]:
    """The weights of a safetensors file as torch tensors that each own their memory.

    Read with ``readinto`` straight into each tensor (no mmap, no second copy), so
    the worker's RSS before the call is the weights plus the interpreter, like a
    trainer's state_dict.
    """
    import torch

    entries, start = read_safetensors_entries(path)
    out: dict[str, Any] = {}
    with open(path, "rb", buffering=0) as f:
        for e in sorted(entries, key=lambda e: e.begin):
            t = torch.empty(e.shape, dtype=getattr(torch, e.dtype.torch_name))
            buf = t.reshape(-1).view(torch.uint8).numpy()
            f.seek(start + e.begin)
            got = f.readinto(memoryview(buf))
            if got != buf.nbytes:
                raise RuntimeError(f"{path}: short read for {e.name}")
            out[e.name] = t
    return out


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS ("5" > clear_refs, Linux >= 4.0)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _seed_save(tensors: Mapping[str, Any], ckdir: Path, step: int) -> dict[str, Any]:
    """``apollo-checkpoint save``, faithfully: see /work/shared/seed/apollo-checkpoint.rs.

    Differences, each needed to run it at all or to run it in a benchmark:
    ``.cpu().numpy()`` raises on bf16, so bytes go through a uint8 view; the
    tensors are already in this process (no IPC handles on a CPU machine, and
    the Python start-up the Rust tool pays per run is reported separately);
    directory names get a step suffix because the original's minute-resolution
    names collide when two saves run within a minute (it then deletes its own
    latest checkpoint).
    """
    import torch

    from apollo_cas import dtypes
    from apollo_cas.formats import flat

    ckdir.mkdir(parents=True, exist_ok=True)
    name = time.strftime(flat.TIME_FORMAT, time.gmtime()) + f"-{step:03d}"
    cur = ckdir / name
    cur.mkdir(parents=True, exist_ok=True)
    live = cur / flat.WEIGHTS
    # dump_live_weights: the Python helper writes weights.bin and weights.json.
    with open(live, "wb") as f:
        entries = flat.write_weights(
            f,
            tensors,
            lambda t: (
                dtypes.from_torch(t.dtype),
                t.shape,
                t.contiguous().cpu().view(torch.uint8).numpy().tobytes(),  # was .numpy().tobytes()
            ),
        )
    live.with_suffix(".json").write_bytes(flat.dumps_index(entries, indent=None))
    # Find the previous checkpoint through the latest symlink.
    latest = ckdir / "latest"
    prev = None
    if latest.exists():
        p = ckdir / os.readlink(latest) / flat.WEIGHTS
        prev = p if p.exists() else None
    changed_bytes = None
    if prev is not None:
        with open(prev, "rb") as fp, open(live, "rb") as fl:
            old = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            new = mmap.mmap(fl.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                if len(old) == len(new):
                    changed_bytes = sum(e - s for s, e in diff_blocks(old, new, SEED_BLOCK_SIZE))
            finally:
                old.close()
                new.close()
        if changed_bytes == 0:
            shutil.rmtree(cur)  # "No changes — skipping checkpoint"
            return {"kept": False, "changed_bytes": 0}
    # Save the index (again, pretty), the metadata, and move latest (remove, then create).
    (cur / flat.INDEX).write_bytes(flat.dumps_index(entries, indent=flat.TOOL_INDENT))
    (cur / flat.META).write_bytes(flat.dumps_meta(name, entries))
    if latest.is_symlink():
        latest.unlink()
    os.symlink(name, latest)
    return {"kept": True, "changed_bytes": changed_bytes}


def diff_blocks(old: Any, new: Any, block_size: int) -> list[tuple[int, int]]:
    """The original's ``diff_blocks``: contiguous runs of differing blocks, as byte ranges.

    The Rust compares block by block (memcmp); this compares 64 MiB windows
    with numpy first and looks at blocks only inside windows that differ, which
    gives the same ranges at memcmp-like speed.
    """
    a = np.frombuffer(old, dtype=np.uint8)
    b = np.frombuffer(new, dtype=np.uint8)
    window = (64 << 20) // block_size * block_size
    changed_blocks: list[int] = []
    for s in range(0, len(a), window):
        x, y = a[s : s + window], b[s : s + window]
        if np.array_equal(x, y):
            continue
        diff = x != y
        pad = -len(diff) % block_size
        if pad:
            diff = np.concatenate([diff, np.zeros(pad, bool)])
        hit = np.flatnonzero(diff.reshape(-1, block_size).any(axis=1))
        changed_blocks.extend((s // block_size + hit).tolist())
    ranges: list[tuple[int, int]] = []
    for blk in changed_blocks:
        start, end = blk * block_size, min((blk + 1) * block_size, len(a))
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _seed_load(ckdir: Path) -> dict[str, Any]:
    """Read the latest weights.bin back into tensors (the original has no restore)."""
    import torch

    from apollo_cas.formats import flat

    cur = ckdir / os.readlink(ckdir / "latest")
    index_path, weights_path = cur / flat.INDEX, cur / flat.WEIGHTS
    index = flat.loads_index(index_path.read_bytes(), index_path)
    entries = flat.parse_index(index, index_path, weights_path, weights_path.stat().st_size)
    out: dict[str, Any] = {}
    with open(weights_path, "rb", buffering=0) as f:
        for e in sorted(entries, key=lambda e: e.offset):
            t = torch.empty(e.shape, dtype=getattr(torch, e.dtype.torch_name))
            f.seek(e.offset)
            f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            out[e.name] = t
    return out


def _latest_file(repo: Path, suffix: str) -> Path:
    return sorted(repo.glob(f"ckpt-*{suffix}"))[-1]


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """Run one in-process save or restore; return timings and (for restores) a digest."""
    import gc
    import resource

    import torch

    tool, op, repo = args["tool"], args["op"], Path(args["repo"])
    tensors = load_source(Path(args["src"])) if op == "save" else None
    if tool == "seed":
        # What the emulation writes through, imported before the clock starts
        # (as torch is), so no timing includes an import.
        from apollo_cas.formats import flat  # noqa: F401
    info: dict[str, Any] = {}
    _reset_peak()
    (rss0,) = _status_kib("self", "VmRSS")
    sampler = PeakSampler("self")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loaded: Mapping[str, Any] | None = None
    if op == "save":
        assert tensors is not None
        step = int(args["step"])
        if tool == "apollo":
            from apollo_cas.store import Store

            with Store.open(repo, create=True) as st:
                r = st.save(tensors)
            info = {
                "new_chunks": r.stats.new_chunks,
                "chunks": r.stats.chunks,
                "new_stored_bytes": r.stats.new_stored_bytes,
                "unchanged": r.unchanged,
            }
        elif tool == "seed":
            info = _seed_save(tensors, repo, step)
        elif tool == "torch":
            repo.mkdir(parents=True, exist_ok=True)
            torch.save(tensors, repo / f"ckpt-{step:03d}.pt")
        elif tool == "safetensors":
            from safetensors.torch import save_file

            repo.mkdir(parents=True, exist_ok=True)
            save_file(
                tensors, str(repo / f"ckpt-{step:03d}.safetensors"), metadata={"format": "pt"}
            )
        else:
            raise ValueError(tool)
    else:
        if tool == "apollo":
            from apollo_cas.store import Store

            with Store.open(repo) as st:
                loaded = st.load("latest")
        elif tool == "seed":
            loaded = _seed_load(repo)
        elif tool == "torch":
            loaded = torch.load(_latest_file(repo, ".pt"), weights_only=True)
        elif tool == "safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(_latest_file(repo, ".safetensors")))
        else:
            raise ValueError(tool)
    call_seconds = time.perf_counter() - t0
    digest = None
    if loaded is not None:
        # Restores into memory include one pass over every byte (the digest that
        # proves them right): safetensors' load_file maps the file and reads
        # lazily, so timing the call alone would count bytes never read.
        digest = digest_torch(loaded)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    hwm, anon = sampler.stop()
    (hwm_now,) = _status_kib("self", "VmHWM")
    peak = max(hwm, hwm_now * 1024)
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        "rss_before": rss0 * 1024,
        "max_rss": peak,
        "peak_anon": anon,
        "extra_rss": max(0, peak - rss0 * 1024),
        "info": info,
    }
    if loaded is not None:
        result["digest"] = digest
        result["info"]["call_seconds"] = round(call_seconds, 4)
    del tensors, loaded
    gc.collect()
    _trim_heap()
    return result


def _trim_heap() -> None:
    """Give freed memory back to the OS, so the next op starts from live memory only."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the one JSON line: libraries' prints go to stderr."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved


def main(argv: list[str]) -> int:
    """``tools.py worker``: answer one JSON request per stdin line with one JSON line."""
    if argv != ["worker"]:
        print("usage: tools.py worker (started by benchmarks/compare.py)", file=sys.stderr)
        return 2
    replies = sys.stdout
    import torch  # noqa: F401  (start-up paid here, once, outside every timing)

    for line in sys.stdin:
        args = json.loads(line)
        try:
            with _stdout_to_stderr():
                result = {"ok": True} if args.get("op") == "ping" else worker(args)
        except Exception as exc:  # report, keep serving: the parent decides what to do
            result = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(result) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
