"""The dtypes fusebuild knows, their short names, and type promotion.

Promotion follows torch (and NumPy 2 for Python scalars): categories bool < int < float; among
tensors of one category the wider wins (uint8 with a signed int widens to at least int16, float16
with bfloat16 gives float32); "weak" operands (literals and scalar inputs) only matter when their
category is higher than every tensor's, and then literals give the default dtype of that category
(int64, float32) while scalar inputs give their declared dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str      # numpy/torch name: 'float32'
    short: str     # key letter form: 'f32'
    kind: str      # 'b' bool, 'i' signed, 'u' unsigned, 'f' float
    bits: int

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)

    @property
    def is_float(self) -> bool:
        return self.kind == "f"

    @property
    def is_int(self) -> bool:
        return self.kind in "iu"

    @property
    def is_bool(self) -> bool:
        return self.kind == "b"

    @property
    def category(self) -> int:
        return {"b": 0, "i": 1, "u": 1, "f": 2}[self.kind]

    @property
    def compute(self) -> "DType":
        """The dtype arithmetic is done in: float16/bfloat16 compute in float32."""
        return float32 if self.name in ("float16", "bfloat16") else self

    @property
    def numpy(self) -> np.dtype:
        if self.name == "bfloat16":
            import ml_dtypes  # the JAX/TensorFlow convention for bfloat16 numpy arrays
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name if self.name != "bool" else np.bool_)

    def __repr__(self) -> str:
        return self.name


bool_ = DType("bool", "b8", "b", 8)
int8 = DType("int8", "i8", "i", 8)
int16 = DType("int16", "i16", "i", 16)
int32 = DType("int32", "i32", "i", 32)
int64 = DType("int64", "i64", "i", 64)
uint8 = DType("uint8", "u8", "u", 8)
float16 = DType("float16", "f16", "f", 16)
bfloat16 = DType("bfloat16", "bf16", "f", 16)
float32 = DType("float32", "f32", "f", 32)
float64 = DType("float64", "f64", "f", 64)

ALL: tuple[DType, ...] = (bool_, int8, int16, int32, int64, uint8, float16, bfloat16, float32, float64)
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
BY_SHORT: dict[str, DType] = {d.short: d for d in ALL}
FLOATS = tuple(d for d in ALL if d.is_float)
INTS = tuple(d for d in ALL if d.is_int)


def lookup(name: str) -> DType:
    """A dtype by its long or short name; raises KeyError."""
    if name in BY_NAME:
        return BY_NAME[name]
    return BY_SHORT[name]


def from_numpy(dt) -> DType:
    """The DType of a numpy dtype (bfloat16 from ml_dtypes included); KeyError if unsupported
    (byte-swapped dtypes included: kernels read native byte order)."""
    dt = np.dtype(dt)
    if not dt.isnative:
        raise KeyError(f"{dt.str} is not in native byte order")
    return BY_NAME[dt.name]


def promote_pair(a: DType, b: DType) -> DType:
    """Promotion of two tensor dtypes."""
    if a == b:
        return a
    if a.category != b.category:
        return a if a.category > b.category else b
    if a.is_float:
        if {a.name, b.name} == {"float16", "bfloat16"}:
            return float32
        return a if a.bits > b.bits else b
    if a.kind == b.kind:
        return a if a.bits > b.bits else b
    signed, unsigned = (a, b) if a.kind == "i" else (b, a)
    if signed.bits > unsigned.bits:
        return signed
    return BY_NAME[f"int{min(64, unsigned.bits * 2)}"]


DEFAULT_FOR_CATEGORY = {0: bool_, 1: int64, 2: float32}


def result_type(strong: list[DType], weak: list[tuple[DType, bool]]) -> DType:
    """Promote tensor dtypes `strong` with weak operands given as (dtype, is_literal)."""
    result = None
    for d in strong:
        result = d if result is None else promote_pair(result, d)
    top = result.category if result is not None else -1
    higher = [DEFAULT_FOR_CATEGORY[d.category] if literal else d
              for d, literal in weak if d.category > top]
    if higher:
        best = max(d.category for d in higher)
        result = None
        for d in higher:
            if d.category == best:
                result = d if result is None else promote_pair(result, d)
    if result is None:
        raise ValueError("result_type of no operands")
    return result
