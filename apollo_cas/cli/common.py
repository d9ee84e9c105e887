"""Options, rendering and progress shared by every command."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from ..errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

STORE_ENV = "APOLLO_CAS_STORE"

store_option = click.option(
    "--store",
    "store",
    envvar=STORE_ENV,
    metavar="STORE",
    help=f"Store directory or s3://bucket/prefix (default: ${STORE_ENV}).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."
)
series_option = click.option(
    "--series",
    default="default",
    show_default=True,
    metavar="NAME",
    help="Checkpoint series (one per writer: host, rank, run); each has its own 'latest'.",
)


def need_store(store: str | None) -> str:
    if not store:
        raise UsageError("no store given", f"pass --store STORE or set {STORE_ENV}")
    return store


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'1M', '1MiB', '4096', '512k' -> bytes (binary multiples; 'MB' means MiB too)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(
            f"cannot read {what} {text!r}", "use a number with an optional K/M/G suffix"
        )
    scale = 1024 ** ("kmgt".index(m.group(2).lower()) + 1) if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"


def ratio(x: float | None) -> str:
    if x is None or math.isinf(x):
        return "-"
    return f"{x:.2f}x"


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def note(message: str) -> None:
    """Human-readable remarks go to stderr; stdout is for results."""
    click.echo(message, err=True)


@contextmanager
def progress(
    total: int, label: str, enabled: bool = True
) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on stderr, only when stderr is a terminal."""
    if (
        not enabled
        or total <= 0
        or not sys.stderr.isatty()
        or os.environ.get("APOLLO_CAS_NO_PROGRESS")
    ):
        yield None
        return
    with click.progressbar(
        length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True, show_eta=True
    ) as bar:
        yield bar.update
