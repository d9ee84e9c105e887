"""JSON as strict as the formats that embed it (safetensors headers, weights.json).

Python's ``json`` keeps the last of two equal keys and recurses once per nesting
level. A file whose header names a tensor twice would then lose one of them
without a word, and a header nested a few thousand levels deep would end in a
``RecursionError``. Both are refused here, as the safetensors reference parser
(serde) refuses them, with one :class:`~apollo_cas.errors.UnsupportedSource`.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UnsupportedSource


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def loads(data: bytes | str, where: str, what: str, hint: str | None = None) -> Any:
    """Parse ``data`` (``what`` in ``where``, for messages): duplicate keys and
    deep nesting are errors; so is anything that is not UTF-8 JSON."""
    try:
        return json.loads(data, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as exc:
        raise UnsupportedSource(
            f"{where}: key {exc.key!r} appears twice in its {what}",
            hint or "re-export the file; one of the two entries would be lost",
        ) from None
    except RecursionError:
        raise UnsupportedSource(f"{where}: {what} is nested too deeply to be real", hint) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedSource(f"{where}: unreadable {what} (not JSON: {exc})", hint) from None
