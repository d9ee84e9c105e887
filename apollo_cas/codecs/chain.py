"""Delta chains: walked with a bound and a loop check, read link by link, verified.

A delta chunk names its base in its header, and a manifest's ``bases`` maps
chunks to their bases; both come from a writer we cannot trust blindly (a
damaged store, a buggy or hostile one). Every walk over such edges goes
through :func:`walk`, which stops at :data:`~apollo_cas.codecs.delta.MAX_DEPTH`
links (the most the format's depth byte can express) and at the first chunk
seen twice, so a loop is an error naming its chunks instead of a
``RecursionError`` or a walk that never ends.

:func:`read_verified` is the body of ``ChunkStore.read``: it walks a chunk's
chain through the headers first, checking each link's claimed raw size
(against the size the caller's place needs, against the length its dependent
needs, and against :data:`MAX_RAW_SIZE`) *before* anything is decompressed,
then decodes from the root outwards, checking each link's hash and length.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import CorruptChunk, MissingChunk, ObjectNotFound
from ..hashing import digest
from . import delta
from .envelope import Blob

#: No chunk decodes to more than this: the store's largest block size
#: (``store.MAX_BLOCK_SIZE``). A claim above it is refused before decoding, so a
#: damaged or hostile header cannot make a read allocate gigabytes.
MAX_RAW_SIZE = 256 << 20

_HINT = "run 'apollo-cas verify --read-data' to see which checkpoints it breaks"


class ChainError(ValueError):
    """A chain that loops or is longer than the format allows; ``chunks`` in order."""

    def __init__(self, message: str, chunks: list[bytes]) -> None:
        super().__init__(message)
        self.chunks = chunks


def _short(chain: list[bytes]) -> str:
    return " -> ".join(c.hex() for c in chain)


def walk(
    start: bytes, base_of: Callable[[bytes], bytes | None], limit: int = delta.MAX_DEPTH
) -> list[bytes]:
    """``[start, its base, that base's base, ...]`` down to a chunk without a base.

    Raises :class:`ChainError` if a chunk comes round again (a loop) or the
    chain has more than ``limit`` links.
    """
    chain = [start]
    seen = {start}
    cur: bytes | None = base_of(start)
    while cur is not None:
        if cur in seen:
            raise ChainError(f"delta chain loops: {_short([*chain, cur])}", [*chain, cur])
        if len(chain) > limit:
            raise ChainError(f"delta chain of {start.hex()} is longer than {limit} links", chain)
        chain.append(cur)
        seen.add(cur)
        cur = base_of(cur)
    return chain


def read_verified(
    chunk_id: bytes, size: int | None, get_blob: Callable[[bytes], Blob], where: str
) -> Blob:
    """The raw bytes of ``chunk_id`` (``size`` long if given), bases resolved, every
    link hashed. ``get_blob`` returns a stored chunk or raises ``ObjectNotFound``;
    ``where`` names the store in errors. Raises :class:`CorruptChunk` naming the
    chunk on any mismatch; nothing is decompressed before every link's claimed
    size has been checked.
    """
    from . import _unpack, base_of, decode  # the package's public codec API

    hex_id = chunk_id.hex()
    links: list[tuple[bytes, Blob]] = []  # (chunk id, blob), the asked-for chunk first
    seen: set[bytes] = set()
    cid, want = chunk_id, size
    while True:
        name = f"chunk {cid.hex()}"
        try:
            blob = get_blob(cid)
        except (ObjectNotFound, MissingChunk) as exc:
            # The inventory names a missing chunk itself (MissingChunk); a missing
            # base must still name the chunk that needed it.
            if not links:
                if isinstance(exc, MissingChunk):
                    raise
                raise CorruptChunk(
                    f"{name} is missing from {where}",
                    "run 'apollo-cas verify' to see which checkpoints it breaks; "
                    "restore another one",
                ) from None
            raise CorruptChunk(
                f"chunk {hex_id}: its delta base chunk {cid.hex()} is missing",
                "the chunk cannot be rebuilt; "
                "run apollo-cas verify to list the checkpoints it breaks",
            ) from None
        try:
            env = _unpack(blob, name)
            b = base_of(blob, name)
        except CorruptChunk as exc:
            if not links:
                raise
            raise _base_error(hex_id, cid, exc) from exc
        if want is not None and env.raw_size != want:
            what = "its place needs" if not links else "its dependent needs"
            msg = f"{name} is {env.raw_size} bytes, {what} {want}"
            raise CorruptChunk(
                msg if not links else f"chunk {hex_id}: its delta base {msg}",
                "the manifest names the wrong chunk for this block, or the chunk is damaged; "
                + _HINT,
            )
        if env.raw_size > MAX_RAW_SIZE:
            raise CorruptChunk(
                f"{name} claims {env.raw_size} bytes, more than any block ({MAX_RAW_SIZE})",
                "the chunk header is damaged; " + _HINT,
            )
        links.append((cid, blob))
        seen.add(cid)
        if b is None:
            break
        base = bytes.fromhex(b)
        if base in seen:
            chain = [c for c, _ in links] + [base]
            raise CorruptChunk(f"chunk {hex_id}: its delta chain loops ({_short(chain)})", _HINT)
        if len(links) > delta.MAX_DEPTH:
            raise CorruptChunk(
                f"chunk {hex_id}: its delta chain is longer than {delta.MAX_DEPTH} links", _HINT
            )
        cid, want = base, env.raw_size
    raw: Blob | None = None
    for i in range(len(links) - 1, -1, -1):
        cid, blob = links[i]
        prev = raw
        try:
            raw = decode(blob, f"chunk {cid.hex()}", load_base=_loader(prev))
            if digest(raw) != cid:
                raise CorruptChunk(
                    f"chunk {cid.hex()} is corrupt: its content does not hash to its name", _HINT
                )
        except CorruptChunk as exc:
            if i == 0:
                raise
            raise _base_error(hex_id, cid, exc) from exc
    assert raw is not None
    if size is not None and len(raw) != size:  # decode guarantees it; the seam says so too
        raise CorruptChunk(f"chunk {hex_id} decoded to {len(raw)} bytes, its place needs {size}")
    return raw


def _loader(raw: Blob | None) -> Callable[[str], Blob]:
    """The base loader for one link: the base decoded (and verified) just before."""

    def load(_hex_id: str) -> Blob:
        if raw is None:  # only a chunk with no base is decoded without one
            raise KeyError(_hex_id)
        return raw

    return load


def _base_error(hex_id: str, base: bytes, exc: CorruptChunk) -> CorruptChunk:
    return CorruptChunk(
        f"chunk {hex_id}: its delta base chunk {base.hex()} cannot be read ({exc.message})",
        "the chunk cannot be rebuilt; run apollo-cas verify to list the checkpoints it breaks",
    )
