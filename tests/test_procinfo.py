"""procinfo: which processes can be judged here, and whether they still run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from apollo_cas import procinfo
from apollo_cas.procinfo import ALIVE, DEAD, FOREIGN, Holder

pytestmark = pytest.mark.skipif(
    not procinfo.current().boot_id or not procinfo.current().pid_ns,
    reason="needs Linux /proc (boot id, pid namespace)",
)


def dead_pid() -> tuple[int, str]:
    """The pid and start time of a process that has exited (and been reaped)."""
    p = subprocess.Popen(
        [sys.executable, "-c", "from apollo_cas import procinfo; print(procinfo.current().start)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = p.communicate(timeout=30)
    return p.pid, out.strip()


def test_this_process_is_alive_and_a_reused_pid_is_not() -> None:
    me = procinfo.current()
    assert me.pid == os.getpid() and me.start.isdigit()
    assert procinfo.judge(me) == ALIVE
    assert procinfo.judge(replace(me, start=str(int(me.start) + 1))) == DEAD  # pid reused


def test_an_exited_process_is_dead() -> None:
    pid, start = dead_pid()
    assert procinfo.judge(replace(procinfo.current(), pid=pid, start=start)) == DEAD


def test_a_zombie_is_dead() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while procinfo.process_state(p.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert not procinfo.pid_alive(p.pid)
    finally:
        p.wait()


@pytest.mark.parametrize(
    "change",
    [
        {"pid_ns": "pid:[4026530001]"},
        {"boot_id": "00000000-0000-4000-8000-000000000000"},
        {"host": "another-host.example"},
        {"boot_id": "", "pid_ns": ""},  # a record of an older version
    ],
)
def test_holders_elsewhere_are_foreign_even_with_a_live_pid(change: dict[str, str]) -> None:
    me = procinfo.current()
    assert procinfo.judge(replace(me, **change)) == FOREIGN
    pid, start = dead_pid()
    assert procinfo.judge(replace(me, pid=pid, start=start, **change)) == FOREIGN


def test_tags_in_file_names() -> None:
    token = procinfo.tag()
    assert "-" not in token and token.startswith(f"{os.getpid()}.")
    assert procinfo.judge_tag(token) == ALIVE
    pid, ctx, start = token.split(".")
    dead, dead_start = dead_pid()
    assert procinfo.judge_tag(f"{dead}.{ctx}.{dead_start}") == DEAD
    assert procinfo.judge_tag(f"{pid}.{ctx}.{int(start) + 1}") == DEAD  # pid reused
    assert procinfo.judge_tag(f"{dead}.00000000.{dead_start}") == FOREIGN
    assert procinfo.judge_tag(str(dead)) == FOREIGN  # an old name: a bare pid
    assert procinfo.judge_tag("apollo") == FOREIGN


def test_a_process_in_its_own_pid_namespace_is_foreign() -> None:
    exe = shutil.which("unshare")
    prefix = [exe or "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if exe is None or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("cannot create a pid namespace here")
    code = "import json; from apollo_cas import procinfo; print(json.dumps(procinfo.current().__dict__), procinfo.tag())"
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    record, token = out.rsplit(" ", 1)
    other = Holder(**json.loads(record))
    me = procinfo.current()
    assert other.pid == 1 and other.pid_ns != me.pid_ns
    assert (other.host, other.boot_id) == (me.host, me.boot_id)
    assert procinfo.judge(other) == FOREIGN
    assert procinfo.judge_tag(token.strip()) == FOREIGN


def test_handles_of_an_exporter_in_another_pid_namespace_are_not_judged_by_pid(
    tmp_path: Path,
) -> None:
    """The exporter's pid means nothing here: the owner check must not call its
    server gone (before, only --no-owner-check helped)."""
    from apollo_cas.errors import StaleHandles
    from apollo_cas.sources.handles import HandlesFile, check_owner

    me = procinfo.current()
    pid, start = dead_pid()
    meta = {"pid": pid, "pid_start": int(start), "hostname": me.host, "boot_id": me.boot_id}
    here = HandlesFile(tmp_path / "h", (), {**meta, "pid_ns": me.pid_ns}, time.time())
    with pytest.raises(StaleHandles, match="is gone"):
        check_owner(here)
    elsewhere = replace(here, meta={**meta, "pid_ns": "pid:[4026530001]"})
    assert check_owner(elsewhere)["owner_pid"] == str(pid)
