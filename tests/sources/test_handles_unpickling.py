"""Loading a handles file without running its pickle: the two-name allowlist
(apollo_cas.sources.handles.unpickling). Hostile pickles are crafted on the CPU."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import rebuild_cuda_tensor  # noqa: E402

from apollo_cas.errors import ApolloError, UnsafePickle, UnsupportedSource  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402
from tests.sources.handle_files import handle_args, write  # noqa: E402


def test_allowlist_is_two_names() -> None:
    names = sorted(name for _, name in handles.allowlist())  # type: ignore[misc]
    assert names == ["builtins.bytes", "torch.multiprocessing.reductions.rebuild_cuda_tensor"]


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.cmd,))


def test_pickle_that_runs_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = write(tmp_path / "evil.pt", {"w": {"handle": _Evil(f"touch {marker}")}})
    with pytest.raises(UnsafePickle) as ei:
        handles.read_handles(p)
    assert not marker.exists()
    msg = str(ei.value)
    assert str(p) in msg and "system" in msg and "\n" not in msg


class _CallsRebuild:
    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_cuda_tensor, handle_args())


def test_pickle_that_calls_the_rebuild_function_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path / "call.pt", {"w": _CallsRebuild()})
    with pytest.raises(UnsafePickle, match="called while unpickling"):
        handles.read_handles(p)


class _Eval:
    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, ("__import__('os').getpid()",))


class _BigBytes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (bytes, (10**12,))


class _Dunder:
    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, ("abc", "upper"))


@pytest.mark.parametrize("payload", [_Eval(), _BigBytes(), _Dunder()])
def test_other_code_paths_are_refused(tmp_path: Path, payload: object) -> None:
    p = write(tmp_path / "x.pt", {"w": {"handle": payload}})
    with pytest.raises(UnsafePickle):
        handles.read_handles(p)


def test_plain_pickle_with_global_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps({"w": {"handle": _Evil("true")}}, protocol=2))
    with pytest.raises(ApolloError) as ei:
        handles.read_handles(p)
    assert isinstance(ei.value, (UnsafePickle, UnsupportedSource))


def test_cpu_tensor_handles_are_refused(tmp_path: Path) -> None:
    from torch.multiprocessing.reductions import reduce_tensor

    p = write(tmp_path / "cpu.pt", {"w": {"handle": reduce_tensor(torch.ones(3))}})
    with pytest.raises(UnsafePickle, match="rebuild_tensor"):
        handles.read_handles(p)
