"""Tensor descriptions for the format tests: what a writer needs of a tensor
(name, dtype in safetensors spelling, shape, nbytes) and hypothesis strategies
for lists of them with distinct names."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from apollo_cas import dtypes


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * dtypes.BY_NAME[self.dtype].itemsize


names = st.from_regex(r"[a-z][a-z0-9_.]{0,16}", fullmatch=True)
specs = st.lists(
    st.builds(
        Spec,
        names,
        st.sampled_from(sorted(dtypes.BY_NAME)),
        st.lists(st.integers(0, 40), max_size=3).map(tuple),
    ),
    max_size=12,
    unique_by=lambda s: s.name,
)
