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

from .. import frontend, settings
from ..errors import StoreNotFound, UsageError

#: A decorated command (what an option decorator takes and returns).
F = TypeVar("F", bound=Callable[..., Any])

STORE_ENV = settings.STORE  # click reads it for --store (envvar)

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


def need_store(store: str | None, origin: str | None = None) -> str:
    """The store location of this command, with where it came from recorded for
    error hints (``--store``, ``$APOLLO_CAS_STORE``, or ``origin``); a path that
    is a file is refused here, before any backend reads ``FILE/config``."""
    if not store:
        raise UsageError("no store given", f"pass --store STORE or set {STORE_ENV}")
    if origin is None:
        ctx = click.get_current_context(silent=True)
        from_env = (
            ctx is not None
            and ctx.get_parameter_source("store") == click.core.ParameterSource.ENVIRONMENT
        )
        origin = f"${STORE_ENV}" if from_env else "--store"
    frontend.set_store_origin(origin)
    if "://" not in store and os.path.exists(store) and not os.path.isdir(store):
        raise StoreNotFound(
            f"{store} (from {origin}) is a file, not an apollo_cas store",
            f"a store is a directory holding 'config': fix {origin}, or name a new "
            "directory for a new store",
        )
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
    if not enabled or total <= 0 or not sys.stderr.isatty() or settings.no_progress():
        yield None
        return
    with click.progressbar(
        length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True, show_eta=True
    ) as bar:
        yield bar.update
