"""The vLLM worker extension: the glue between a vLLM worker and :mod:`.ops`.

vLLM appends the class named by ``--worker-extension-cls`` (or
``LLM(worker_extension_cls=...)``) to its worker class's bases, so these
methods run inside every worker process with ``self`` the worker, and
``collective_rpc("apollo_save", kwargs={...})`` calls them on every rank.
vLLM refuses an extension attribute that its worker already has, so every
attribute here starts with ``apollo_`` (methods) or ``_apollo_`` (state kept
in the worker's ``__dict__``, created on first use: the extension's
``__init__`` is never called).

What this reads from the worker (vLLM's documented names): ``model_runner.model``
(the model, possibly inside the CUDA-graph wrapper), ``device``, ``rank``,
``parallel_config`` (``tensor_parallel_size``, ``pipeline_parallel_size``,
``data_parallel_size``, ``data_parallel_rank``), and, when vLLM is importable,
``vllm.distributed.parallel_state``'s tensor- and pipeline-parallel rank and
size. Every reply is a JSON-serialisable ``dict`` with ``"ok"``; errors are
replies (``"ok": false, "error": ...``), so the dev-mode HTTP
``POST /collective_rpc`` returns them as JSON. Arguments arrive as strings over
HTTP and are converted here.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ApolloCasWorkerExtension", "worker_placement"]

_STATE_ATTR = "_apollo_state"


@dataclass
class _State:
    guard: Any  # UpdateGuard (imported lazily: this module loads in vLLM's config phase)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stores: dict[str, Any] = field(default_factory=dict)
    default_store: str | None = None
    saver: Any = None
    saver_interval: float = 600.0
    watched: list[str] = field(default_factory=list)
    session_open: bool = False
    sleep_level: int = 0
    awaiting_reload: bool = False


def _state(worker: Any) -> _State:
    st = worker.__dict__.get(_STATE_ATTR)
    if st is None:
        from .periodic import UpdateGuard

        st = worker.__dict__.setdefault(_STATE_ATTR, _State(guard=UpdateGuard()))
    return st


# ------------------------------------------------------------------------ arguments


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _store(worker: Any, location: Any) -> Any:
    from ... import settings
    from ...errors import UsageError
    from ...store import Store

    st = _state(worker)
    loc = _opt_str(location) or st.default_store or settings.store()
    if not loc:
        raise UsageError(
            "no store given", "pass store=PATH or s3://bucket/prefix, or set APOLLO_CAS_STORE"
        )
    with st.lock:
        store = st.stores.get(loc)
        if store is None:
            store = st.stores[loc] = Store.open(loc, create=True)
        st.default_store = st.default_store or loc
    return store


def worker_placement(worker: Any) -> tuple[int, int, dict[str, str], str]:
    """(rank, world size, metadata, series suffix) of a worker in its model-parallel group.

    The rank counts tensor- and pipeline-parallel workers of one model copy
    (``pp_rank * tp_size + tp_rank``). Data-parallel replicas save into series
    of their own (suffix ``.dp<r>``); their identical weights share chunks.
    """
    pc = getattr(worker, "parallel_config", None)
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    rank = int(getattr(worker, "rank", 0) or 0) % (tp * pp)
    tp_rank, pp_rank = rank % tp, rank // tp
    try:  # inside vLLM: the parallel state is the authority
        from vllm.distributed import parallel_state as ps

        tp_rank = int(ps.get_tensor_model_parallel_rank())
        tp = int(ps.get_tensor_model_parallel_world_size())
        pp_group = ps.get_pp_group()
        pp_rank, pp = int(pp_group.rank_in_group), int(pp_group.world_size)
    except Exception:  # not in vLLM (tests) or an older layout: the worker's attributes
        pass
    dp = int(getattr(pc, "data_parallel_size", 1) or 1)
    dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
    meta = {
        "tp_rank": str(tp_rank),
        "tp_size": str(tp),
        "pp_rank": str(pp_rank),
        "pp_size": str(pp),
    }
    suffix = ""
    if dp > 1:
        meta.update(dp_rank=str(dp_rank), dp_size=str(dp))
        suffix = f".dp{dp_rank}"
    return pp_rank * tp + tp_rank, tp * pp, meta, suffix


def _reply(worker: Any, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn``; an error becomes a JSON reply (and a log line), never a crash."""
    from ...errors import ApolloError

    try:
        return fn()
    except ApolloError as exc:
        log.warning("apollo_cas %s failed: %s", what, exc)
        return {"ok": False, "error": str(exc), "error_type": type(exc).__name__}
    except Exception as exc:
        log.exception("apollo_cas %s failed", what)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "error_type": "internal"}


# ------------------------------------------------------------------------- the class


