"""py-spy attached to this very process for a stretch of code, and its raw output summed up.

The probes use it to see where each thread of a save waits and who holds the GIL, which
``sys._current_frames`` cannot tell (a thread waiting for the GIL shows the line it will
resume at). py-spy is not a dependency: ``--py-spy PATH`` names its binary (a wheel
travels to the device like the others); without it the probes run unprofiled.

    with Recording(binary, out / "idle.txt", idle=True, native=True) as rec:
        run_the_step()
    summary = summarize(rec.path)
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^thread \((\d+)\): (.*) (\d+)$")
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1)


def allow_tracing_by_children() -> None:
    """Under Yama's ptrace scope 1 only an ancestor may attach; let our py-spy child."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)


class Recording:
    """``py-spy record --pid <this process>`` while the ``with`` block runs.

    ``idle``: also samples of threads that are not running (where they wait); ``gil``:
    only the thread holding the GIL; ``native``: C frames too (``take_gil``, CUDA
    calls, zstd). ``error`` says why nothing was recorded, if so.
    """

    def __init__(
        self,
        binary: str,
        path: Path,
        *,
        rate: int = 100,
        idle: bool = False,
        gil: bool = False,
        native: bool = False,
    ) -> None:
        self.binary = binary
        self.path = Path(path)
        # Native stacks need py-spy to pause the process for each sample.
        self.args = ["--threads", "-r", str(rate), "-f", "raw"]
        self.args += ["--idle"] * idle + ["--gil"] * gil
        self.args += ["--native"] if native else ["--nonblocking"]
        self.error: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Recording:
        allow_tracing_by_children()
        self.path.unlink(missing_ok=True)
        cmd = [self.binary, "record", "--pid", str(os.getpid()), "-o", str(self.path), *self.args]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.5)  # attaching takes a moment; samples before the block are few
        if self._proc.poll() is not None:
            self.error = self._output()
        return self

    def __exit__(self, *exc: Any) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.error = "py-spy did not stop within 60 s"
        if not self.path.exists():
            self.error = self.error or self._output()

    def _output(self) -> str:
        assert self._proc is not None
        out = self._proc.stdout.read() if self._proc.stdout else b""
        return f"py-spy exited {self._proc.returncode}: {out.decode(errors='replace')[-800:]}"


def group(name: str) -> str:
    """A thread's group: its name without the pool's counter (``apollo-delta_3``)."""
    return name.rstrip("0123456789").rstrip("_-") or name


def summarize(path: Path, top: int = 15, depth: int = 3) -> dict[str, Any]:
    """Per thread group: samples, and the most common innermost ``depth`` frames."""
    samples: collections.Counter[str] = collections.Counter()
    frames: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    threads: dict[str, set[str]] = collections.defaultdict(set)
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, stack, count = m.group(1), m.group(2).split(";"), int(m.group(3))
        g = group(stack[0])
        threads[g].add(tid)
        samples[g] += count
        leaf = " < ".join(reversed(stack[1:][-depth:])) or "(no frames)"
        frames[g][leaf] += count
    return {
        g: {
            "threads": len(threads[g]),
            "samples": n,
            "top": [[c, f] for f, c in frames[g].most_common(top)],
        }
        for g, n in samples.most_common()
    }
