"""Options shared by commands that write chunks: the block size and the codecs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import click

from .. import codecs
from ..manifest import DEFAULT_BLOCK_SIZE
from ..store import check_block_size
from .common import F, human_bytes, note, parse_size

#: Below this, the object count gets large enough to hurt (4 KiB, the original
#: tool's default, makes 256 objects per MiB of weights).
SMALL_BLOCK_WARNING = 64 * 1024


def block_size_option(default: str | None = "1MiB") -> Callable[[F], F]:
    """``--block-size SIZE``; without a ``default`` a save keeps its series' block size."""
    return click.option(
        "--block-size",
        default=default,
        show_default=default is not None,
        metavar="SIZE",
        help="Block size (bytes, or with K/M suffix). 1 MiB balances dedup "
        "granularity against object count."
        + ("" if default else " Default: the series' latest checkpoint's, else 1 MiB."),
    )


def checked_block_size(text: str, warn: bool = True) -> int:
    """``--block-size`` read and range-checked (a usage error), warned about if small."""
    bs = check_block_size(parse_size(text, "block size"))  # a usage error before any warning
    if warn:
        warn_block_size(bs)
    return bs


def warn_block_size(bs: int) -> None:
    """A note on stderr for a block size that makes too many objects."""
    if bs < SMALL_BLOCK_WARNING:
        note(
            f"warning: block size {bs} makes {(1 << 30) // max(bs, 1):,} objects per GiB of weights; "
            f"the default {human_bytes(DEFAULT_BLOCK_SIZE)} is much cheaper to store and list"
        )


def codec_options(fn: F) -> F:
    fn = click.option(
        "--delta/--no-delta",
        default=None,
        help="Store changed blocks as XOR deltas against the parent's block "
        "when smaller (default: the codec policy's).",
    )(fn)
    fn = click.option(
        "--level", type=int, default=1, show_default=True, help="zstd level (-7..22)."
    )(fn)
    fn = click.option(
        "--codec",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "zstd", "planes", "raw"]),
        help="Chunk codec: auto picks byte planes for floats, zstd otherwise.",
    )(fn)
    return fn


def make_policy(codec: str, level: int, delta: bool | None) -> codecs.CodecPolicy:
    """The codec policy the options describe (``delta=None``: the default)."""
    policy = codecs.CodecPolicy(codec=codec, level=level)
    return policy if delta is None else dataclasses.replace(policy, delta=delta)
