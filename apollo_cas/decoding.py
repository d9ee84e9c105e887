"""Decoding many chunks into place: on threads, or on worker processes.

Restore is what users wait for after a crash, so it must use every core. On
threads it does not: measured on a 16-core H200 host (benchmarks/results/
restore.json), reading + decoding + verifying chunks peaks at about 2 GB/s with
4 threads and falls to 1 GB/s with 16, because byte-plane interleaving, buffer
copies and file reads hold the GIL between the parts that release it; the same
work in 16 processes runs at 9.5 GB/s. So large restores from stores that
other processes can open (a directory, S3) decode in worker processes, each of
which opens a chunk reader on the store itself and writes verified chunks
straight into the output file: no chunk bytes ever travel between processes.
Small restores, backends that other processes cannot open (declared by
``Backend.capabilities``) and machines with few cores use threads.

Chunks are read through a small :class:`ChunkReader` protocol. In a format-2
store each output's jobs, in order, are grouped into *spans*: runs of chunks that
lie back to back in one pack, read with one ranged read of up to
:data:`SPAN_BYTES` and then decoded and re-hashed one by one. A restore into
several files hands out spans from the files in turn
(:func:`interleave_outputs`), so the workers spread over the files.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from . import errors as errors_module
from . import settings
from .codecs.envelope import Blob
from .errors import ApolloError, CorruptChunk, TargetError
from .fsio import destination_error
from .parallel import bounded_map

if TYPE_CHECKING:
    from .backends.base import Capabilities
    from .inventory import Location

#: Restores smaller than this stay on threads: a process pool costs ~0.3 s to start.
PROCESS_THRESHOLD = 512 << 20
#: Chunks per task sent to a worker process (amortises the round trip).
BATCH = 32
#: The longest ranged read of one span (a few chunks back to back in a pack).
SPAN_BYTES = 16 << 20

#: output index, byte offset, chunk id[, decoded size the output needs]
Job = tuple[int, int, bytes] | tuple[int, int, bytes, int]
#: ``read_chunk(chunk_id, size)``: verified raw bytes, refused unless ``size`` long.
ReadFn = Callable[[bytes, int], bytes]
DoneFn = Callable[[int, int, int], None]  # output index, offset, length
#: (output, offset, chunk id, offset in the object, stored length, size or None)
SpanItem = tuple[int, int, bytes, int, int, "int | None"]
#: (object key, first offset, items): chunks back to back in one object, or
#: one whole-object chunk (format 1: offset 0, length -1).
Span = tuple[str, int, list[SpanItem]]

T = TypeVar("T")


class ChunkReader(Protocol):
    """Verified chunks, for restores (``ChunkStore`` implements it)."""

    def read(self, chunk_id: bytes, size: int | None = None) -> Blob:
        """A chunk's raw bytes, re-hashed (and of length ``size`` if given)."""
        ...

    def locate(self, chunk_id: bytes) -> Location:
        """Where its envelope is (CorruptChunk if the store lacks it)."""
        ...

    def read_span(
        self, key: str, offset: int, items: list[tuple[bytes, int, int, int | None]]
    ) -> list[Blob]:
        """Chunks back to back in one object, in one ranged read, each verified."""
        ...


def spans(reader: ChunkReader, jobs: Iterable[Job]) -> Iterator[Span]:
    """Group jobs, in their order, into runs that are contiguous in one object."""
    cur: Span | None = None
    end = 0
    for job in jobs:
        out, offset, cid = job[0], job[1], job[2]
        size = job[3] if len(job) > 3 else None
        loc = reader.locate(cid)
        item: SpanItem = (out, offset, cid, loc.offset, loc.length, size)
        if (
            cur is not None
            and loc.length >= 0
            and loc.key == cur[0]
            and loc.offset == end
            and end + loc.length - cur[1] <= SPAN_BYTES
        ):
            cur[2].append(item)
            end += loc.length
            continue
        if cur is not None:
            yield cur
        cur = (loc.key, loc.offset, [item])
        end = loc.offset + loc.length
    if cur is not None:
        yield cur


