"""Weight updates of a vLLM worker, made to hold the update guard.

vLLM's worker changes its weights in a few named methods: the weight-transfer
session (``start_weight_update`` .. ``update_weights`` .. ``finish_weight_update``
of the weight-transfer API), ``reload_weights``, ``sleep`` / ``wake_up`` (level 1 offloads
the weights, level 2 discards them until the next reload), and the methods RL
frameworks' own extensions add. Each is replaced, on the worker instance, by a
wrapper that brackets it with ``UpdateGuard.begin_update`` / ``end_update``;
``collective_rpc`` looks methods up on the instance, so the wrappers are what
it calls. A name the worker does not have is skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["BEGIN_END", "watch_updates"]

#: Worker methods that change the weights, wrapped by ``apollo_watch_updates``:
#: vLLM's own, and the names RL frameworks' extensions add (vLLM's RLHF example's
#: ``update_weight``, checkpoint-engine's ``update_weights_from_ipc``).
BEGIN_END = (
    "reload_weights",
    "update_weights",
    "load_weights",
    "update_weight",
    "update_weights_from_ipc",
    "update_weights_from_ipc_handles",
)


def _wrap(worker: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    orig = getattr(worker, name, None)
    if orig is None or getattr(orig, "_apollo_wrapped", False):
        return False
    wrapper = functools.wraps(orig)(make(orig))
    wrapper._apollo_wrapped = True  # type: ignore[attr-defined]
    setattr(worker, name, wrapper)  # an instance attribute: collective_rpc finds it first
    return True


def watch_updates(worker: Any, st: Any) -> list[str]:
    """Make the weight-update entry points present on ``worker`` hold ``st.guard``.

    ``st`` is the extension's per-worker state (``guard``, ``watched``,
    ``session_open``, ``sleep_level``, ``awaiting_reload``). Returns every
    wrapped name; wrapping twice is a no-op.
    """
    g = st.guard

    def settle() -> None:  # a level-2 sleep's weights are garbage until reloaded
        if st.awaiting_reload:
            st.awaiting_reload = False
            g.end_update()

    def start(orig: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            g.begin_update()
            try:
                out = orig(*a, **k)
            except BaseException:
                g.end_update()
                raise
            st.session_open = True
            return out

        return run

    def finish(orig: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            try:
                return orig(*a, **k)
            finally:
                if st.session_open:
                    st.session_open = False
                    g.end_update()
                    settle()

        return run

    def around(orig: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            if st.session_open:  # a chunk of a start..finish session: already held
                return orig(*a, **k)
            with g.updating():
                out = orig(*a, **k)
            settle()
            return out

        return run

    def sleep(orig: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            level = int(k.get("level", a[0] if a else 1))
            g.begin_update()  # offloaded or discarded weights: no snapshot until awake
            st.sleep_level = level
            try:
                return orig(*a, **k)
            except BaseException:
                st.sleep_level = 0
                g.end_update()
                raise

        return run

    def wake(orig: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            out = orig(*a, **k)
            tags = k.get("tags", a[0] if a else None)
            if st.sleep_level and (tags is None or "weights" in tags):
                if st.sleep_level >= 2:
                    st.awaiting_reload = True  # held until the next finished update
                else:
                    g.end_update()
                st.sleep_level = 0
            return out

        return run

    done = []
    for name, make in (
        ("start_weight_update", start),
        ("start_draft_weight_update", start),
        ("finish_weight_update", finish),
        *((n, around) for n in BEGIN_END),
        ("sleep", sleep),
        ("wake_up", wake),
    ):
        if _wrap(worker, name, make):
            done.append(name)
    st.watched += done
    return st.watched
