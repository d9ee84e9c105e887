"""A source file that changes while it is saved (a trainer rewriting
model.safetensors in place): one clear error, nothing committed, never a
SIGBUS (issue 11, item 11).

The save runs in a real subprocess; its progress callback (an explicit seam of
``Store.save``) pauses it after the first block until the test has changed the
file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

SAVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from apollo_cas.backends import open_backend
    from apollo_cas.errors import ApolloError
    from apollo_cas.sources import open_path
    from apollo_cas.store import Store

    source, store, flag = sys.argv[1:4]
    paused = False

    def progress(n):
        global paused
        if not paused:
            paused = True
            Path(flag + ".paused").touch()
            while not os.path.exists(flag + ".go"):
                time.sleep(0.01)

    try:
        # As the CLI opens a store that does not exist yet: its first save creates it.
        with open_path(source) as src, Store(open_backend(store)) as st:
            st.save(src, block_size=65536, progress=progress)
    except ApolloError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print("saved")
    """
)


def _change_during_save(
    tmp_path: Path, source: Path, store: str, change
) -> subprocess.CompletedProcess[str]:
    flag = str(tmp_path / "flag")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(source), store, flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 60
    while not os.path.exists(flag + ".paused"):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    change(source)
    Path(flag + ".go").touch()
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 4)


def _rewrite_same_size(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(os.urandom(4096))
    # A real rewrite moves the mtime; make it move even on a coarse clock.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture
def big_model() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(8)}  # 32 MiB


@pytest.mark.parametrize("change", [_truncate, _rewrite_same_size], ids=["truncated", "rewritten"])
@pytest.mark.parametrize("kind", ["safetensors", "seed", "pt"])
def test_source_changed_during_save(
    tmp_path, tmp_store, big_model, write_safetensors, write_seed_checkpoint, write_pt, change, kind
):
    if kind == "safetensors":
        source = write_safetensors(big_model, tmp_path / "model.safetensors")
        changed = source
    elif kind == "pt":
        source = changed = write_pt(big_model, tmp_path / "model.pt")
    else:
        source = write_seed_checkpoint(tmp_path / "2025-03-01-1200", big_model)
        changed = source / "weights.bin"
    r = _change_during_save(tmp_path, source, tmp_store, lambda _: change(changed))
    assert r.returncode == 1, (r.returncode, r.stderr)  # not -7 (SIGBUS)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "changed while it was being saved" in lines[0]
    assert str(changed) in lines[0]
    assert not os.path.exists(tmp_store)  # the failed first save left no store behind


def test_file_replaced_by_rename_during_save_is_saved_whole(
    tmp_path, tmp_store, big_model, write_safetensors, assert_same_tensors
):
    """A writer that replaces the file by rename (the safe way) leaves the open
    file whole: the save completes with the bytes it started with."""
    source = write_safetensors(big_model, tmp_path / "model.safetensors")

    def replace(path: Path) -> None:
        other = write_safetensors({"x": torch.ones(3)}, tmp_path / "new.safetensors")
        os.replace(other, path)

    r = _change_during_save(tmp_path, source, tmp_store, replace)
    assert r.returncode == 0, r.stderr
    from apollo_cas.store import Store

    with Store.open(tmp_store) as st:
        assert_same_tensors(st.load(), big_model)
