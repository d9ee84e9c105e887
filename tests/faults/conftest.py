"""Fixtures of the fault suite, and a summary of what it tried (printed at the end)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

#: operation -> outcome -> count, filled by the tests, printed by the hook below.
FAULT_STATS: dict[str, Counter[str]] = {}


@pytest.fixture
def fault_stats() -> dict[str, Counter[str]]:
    return FAULT_STATS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_STATS:
        return
    terminalreporter.section("apollo_cas fault injection")
    for op, counts in sorted(FAULT_STATS.items()):
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{op}: {parts}")
