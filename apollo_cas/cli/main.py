"""``apollo-cas``: the entry point, and where errors become exit codes.

Exit codes: 0 success, 1 error (one line on stderr: what, and what to do),
2 usage error, 3 ``verify`` found damage, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from ..errors import ApolloError
from . import demo, maintenance, migrate, report, restore, save
from .allocator import keep_freed_memory


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="apollo_cas")
def cli() -> None:
    """apollo-cas: deduplicating, content-addressed checkpoints of model weights.

    Weights are split into blocks named by their XXH3-128 hash; blocks already in
    the store are skipped, new ones are compressed. Every checkpoint restores
    bit-exactly to safetensors, the original flat weights.bin + weights.json, or
    tensors in memory.

    STORE is a directory or s3://bucket/prefix; $APOLLO_CAS_STORE is the default.
    REF is a checkpoint id (a unique prefix is enough), a tag, or 'latest'.
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


def run(group: click.Group, args: list[str] | None = None, prog: str = "apollo-cas") -> int:
    """Run a click group with apollo_cas's error contract; returns the exit code."""
    try:
        group.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except ApolloError as exc:
        click.echo(f"error: {exc}", err=True)
        if os.environ.get("APOLLO_CAS_DEBUG"):
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted; the store is unchanged up to the last completed step", err=True)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug: still one line, with the way to get details
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} "
            "(set APOLLO_CAS_DEBUG=1 for a traceback and report it)",
            err=True,
        )
        if os.environ.get("APOLLO_CAS_DEBUG"):
            traceback.print_exc()
        return 1
    return 0


def main() -> None:
    keep_freed_memory()
    sys.exit(run(cli))


if __name__ == "__main__":
    main()