def interleave_outputs(streams: Sequence[Iterable[T]]) -> Iterator[T]:
    """One item from each stream in turn, each stream's own order kept.

    Restores into several files (safetensors shards, an exact restore's
    files) take their spans from here so that workers busy at the same time
    write into different files. Writes into one file serialise on that file's
    inode lock: measured on the 16-core H200 host (benchmarks/results/
    h200_2026-12-03/shm_writes.json), 16 processes writing one tmpfs file
    reach 2.8 GB/s with pwrite and 4.7 GB/s through a shared mapping, while 16
    processes writing a file each reach 17 GB/s. Handing out spans in output
    order instead put every worker in the same shard while the rest sat idle.

    Lazy: it holds one iterator per stream and nothing else, so streams that
    are themselves lazy (a 54 GB model's jobs) are never materialised. Once
    a stream runs dry the others continue in turn, so two consecutive items
    come from one stream only when every other stream is exhausted.
    """
    live = deque(iter(s) for s in streams)
    while live:
        it = live.popleft()
        for item in it:
            yield item
            live.append(it)
            break


def read_span(reader: ChunkReader, span: Span) -> list[Blob]:
    """The verified bytes of every chunk of ``span``, in order."""
    key, first, items = span
    if items[0][4] < 0:  # a whole object (format 1)
        return [reader.read(it[2], it[5]) for it in items]
    try:
        return reader.read_span(key, first, [(it[2], it[3], it[4], it[5]) for it in items])
    except CorruptChunk:
        # The pack may have been repacked since we located the chunks (restores
        # take no lock), or one chunk is damaged: read one by one, which looks
        # again and names the damaged chunk.
        return [reader.read(it[2], it[5]) for it in items]


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


@runtime_checkable
class _ReaderLike(Protocol):
    def locate(self, chunk_id: bytes) -> Location: ...


class _CallableReader:
    """A ``read_chunk(chunk_id)`` function as a :class:`ChunkReader` (one read per chunk)."""

    def __init__(self, read_chunk: Callable[[bytes], Blob]) -> None:
        self._read = read_chunk

    def read(self, chunk_id: bytes, size: int | None = None) -> Blob:
        data = self._read(chunk_id)
        if size is not None and len(data) != size:
            raise CorruptChunk(
                f"chunk {chunk_id.hex()} decodes to {len(data)} bytes where its tensor needs {size}",
                "run 'apollo-cas verify --read-data' to see which checkpoints it breaks",
            )
        return data

    def locate(self, chunk_id: bytes) -> Location:
        from .inventory import Location

        return Location("", 0, -1)

    def read_span(
        self, key: str, offset: int, items: list[tuple[bytes, int, int, int | None]]
    ) -> list[Blob]:
        return [self.read(cid, size) for cid, _o, _n, size in items]


def _settle(
    done: list[tuple[int, int, int]],
    progress: Callable[[int], None] | None,
    on_done: DoneFn | None,
) -> int:
    """Report pieces written ((output, offset, bytes)) to ``progress`` and
    ``on_done``; returns their bytes."""
    for out, offset, n in done:
        if progress:
            progress(n)
        if on_done:
            on_done(out, offset, n)
    return sum(n for _, _, n in done)


