"""Element types: one canonical spelling (safetensors') and the ones users have.

Manifests store the safetensors name (``"BF16"``). The original tool wrote
``str(tensor.dtype)`` (``"torch.bfloat16"``) into weights.json; both spellings,
and numpy's, are accepted on input. Bytes always travel as raw little-endian
bytes through a ``uint8`` view, never through ``.numpy()`` of the original
dtype (numpy has no bfloat16 or fp8).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SourceError, UnsupportedDtype

#: Bound on a dimension and on a tensor's byte size. Manifests hold sizes as
#: msgpack integers and offsets are added to them: below 2**63 every size and
#: sum stays a signed 64-bit integer, which msgpack, numpy and torch all take.
MAX_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class DType:
    """One storable element type."""

    name: str  # safetensors spelling, canonical in manifests
    itemsize: int
    torch_name: str  # attribute of the torch module
    numpy_name: str | None  # numpy dtype, when numpy has one

    @property
    def torch_str(self) -> str:
        """The spelling the original tool wrote into weights.json."""
        return f"torch.{self.torch_name}"


_ALL = [
    DType("BOOL", 1, "bool", "bool"),
    DType("U8", 1, "uint8", "uint8"),
    DType("I8", 1, "int8", "int8"),
    DType("U16", 2, "uint16", "uint16"),
    DType("I16", 2, "int16", "int16"),
    DType("U32", 4, "uint32", "uint32"),
    DType("I32", 4, "int32", "int32"),
    DType("U64", 8, "uint64", "uint64"),
    DType("I64", 8, "int64", "int64"),
    DType("F8_E4M3", 1, "float8_e4m3fn", None),
    DType("F8_E5M2", 1, "float8_e5m2", None),
    DType("F16", 2, "float16", "float16"),
    DType("BF16", 2, "bfloat16", None),
    DType("F32", 4, "float32", "float32"),
    DType("F64", 8, "float64", "float64"),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
_ALIASES: dict[str, DType] = {}
for _d in _ALL:
    for _alias in (_d.name, _d.name.lower(), _d.torch_name, _d.torch_str, _d.numpy_name):
        if _alias:
            _ALIASES.setdefault(_alias, _d)
# Older torch spellings and common shorthands.
_ALIASES.update(
    {
        "torch.half": BY_NAME["F16"],
        "torch.float": BY_NAME["F32"],
        "torch.double": BY_NAME["F64"],
        "torch.long": BY_NAME["I64"],
        "torch.int": BY_NAME["I32"],
        "torch.short": BY_NAME["I16"],
        "F8_E4M3FN": BY_NAME["F8_E4M3"],
    }
)


def lookup(spelling: object, where: str = "", *, exact: bool = False) -> DType:
    """Resolve any accepted spelling (``BF16``, ``bfloat16``, ``torch.bfloat16``);
    with ``exact``, only the canonical safetensors names (what a safetensors
    header may hold)."""
    table = BY_NAME if exact else _ALIASES
    d = table.get(spelling) if isinstance(spelling, str) else None
    if d is None:
        at = f" in {where}" if where else ""
        raise UnsupportedDtype(
            f"unsupported dtype {spelling!r}{at}",
            "apollo_cas stores the dtypes safetensors can hold: "
            + ", ".join(sorted(BY_NAME))
            + "; convert the tensor (for example to bfloat16) before saving",
        )
    return d


def from_torch(dtype: object, where: str = "") -> DType:
    """The DType of a ``torch.dtype``."""
    return lookup(str(dtype), where)


def check_shape(
    shape: object, dtype: DType, nbytes: int | None = None, where: str = ""
) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, if it is a real one for ``nbytes`` bytes of ``dtype``.

    The rule every source and the manifest reader share: a list of integers
    (not booleans, floats or strings), each ``>= 0`` and below 2**63, whose
    element count times the item size is ``nbytes`` and below 2**63. Raises
    :class:`~apollo_cas.errors.SourceError` naming ``where`` otherwise.
    """
    at = f"{where}: " if where else ""
    if not isinstance(shape, (list, tuple)) or not all(is_int(d) for d in shape):
        raise SourceError(
            f"{at}shape {shape!r} is not a list of integers", "re-export the checkpoint"
        )
    dims = tuple(int(d) for d in shape)
    count = 1
    for d in dims:
        if not 0 <= d <= MAX_SIZE:
            raise SourceError(
                f"{at}shape {list(dims)} has a dimension out of range (0 to 2**63-1)",
                "re-export the checkpoint",
            )
        count *= d
    if count * dtype.itemsize > MAX_SIZE:
        raise SourceError(f"{at}shape {list(dims)} is larger than 2**63 bytes")
    if nbytes is not None and count * dtype.itemsize != nbytes:
        raise SourceError(
            f"{at}shape {list(dims)} of {dtype.name} needs {count * dtype.itemsize} bytes "
            f"but has size {nbytes}",
            "the index is inconsistent; re-export the checkpoint",
        )
    return dims


def is_int(v: object) -> bool:
    """An integer as JSON and msgpack write one: ``int``, never ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)
