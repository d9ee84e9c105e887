"""Process identity and liveness: the one answer to "is that process still running?".

A pid means something only inside its pid namespace and its boot: a save in
another container on the same host (same or reused hostname) records a pid
that names some other process here, or none; after a reboot every pid is new.
So a holder (a lock's owner, the writer of a temporary file, the exporter of
a handles file) is identified by

* ``host``: ``socket.gethostname()``;
* ``boot_id``: ``/proc/sys/kernel/random/boot_id``, new at every boot and
  shared by every container of one kernel;
* ``pid_ns``: ``readlink /proc/self/ns/pid`` (``pid:[4026531836]``), unique per
  pid namespace within one boot;
* ``pid`` and ``start``: the pid, and its start time in clock ticks after boot
  (``/proc/<pid>/stat`` field 22), which tells a reused pid apart.

:func:`judge` answers :data:`ALIVE` or :data:`DEAD` only for a holder in *our*
host, boot and pid namespace (and only when our ``/proc`` shows our own pid
namespace); anything else is :data:`FOREIGN`: its liveness cannot be known
here, and callers fall back to a lease (an expiry time) or an age. A holder
record that lacks the namespace fields (written by an older apollo_cas) is
foreign too: it may come from another container with the same hostname.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

#: Verdicts of :func:`judge`.
ALIVE, DEAD, FOREIGN = "alive", "dead", "foreign"


@dataclass(frozen=True)
class Holder:
    """Who holds something: enough to judge later whether it still runs."""

    host: str
    boot_id: str
    pid_ns: str
    pid: int
    start: str  # clock ticks after boot, as text ("" if unknown)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


_CONTEXT: dict[int, tuple[str, str, str]] = {}


def _context() -> tuple[str, str, str]:
    """(host, boot id, pid namespace) of this process; ids are "" where unknown.

    The pid namespace counts only if the ``/proc`` we read belongs to it
    (``/proc/self`` is our own pid): a ``/proc`` of another namespace would
    answer pid questions about other processes than ``os.kill`` reaches.
    """
    pid = os.getpid()  # per pid: a forked child may live in a new pid namespace
    cached = _CONTEXT.get(pid)
    if cached is not None:
        return cached
    host = socket.gethostname()
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
        if os.readlink("/proc/self") != str(pid):
            ns = ""
    except OSError:
        ns = ""
    _CONTEXT[pid] = (host, boot, ns)
    return host, boot, ns


def proc_start(pid: int) -> str:
    """Start time of ``pid`` in clock ticks after boot, or "" if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, T, Z, ...), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        return text[text.rfind(b")") + 2 :].split()[0].decode()
    except (OSError, IndexError):
        return ""


def current() -> Holder:
    """This process."""
    host, boot, ns = _context()
    pid = os.getpid()  # not cached: a forked child is another process
    return Holder(host=host, boot_id=boot, pid_ns=ns, pid=pid, start=proc_start(pid))


def same_context(h: Holder) -> bool:
    """Whether ``h``'s pid can be judged here: same host, boot and pid namespace."""
    host, boot, ns = _context()
    return bool(boot and ns) and (h.host, h.boot_id, h.pid_ns) == (host, boot, ns)


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether ``pid`` of *this* pid namespace runs, and (given ``start``) is still
    the process that started then. Zombies are dead. Callers that hold a
    record from elsewhere use :func:`judge` instead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    if process_state(pid) in ("Z", "X"):
        return False
    now = proc_start(pid)
    return not start or not now or now == start


def judge(h: Holder) -> str:
    """:data:`ALIVE`, :data:`DEAD`, or :data:`FOREIGN` (cannot be known here)."""
    if not same_context(h):
        return FOREIGN
    return ALIVE if pid_alive(h.pid, h.start) else DEAD


# ---------------------------------------------------------------------- tags in file names


def _context_digest(host: str, boot: str, ns: str) -> str:
    return hashlib.sha256(f"{host}\0{boot}\0{ns}".encode()).hexdigest()[:8]


_TAGS: dict[int, str] = {}


def tag() -> str:
    """This process as a short token for temporary file names: ``<pid>.<ctx>.<start>``.

    ``ctx`` is a digest of host, boot id and pid namespace; the token holds no
    ``-`` so it can lead a ``-``-separated name. See :func:`judge_tag`.
    """
    pid = os.getpid()
    token = _TAGS.get(pid)
    if token is None:  # computed once per process: chunk writes name a temporary each
        me = current()
        token = f"{me.pid}.{_context_digest(me.host, me.boot_id, me.pid_ns)}.{me.start or 0}"
        _TAGS[pid] = token
    return token


def judge_tag(token: str) -> str:
    """Judge the writer named by a :func:`tag` token. A bare pid (names written
    by older versions) or anything unparseable is :data:`FOREIGN`."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        return FOREIGN
    host, boot, ns = _context()
    if not (boot and ns) or parts[1] != _context_digest(host, boot, ns):
        return FOREIGN
    start = "" if parts[2] == "0" else parts[2]
    return ALIVE if pid_alive(int(parts[0]), start) else DEAD
