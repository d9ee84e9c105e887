"""The opt-in allocator tuning the CLI applies at start-up and in-process callers may."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_keep_freed_memory_applies_on_glibc_without_importing_torch() -> None:
    code = (
        "import sys, apollo_cas; ok = apollo_cas.keep_freed_memory(); "
        "print(ok, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
