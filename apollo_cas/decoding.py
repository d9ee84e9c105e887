"""Decoding many chunks into place: on threads, or on worker processes.

Restore is what users wait for after a crash, so it must use every core. On
threads it does not: measured on a 16-core H200 host (benchmarks/results/
restore.json), reading + decoding + verifying chunks peaks at about 2 GB/s with
4 threads and falls to 1 GB/s with 16, because byte-plane interleaving, buffer
copies and file reads hold the GIL between the parts that release it; the same
work in 16 processes runs at 9.5 GB/s. So large restores from stores that
other processes can open (a directory, S3) decode in worker processes, each of
which opens the store itself and ``pwrite``s verified chunks straight into the
output file: no chunk bytes ever travel between processes. Small restores, the
in-memory backend and machines with few cores use threads.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from . import errors as errors_module
from .errors import ApolloError, TargetError
from .parallel import bounded_map

if TYPE_CHECKING:
    from .store import Store

#: Restores smaller than this stay on threads: a process pool costs ~0.3 s to start.
PROCESS_THRESHOLD = 512 << 20
#: Chunks per task sent to a worker process (amortises the round trip).
BATCH = 32

Job = tuple[int, int, bytes, int]  # output index, byte offset, chunk id, its length there
#: ``read_chunk(chunk_id, size)``: verified raw bytes, refused unless ``size`` long.
ReadFn = Callable[[bytes, int], bytes]
DoneFn = Callable[[int, int, int], None]  # output index, offset, length


@dataclass(frozen=True)
class Output:
    """An output file: its open descriptor (threads) and its path (processes)."""

    fd: int
    path: str


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Decoder:
    """Writes verified chunks at their offsets in output files."""

    def __init__(
        self,
        read_chunk: ReadFn,
        workers: int,
        location: str | None = None,
        processes: bool = False,
    ) -> None:
        self.read_chunk = read_chunk
        self.workers = workers
        self.location = location
        self.processes = processes and location is not None

    @classmethod
    def for_store(cls, store: Store, nbytes: int) -> Decoder:
        """Processes when they pay off and the store can be opened by another process."""
        env = os.environ.get("APOLLO_CAS_PROCESSES", "auto")
        shareable = not store.location.startswith("memory://")
        big = nbytes >= PROCESS_THRESHOLD and store.workers >= 4
        use = shareable and (env == "1" or (env == "auto" and big))
        return cls(store.read_chunk, store.workers, store.location, use)

    def write(
        self,
        outputs: list[Output],
        jobs: Iterable[Job],
        progress: Callable[[int], None] | None = None,
        on_done: DoneFn | None = None,
    ) -> int:
        """Decode every job's chunk into ``outputs``; returns the bytes written.

        ``on_done(output, offset, length)`` is called (from the caller's thread)
        as each piece lands, so a caller can start using finished regions early.
        """
        if self.processes:
            return self._write_processes(outputs, jobs, progress, on_done)

        def task(job: Job) -> tuple[Job, int]:
            out, offset, cid, size = job
            data = self.read_chunk(cid, size)
            try:
                pwrite_all(outputs[out].fd, data, offset)
            except OSError as exc:
                from .targets.files import destination_error

                raise destination_error(exc, "writing", outputs[out].path) from exc
            return job, len(data)

        total = 0
        for (out, offset, _cid, _size), n in bounded_map(task, jobs, self.workers):
            total += n
            if progress:
                progress(n)
            if on_done:
                on_done(out, offset, n)
        return total

    def _write_processes(
        self,
        outputs: list[Output],
        jobs: Iterable[Job],
        progress: Callable[[int], None] | None,
        on_done: DoneFn | None,
    ) -> int:
        assert self.location is not None
        paths = [o.path for o in outputs]
        total = 0
        lock = threading.Lock()
        batches = _batches(jobs)
        errors: list[BaseException] = []

        def next_batch() -> list[Job] | None:
            with lock:
                if errors:
                    return None
                return next(batches, None)

        def settle(done: list[tuple[int, int, int]]) -> None:
            nonlocal total
            with lock:
                for out, offset, n in done:
                    total += n
                    if progress:
                        progress(n)
                    if on_done:
                        on_done(out, offset, n)

        def drive(worker: _Worker) -> None:
            try:
                while (batch := next_batch()) is not None:
                    settle(worker.call(paths, batch))
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        # Worker *processes* started as fresh interpreters (not fork: the parent
        # has threads and perhaps CUDA state; not multiprocessing's spawn, which
        # re-imports the user's __main__). One thread per worker only waits on
        # its pipe, so the GIL is not in the way.
        workers = [_Worker(self.location) for _ in range(self.workers)]
        try:
            threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for w in workers:
                w.close()
        if errors:
            raise errors[0]
        return total


class _Worker:
    """One decode worker process speaking msgpack over its stdin/stdout."""

    def __init__(self, location: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apollo_cas.decode_worker", location],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def call(self, paths: list[str], batch: list[Job]) -> list[tuple[int, int, int]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            send_frame(self.proc.stdin, [paths, batch])
            reply = recv_frame(self.proc.stdout)
        except (BrokenPipeError, EOFError):
            where = os.path.dirname(paths[0]) if paths else "the destination"
            raise TargetError(
                f"a restore worker process died (exit code {self.proc.poll()}) "
                f"while writing into {where}",
                f"check that the filesystem of {where} has room (a full tmpfs kills writers), "
                "or run again with APOLLO_CAS_PROCESSES=0 to decode on threads",
            ) from None
        if isinstance(reply, dict):
            cls = getattr(errors_module, str(reply.get("type")), ApolloError)
            if not (isinstance(cls, type) and issubclass(cls, ApolloError)):
                cls = ApolloError
            raise cls(str(reply.get("message")), reply.get("hint"))
        return [tuple(x) for x in reply]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def send_frame(stream: IO[bytes], obj: object) -> None:
    """One message: a 4-byte length, then msgpack (pipes need explicit framing)."""
    import msgpack

    data = msgpack.packb(obj)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def recv_frame(stream: IO[bytes]) -> Any:
    """The next message, or EOFError at the end of the stream."""
    import msgpack

    head = _read_exact(stream, 4)
    return msgpack.unpackb(_read_exact(stream, struct.unpack("<I", head)[0]), raw=False)


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        piece = stream.read(n - len(buf))
        if not piece:
            raise EOFError
        buf += piece
    return buf


def _batches(jobs: Iterable[Job]) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for j in jobs:
        batch.append(j)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
