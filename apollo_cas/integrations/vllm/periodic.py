"""Saving from a background thread without racing weight updates.

Two pieces, both free of vLLM:

* :class:`UpdateGuard`: weight updates and snapshots exclude each other. An
  update (vLLM's ``start_weight_update`` .. ``finish_weight_update``, a
  ``reload_weights``, a hot restore) holds the guard from begin to end; a save
  takes the tensors while no update runs (:meth:`UpdateGuard.stable`, holding
  nothing) and holds the guard only while it takes the snapshot of block
  digests (the GPU hash: milliseconds, measured in
  benchmarks/results/vllm_extension.json), after checking that no update
  began in between. Fetching
  the changed blocks, compressing and writing happen after the guard is
  released, so an update never waits for more than one hash. If an update
  starts while blocks are still being fetched, the host re-hashes every
  fetched block against the digest taken under the guard
  (``ChunkStore.put_block``) and the save fails with ``CorruptChunk``; the
  caller retries (:func:`~apollo_cas.integrations.vllm.ops.save_module` does).
  Blocks not fetched are recorded as they were at the snapshot, so a
  checkpoint is always one consistent point in time.
* :class:`PeriodicSaver`: calls a save function every ``interval`` seconds on
  a daemon thread, at wall-clock multiples of the interval (so the ranks of a
  tensor-parallel model, each with its own saver, agree on the slot that
  names their group). A failure is logged and retried with exponential
  backoff (capped at the interval); nothing is raised into the caller.
  Stopping it interrupts a save that still waits for an update to end.

Tests drive both deterministically: :meth:`PeriodicSaver.trigger` runs a save
now, and :meth:`UpdateGuard.wait_for_waiters` / :meth:`PeriodicSaver.wait_for`
block on conditions instead of sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PeriodicSaver", "PeriodicStatus", "UpdateGuard"]


class UpdateGuard:
    """Mutual exclusion of weight updates (long, nested) and snapshots (short)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._updating = 0
        self._snapshotting = False
        self._waiters = 0
        self._interrupts = 0
        #: Incremented at every update's begin: a save can tell whether one started.
        self.generation = 0
        #: The weight version the last finished update announced (vLLM's, when known).
        self.weight_version: str | None = None

    # -- the update side -----------------------------------------------------------
    def begin_update(self) -> None:
        """Mark weights as changing; waits for a snapshot in progress (milliseconds)."""
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: not self._snapshotting)
            finally:
                self._waiters -= 1
            self._updating += 1
            self.generation += 1

    def end_update(self, weight_version: str | int | None = None) -> None:
        """Weights are stable again; ``weight_version`` (if given) is recorded by later saves."""
        with self._cond:
            if self._updating <= 0:
                raise RuntimeError("end_update without begin_update")
            self._updating -= 1
            if weight_version is not None:
                self.weight_version = str(weight_version)
            self._cond.notify_all()

    def set_weight_version(self, weight_version: str | int | None) -> None:
        with self._cond:
            self.weight_version = None if weight_version is None else str(weight_version)

    @contextlib.contextmanager
    def updating(self, weight_version: str | int | None = None) -> Iterator[None]:
        """``with guard.updating(): <change weights>``. The version is kept only on success."""
        self.begin_update()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.end_update(weight_version if ok else None)

    @property
    def updating_now(self) -> bool:
        with self._cond:
            return self._updating > 0

    # -- the snapshot side ---------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self, timeout: float | None = None) -> Iterator[int]:
        """Hold off updates while the block digests are taken; yields the generation.

        Waits until no update is running (at most ``timeout`` seconds, then
        ``TimeoutError``). Keep the body short: updates wait for it.
        """
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            mark = self._interrupts
            try:
                while True:
                    # ``timeout`` bounds the wait for updates; another snapshot
                    # takes milliseconds and is always waited for.
                    ok = self._cond.wait_for(
                        lambda: self._updating == 0 or self._interrupts != mark, timeout
                    )
                    if not ok or self._interrupts != mark:
                        raise TimeoutError("weights were being updated for the whole wait")
                    if not self._snapshotting:
                        break
                    self._cond.wait_for(lambda: not self._snapshotting or self._interrupts != mark)
            finally:
                self._waiters -= 1
            self._snapshotting = True
            gen = self.generation
        try:
            yield gen
        finally:
            with self._cond:
                self._snapshotting = False
                self._cond.notify_all()

    def stable(self, timeout: float | None = None) -> tuple[int, str | None]:
        """Wait until no update runs; (generation, weight version) at that moment.

        Nothing is held: a reader takes the tensors after this, then checks
        inside :meth:`snapshot` that the generation is unchanged (no update
        began since), so only the hash itself runs under the guard.
        """
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            mark = self._interrupts
            try:
                ok = self._cond.wait_for(
                    lambda: self._updating == 0 or self._interrupts != mark, timeout
                )
            finally:
                self._waiters -= 1
            if not ok or self._interrupts != mark:
                raise TimeoutError("weights were being updated for the whole wait")
            return self.generation, self.weight_version

    def interrupt_waits(self) -> None:
        """Make every snapshot or stable wait in progress give up (``TimeoutError``):
        a saver being stopped must not wait for an update to end. Updates are not
        affected."""
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    def wait_for_waiters(self, n: int, timeout: float = 10.0) -> bool:
        """Block until ``n`` threads wait on the guard (tests: no sleeps as sync)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiters >= n, timeout)


@dataclass
class PeriodicStatus:
    """What the periodic saver has done (JSON-ready)."""

    running: bool
    interval_seconds: float
    saves: int
    failures: int
    consecutive_failures: int
    last_success: float | None
    last_failure: float | None
    last_error: str | None
    last_result: dict[str, Any] | None
    next_attempt: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeriodicSaver:
    """Run ``save(slot)`` every ``interval`` seconds on a daemon thread.

    ``slot`` is the scheduled time (epoch seconds, a multiple of the interval)
    that the attempt belongs to; retries of a failed attempt keep its slot.
    ``backoff`` is the first retry delay, doubled per consecutive failure and
    capped at the interval. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        save: Callable[[float], dict[str, Any]],
        interval: float,
        *,
        backoff: float = 5.0,
        clock: Callable[[], float] = time.time,
        name: str = "apollo-cas-periodic",
        guard: UpdateGuard | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._save = save
        self.interval = float(interval)
        self.backoff = max(0.0, float(backoff))
        self._clock = clock
        self._name = name
        self._guard = guard
        self._cond = threading.Condition()
        self._stop = False
        self._kick = False
        self._thread: threading.Thread | None = None
        self._saves = 0
        self._failures = 0
        self._consecutive = 0
        self._last_success: float | None = None
        self._last_failure: float | None = None
        self._last_error: str | None = None
        self._last_result: dict[str, Any] | None = None
        self._next: float | None = None

    # -- control -----------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop after the save in progress (if any); True if the thread ended within
        ``timeout``. A save still waiting for an update to end (on ``guard``) gives up."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            t = self._thread
        if self._guard is not None:
            self._guard.interrupt_waits()
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    def trigger(self) -> None:
        """Run a save now (in the saver's thread), then return to the schedule."""
        with self._cond:
            self._kick = True
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._stop

    def status(self) -> PeriodicStatus:
        with self._cond:
            return PeriodicStatus(
                running=self.running,
                interval_seconds=self.interval,
                saves=self._saves,
                failures=self._failures,
                consecutive_failures=self._consecutive,
                last_success=self._last_success,
                last_failure=self._last_failure,
                last_error=self._last_error,
                last_result=self._last_result,
                next_attempt=self._next,
            )

    def wait_for(self, *, saves: int = 0, failures: int = 0, timeout: float = 30.0) -> bool:
        """Block until at least ``saves`` successes and ``failures`` failures happened."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._saves >= saves and self._failures >= failures, timeout
            )

    # -- the thread --------------------------------------------------------------
    def _slot_after(self, t: float) -> float:
        return (math.floor(t / self.interval) + 1) * self.interval

    def _run(self) -> None:
        slot = self._slot_after(self._clock())
        due = slot
        while True:
            with self._cond:
                self._next = due
                while not self._stop and not self._kick:
                    delay = due - self._clock()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stop:
                    self._next = None
                    return
                if self._kick:
                    self._kick = False
                    slot = math.floor(self._clock() / self.interval) * self.interval
            try:
                result = self._save(slot)
            except Exception as exc:  # never into the server: log, back off, retry
                if self._stop:
                    log.debug("apollo_cas periodic save abandoned at stop: %s", exc)
                    return
                with self._cond:
                    self._failures += 1
                    self._consecutive += 1
                    self._last_failure = self._clock()
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    delay = min(self.interval, self.backoff * 2 ** (self._consecutive - 1))
                    due = self._clock() + delay
                    self._next = due
                    self._cond.notify_all()
                log.warning(
                    "apollo_cas periodic save failed (%s); retrying in %.1f s",
                    self._last_error,
                    delay,
                    exc_info=True,
                )
                continue
            with self._cond:
                self._saves += 1
                self._consecutive = 0
                self._last_success = self._clock()
                self._last_error = None
                self._last_result = result
                slot = self._slot_after(self._clock())
                due = slot
                self._next = due
                self._cond.notify_all()