class Decoder:
    """Writes verified chunks at their offsets in output files."""

    def __init__(
        self,
        reader: ChunkReader | Callable[[bytes], Blob],
        workers: int,
        location: str | None = None,
        processes: bool = False,
    ) -> None:
        # A plain ``read_chunk`` function (the interface before the reader
        # protocol) still works: one read per chunk.
        self.reader: ChunkReader = (
            reader if isinstance(reader, _ReaderLike) else _CallableReader(reader)
        )
        self.workers = workers
        self.location = location
        self.processes = processes and location is not None

    def read_chunk(self, chunk_id: bytes, size: int | None = None) -> Blob:
        return self.reader.read(chunk_id, size)

    @classmethod
    def for_store(cls, store: Any, nbytes: int) -> Decoder:
        """What ``store.decoder(nbytes)`` returns (kept for callers of the old name)."""
        decoder: Decoder = store.decoder(nbytes)
        return decoder

    @classmethod
    def for_reader(
        cls,
        reader: ChunkReader,
        workers: int,
        location: str,
        capabilities: Capabilities,
        nbytes: int,
    ) -> Decoder:
        """Processes when they pay off and another process can open the store."""
        env = settings.processes()  # APOLLO_CAS_PROCESSES: auto, 0 or 1
        shareable = capabilities.shareable_across_processes
        big = nbytes >= PROCESS_THRESHOLD and workers >= 4
        use = shareable and (env == "1" or (env == "auto" and big))
        return cls(reader, workers, location, use)

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
        Spans are handed out in the order of ``jobs``: for several outputs,
        :meth:`write_each` spreads the workers over the files.
        """
        return self._write_spans(outputs, spans(self.reader, jobs), progress, on_done)

    def write_each(
        self,
        outputs: list[Output],
        jobs_by_output: Sequence[Iterable[Job]],
        progress: Callable[[int], None] | None = None,
        on_done: DoneFn | None = None,
    ) -> int:
        """:meth:`write` with one job stream per output, taken in turn
        (:func:`interleave_outputs`); each stream keeps its own order, so its
        spans (chunks back to back in a pack) stay whole."""
        per_output = [spans(self.reader, jobs) for jobs in jobs_by_output]
        return self._write_spans(outputs, interleave_outputs(per_output), progress, on_done)

    def _write_spans(
        self,
        outputs: list[Output],
        todo: Iterable[Span],
        progress: Callable[[int], None] | None,
        on_done: DoneFn | None,
    ) -> int:
        if self.processes:
            return self._write_processes(outputs, todo, progress, on_done)

        def task(span: Span) -> list[tuple[int, int, int]]:
            done = []
            for it, data in zip(span[2], read_span(self.reader, span), strict=True):
                try:
                    pwrite_all(outputs[it[0]].fd, data, it[1])
                except OSError as exc:
                    raise destination_error(exc, "writing", outputs[it[0]].path) from exc
                done.append((it[0], it[1], len(data)))
            return done

        total = 0
        for done in bounded_map(task, todo, self.workers):
            total += _settle(done, progress, on_done)
        return total

    def _write_processes(
        self,
        outputs: list[Output],
        jobs: Iterable[Span],
        progress: Callable[[int], None] | None,
        on_done: DoneFn | None,
    ) -> int:
        assert self.location is not None
        paths = [o.path for o in outputs]
        total = 0
        lock = threading.Lock()
        batches = _batches(jobs)
        errors: list[BaseException] = []

        def next_batch() -> list[Span] | None:
            with lock:
                if errors:
                    return None
                return next(batches, None)

        def settle(done: list[tuple[int, int, int]]) -> None:
            nonlocal total
            with lock:
                total += _settle(done, progress, on_done)

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
        writes = "pwrite" if settings.worker_writes() == "pwrite" else "mmap"
        workers = [_Worker(self.location, writes) for _ in range(self.workers)]
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

    def __init__(self, location: str, writes: str = "mmap") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apollo_cas.decode_worker", location, writes],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def call(self, paths: list[str], batch: list[Span]) -> list[tuple[int, int, int]]:
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


def _batches(jobs: Iterable[Span]) -> Iterator[list[Span]]:
    """Spans in requests of about :data:`BATCH` chunks."""
    batch: list[Span] = []
    n = 0
    for j in jobs:
        batch.append(j)
        n += len(j[2])
        if n >= BATCH:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch
