"""A handles file loaded without running its pickle: torch's ``weights_only`` plus two names.

The original tool loaded the file with ``weights_only=False``: whoever could
write it ran code as the checkpointing user. Here it is loaded with
``weights_only=True`` plus an allowlist of exactly two names (docs/HANDLES.md):

* ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` resolves to an inert
  *marker*, not the function: the pickle can name it but not call it (a file
  that tries to call it while unpickling is refused as unsafe). After loading,
  :mod:`.format` checks every argument and :mod:`.ipc` calls the real function
  itself.
* ``builtins.bytes`` resolves to a wrapper that only builds ``b""`` (protocol 2
  pickles an empty ``bytes`` as a call) and refuses anything else.

Everything else a handle holds (``torch.Tensor`` / ``torch.nn.Parameter`` and
the storage classes as values, ``torch.Size``, dtypes, ``_codecs.encode`` for
bytes) is already on torch's default ``weights_only`` allowlist. Any other
global — ``os.system``, ``builtins.eval``, a class of some package — stops the
load before anything runs, as :class:`~apollo_cas.errors.UnsafePickle` naming the
file and the global. torch's multi-paragraph refusals become one-line errors here.
"""

from __future__ import annotations

import pickle
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ... import frontend
from ...errors import SourceError, UnsafePickle, UnsupportedSource

REBUILD_NAME = "torch.multiprocessing.reductions.rebuild_cuda_tensor"
BYTES_NAME = "builtins.bytes"

__all__ = ["BYTES_NAME", "REBUILD_NAME", "allowlist", "check_magic", "is_rebuild", "unpickle"]


class _Refused(Exception):
    """Raised by the allowlist stand-ins when a pickle tries to *call* them."""


def _rebuild_marker(*args: object) -> None:
    """Stands for ``rebuild_cuda_tensor`` inside a loaded handles file. Never runs it."""
    raise _Refused(f"{REBUILD_NAME} is called while unpickling")


def _safe_bytes(*args: object) -> bytes:
    """``bytes()`` as protocol-2 pickles spell ``b""``; no sizes, no iterables."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes):
        return args[0]
    raise _Refused(f"{BYTES_NAME} is called with {type(args[0]).__name__} arguments")


def allowlist() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The globals added to torch's ``weights_only`` defaults, as ``(stand-in, name)``."""
    return [(_rebuild_marker, REBUILD_NAME), (_safe_bytes, BYTES_NAME)]


def is_rebuild(func: object) -> bool:
    """Whether a loaded handle names ``rebuild_cuda_tensor`` (as its stand-in)."""
    return func is _rebuild_marker


# torch.serialization.safe_globals edits a process-wide set: one load at a time.
_LOAD_LOCK = threading.Lock()


def unpickle(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the allowlist, errors made one-line."""
    with _LOAD_LOCK:
        try:
            with torch.serialization.safe_globals(allowlist()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except _Refused as exc:
            raise UnsafePickle(
                f"{path}: refused to load: {exc}; a handles file only names it",
                "regenerate the handles file with torch.multiprocessing.reductions.reduce_tensor "
                "(or apollo_cas.sources.handles.write_handles); nothing in it was executed",
            ) from None
        except pickle.UnpicklingError as exc:
            raise _unpickling_error(path, str(exc)) from None
        except OSError as exc:
            raise SourceError(
                f"cannot read handles file {path}: {exc.strerror or exc}",
                "check the path and its permissions",
            ) from None
        except Exception as exc:  # zip/magic-number errors of torch.load, truncated files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedSource(
                f"{path} is not a handles file ({first[:200]})",
                "pass the file written by torch.save({name: {'handle': reduce_tensor(t)}})"
                + _other_kind(),
            ) from None


def _other_kind() -> str:
    """The tail of a not-a-handles-file hint: another kind, where the front end can."""
    return frontend.offer(
        "--source-kind", "; use --source-kind to read it as another kind", otherwise=""
    )


#: What torch.save writes: a zip archive, or (legacy format) a pickle, whose
#: first opcode is PROTO (0x80). Anything else is not a handles file at all and
#: must not reach the unpickler, whose refusal of stray bytes reads like a
#: hostile pickle ("Unsupported operand 215").
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def check_magic(path: Path) -> None:
    """Refuse, by its first bytes, a file that torch.save did not write."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise SourceError(f"cannot read handles file {path}: {exc.strerror or exc}") from None
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == _PICKLE_PROTO):
        return
    if not head:
        what = "it is empty"
    elif len(head) >= 9 and head[8:9] == b"{":
        what = "it is a safetensors file"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "it is text"
    else:
        what = "it is not a file torch.save writes"
    raise UnsupportedSource(
        f"{path} is not a handles file ({what})",
        "pass the file the server wrote with torch.save({name: {'handle': reduce_tensor(t)}})"
        + _other_kind(),
    )


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Phrases of torch's weights_only refusals (a global or call outside the allowlist),
# as opposed to a file that is simply not a pickle.
_REFUSAL_WORDS = (
    "unrecognized function",
    "Can only",
    "blocked",
    "Unsupported operand",
    "allowlist",
    "allowed global",
)
_BOILERPLATE = (
    "Weights only load failed",
    "Check the documentation",
    "(1)",
    "(2)",
    "In PyTorch 2.6",
    "Please file an issue",
)


def _unpickling_error(path: Path, text: str) -> Exception:
    """Map torch's multi-paragraph weights_only error to one line."""
    hint = (
        "a handles file only names torch's rebuild_cuda_tensor, tensor and storage classes "
        "and dtypes; nothing in it was executed. Regenerate it with reduce_tensor; never "
        "load it with weights_only=False"
    )
    m = _GLOBAL_RE.search(text)
    if m:
        return UnsafePickle(
            f"{path}: refused to load: it names the global {m.group(1)}, which is not allowlisted",
            hint,
        )
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
    detail = next((p for p in paragraphs if not p.startswith(_BOILERPLATE)), "")
    detail = detail.removeprefix("WeightsUnpickler error:").strip()
    if any(w in text for w in _REFUSAL_WORDS):
        return UnsafePickle(f"{path}: refused to load: {detail[:200]}", hint)
    return UnsupportedSource(
        f"{path} is not a handles file ({(detail or 'unreadable pickle')[:200]})",
        "pass the handles file written by the server" + _other_kind(),
    )
