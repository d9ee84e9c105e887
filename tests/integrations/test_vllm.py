"""The vLLM worker extension on real torch modules (CPU), in a worker-shaped object.

vLLM cannot be installed here (its wheel pins another torch and CUDA), so the
worker is a stand-in with the attribute names vLLM's worker has
(``model_runner.model`` behind a CUDA-graph-style wrapper, ``rank``,
``device``, ``parallel_config``) and its weight-update entry points. Every
reply goes through ``json.dumps``, as the dev-mode HTTP endpoint would send it.
Synchronisation with the background saver is by conditions, never by sleeping.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from apollo_cas import Store
from apollo_cas.backends.memory import MemoryBackend
from apollo_cas.integrations.vllm import ApolloCasWorkerExtension
from apollo_cas.integrations.vllm.collect import collect_tensors, unwrap_model
from apollo_cas.integrations.vllm.ops import save_module
from apollo_cas.integrations.vllm.periodic import PeriodicSaver, UpdateGuard


class GraphWrapper:
    """Like vLLM's CUDAGraphWrapper: not an nn.Module; ``runnable`` and ``unwrap()``."""

    def __init__(self, runnable: nn.Module) -> None:
        self.runnable = runnable

    def unwrap(self) -> nn.Module:
        return self.runnable


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        # vLLM keeps quantization scales as plain tensor attributes, and the KV
        # cache as a list attribute: the first is state, the second is not.
        self._k_scale = torch.tensor(1.0)
        self.kv_cache = [torch.zeros(4, d)]


