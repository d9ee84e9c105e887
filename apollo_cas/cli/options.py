"""Codec options shared by commands that write chunks."""

from __future__ import annotations

import dataclasses

import click

from .. import codecs
from .common import F


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
