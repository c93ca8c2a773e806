"""ArgSpec canonicalization and the key grammar (DESIGN §2), shared by build and runtime.

The same `canonicalize` serves real arrays (integer shapes and element strides) and the build's
symbolic matrix shapes (`Dim` monomials such as 4*H), so both sides agree on every key.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence, Union

from .dtypes import BY_SHORT, DType


class Dim:
    """A symbolic size: integer coefficient times a product of symbols (B, 4*H, C*T)."""
    __slots__ = ("coef", "syms")

    def __init__(self, coef: int = 1, syms: tuple[str, ...] = ()):
        self.coef, self.syms = coef, tuple(sorted(syms))

    @staticmethod
    def of(x: "int | Dim") -> "Dim":
        return x if isinstance(x, Dim) else Dim(int(x))

    def __mul__(self, other):
        o = Dim.of(other)
        return Dim(self.coef * o.coef, self.syms + o.syms)

    __rmul__ = __mul__

    def __eq__(self, other):
        if isinstance(other, (int, Dim)):
            o = Dim.of(other)
            return (self.coef == 0 and o.coef == 0) or (self.coef, self.syms) == (o.coef, o.syms)
        return NotImplemented

    def __hash__(self):
        return hash((self.coef, self.syms)) if self.syms else hash(self.coef)

    def divisible(self, n: int) -> bool:
        return self.coef % n == 0

    def __floordiv__(self, n: int) -> "Dim":
        return Dim(self.coef // n, self.syms)

    def __str__(self):
        parts = ([str(self.coef)] if self.coef != 1 or not self.syms else []) + list(self.syms)
        return "*".join(parts)

    __repr__ = __str__


Size = Union[int, Dim]


@dataclass(frozen=True)
class Canonical:
    """A call reduced to canonical form: sizes, per-operand element strides, input layouts."""
    sizes: tuple
    strides: tuple          # one tuple per operand (inputs first, then extra operands)
    layouts: tuple          # one layout string per input operand ('cc', 'bc', 'sc', '' ...)


def broadcast_shapes(shapes: Sequence[Sequence[Size]]) -> tuple:
    """numpy broadcasting (right-aligned); raises ValueError naming the clash."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        size = 1
        for s in shapes:
            j = len(s) - rank + i
            if j < 0 or s[j] == 1:
                continue
            if size == 1:
                size = s[j]
            elif not s[j] == size:
                raise ValueError(f"dimension {i - rank} has sizes {size} and {s[j]}")
        out.append(size)
    return tuple(out)


def contiguous_strides(shape: Sequence[Size]) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc = acc * size
    return tuple(reversed(strides))


def row_strides(shape: Sequence[Size]) -> tuple:
    """Strides of a row output over iteration shape `shape`: those of the C-contiguous array
    `[..., 1]` on the outer dims, 0 along the reduced last dim (stored once per row)."""
    return contiguous_strides(tuple(shape[:-1]) + (1,))[:-1] + (0,)


def canonicalize(shape: Sequence[Size], inputs: Sequence[tuple[Sequence[Size], Sequence[Size]]],
                 extra: Sequence[Sequence[Size]] = (), keep_last: bool = False) -> Canonical:
    """Canonicalize operands over iteration shape `shape`.

    `inputs` are (shape, strides) pairs broadcastable to `shape`; `extra` are strides of
    operands already in `shape` (outputs, cat parts), which take part in merging only.
    With `keep_last` (reduction groups, DESIGN §8) the last dim, the reduced one, is never
    dropped nor merged with another: it stays the innermost letter of every layout.
    """
    rank = len(shape)
    ops = []
    for s, st in inputs:
        pad = rank - len(s)
        ops.append([0 if i < pad or s[i - pad] == 1 and not shape[i] == 1 else st[i - pad]
                    for i in range(rank)])
    ops.extend(list(st) for st in extra)
    last = rank - 1 if keep_last else None
    keep = [i for i in range(rank) if not shape[i] == 1 or i == last]
    sizes: list = []
    strides: list[list] = [[] for _ in ops]
    for i in keep:
        if sizes and i != last and all(o[-1] == st[i] * shape[i] for o, st in zip(strides, ops)):
            sizes[-1] = sizes[-1] * shape[i]
            for o, st in zip(strides, ops):
                o[-1] = st[i]
            continue
        sizes.append(shape[i])
        for o, st in zip(strides, ops):
            o.append(st[i])
    dense = contiguous_strides(sizes)
    layouts = tuple("".join("b" if s == 0 else "c" if s == d else "s" for s, d in zip(st, dense))
                    for st in strides[:len(inputs)])
    return Canonical(tuple(sizes), tuple(tuple(s) for s in strides), layouts)


# ---------------------------------------------------------------- keys -------------------------

MAX_RANK = 64       # numpy's (so every call's) most dims: no key has more letters per input
_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\((.*)\)$")
_LAYOUT_RE = re.compile(r"^[cbs]*$")


def format_key(group: str, descs: Sequence[tuple[DType, str]]) -> str:
    return f"{group}({','.join(f'{d.short}:{layout}' for d, layout in descs)})"


@functools.lru_cache(maxsize=1 << 14)
def parse_key(key: str) -> tuple[str, tuple[tuple[DType, str], ...]]:
    """Inverse of format_key; raises ValueError on a malformed key. Memoized: a bundle's
    keys are parsed by its check, its index and its first calls."""
    m = _KEY_RE.match(key.strip())
    if not m:
        raise ValueError(f"malformed key {key!r}: expected group(dtype:layout,...)")
    descs = []
    for part in m.group(2).split(","):
        short, _, layout = part.strip().partition(":")
        if short not in BY_SHORT or not _LAYOUT_RE.match(layout) or ":" not in part:
            raise ValueError(f"malformed descriptor {part!r} in key {key!r}")
        descs.append((BY_SHORT[short], layout))
    ranks = {len(layout) for _, layout in descs}
    if len(ranks) > 1:
        raise ValueError(f"descriptors of key {key!r} have different ranks")
    return m.group(1), tuple(descs)


def symbol_name(key: str) -> str:
    """The exported C symbol of a kernel: fb_<group>__f32_cc__f32_bc."""
    group, descs = parse_key(key)
    return "fb_" + group + "".join(f"__{d.short}_{layout}" for d, layout in descs)