class ApolloCasWorkerExtension:
    """apollo_cas inside a vLLM worker: save, restore, export, list, stats, periodic.

    Use ``--worker-extension-cls apollo_cas.integrations.vllm.ApolloCasWorkerExtension``
    (or ``LLM(worker_extension_cls=...)``) and call the methods through
    ``collective_rpc``; docs/VLLM.md has the recipes.
    """

    # -- helpers bound to the worker -------------------------------------------------
    def apollo_placement(self) -> dict[str, Any]:
        """This worker's rank, world size and parallel layout, as the store records them."""
        rank, world, meta, suffix = worker_placement(self)
        return {"ok": True, "rank": rank, "world_size": world, "series_suffix": suffix, **meta}

    def _apollo_common(self) -> tuple[Any, int, int, dict[str, str], str]:
        rank, world, meta, suffix = worker_placement(self)
        return self.model_runner.model, rank, world, meta, suffix  # type: ignore[attr-defined]

    # -- save / restore / export -----------------------------------------------------
    def apollo_save(
        self,
        store: str | None = None,
        tag: str | None = None,
        group: str | None = None,
        weight_version: str | None = None,
        series: str = "default",
        block_size: int | str | None = None,
        exclude: str | None = None,
    ) -> dict[str, Any]:
        """Save this rank's weights (parameters, buffers, tensor attributes) in process.

        ``exclude``: a regular expression; tensors whose names match are left out
        (use the same one to restore)."""

        def run() -> dict[str, Any]:
            from ...manifest import DEFAULT_BLOCK_SIZE
            from .ops import save_module

            model, rank, world, meta, suffix = self._apollo_common()
            return save_module(
                _store(self, store),
                model,
                rank=rank,
                world_size=world,
                series=series + suffix,
                tag=_opt_str(tag),
                group=_opt_str(group),
                weight_version=_opt_str(weight_version),
                guard=_state(self).guard,
                block_size=int(block_size or DEFAULT_BLOCK_SIZE),
                metadata={**meta, "trigger": "rpc"},
                exclude=_opt_str(exclude),
                # This runs on the worker's main thread, which also runs the updates:
                # waiting for one to finish would wait for ourselves.
                snapshot_timeout=0,
            )

        return _reply(self, "save", run)

    def apollo_restore(
        self,
        store: str | None = None,
        ref: str | None = None,
        group: str | None = None,
        series: str = "default",
        dry_run: bool | str = False,
        exclude: str | None = None,
    ) -> dict[str, Any]:
        """Write a checkpoint (or this rank's member of a group) into the live weights.

        Pause serving first; the reply's ``must_pause`` says what and why.
        """

        def run() -> dict[str, Any]:
            from .ops import restore_module

            model, rank, world, _meta, suffix = self._apollo_common()
            return restore_module(
                _store(self, store),
                model,
                rank=rank,
                world_size=world,
                ref=_opt_str(ref),
                group=_opt_str(group),
                series=series + suffix,
                guard=_state(self).guard,
                dry_run=_bool(dry_run),
                exclude=_opt_str(exclude),
            )

        return _reply(self, "restore", run)

    def apollo_export_handles(
        self,
        path: str = "/tmp/vllm_weight_handles.pt",
        include_meta: bool | str = True,
        exclude: str | None = None,
    ) -> dict[str, Any]:
        """Write this rank's CUDA IPC handles file for the cron path (docs/HANDLES.md)."""

        def run() -> dict[str, Any]:
            from .ops import export_handles_module

            model, rank, world, _meta, _suffix = self._apollo_common()
            return export_handles_module(
                model,
                path,
                rank=rank,
                world_size=world,
                include_meta=_bool(include_meta),
                exclude=_opt_str(exclude),
            )

        return _reply(self, "export_handles", run)

    # -- list / stats -----------------------------------------------------------------
    def apollo_list(self, store: str | None = None, series: str = "default") -> dict[str, Any]:
        """This rank's checkpoints and the store's groups."""

        def run() -> dict[str, Any]:
            from .listing import list_store

            rank, world, _meta, suffix = worker_placement(self)
            return list_store(
                _store(self, store), rank=rank, world_size=world, series=series + suffix
            )

        return _reply(self, "list", run)

    def apollo_stats(
        self,
        store: str | None = None,
        ref: str | None = None,
        series: str = "default",
        totals: bool | str = False,
    ) -> dict[str, Any]:
        """One checkpoint of this rank (default latest); with ``totals`` the whole store."""

        def run() -> dict[str, Any]:
            from .listing import stats_store

            rank, world, _meta, suffix = worker_placement(self)
            return stats_store(
                _store(self, store),
                ref=_opt_str(ref),
                rank=rank,
                world_size=world,
                series=series + suffix,
                totals=_bool(totals),
            )

        return _reply(self, "stats", run)

    # -- weight updates ---------------------------------------------------------------
    def apollo_watch_updates(self) -> dict[str, Any]:
        """Wrap vLLM's weight-update entry points present on this worker with the guard."""

        def run() -> dict[str, Any]:
            from .updates import watch_updates

            return {"ok": True, "watched": watch_updates(self, _state(self))}

        return _reply(self, "watch_updates", run)

    def apollo_begin_update(self) -> dict[str, Any]:
        """Weights are about to change (an update path apollo_cas does not wrap)."""

        def run() -> dict[str, Any]:
            _state(self).guard.begin_update()
            return {"ok": True}

        return _reply(self, "begin_update", run)

    def apollo_end_update(self, weight_version: str | None = None) -> dict[str, Any]:
        """The update is done; ``weight_version`` is recorded by the saves after it."""

        def run() -> dict[str, Any]:
            _state(self).guard.end_update(_opt_str(weight_version))
            return {"ok": True, "weight_version": _state(self).guard.weight_version}

        return _reply(self, "end_update", run)

    def apollo_set_weight_version(self, weight_version: str | None) -> dict[str, Any]:
        """Record the version vLLM's ``finish_weight_update(weight_version=...)`` set
        (the engine keeps it; workers are not told)."""

        def run() -> dict[str, Any]:
            _state(self).guard.set_weight_version(_opt_str(weight_version))
            return {"ok": True, "weight_version": _state(self).guard.weight_version}

        return _reply(self, "set_weight_version", run)

    # -- periodic mode ----------------------------------------------------------------
    def apollo_start_periodic(
        self,
        store: str | None = None,
        interval_minutes: float | str = 10,
        series: str = "default",
        block_size: int | str | None = None,
        backoff_seconds: float | str = 30,
    ) -> dict[str, Any]:
        """Save every ``interval_minutes`` from a background thread (see docs/VLLM.md)."""

        def run() -> dict[str, Any]:
            from ...manifest import DEFAULT_BLOCK_SIZE
            from .periodic import PeriodicSaver

            st = _state(self)
            target = _store(self, store)
            bs = int(block_size or DEFAULT_BLOCK_SIZE)
            from .updates import watch_updates

            watched = watch_updates(self, st)
            save = functools.partial(_periodic_save, self, target, series, bs)
            with st.lock:
                if st.saver is not None:
                    st.saver.stop(timeout=2.0)
                st.saver_interval = float(interval_minutes) * 60
                st.saver = PeriodicSaver(
                    save, st.saver_interval, backoff=float(backoff_seconds), guard=st.guard
                )
                st.saver.start()
            return {"ok": True, "watched": watched, **st.saver.status().to_dict()}

        return _reply(self, "start_periodic", run)

    def apollo_stop_periodic(self) -> dict[str, Any]:
        """Stop the periodic saver after the save in progress."""

        def run() -> dict[str, Any]:
            st = _state(self)
            with st.lock:
                saver, st.saver = st.saver, None
            # Short: this is the worker's main thread. A save being written finishes
            # on its own ("stopped": false until then).
            stopped = saver.stop(timeout=2.0) if saver is not None else True
            return {"ok": True, "stopped": stopped}

        return _reply(self, "stop_periodic", run)

    def apollo_periodic_now(self) -> dict[str, Any]:
        """Ask the periodic saver for a save now, on its thread (returns at once)."""

        def run() -> dict[str, Any]:
            from ...errors import UsageError

            saver = _state(self).saver
            if saver is None:
                raise UsageError("the periodic saver is not running", "call apollo_start_periodic")
            saver.trigger()
            return {"ok": True, "triggered": True}

        return _reply(self, "periodic_now", run)

    def apollo_periodic_status(self) -> dict[str, Any]:
        """Saves, failures, last error and next attempt of the periodic saver."""

        def run() -> dict[str, Any]:
            saver = _state(self).saver
            if saver is None:
                return {"ok": True, "running": False}
            return {"ok": True, **saver.status().to_dict()}

        return _reply(self, "periodic_status", run)


def _periodic_save(
    worker: Any, store: Any, series: str, block_size: int, slot: float
) -> dict[str, Any]:
    """One periodic save; raises on failure (the saver logs and retries)."""
    from .ops import save_module

    model, rank, world, meta, suffix = worker._apollo_common()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(slot))
    kwargs: dict[str, Any] = dict(
        rank=rank,
        world_size=world,
        series=series + suffix,
        group=f"periodic-{stamp}" if world > 1 else None,
        guard=_state(worker).guard,
        block_size=block_size,
        metadata={**meta, "trigger": "periodic", "slot": stamp},
        # A long update (or a sleep) fails this attempt instead of blocking the
        # thread forever; the saver logs it and retries with backoff.
        snapshot_timeout=_state(worker).saver_interval,
    )
    device = getattr(worker, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        # Our own stream: the hash does not queue behind the model's kernels.
        with torch.cuda.stream(torch.cuda.Stream(device=device)):
            return save_module(store, model, **kwargs)
    return save_module(store, model, **kwargs)
