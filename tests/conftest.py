"""Shared fixtures for the whole suite.

* ``tmp_store``: path of a fresh store directory (created by its first save);
* ``make_model``: a generated transformer-shaped dict of tensors (embeddings,
  per-layer q/k/v/o, mlp, norms), any dtype, small by default;
* ``write_safetensors`` / ``write_pt`` / ``write_seed``: write tensors as a
  safetensors file (or shards + index), a ``torch.save`` state_dict, or the
  original tool's checkpoint directory (``weights.bin`` + ``weights.json`` with
  ``"torch.bfloat16"`` spellings, ``%Y-%m-%d-%H%M`` directory names, a
  ``latest`` symlink, optionally a half-written directory and a dangling
  ``latest``);
* ``run_cli``: the real ``apollo-cas`` (or ``apollo-checkpoint``) in a subprocess;
* ``snapshot``: every file of a directory with its bytes, to prove a failed
  command left a store as it was;
* ``tensor_bytes``: the raw bytes of a tensor (through a uint8 view).

Factories are returned as plain functions, so they also work inside
hypothesis examples (they hold no per-test state).
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from apollo_cas import dtypes
from apollo_cas.formats import flat
from apollo_cas.formats import safetensors as st_format

# ---------------------------------------------------------------------------
# tensors


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, any dtype (bf16, fp8, bool, 0-d)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values of ``dtype``: normal-ish weights for floats, random bytes for ints."""
    count = 1
    for s in shape:
        count *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def make_model(
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 96,
    intermediate: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A decoder-only transformer's state_dict with random weights (HF names)."""
    gen = torch.Generator().manual_seed(seed)
    inter = intermediate or hidden * 3 + 5  # odd on purpose: sizes off the block grid
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return {name: random_tensor(shape, dtype, gen) for name, shape in shapes.items()}


def assert_same_tensors(got: Mapping[str, Any], want: Mapping[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bit-exact, NaNs included)."""
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert tuple(g.shape) == tuple(w.shape), name
        assert tensor_bytes(g) == tensor_bytes(w), name


# ---------------------------------------------------------------------------
# source files


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, shards: int | None = None
) -> Path:
    """One safetensors file at ``path``; or, with ``shards``, that many files named
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` in
    directory ``path`` (returns the index)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if not shards:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = st_format.hf_shard_name(i, shards)
        # The library's writer, not apollo_cas's: sources are tested on files
        # apollo_cas did not make.
        save_file({k: tensors[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(len(tensor_bytes(t)) for t in tensors.values())
    index = path / st_format.INDEX
    index.write_bytes(st_format.index_bytes(weight_map, total, indent=None))
    return index


def write_pt(tensors: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(tensors), path)
    return path


def write_seed_checkpoint(
    directory: str | Path, tensors: Mapping[str, torch.Tensor], timestamp: str | None = None
) -> Path:
    """One checkpoint exactly as the original tool's dump wrote it: tensors back to
    back in sorted-name order, ``weights.json`` with ``str(tensor.dtype)``
    spellings, pretty-printed, and ``checkpoint-meta.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / flat.WEIGHTS, "wb") as f:
        entries = flat.write_weights(
            f, tensors, lambda t: (dtypes.from_torch(t.dtype), t.shape, tensor_bytes(t))
        )
    (d / flat.INDEX).write_bytes(flat.dumps_index(entries, indent=flat.TOOL_INDENT))
    (d / flat.META).write_bytes(flat.dumps_meta(timestamp or d.name, entries))
    return d


@dataclass
class SeedRoot:
    """What :func:`write_seed_root` made."""

    root: Path
    dirs: list[Path]  # whole checkpoints, oldest first
    timestamps: list[float]  # their times (UTC epoch seconds, from the names)
    models: list[dict[str, torch.Tensor]]
    half_written: list[Path] = field(default_factory=list)


def write_seed_root(
    root: str | Path,
    models: list[Mapping[str, torch.Tensor]],
    half_written: bool = False,
    dangling_latest: bool = False,
    start: dt.datetime | None = None,
    step_minutes: int = 10,
) -> SeedRoot:
    """The original tool's ``--checkpoint-dir``: one ``%Y-%m-%d-%H%M`` directory per
    model (written in order, ``step_minutes`` apart) and ``latest`` -> the newest.

    ``half_written`` adds a newer directory whose dump was cut short (partial
    ``weights.bin``, no index); ``dangling_latest`` points ``latest`` at a
    directory that does not exist (what the same-minute bug leaves)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t = start or dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    out = SeedRoot(root, [], [], [dict(m) for m in models])
    for m in models:
        name = t.strftime(flat.TIME_FORMAT)
        out.dirs.append(write_seed_checkpoint(root / name, m))
        out.timestamps.append(float(calendar.timegm(t.utctimetuple())))
        t += dt.timedelta(minutes=step_minutes)
    latest_target = out.dirs[-1].name if out.dirs else None
    if half_written:
        d = root / t.strftime(flat.TIME_FORMAT)
        d.mkdir()
        (d / flat.WEIGHTS).write_bytes(b"\x01" * 1000)  # cut off mid-dump: no index
        out.half_written.append(d)
        t += dt.timedelta(minutes=step_minutes)
    if dangling_latest:
        latest_target = t.strftime(flat.TIME_FORMAT)  # deleted by the same-minute bug
    if latest_target:
        os.symlink(latest_target, root / "latest")
    return out


# ---------------------------------------------------------------------------
# stores


def snapshot(directory: str | Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes); {} if it is missing."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---------------------------------------------------------------------------
# fixtures


def _fast_base() -> str | None:
    """A tmpfs to keep stores on: fsync per chunk costs ~3 ms on this disk and
    nothing on tmpfs, and no test here measures the disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@pytest.fixture
def fast_tmp_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh empty directory on tmpfs when there is one (else under ``tmp_path``)."""
    base = _fast_base()
    if base is None:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="apollo-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fast_mkdtemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """``fast_mkdtemp(prefix)``: a new directory on tmpfs (for module-scoped fixtures),
    removed at the end of the session."""
    made: list[Path] = []

    def mk(prefix: str = "tmp") -> Path:
        base = _fast_base()
        if base is None:
            return tmp_path_factory.mktemp(prefix)
        d = Path(tempfile.mkdtemp(prefix=f"apollo-test-{prefix}-", dir=base))
        made.append(d)
        return d

    yield mk
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fast_tmp_base() -> str | None:
    """Directory for ``tempfile.TemporaryDirectory(dir=...)`` in hypothesis examples."""
    return _fast_base()


@pytest.fixture
def tmp_store(fast_tmp_dir: Path) -> str:
    """Path of a store directory that does not exist yet (its first save creates it)."""
    return str(fast_tmp_dir / "store")


@pytest.fixture(scope="session", name="make_model")
def _make_model() -> Callable[..., dict[str, torch.Tensor]]:
    """``make_model(layers=2, hidden=64, vocab=96, dtype=torch.bfloat16, seed=0)``."""
    return make_model


@pytest.fixture(scope="session", name="write_safetensors")
def _write_safetensors() -> Callable[..., Path]:
    return write_safetensors


@pytest.fixture(scope="session", name="write_pt")
def _write_pt() -> Callable[..., Path]:
    return write_pt


@pytest.fixture(scope="session")
def write_seed() -> Callable[..., SeedRoot]:
    """``write_seed(root, models, half_written=False, dangling_latest=False)``."""
    return write_seed_root


@pytest.fixture(scope="session", name="write_seed_checkpoint")
def _write_seed_checkpoint() -> Callable[..., Path]:
    return write_seed_checkpoint


@pytest.fixture(scope="session", name="snapshot")
def _snapshot() -> Callable[[str | Path], dict[str, bytes]]:
    return snapshot


@pytest.fixture(scope="session", name="tensor_bytes")
def _tensor_bytes() -> Callable[[torch.Tensor], bytes]:
    return tensor_bytes


@pytest.fixture(scope="session", name="assert_same_tensors")
def _assert_same_tensors() -> Callable[..., None]:
    return assert_same_tensors


@pytest.fixture(scope="session", name="random_tensor")
def _random_tensor() -> Callable[..., torch.Tensor]:
    return random_tensor


def _cli_env(env: Mapping[str, str] | None) -> dict[str, str]:
    full = {
        k: v for k, v in os.environ.items() if k not in ("APOLLO_CAS_STORE", "APOLLO_CAS_DEBUG")
    }
    full["APOLLO_CAS_NO_PROGRESS"] = "1"
    if env:
        full.update(env)
    return full


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, env=None, prog="apollo-cas")``: the real command line in a
    subprocess with ``APOLLO_CAS_NO_PROGRESS=1`` (``APOLLO_CAS_STORE`` unset unless
    ``env`` sets it). ``prog="apollo-checkpoint"`` runs the compatibility entry point."""

    def run(
        *args: object,
        env: Mapping[str, str] | None = None,
        prog: str = "apollo-cas",
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        if prog == "apollo-cas":
            cmd = [sys.executable, "-m", "apollo_cas.cli.main"]
        elif prog == "apollo-checkpoint":
            cmd = [sys.executable, "-c", "from apollo_cas.cli.seed_compat import main; main()"]
        else:
            raise ValueError(f"unknown program {prog!r}")
        return subprocess.run(
            [*cmd, *map(str, args)],
            capture_output=True,
            text=True,
            env=_cli_env(env),
            timeout=timeout,
            check=False,
        )

    return run


# ---------------------------------------------------------------------------
# the fault suites' summary (tests/faults), also under pytest-xdist
#
# It lives here, not in tests/faults/conftest.py: with ``-n N`` the controller
# process collects nothing, so only this conftest's hooks run there. Each worker
# hands its counts over at the end of its session and the controller adds them up.

#: operation -> outcome -> count, filled by the tests, printed by the hook below.
FAULT_STATS: dict[str, Counter[str]] = {}
_WORKER_KEY = "apollo_cas_fault_stats"


@pytest.fixture
def fault_stats() -> dict[str, Counter[str]]:
    return FAULT_STATS


def pytest_configure(config: pytest.Config) -> None:
    # One seed for the whole run: xdist workers import the fault modules at
    # different instants, and would each draw their own from the clock. Set
    # before the workers start, so they inherit it.
    os.environ.setdefault("APOLLO_CAS_FAULT_SEED", str(int(time.time()) % 100_000))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Under pytest-xdist the tests marked slow (a minute or two each, most of the
    # suite's time) are handed out first: started last, they would keep one
    # worker busy long after the others ran out of work. Serial runs keep the
    # collection order.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput[_WORKER_KEY] = {op: dict(c) for op, c in FAULT_STATS.items()}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without pytest-xdist
def pytest_testnodedown(node: Any, error: object) -> None:
    for op, counts in getattr(node, "workeroutput", {}).get(_WORKER_KEY, {}).items():
        merged = FAULT_STATS.setdefault(op, Counter())
        if op.startswith("seed"):  # a value, not a count: the same in every worker
            for k in counts:
                merged[k] = 1
        else:
            merged.update(counts)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_STATS:
        return
    terminalreporter.section("apollo_cas fault injection")
    for op, counts in sorted(FAULT_STATS.items()):
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{op}: {parts}")


from s3server import s3_env, s3_location, s3_server  # noqa: E402, F401
