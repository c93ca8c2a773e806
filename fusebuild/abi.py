"""The kernel calling convention, shared by codegen (CPU, CUDA) and the runtime.

Every kernel symbol has the C signature
    void sym(const int64_t *ptrs, const int64_t *meta, int64_t start, int64_t stop)
(CUDA kernels take the same four values as kernel parameters) where
  ptrs  holds addresses: each tensor input's chunks (one if not chunked), then each output's
        cat parts (one if not a cat output);
  meta  holds int64 words: the canonical sizes (rank words); element strides per operand and
        dim (tensor inputs, then outputs; rank words each); seed and offset when the group
        draws random numbers; then one word per scalar input holding the bits of its value in
        its declared dtype (zero-extended; float32 in the low 32 bits);
  start, stop  the range of linear element indices (C order over the canonical sizes) to compute.
A reduction kernel (DESIGN §8) works on whole rows of its last dim, N elements each: it computes
every row r whose first index r * max(N, 1) lies in [start, stop), so any split of [0, n) computes
each row once, and callers pass n = rows * max(N, 1) (`dispatch.work_count`), which covers rows of
N = 0 (their row outputs are written). A row output's strides are 0 along the last dim.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Abi:
    rank: int
    chunks: tuple[int, ...]     # pointers per tensor input
    parts: tuple[int, ...]      # pointers per output
    random: bool
    n_scalars: int

    def in_ptr(self, i: int, k: int = 0) -> int:
        return sum(self.chunks[:i]) + k

    def out_ptr(self, o: int, k: int = 0) -> int:
        return sum(self.chunks) + sum(self.parts[:o]) + k

    @property
    def n_ptrs(self) -> int:
        return sum(self.chunks) + sum(self.parts)

    @property
    def n_operands(self) -> int:
        return len(self.chunks) + len(self.parts)

    def size(self, d: int) -> int:
        return d

    def stride(self, operand: int, d: int) -> int:
        """Operand index counts tensor inputs first, then outputs."""
        return self.rank + operand * self.rank + d

    @property
    def seed(self) -> int:
        return self.rank * (1 + self.n_operands)

    @property
    def offset(self) -> int:
        return self.seed + 1

    def scalar(self, k: int) -> int:
        return self.seed + (2 if self.random else 0) + k

    @property
    def n_meta(self) -> int:
        return self.scalar(self.n_scalars)


# Every artifact (.so, cubin, PTX) also defines the data object ARTIFACT_SYMBOL: the canonical
# JSON of its description (fusebuild/artifact.py), checked against the manifest before any call.
ARTIFACT_SYMBOL = "fusebuild_artifact"
GRAD_SUFFIX = "__grad"    # the backward group of `g` (derived from `grad:`) is `g__grad`
