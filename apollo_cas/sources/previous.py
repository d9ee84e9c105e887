"""Does a source still look like the series' previous checkpoint?

Names, dtypes, shapes, sizes and the tensor-parallel rank, compared with the
manifest of the series' latest checkpoint before a save. For a handles source a
difference usually means the handles are stale (the server reloaded or
reallocated its weights) and the bytes behind them are not the model; for any
other source it means the model changed. :func:`check_against` fits the store's
``save(check=...)`` hook. A source that must always be checked (the handles
source) says so itself by being a :class:`ChecksPrevious`: ``Store.save`` runs
its check on every save, whoever the caller is, so a Python caller gets the
same refusal as ``apollo-cas save --handles``.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from .. import dtypes, frontend
from ..errors import SourceError, StaleHandles
from ..manifest import Manifest
from .base import Source

log = logging.getLogger(__name__)

__all__ = ["ChecksPrevious", "check_against", "differences"]


@runtime_checkable
class ChecksPrevious(Protocol):
    """A source that refuses to be saved unless it matches the series' previous
    checkpoint. ``Store.save`` calls :meth:`check_previous` under its lock,
    before anything is written, on every save of such a source (no opt-in):
    the guarantee belongs to the source, not to the front end that saves it."""

    def check_previous(self, manifest: Manifest | None, *, force: bool) -> None:
        """Raise if the source does not match ``manifest`` (None: a first save);
        with ``force`` (the save's own) the differences are only logged."""


def differences(manifest: Manifest, source: Source) -> list[str]:
    """How ``source`` differs from ``manifest`` in names, dtypes, shapes, sizes, rank."""
    out: list[str] = []
    old = {t.name: t for t in manifest.tensors}
    new = {t.name: t for t in source.tensors()}
    for name in sorted(old.keys() - new.keys()):
        out.append(f"{name!r} is gone")
    for name in sorted(new.keys() - old.keys()):
        out.append(f"{name!r} is new")
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        same_dtype = dtypes.lookup(a.dtype).name == b.dtype.name
        if not same_dtype:
            out.append(f"{name!r} dtype {a.dtype} -> {b.dtype.name}")
        if tuple(a.shape) != tuple(b.shape):
            out.append(f"{name!r} shape {tuple(a.shape)} -> {tuple(b.shape)}")
        elif same_dtype and a.nbytes != b.nbytes:
            out.append(f"{name!r} size {a.nbytes} -> {b.nbytes} bytes")
    for what, x, y in (
        ("rank", manifest.source.rank, source.info.rank),
        ("world size", manifest.source.world_size, source.info.world_size),
    ):
        if x is not None and y is not None and x != y:
            out.append(f"{what} {x} -> {y}")
    return out


def check_against(manifest: Manifest | None, source: Source, *, force: bool = False) -> None:
    """Refuse ``source`` if it does not match the series' previous checkpoint.

    For a handles file a mismatch usually means stale handles (the server
    reloaded or reallocated its weights) and the bytes behind them are not the
    model: :class:`StaleHandles`. For other sources, :class:`SourceError`. With
    ``force`` the differences are only logged (the model really changed). Fits
    the store's ``save(check=...)`` hook; no previous manifest passes.
    """
    if manifest is None:
        return
    diffs = differences(manifest, source)
    if not diffs:
        return
    where = source.info.location or source.info.kind
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    msg = f"{where}: {len(diffs)} difference(s) from the previous checkpoint of the series: {shown}"
    if force:
        log.warning("%s (forced)", msg)
        return
    if source.info.kind == "handles":
        raise StaleHandles(
            msg,
            "the handles may be stale (the server reloaded or reallocated its "
            "weights): re-export them; "
            + frontend.offer(
                "--force", "if the model really changed, pass --force or save into a new --series"
            ),
        )
    raise SourceError(
        msg,
        frontend.offer(
            "--force", "if the model really changed, pass --force or save into a new --series"
        ),
    )
