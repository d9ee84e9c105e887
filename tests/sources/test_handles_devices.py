"""The server's device indices mapped to this process's GPUs
(apollo_cas.sources.handles.devices): pure functions, no GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from apollo_cas.errors import StaleHandles, UsageError  # noqa: E402
from apollo_cas.sources import handles  # noqa: E402

# ---------------------------------------------------------------------- device mapping

UUIDS = ["aaaa", "bbbb", "cccc", "dddd"]


def test_map_devices_rules() -> None:
    md = handles.map_devices
    assert md([0, 1], {}, None, UUIDS, None) == ({0: 0, 1: 1}, "same index (no metadata)")
    assert md([0], {}, {0: 3}, UUIDS, None)[0] == {0: 3}
    by_uuid = {"device_uuids": {"0": "GPU-cccc", "1": "GPU-AAAA"}}
    assert md([0, 1], by_uuid, None, UUIDS, "2,0") == ({0: 2, 1: 0}, "GPU UUID")
    # The server saw GPUs 2,3 as 0,1; we see them all.
    assert md([1], {"cuda_visible_devices": "2,3"}, None, UUIDS, None)[0] == {1: 3}
    # ... or we see 3,2.
    assert md([0], {"cuda_visible_devices": "2,3"}, None, UUIDS, "3,2")[0] == {0: 1}
    assert md([0], {"cuda_visible_devices": "1"}, None, UUIDS, "1")[0] == {0: 0}
    assert md([0], {"cuda_visible_devices": "GPU-dddd"}, None, UUIDS, None)[0] == {0: 3}


def test_map_devices_refusals() -> None:
    md = handles.map_devices
    with pytest.raises(StaleHandles, match="sees 1 GPU"):
        md([2], {}, None, UUIDS[:1], None)
    with pytest.raises(StaleHandles, match="not visible"):
        md([0], {"device_uuids": {"0": "GPU-eeee"}}, None, UUIDS, None)
    with pytest.raises(StaleHandles, match="not visible"):
        md([0], {"cuda_visible_devices": "3"}, None, UUIDS, "0,1")
    with pytest.raises(UsageError, match="no entry"):
        md([0, 1], {}, {0: 0}, UUIDS, None)
    with pytest.raises(StaleHandles):
        md([0], {}, {0: 9}, UUIDS, None)


def test_parse_device_map() -> None:
    assert handles.parse_device_map("0:2, 1:3") == {0: 2, 1: 3}
    with pytest.raises(UsageError):
        handles.parse_device_map("0=2")
