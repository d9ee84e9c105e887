"""A restore worker process: decodes chunks and writes them into output files.

Started by :mod:`apollo_cas.decoding` as ``python -m apollo_cas.decode_worker
STORE``. Protocol on stdin/stdout, length-prefixed msgpack frames: request ``[paths, [[out, offset,
chunk_id], ...]]``; reply ``[[out, offset, length], ...]`` or, on an error,
``{"type": error class name, "message": ..., "hint": ...}``. Exits at EOF.
"""

from __future__ import annotations

import os
import sys

from .decoding import pwrite_all, recv_frame, send_frame
from .errors import ApolloError
from .store import Store


def serve(location: str) -> None:
    store = Store.open(location, workers=1)
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    while True:
        try:
            paths, batch = recv_frame(inp)
        except EOFError:
            return
        fds: dict[int, int] = {}
        try:
            done = []
            for o, offset, cid in batch:
                data = store.read_chunk(bytes(cid))
                if o not in fds:
                    fds[o] = os.open(paths[o], os.O_WRONLY)
                pwrite_all(fds[o], data, offset)
                done.append((o, offset, len(data)))
            reply: object = done
        except ApolloError as exc:
            reply = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        except OSError as exc:
            from .backends.local import os_error

            err = os_error(exc, "restoring into", paths[0] if paths else "")
            reply = {"type": type(err).__name__, "message": err.message, "hint": err.hint}
        finally:
            for fd in fds.values():
                os.close(fd)
        send_frame(out, reply)


if __name__ == "__main__":
    serve(sys.argv[1])
