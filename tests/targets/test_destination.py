"""The restore destination: its OS errors name it, and files a restore did not write stay.

Through the real CLI. The filesystems are real: a read-only tmpfs and tiny
tmpfs mounts (skipped where mounting is not permitted).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apollo_cas.errors import DiskFull
from apollo_cas.store import Store

from .failures import FailingReader

BS = 65536
MountFn = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[MountFn]:
    """``mount(size="2m", ro=False)``: a fresh tmpfs, unmounted afterwards."""
    made: list[Path] = []

    def mk(size: str = "2m", ro: bool = False) -> Path:
        d = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, check=False
        )
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
        made.append(d)
        return d

    yield mk
    for d in made:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def store(tmp_store: str) -> str:
    """A store of about 2.4 MB of incompressible weights in two tensors."""
    rng = np.random.default_rng(0)
    with Store.open(tmp_store, create=True, workers=2) as st:
        st.save(
            {f"t{i}": rng.integers(0, 256, 1_200_000, dtype=np.uint8) for i in range(2)},
            block_size=BS,
        )
    return tmp_store


def _one_line_about(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert "internal error" not in p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)


# ------------------------------------------------------------------------ OS errors


def test_a_read_only_destination(store: str, mount: MountFn, run_cli: Callable[..., Any]) -> None:
    ro = mount(ro=True)
    for to in (ro, ro / "sub"):
        p = run_cli("restore", "--store", store, "--to", to)
        _one_line_about(p, "read-only", str(ro), "--to")
        assert "apollo-cas gc" not in p.stderr and "store" not in p.stderr.replace("restore", "")


@pytest.mark.parametrize("fmt", ["safetensors", "flat"])
def test_a_destination_too_small_from_the_start(
    store: str, mount: MountFn, run_cli: Callable[..., Any], fmt: str
) -> None:
    tiny = mount("64k")
    p = run_cli("restore", "--store", store, "--to", tiny, "--format", fmt)
    _one_line_about(p, "no space left on the restore destination", str(tiny))
    assert "gc" not in p.stderr
    assert os.listdir(tiny) == []


def test_shards_that_fit_one_by_one_but_not_together(
    store: str, mount: MountFn, run_cli: Callable[..., Any]
) -> None:
    """Two 1.2 MB shards on a 2 MB tmpfs, decoded on threads: before, each shard's
    space check passed alone and the second write hit ENOSPC as an internal error."""
    small = mount("2m")
    p = run_cli(
        "restore",
        "--store",
        store,
        "--to",
        small,
        "--max-shard-size",
        "1500000",
        env={"APOLLO_CAS_PROCESSES": "0"},
    )
    _one_line_about(p, "no space left on the restore destination", str(small))
    assert "gc" not in p.stderr
    assert os.listdir(small) == []


def test_the_disk_filling_up_during_the_writes(
    store: str, mount: MountFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process fills the destination after the space check (thread path)."""
    dest = mount("3m")
    st = Store.open(store, workers=2)

    class FillsTheDisk(FailingReader):
        """Once a few chunks were read, another process takes the rest of the disk
        (through ``st.reader``: restores read chunk by chunk or a pack span at once)."""

        def _tick(self, k: int = 1) -> None:
            with self.lock:
                self.count += k
                if self.count < self.n or self.count - k >= self.n:
                    return
            with open(dest / "filler", "wb") as f:  # the rest of the filesystem
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass

    st.reader = FillsTheDisk(st.reader, 3)
    monkeypatch.setenv("APOLLO_CAS_PROCESSES", "0")
    with pytest.raises(DiskFull, match="no space left on the restore destination") as err:
        st.restore("latest", dest / "out", format="flat")
    assert str(dest / "out") in str(err.value) and "gc" not in str(err.value)
    assert os.listdir(dest / "out") == []


# --------------------------------------------------------------- files it did not write


def _save(root: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with Store.open(root, create=True) as st:
        st.save(
            {f"t{i}": rng.integers(0, 256, 3 * BS, dtype=np.uint8) for i in range(n)},
            block_size=BS,
        )


def test_a_restore_leaves_the_users_shards_alone(
    tmp_store: str, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    _save(tmp_store, 2, 1)
    to = tmp_path / "model"
    to.mkdir()
    theirs = to / "model-00001-of-00003.safetensors"
    theirs.write_bytes(b"the user's own file")
    p = run_cli("restore", "--store", tmp_store, "--to", to)
    assert p.returncode == 0, p.stderr
    assert theirs.read_bytes() == b"the user's own file"
    assert (to / "model.safetensors").exists()
    assert "warning" in p.stderr and theirs.name in p.stderr and str(to) in p.stderr


def test_a_restore_removes_the_stale_shards_it_wrote_itself(
    tmp_store: str, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    _save(tmp_store, 3, 2)
    to = tmp_path / "model"
    p = run_cli("restore", "--store", tmp_store, "--to", to, "--max-shard-size", "200000")
    assert p.returncode == 0, p.stderr
    shards = sorted(x.name for x in to.glob("model-*.safetensors"))
    assert len(shards) == 3 and (to / "model.safetensors.index.json").exists()
    theirs = to / "model-00009-of-00009.safetensors"
    theirs.write_bytes(b"not ours")
    p = run_cli("restore", "--store", tmp_store, "--to", to)  # one file this time
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in to.glob("*.safetensors")) == [
        "model-00009-of-00009.safetensors",
        "model.safetensors",
    ]
    assert not (to / "model.safetensors.index.json").exists()
    assert theirs.name in p.stderr and all(s not in p.stderr for s in shards)


def test_permission_denied_names_the_destination(tmp_path: Path) -> None:
    """EACCES cannot be provoked as root; the mapping itself, then."""
    import errno

    from apollo_cas.errors import PermissionDenied
    from apollo_cas.targets.files import destination_error

    err = destination_error(OSError(errno.EACCES, "Permission denied"), "creating", tmp_path / "x")
    assert isinstance(err, PermissionDenied)
    assert "restore destination" in err.message and str(tmp_path / "x") in err.message
    assert str(tmp_path) in (err.hint or "") and "gc" not in (err.hint or "")
