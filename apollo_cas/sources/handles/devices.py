"""Which local GPU holds each of the server's devices.

A handle names its device by the *exporter's* index, which is this process's
index only when both see the same GPUs in the same order. :func:`map_devices`
picks the local index from an explicit map (``--device-map``), the GPU UUIDs the
exporter recorded, or the two ``CUDA_VISIBLE_DEVICES``, and refuses a GPU this
process cannot see. Pure functions over what the caller passes in (the local GPU
UUIDs come from :mod:`.ipc`): testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import StaleHandles, UsageError

__all__ = ["map_devices", "norm_uuid", "parse_device_map"]


def parse_device_map(text: str) -> dict[int, int]:
    """``"0:2,1:3"`` -> ``{0: 2, 1: 3}``: the owner's device index -> this process's."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, sep, b = part.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise UsageError(
                f"invalid device map entry {part!r}",
                "write OWNER:LOCAL pairs of device indices, e.g. 0:2,1:3",
            )
        out[int(a)] = int(b)
    return out


def _env_text(env: str | None) -> str:
    """How this process's CUDA_VISIBLE_DEVICES reads in a message ("unset", not None)."""
    return "CUDA_VISIBLE_DEVICES unset" if env is None else f"CUDA_VISIBLE_DEVICES={env!r}"


def norm_uuid(u: str) -> str:
    """A GPU UUID as compared here: lower case, without its ``GPU-`` prefix."""
    u = str(u).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _visible(env: str | None) -> list[str] | None:
    if env is None or env.strip() == "":
        return None
    return [t.strip() for t in env.split(",") if t.strip()]


def map_devices(
    owner_indices: Sequence[int],
    meta: Mapping[str, Any],
    device_map: Mapping[int, int] | None,
    local_uuids: Sequence[str],
    local_env: str | None,
) -> tuple[dict[int, int], str]:
    """Owner device index -> local index, and the rule used (for the metadata).

    Rules, first that applies: an explicit ``device_map``; the GPU UUIDs the
    exporter recorded (``__meta__["device_uuids"]``); the exporter's
    ``CUDA_VISIBLE_DEVICES`` against ours; else the same index (the original
    format records nothing: run with the server's ``CUDA_VISIBLE_DEVICES``).
    """
    want = sorted(set(owner_indices))
    n = len(local_uuids)

    def check_local(mapping: dict[int, int], rule: str) -> tuple[dict[int, int], str]:
        for o, loc in mapping.items():
            if loc >= n:
                seen = f"{n} GPU(s)" if n else "no GPU"
                raise StaleHandles(
                    f"handles name GPU {o} of the server, mapped to local GPU {loc}, but this "
                    f"process sees {seen} ({_env_text(local_env)}, rule: {rule})",
                    "run on the server's machine with its GPUs visible, or pass a device map",
                )
        return mapping, rule

    if device_map:
        missing = [o for o in want if o not in device_map]
        if missing:
            raise UsageError(
                f"device map has no entry for the server's GPU(s) {missing}",
                "map every device index the handles use",
            )
        return check_local({o: int(device_map[o]) for o in want}, "explicit map")
    uuids = meta.get("device_uuids")
    if isinstance(uuids, dict) and all(str(o) in uuids for o in want):
        mapping = {}
        for o in want:
            u = norm_uuid(str(uuids[str(o)]))
            if u not in local_uuids:
                raise StaleHandles(
                    f"the server's GPU {o} (GPU-{u}) is not visible to this process "
                    f"({_env_text(local_env)})",
                    "CUDA IPC needs the same physical GPU: run on the server's machine with that "
                    "GPU visible",
                )
            mapping[o] = local_uuids.index(u)
        return check_local(mapping, "GPU UUID")
    if "cuda_visible_devices" in meta:
        owner_list = _visible(meta.get("cuda_visible_devices"))
        local_list = _visible(local_env)
        if owner_list == local_list:
            return check_local({o: o for o in want}, "same CUDA_VISIBLE_DEVICES")
        mapping = {}
        for o in want:
            token = owner_list[o] if owner_list and o < len(owner_list) else str(o)
            if owner_list is not None and o >= len(owner_list):
                raise StaleHandles(
                    f"handles name GPU {o}, but the server saw only "
                    f"{len(owner_list)} (CUDA_VISIBLE_DEVICES={owner_list})"
                )
            if local_list is not None and token in local_list:
                mapping[o] = local_list.index(token)
            elif local_list is None and token.isdigit():
                mapping[o] = int(token)
            elif norm_uuid(token) in local_uuids:
                mapping[o] = local_uuids.index(norm_uuid(token))
            else:
                raise StaleHandles(
                    f"the server's GPU {o} ({token!r} in its CUDA_VISIBLE_DEVICES) is not "
                    f"visible to this process ({_env_text(local_env)})",
                    "run with the server's CUDA_VISIBLE_DEVICES, or pass a device map",
                )
        return check_local(mapping, "CUDA_VISIBLE_DEVICES")
    return check_local({o: o for o in want}, "same index (no metadata)")
