"""Checkpoints whose manifest lies, written the way a buggy or hostile writer would.

A chunk id is the hash of its raw bytes, so a chunk of the wrong length for its
place, or a loop of delta bases, can only come from a manifest (or a chunk
header) that says something false. These helpers write such a manifest
directly (hashed, so it passes the store's manifest checks) and point the
series' ``latest`` at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from apollo_cas import layout
from apollo_cas.hashing import digest_hex
from apollo_cas.manifest import Manifest, TensorEntry
from apollo_cas.store import Store


def publish(st: Store, manifest: Manifest) -> str:
    """Write ``manifest`` and move its series' latest to it; returns its id."""
    data = manifest.encode()
    cid = digest_hex(data)
    st.backend.put(layout.manifest_key(cid), data)
    st.backend.put(layout.series_key(manifest.series), cid.encode())
    return cid


def rewrite_latest(st: Store, change: Callable[[Manifest], Manifest]) -> str:
    """Replace the latest checkpoint by ``change(manifest)``; returns the new id."""
    m = st.manifest(st.resolve("latest"))
    return publish(st, replace(change(m), parent=m.parent))


def swap_chunk(m: Manifest, at: tuple[str, int], chunk: bytes) -> Manifest:
    """``m`` with tensor ``at[0]``'s block ``at[1]`` naming ``chunk`` instead."""
    name, index = at
    tensors: list[TensorEntry] = []
    for t in m.tensors:
        if t.name == name:
            chunks = list(t.chunks)
            chunks[index] = chunk
            t = replace(t, chunks=tuple(chunks))
        tensors.append(t)
    return replace(m, tensors=tuple(tensors))


def chunk_of(st: Store, name: str, index: int, ref: str = "latest") -> bytes:
    m = st.manifest(st.resolve(ref))
    entry = m.tensor(name)
    assert entry is not None
    return entry.chunks[index]
