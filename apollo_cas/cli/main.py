"""``apollo-cas``: the entry point, and where errors become exit codes.

Exit codes come from one table (:mod:`apollo_cas.cli.exits`): 0 success, 1 error
(one line on stderr: what, and what to do), 2 usage error, 3 ``verify`` found
damage, 130 interrupted, 143 terminated.

Under ``--json`` an error is reported twice: the usual one line on stderr, and
on stdout one JSON object ``{"error": {"type", "message", "hint", "exit_code"}}``
(plus what was done before it, for commands that work through several items),
so that a script reading stdout always gets one JSON document.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from .. import frontend, settings
from ..allocator import keep_freed_memory
from ..errors import ApolloError
from . import demo, exits, maintenance, migrate, report, restore, save
from .common import emit_json


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="apollo_cas")
def cli() -> None:
    """apollo-cas: deduplicating, content-addressed checkpoints of model weights.

    Weights are split into blocks named by their XXH3-128 hash; blocks already in
    the store are skipped, new ones are compressed. Every checkpoint restores
    bit-exactly to safetensors, the original flat weights.bin + weights.json, or
    tensors in memory.

    STORE is a directory or s3://bucket/prefix; $APOLLO_CAS_STORE is the default.
    REF is a checkpoint id (any unique prefix of it), a tag, 'latest' (of the
    --series, 'default' unless given) or 'latest@SERIES'.

    Results go to stdout; --json works on every command (errors under --json are
    also a JSON object on stdout). Progress and notes go to stderr.

    \b
    Exit codes: 0 success
                1 error: not found, refused because of what the store holds,
                  unreadable source, I/O (one line on stderr)
                2 usage error: bad option, value or name
                3 verify found damage
                130 interrupted (Ctrl-C), 143 terminated (SIGTERM)
    """


for command in (
    save.save,
    restore.restore,
    report.list_cmd,
    report.stats,
    report.diff,
    report.tag,
    *maintenance.COMMANDS,
    migrate.migrate,
    demo.demo,
):
    cli.add_command(command)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every lock and temporary is
    released on the way out, as Ctrl-C does (a BaseException, like
    KeyboardInterrupt: no ``except Exception`` swallows it)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _wants_json(args: list[str]) -> bool:
    head = args[: args.index("--")] if "--" in args else args
    return "--json" in head


def error_json(exc: BaseException, code: int) -> dict[str, Any]:
    """The JSON document of an error (``--json``): what, what to do, the exit code."""
    if isinstance(exc, ApolloError):
        err = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    elif isinstance(exc, click.ClickException):
        err = {"type": "UsageError", "message": exc.format_message(), "hint": None}
    else:
        err = {"type": type(exc).__name__, "message": str(exc), "hint": None}
    done = getattr(exc, "done", None)  # what a command of several items finished first
    return {**(done or {}), "error": {**err, "exit_code": code}}


def run(
    group: click.Group,
    args: list[str] | None = None,
    prog: str = "apollo-cas",
    fe: frontend.Frontend = frontend.APOLLO_CAS,
) -> int:
    """Run a click group with apollo_cas's error contract; returns the exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    as_json = _wants_json(argv)
    debug = False  # read inside the try: a bad APOLLO_CAS_DEBUG is a usage error
    with frontend.using(fe), _sigterm_unwinds():
        try:
            debug = settings.debug()
            group.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.exceptions.Exit as exc:
            return int(exc.exit_code or 0)
        except click.ClickException as exc:
            exc.show()
            if as_json:
                emit_json(error_json(exc, exc.exit_code))
            return exc.exit_code
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            return exits.INTERRUPTED
        except ApolloError as exc:
            code = exits.code_for(exc)
            click.echo(f"error: {exc}", err=True)
            if debug:
                traceback.print_exc()
            if as_json:
                emit_json(error_json(exc, code))
            return code
        except KeyboardInterrupt:
            click.echo(
                "interrupted; the store is unchanged up to the last completed step", err=True
            )
            return exits.INTERRUPTED
        except Terminated:
            click.echo(
                "terminated (SIGTERM); the store is unchanged up to the last completed step",
                err=True,
            )
            return exits.TERMINATED
        except BrokenPipeError:
            return exits.ERROR
        except Exception as exc:  # a bug: still one line, with the way to get details
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} "
                "(set APOLLO_CAS_DEBUG=1 for a traceback and report it)",
                err=True,
            )
            if debug:
                traceback.print_exc()
            if as_json:
                emit_json(error_json(exc, exits.ERROR))
            return exits.ERROR
    return exits.OK


def main() -> None:
    keep_freed_memory()
    sys.exit(run(cli))


if __name__ == "__main__":
    main()