class Model(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(128, d)
        self.layers = nn.ModuleList(Attention(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 128, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: stored once
        self.register_buffer("rope_cache", torch.arange(256, dtype=torch.float32))
        self.to(torch.bfloat16)
        for layer in self.layers:
            layer._k_scale = torch.tensor(0.5 + seed)


class Worker(ApolloCasWorkerExtension):
    """A worker-shaped object: vLLM mixes the extension into its Worker the same way."""

    def __init__(self, model: nn.Module, rank: int = 0, tp: int = 1) -> None:
        self.model_runner = SimpleNamespace(model=GraphWrapper(model))
        self.rank = rank
        self.local_rank = rank
        self.device = torch.device("cpu")
        self.parallel_config = SimpleNamespace(
            tensor_parallel_size=tp,
            pipeline_parallel_size=1,
            data_parallel_size=1,
            data_parallel_rank=0,
        )
        self.updates: list[str] = []

    # vLLM's weight-transfer entry points (worker side)
    def start_weight_update(self) -> None:
        self.updates.append("start")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        model = self.model_runner.model.unwrap()
        with torch.no_grad():
            model.norm.weight.add_(float(update_info["delta"]))
        self.updates.append("update")

    def finish_weight_update(self) -> None:
        self.updates.append("finish")


def call(worker: Worker, method: str, **kwargs: Any) -> dict[str, Any]:
    """collective_rpc's view of one worker: the method by name, the reply as JSON
    (strict, as the HTTP endpoint's JSONResponse: no NaN or infinity)."""
    reply = getattr(worker, method)(**kwargs)
    return json.loads(json.dumps(reply, allow_nan=False))


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def state(model: nn.Module) -> dict[str, bytes]:
    return {n: raw(t) for n, t in collect_tensors(model).tensors.items()}


def test_extension_attributes_cannot_clash_with_a_vllm_worker() -> None:
    # vLLM asserts that no extension attribute (dunders aside) exists on its worker.
    names = [a for a in dir(ApolloCasWorkerExtension) if not a.startswith("__")]
    assert names and all(a.startswith(("apollo_", "_apollo_")) for a in names)


def test_collect_unwraps_and_takes_attributes_once() -> None:
    model = Model()
    c = collect_tensors(GraphWrapper(model))
    assert unwrap_model(GraphWrapper(model)) is model
    assert "layers.0._k_scale" in c.tensors and "layers.1._k_scale" in c.attributes
    assert not any("kv_cache" in n or "runnable" in n for n in c.tensors)
    assert "rope_cache" in c.tensors
    # The tied head is the embedding's memory: one tensor, one alias.
    assert c.aliases == {"lm_head.weight": "embed_tokens.weight"}
    assert "lm_head.weight" not in c.tensors


def test_save_and_restore_round_trip_through_the_extension(tmp_path: Path) -> None:
    model = Model()
    w = Worker(model)
    store = str(tmp_path / "store")
    before = state(model)
    saved = call(w, "apollo_save", store=store, tag="base", block_size="65536")
    assert saved["ok"], saved
    assert saved["tensors"] == len(before) and saved["module_attributes"] == 2
    assert saved["rank"] == 0 and saved["world_size"] == 1 and saved["tag"] == "base"

    with torch.no_grad():  # weights, a scale attribute and a buffer drift
        model.layers[0].qkv_proj.weight[:3] += 1
        model.layers[1]._k_scale.fill_(9.0)
        model.rope_cache.zero_()
    assert state(model) != before
    dry = call(w, "apollo_restore", store=store, ref="base", dry_run="true")
    assert dry["ok"] and dry["dry_run"] and dry["blocks_written"] == 3
    assert state(model) != before

    restored = call(w, "apollo_restore", store=store, ref="base")
    assert restored["ok"], restored
    assert restored["verified"] and restored["blocks_written"] == 3
    assert restored["checkpoint"] == saved["checkpoint"]
    assert set(restored["must_pause"]) == {"serving", "weight_updates", "prefix_cache"}
    assert state(model) == before
    # The tied head sees the restored embedding (same memory).
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)

    listing = call(w, "apollo_list", store=store)
    assert listing["ok"] and listing["latest"] == saved["checkpoint"]
    assert [r["id"] for r in listing["checkpoints"]] == [saved["checkpoint"]]
    stats = call(w, "apollo_stats", store=store, totals="true")
    assert stats["ok"] and stats["checkpoint"]["id"] == saved["checkpoint"]
    assert stats["store"]["checkpoints"] == 1


def test_non_contiguous_weights_restore_in_place(tmp_path: Path) -> None:
    # vLLM's fp8 layers keep a transposed view as the weight after loading.
    model = Model()
    lin = model.layers[0].qkv_proj
    lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t(), requires_grad=False)
    assert not lin.weight.is_contiguous()
    w = Worker(model)
    assert call(w, "apollo_save", store=str(tmp_path / "s"))["ok"]
    before = raw(lin.weight)
    with torch.no_grad():
        lin.weight.mul_(2)
    r = call(w, "apollo_restore", store=str(tmp_path / "s"))
    assert r["ok"] and r["non_contiguous"] == 1, r
    assert raw(lin.weight) == before and not lin.weight.is_contiguous()


def test_two_ranks_join_one_group_and_restore_their_own_shard(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ws = [Worker(Model(seed=r), rank=r, tp=2) for r in (0, 1)]
    no_group = call(ws[0], "apollo_save", store=store)
    assert not no_group["ok"] and "group" in no_group["error"]
    replies = [call(w, "apollo_save", store=store, group="step-1") for w in ws]
    assert all(r["ok"] for r in replies), replies
    assert [r["series"] for r in replies] == ["default.rank0", "default.rank1"]
    st = Store.open(store)
    g = st.group("step-1")
    assert g.complete and g.world_size == 2
    for r in (0, 1):
        src = st.manifest(g.members[r]).source
        assert (src.rank, src.world_size, src.metadata["tp_rank"]) == (r, 2, str(r))

    befores = [state(w.model_runner.model.unwrap()) for w in ws]
    for w in ws:
        with torch.no_grad():
            w.model_runner.model.unwrap().norm.weight.add_(1)
    for r, w in enumerate(ws):
        out = call(w, "apollo_restore", store=store, group="step-1")
        assert out["ok"] and out["checkpoint"] == g.members[r], out
        assert state(w.model_runner.model.unwrap()) == befores[r]
    # A rank never takes another rank's shard.
    wrong = call(ws[1], "apollo_restore", store=store, ref=g.members[0])
    assert not wrong["ok"] and "rank 0" in wrong["error"]
    groups = call(ws[0], "apollo_list", store=store)["groups"]
    assert [(x["name"], x["complete"], x["consistent"]) for x in groups] == [("step-1", True, True)]


def test_update_entry_points_hold_the_guard(tmp_path: Path) -> None:
    w = Worker(Model())
    watched = call(w, "apollo_watch_updates")["watched"]
    assert {"start_weight_update", "update_weights", "finish_weight_update"} <= set(watched)
    guard = w.__dict__["_apollo_state"].guard
    w.start_weight_update()
    assert guard.updating_now
    w.update_weights({"delta": 1})  # a chunk of the session: still one update
    w.finish_weight_update()
    assert not guard.updating_now and w.updates == ["start", "update", "finish"]
    w.update_weights({"delta": 1})  # the two-call protocol of older vLLM: wrapped alone
    assert not guard.updating_now and guard.generation == 2


def test_an_update_waits_only_for_the_snapshot() -> None:
    guard = UpdateGuard()
    done = threading.Event()

    def update() -> None:
        with guard.updating(weight_version=3):
            pass
        done.set()

    with guard.snapshot():
        t = threading.Thread(target=update)
        t.start()
        assert guard.wait_for_waiters(1)
        assert not done.is_set() and not guard.updating_now
    t.join(10)
    assert done.is_set() and guard.weight_version == "3"


def test_periodic_save_waits_for_an_update_and_records_its_version(tmp_path: Path) -> None:
    model = Model()
    w = Worker(model)
    store = str(tmp_path / "store")
    started = call(w, "apollo_start_periodic", store=store, interval_minutes="600")
    assert started["ok"] and started["running"], started
    guard = w.__dict__["_apollo_state"].guard
    saver = w.__dict__["_apollo_state"].saver
    try:
        w.start_weight_update()  # wrapped: weights are changing from here
        assert call(w, "apollo_periodic_now")["ok"]
        assert guard.wait_for_waiters(1)  # the saver is blocked on the guard ...
        assert Store.open(store).latest() is None  # ... and has saved nothing
        w.update_weights({"delta": 2})
        call(w, "apollo_set_weight_version", weight_version="7")
        w.finish_weight_update()
        assert saver.wait_for(saves=1)
    finally:
        assert call(w, "apollo_stop_periodic")["stopped"]
    status = call(w, "apollo_periodic_status")
    assert status == {"ok": True, "running": False}
    st = Store.open(store)
    m = st.manifest(st.latest())
    assert m.source.metadata["weight_version"] == "7"
    assert m.source.metadata["trigger"] == "periodic"
    loaded = st.load()
    assert raw(loaded["norm.weight"]) == raw(model.norm.weight)  # after the update


class FlakyBackend(MemoryBackend):
    """Fails the first ``failures`` writes of checkpoint data (chunks, packs or
    manifests: whichever the store format writes), as a full disk or a dropped
    S3 PUT would."""

    DATA = ("chunks/", "packs/", "manifests/")

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _maybe_fail(self, key: str) -> None:
        if key.startswith(self.DATA) and self.failures > 0:
            self.failures -= 1
            raise OSError("injected write failure")

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._maybe_fail(key)
        super().put(key, data, durable=durable)

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        self._maybe_fail(key)
        return super().put_if_absent(key, data, durable=durable)


def test_periodic_failure_is_logged_retried_and_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store(FlakyBackend(failures=1))
    model = Model()
    saver = PeriodicSaver(lambda slot: save_module(store, model), interval=1e6, backoff=0.0)
    caplog.set_level(logging.WARNING, logger="apollo_cas.integrations.vllm.periodic")
    saver.start()
    try:
        saver.trigger()
        assert saver.wait_for(saves=1, failures=1)
        assert saver.running  # the failure did not end the thread
    finally:
        assert saver.stop()
    st = saver.status()
    assert (st.saves, st.failures, st.consecutive_failures) == (1, 1, 0)
    assert st.last_result is not None and st.last_result["ok"]
    json.dumps(st.to_dict())
    assert any("injected write failure" in r.getMessage() for r in caplog.records)
    assert store.latest() == st.last_result["checkpoint"]


def test_periodic_failures_back_off() -> None:
    clock = [1000.0]
    calls: list[float] = []
    saver = PeriodicSaver(
        lambda slot: calls.append(slot) or (_ for _ in ()).throw(OSError("down")),
        interval=100.0,
        backoff=4.0,
        clock=lambda: clock[0],
    )
    saver.start()
    try:
        saver.trigger()
        assert saver.wait_for(failures=1)
        assert saver.status().next_attempt == 1004.0  # backoff after the first failure
        clock[0] = 1004.0
        saver.trigger()
        assert saver.wait_for(failures=2)
        assert saver.status().next_attempt == 1012.0  # doubled
        assert calls == [1000.0, 1000.0]  # the retry belongs to the same slot
    finally:
        saver.stop()


class RacingGuard(UpdateGuard):
    """A writer that ignores the guard: changes the weights right after the digests."""

    def __init__(self, change: Any) -> None:
        super().__init__()
        self.snapshots = 0
        self.change = change

    def snapshot(self, timeout: float | None = None) -> Any:
        inner = super().snapshot(timeout)
        guard = self

        class _Ctx:
            def __enter__(self) -> int:
                return inner.__enter__()

            def __exit__(self, *exc: Any) -> None:
                inner.__exit__(*exc)
                guard.snapshots += 1
                if guard.snapshots == 1:  # right after the first attempt's digests
                    guard.change()

        return _Ctx()


def test_a_block_changed_while_fetching_is_caught_and_the_save_retried() -> None:
    model = Model()

    def change() -> None:
        with torch.no_grad():
            model.layers[0].qkv_proj.weight.add_(1)

    store = Store(MemoryBackend())
    out = save_module(store, model, guard=RacingGuard(change), block_size=4096)
    assert out["ok"] and out["attempts"] == 2
    loaded = store.load()
    assert raw(loaded["layers.0.qkv_proj.weight"]) == raw(model.layers[0].qkv_proj.weight)


def test_export_handles_needs_cuda_tensors(tmp_path: Path) -> None:
    out = call(Worker(Model()), "apollo_export_handles", path=str(tmp_path / "h.pt"))
    assert not out["ok"] and "CUDA" in out["error"]
    assert not (tmp_path / "h.pt").exists()


def test_errors_are_json_replies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APOLLO_CAS_STORE", raising=False)
    w = Worker(Model())
    no_store = call(w, "apollo_save")
    assert not no_store["ok"] and "store" in no_store["error"]
    missing = call(w, "apollo_restore", store=str(tmp_path / "s"), ref="nope")
    assert not missing["ok"] and missing["error_type"] == "RefNotFound"
    placement = call(Worker(Model(), rank=3, tp=4), "apollo_placement")
    assert (placement["rank"], placement["world_size"], placement["tp_rank"]) == (3, 4, "3")


def test_an_rpc_save_during_an_open_update_refuses_at_once(tmp_path: Path) -> None:
    # collective_rpc runs on the worker's main thread, which also runs the update:
    # waiting for finish_weight_update there would wait forever.
    w = Worker(Model())
    store = str(tmp_path / "s")
    call(w, "apollo_watch_updates")
    w.start_weight_update()
    out = call(w, "apollo_save", store=store)
    assert not out["ok"] and "being updated" in out["error"], out
    w.finish_weight_update()
    assert call(w, "apollo_save", store=store)["ok"]


class UpdateAfterCollect(UpdateGuard):
    """An update that runs after the save found the weights stable and before its hash."""

    def __init__(self, change: Any) -> None:
        super().__init__()
        self.calls = 0
        self.change = change

    def stable(self, timeout: float | None = None) -> tuple[int, str | None]:
        out = super().stable(timeout)
        self.calls += 1
        if self.calls == 1:
            threading.Thread(target=self._update).start()
            assert self.wait_for_generation(out[0] + 1)
        return out

    def _update(self) -> None:
        with self.updating(weight_version="after"):
            self.change()

    def wait_for_generation(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.generation >= n and not self._updating, 10)


def test_tensors_taken_before_an_update_are_taken_again() -> None:
    model = Model()

    def change() -> None:
        with torch.no_grad():
            model.norm.weight.add_(3)

    store = Store(MemoryBackend())
    out = save_module(store, model, guard=UpdateAfterCollect(change), block_size=4096)
    assert out["ok"] and out["attempts"] == 2 and out["weight_version"] == "after"
    assert raw(store.load()["norm.weight"]) == raw(model.norm.weight)


def test_a_restore_sets_the_version_of_the_weights_it_wrote(tmp_path: Path) -> None:
    model = Model()
    w = Worker(model)
    store = str(tmp_path / "s")
    assert call(w, "apollo_save", store=store, tag="v5", weight_version="5")["ok"]
    call(w, "apollo_begin_update")
    with torch.no_grad():
        model.norm.weight.add_(1)
    call(w, "apollo_end_update", weight_version="9")
    assert call(w, "apollo_save", store=store)["weight_version"] == "9"
    assert call(w, "apollo_restore", store=store, ref="v5", dry_run="true")["ok"]
    assert w.__dict__["_apollo_state"].guard.weight_version == "9"  # a dry run changes nothing
    assert call(w, "apollo_restore", store=store, ref="v5")["weight_version"] == "5"
    after = call(w, "apollo_save", store=store, tag="again")
    # The restored weights are the v5 checkpoint's again (no new chunk), and say so.
    assert after["ok"] and after["weight_version"] == "5" and after["new_chunks"] == 0


def test_excluded_tensors_are_neither_saved_nor_restored(tmp_path: Path) -> None:
    model = Model()
    w = Worker(model)
    store = str(tmp_path / "s")
    out = call(w, "apollo_save", store=store, exclude=r"rope_cache$")
    assert out["ok"] and "rope_cache" not in Store.open(store).load()
    with torch.no_grad():
        model.rope_cache.zero_()
    assert call(w, "apollo_restore", store=store, exclude=r"rope_cache$")["ok"]
    assert not model.rope_cache.any()  # left as it was
    refused = call(w, "apollo_restore", store=store)  # without it: a name mismatch
    assert not refused["ok"] and "rope_cache" in refused["error"]


def test_stopping_the_saver_does_not_wait_for_an_open_update(tmp_path: Path) -> None:
    # The stop RPC runs on the thread that would finish the update: it must not
    # wait for the saver, which waits for the update.
    w = Worker(Model())
    store = str(tmp_path / "s")
    assert call(w, "apollo_start_periodic", store=store, interval_minutes="600")["ok"]
    guard = w.__dict__["_apollo_state"].guard
    saver = w.__dict__["_apollo_state"].saver
    w.start_weight_update()
    call(w, "apollo_periodic_now")
    assert guard.wait_for_waiters(1)
    assert call(w, "apollo_stop_periodic")["stopped"]
    assert not saver.running and saver.status().saves == 0
    w.finish_weight_update()
    assert Store.open(store).latest() is None


def test_a_save_that_may_not_wait_for_updates_still_waits_for_another_snapshot() -> None:
    # An RPC save (snapshot_timeout=0) meeting the periodic saver's hash: wait for it.
    guard = UpdateGuard()
    store = Store(MemoryBackend())
    model = Model()
    out: list[Any] = []
    t = threading.Thread(
        target=lambda: out.append(save_module(store, model, guard=guard, snapshot_timeout=0))
    )
    with guard.snapshot():
        t.start()
        assert guard.wait_for_waiters(1)
    t.join(30)
    assert out and out[0]["ok"]
