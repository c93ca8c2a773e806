"""The render pass shared by every backend (tinygrad style).

A backend subclasses `Renderer`: one table of op templates keyed by operand class ('f' float,
'i' integer, 'b' bool), plus small hooks for constants, casts, loads and random numbers. The pass
itself is linear: one assignment per node of the typed kernel graph, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .. import dtypes as dt
from ..abi import Abi
from ..argspec import parse_key, symbol_name
from ..ir import Kernel, Node


@dataclass(frozen=True)
class KernelSource:
    """One ArgSpec of a group to render: its typed graph and its key."""
    kernel: Kernel
    key: str

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(layout for _, layout in parse_key(self.key)[1])

    @property
    def rank(self) -> int:
        return len(self.layouts[0]) if self.layouts else 0

    @property
    def symbol(self) -> str:
        return symbol_name(self.key)

    @property
    def abi(self) -> Abi:
        k = self.kernel
        return Abi(self.rank, tuple(c[0] if c else 1 for c in k.chunks),
                   tuple(o.cat[0] if o.cat else 1 for o in k.outputs), k.rand_words > 0,
                   k.n_scalars)


def operand_class(d: dt.DType) -> str:
    return "f" if d.is_float else "b" if d.is_bool else "i"


class Renderer:
    """Backend hooks; `ops[name][cls]` are str.format templates over a, b, c (operands),
    T (the compute type's name in the backend), t (its short name) and bits."""
    ops: dict[str, dict[str, str]] = {}

    def type_name(self, d: dt.DType) -> str:
        raise NotImplementedError

    def assign(self, var: str, d: dt.DType, expr: str) -> str:
        raise NotImplementedError

    def const(self, value, d: dt.DType) -> str:
        raise NotImplementedError

    def cast(self, x: str, src: dt.DType, dst: dt.DType) -> str:
        raise NotImplementedError

    def load(self, node: Node) -> str:
        raise NotImplementedError

    def rand(self, node: Node) -> str:
        raise NotImplementedError

    def rowlen(self, d: dt.DType) -> str:
        """The row length N of a reduction kernel as a value of `d` (row op `rowlen`)."""
        raise NotImplementedError

    def op(self, name: str, args: list[str], t: dt.DType) -> str:
        table = self.ops[name]
        cls = operand_class(t)
        template = table.get(cls) or table.get("*")
        if template is None:
            raise KeyError(f"{type(self).__name__} has no template for {name} on {t.name}")
        named = dict(zip("abc", args))
        return template.format(**named, T=self.type_name(t.compute), t=t.compute.short,
                               bits=t.bits)

    def render_nodes(self, k: Kernel, ids: Iterable[int] | None = None) -> list[str]:
        """One assignment per node of `k` (or of the nodes `ids`, in that order). The row
        reductions rsum/rmax/rmin are accumulated by the backend's row loops, never here."""
        lines = []
        for i in range(len(k.nodes)) if ids is None else ids:
            n = k.nodes[i]
            args = [f"v{a}" for a in n.args]
            if n.op == "load":
                expr = self.load(n)
            elif n.op == "scalar":
                expr = f"a{n.attr}"
            elif n.op == "const":
                expr = self.const(n.attr, n.dtype)
            elif n.op == "cast":
                expr = self.cast(args[0], k.nodes[n.args[0]].dtype, n.dtype)
            elif n.op == "hold":    # already in the compute type: nothing to convert or round
                expr = args[0]
            elif n.op == "rand":
                expr = self.rand(n)
            elif n.op == "rowlen":
                expr = self.rowlen(n.dtype)
            else:
                t = k.nodes[n.args[1] if n.op == "where" else n.args[0]].dtype
                expr = self.op(n.op, args, t)
            lines.append(self.assign(f"v{i}", n.dtype, expr))
        return lines


def check_complete(renderer: Renderer, primitives: tuple[str, ...]) -> None:
    missing = [p for p in primitives if p not in renderer.ops]
    if missing:
        raise AssertionError(f"{type(renderer).__name__} lacks templates for {missing}")
