"""Typed kernel graphs: the second stage of the IR.

`instantiate` types a parsed `syntax.Group` for concrete input dtypes into a `Kernel`: a typed,
topologically ordered graph of primitive ops in which every operand already has its op's dtype
(casts are explicit), composite ops are expanded and dead values removed. Codegen consumes only
this. Row reductions (DESIGN §8) become row primitives (ops.ROW_OPS); `schedule` orders them.

float16/bfloat16 values are *held* in float32: a node's dtype is its logical type, and backends
round to the storage type only at casts and stores. A `hold` node takes a value already in the
compute type as float16/bfloat16 without rounding: scalar inputs enter half-precision ops that way
(in the compute type, as torch keeps scalars in its opmath type, and like literals).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from . import dtypes as dt
from .abi import GRAD_SUFFIX
from .syntax import FULL, ROW, UNIFORM, Expr, Group
from .errors import SpecError
from .ops import CASTS, CONSTANTS, EXPANSIONS, OPS, PRIMITIVE_REDUCTION, REDUCTIONS, ROW_OPS, OpDef

MAX_RAND_WORDS = 4  # one Philox4x32 block per element: 4 words of 32 bits


# ---------------------------------------------------------------- typed kernels ----------------

@dataclass(frozen=True)
class Node:
    op: str                 # primitive op | 'load' | 'scalar' | 'const' | 'cast' | 'hold' | 'rand'
                            # | a row op (ops.ROW_OPS: rsum rmax rmin rowlen)
    args: tuple[int, ...]
    dtype: dt.DType         # logical dtype (float16/bfloat16 are held in float32)
    attr: object = None     # load: (input, chunk); scalar: index; const: value; rand: first word


@dataclass(frozen=True)
class KernelOutput:
    name: str
    dtype: dt.DType
    parts: tuple[int, ...]          # node ids, one per cat part (one for plain outputs)
    cat: tuple[int, int] | None     # (n, dim) as written in the spec
    row: bool = False               # one value per row, stored once per row ([..., 1])


@dataclass(frozen=True)
class Kernel:
    group: str
    in_dtypes: tuple[dt.DType, ...]     # tensor inputs, declared order
    nodes: tuple[Node, ...]
    outputs: tuple[KernelOutput, ...]
    chunks: tuple = ()                  # per tensor input: (n, dim) or None
    rand_words: int = 0                 # 32-bit Philox words drawn per element (0: no random)
    n_scalars: int = 0
    reduce: bool = False                # works row by row: a reduction group (DESIGN §8)


@dataclass(frozen=True)
class _Val:
    """A typed operand during instantiation: a node, or a not-yet-typed literal."""
    node: int | None
    dtype: dt.DType
    weak: str | None        # None (tensor), 'literal', 'scalar'
    value: object = None    # for literals


_LITERAL_DTYPE = {bool: dt.bool_, int: dt.int64, float: dt.float32}


class Builder:
    """Emits typed nodes with hash-consing; the order of emission is topological."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.levels: list[int] = []     # UNIFORM, ROW or FULL per node (see schedule.levels)
        self._index: dict[tuple, int] = {}
        self.t: dt.DType = dt.float32   # dtype of b.c() and b.op() in an expansion

    def emit(self, op: str, args: tuple[int, ...], dtype: dt.DType, attr=None) -> int:
        node = Node(op, tuple(args), dtype, attr)
        key = (op, node.args, dtype, _attr_key(attr))
        if key not in self._index:
            self._index[key] = len(self.nodes)
            self.nodes.append(node)
            self.levels.append(FULL if op in ("load", "rand") else ROW if op in ROW_OPS[:3]
                               else max((self.levels[a] for a in args), default=UNIFORM))
        return self._index[key]

    def const(self, value, dtype: dt.DType) -> int:
        """A constant held in dtype's compute type (a float16 constant is a float32 value)."""
        if dtype.is_bool:
            value = bool(value)
        elif dtype.is_int:
            value = int(value)
        else:
            value = round_float(value, dtype.compute)
        return self.emit("const", (), dtype, value)

    def cast(self, node: int, dtype: dt.DType) -> int:
        if self.nodes[node].dtype == dtype:
            return node
        src = self.nodes[node]
        if src.op == "const":
            return self.const(_cast_value(src.attr, src.dtype, dtype), dtype)
        return self.emit("cast", (node,), dtype)

    def explicit_cast(self, node: int, dtype: dt.DType) -> int:
        """A cast written in the body: as `cast`, but a cast of a float16/bfloat16 value to its own
        type rounds what it holds in float32 (unless it is already on the storage grid)."""
        src = self.nodes[node]
        if src.dtype != dtype or dtype.compute == dtype or src.op in _ON_STORAGE_GRID:
            return self.cast(node, dtype)
        if src.op == "const":
            return self.const(round_float(src.attr, dtype), dtype)
        return self.emit("cast", (node,), dtype)

    def hold(self, node: int, dtype: dt.DType) -> int:
        """`node` converted to the compute type of float16/bfloat16 `dtype` and taken as `dtype`
        without rounding to storage."""
        src = self.nodes[node]
        if src.dtype == dtype:
            return node
        if src.op == "const":
            return self.const(_cast_value(src.attr, src.dtype, dtype.compute), dtype)
        return self.emit("hold", (self.cast(node, dtype.compute),), dtype)

    # the expansion interface used by ops.EXPANSIONS
    def c(self, value) -> int:
        return self.const(value, self.t)

    def row(self, name: str, x: int) -> int:
        """Row primitive `name` (rsum, rmax, rmin) of x over the row; of a value that is the
        same along the row, its closed form (N x, or x)."""
        if self.levels[x] == FULL:
            return self.emit(name, (x,), self.nodes[x].dtype)
        return self.op("mul", x, self.n()) if name == "rsum" else x

    def n(self) -> int:
        """The row length N, in b.t."""
        return self.emit("rowlen", (), self.t)

    def op(self, name: str, *args: int) -> int:
        rule = OPS[name].rule
        out = dt.bool_ if rule in ("cmp", "logical", "pred") else self.t
        if name == "where":
            return self.emit(name, args, self.nodes[args[1]].dtype)
        return self.emit(name, args, out)


# ops whose float16/bfloat16 values are representable in storage (nothing to round)
_ON_STORAGE_GRID = ("load", "scalar", "cast", "rand")


def _attr_key(attr):
    """Hash-consing key of a node attribute: floats by their bits, so 0.0 and -0.0 (equal as
    numbers) stay apart and NaNs (unequal to themselves) with one payload are shared."""
    if type(attr) is float:
        return ("f64", struct.pack("<d", attr))
    return attr


def _cast_value(value, src: dt.DType, dst: dt.DType):
    """Cast a Python constant the way the kernels do (saturating float->int, NaN->0)."""
    if dst.is_bool:
        return value != 0
    if dst.is_float:
        return round_float(value, dst)
    if src.is_float:
        if math.isnan(value):
            return 0
        lo, hi = int_range(dst)
        return int(min(max(math.trunc(value) if math.isfinite(value) else
                           (hi if value > 0 else lo), lo), hi))
    return wrap_int(int(value), dst)


def round_float(value, d: dt.DType) -> float:
    """`value` rounded to nearest-even in float dtype `d`, as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.array(value, np.float64).astype(d.numpy))


def int_range(d: dt.DType) -> tuple[int, int]:
    if d.kind == "u":
        return 0, (1 << d.bits) - 1
    return -(1 << (d.bits - 1)), (1 << (d.bits - 1)) - 1


def wrap_int(v: int, d: dt.DType) -> int:
    lo, _ = int_range(d)
    return ((v - lo) % (1 << d.bits)) + lo


def rand_words_for(d: dt.DType) -> int:
    return 2 if d.bits == 64 else 1


class _Typer:
    def __init__(self, group: Group, dtypes: dict[str, dt.DType], expand: bool):
        self.g, self.b, self.smap, self.expand = group, Builder(), group.source, expand
        self.env: dict[str, _Val] = {}
        self._typed: dict[int, _Val] = {}   # id(Expr) -> its value, filled by typed()
        self.rand_words = 0
        for pos, inp in enumerate(group.tensor_inputs):
            d = dtypes[inp.name]
            if inp.chunk is None:
                self.env[inp.name] = _Val(self.b.emit("load", (), d, (pos, 0)), d, None)
        for k, inp in enumerate(group.scalar_inputs):
            self.env[inp.name] = _Val(self.b.emit("scalar", (), inp.dtype, k), inp.dtype, "scalar")
        self.dtypes = dtypes

    def err(self, e: Expr, message: str, hint: str = "") -> SpecError:
        return self.smap.error(message, e.line, e.col, hint)

    def run(self) -> Kernel:
        outputs: dict[str, tuple] = {}
        tpos = {i.name: n for n, i in enumerate(self.g.tensor_inputs)}
        for st in self.g.stmts:
            if st.kind == "chunk":
                d = self.dtypes[st.source]
                for k, t in enumerate(st.targets):
                    self.env[t] = _Val(self.b.emit("load", (), d, (tpos[st.source], k)), d, None)
            elif st.kind == "expr":
                self.env[st.targets[0]] = self.typed(st.expr)
            else:
                outputs[st.targets[0]] = tuple(self.typed(e) for e in st.parts)
        outs = []
        for o in self.g.outputs:
            vals = outputs[o.name] if o.cat else (self.env[o.name],)
            d = o.dtype or self.gradient_dtype(o.name) or self.promote(list(vals))
            parts = tuple(self.b.cast(self.materialize(v, d), d) for v in vals)
            outs.append(KernelOutput(o.name, d, parts, o.cat, o.row))
        in_dtypes = tuple(self.dtypes[i.name] for i in self.g.tensor_inputs)
        chunks = tuple(i.chunk for i in self.g.tensor_inputs)
        return _dce(Kernel(self.g.name, in_dtypes, tuple(self.b.nodes), tuple(outs), chunks,
                           self.rand_words, len(self.g.scalar_inputs), self.g.reduces))

    def gradient_dtype(self, output: str) -> dt.DType | None:
        """A backward group's (DESIGN §9) gradient `grad_<x>` of a float input x has x's dtype,
        as in torch: float16/bfloat16 gradients are rounded once, in the kernel that computes
        them in float32. None for other outputs."""
        if not self.g.name.endswith(GRAD_SUFFIX):
            return None
        d = self.dtypes.get(output.removeprefix("grad_")) if output.startswith("grad_") else None
        return d if d is not None and d.is_float else None

    @staticmethod
    def promote(vals: list[_Val]) -> dt.DType:
        return dt.result_type([v.dtype for v in vals if v.weak is None],
                              [(v.dtype, v.weak == "literal") for v in vals if v.weak])

    def materialize(self, v: _Val, d: dt.DType, where: Expr | None = None) -> int:
        """The node of `v` cast to `d` (literals are created directly in `d`; scalar inputs and
        values computed from them alone enter float16/bfloat16 in the compute type)."""
        if v.node is not None:
            if v.weak == "scalar" and d.is_float and d.compute != d:
                return self.b.hold(v.node, d)
            return self.b.cast(v.node, d)
        value = v.value
        if d.is_int:
            lo, hi = int_range(d)
            if not float(value).is_integer() or not lo <= value <= hi:
                raise self.err(where or Expr("num", value), f"literal {value!r} does not fit {d.name}",
                               f"cast explicitly, e.g. {d.name}({value!r}), or use a wider type")
        return self.b.const(value, d)

    def typed(self, root: Expr) -> _Val:
        """`value(root)`, typing operands first (post-order) so deep bodies do not recurse."""
        stack, order = [root], []
        while stack:
            e = stack.pop()
            order.append(e)
            stack.extend(a for a in e.args if a is not None)
        for e in reversed(order):
            self._typed[id(e)] = self.value(e)
        return self._typed[id(root)]

    def value(self, e: Expr) -> _Val:
        if id(e) in self._typed:
            return self._typed[id(e)]
        if e.kind == "num":
            return _Val(None, _LITERAL_DTYPE[type(e.value)], "literal", e.value)
        if e.kind == "name":
            if e.value in self.env:
                return self.env[e.value]
            return _Val(None, dt.float32, "literal", CONSTANTS[e.value])
        name = e.value
        if name in CASTS:
            target = dt.lookup(name) if name != "bool" else dt.bool_
            arg = self.value(e.args[0])
            if arg.node is None:
                return _Val(self.b.const(_cast_value(arg.value, arg.dtype, target), target),
                            target, None)
            return _Val(self.b.explicit_cast(arg.node, target), target, None)
        if name == "rand_like":
            return self.rand(e)
        args = [None if a is None else self.value(a) for a in e.args]
        if name in REDUCTIONS:
            return self.reduce(OPS[name], args, e)
        return self.apply(OPS[name], args, e)

    def reduce(self, op: OpDef, args: list, e: Expr) -> _Val:
        """A row reduction: float operands accumulate in float32 (float16, bfloat16, float32) or
        float64 and give the operand's type (half types held in float32, unrounded); integer
        `sum` gives int64, amax/amin keep the integer type, the others need floats (as torch)."""
        x, rule = args[0], REDUCTIONS[op.name]
        t = self.promote([x])
        if t.is_float:
            acc = dt.float64 if t == dt.float64 else dt.float32
        elif rule.ints == "error":
            raise self.err(e, f"{op.name}() needs a float operand, got {t.name}",
                           f"cast first, e.g. {op.name}(float32(x))")
        elif t.is_bool and rule.ints == "keep":
            which = "any" if op.name == "amax" else "every"
            raise self.err(e, f"{op.name}() needs an int or float operand, got bool",
                           f"cast first: {op.name}(uint8(c)) is 1 where {which} element of the "
                           "row is True")
        else:
            acc = dt.int64 if rule.ints == "int64" else t
        out = t if t.is_float else acc
        xn = self.materialize(x, t, e)
        extras = [self.materialize(a, acc, e) for a in args[1:]]
        if not self.expand:     # whole, for the reference: (x, eps or correction)
            node = self.b.emit(op.name, (xn, *extras), out)
            return _Val(node, out, None)
        self.b.t = acc
        xa = self.b.cast(xn, acc)
        if op.name in PRIMITIVE_REDUCTION:
            node = self.b.row(PRIMITIVE_REDUCTION[op.name], xa)
        else:
            node = EXPANSIONS[op.name](self.b, xa, *extras)
        if out != acc:
            node = self.b.hold(node, out)
        return _Val(node, out, None)

    def rand(self, e: Expr) -> _Val:
        ref = self.value(e.args[0])
        if ref.weak is not None:
            raise self.err(e, "rand_like() needs a tensor argument", "rand_like(x) with x a tensor")
        if not ref.dtype.is_float:
            raise self.err(e, f"rand_like() needs a float tensor, got {ref.dtype.name}",
                           "rand_like(float32(x))")
        words = rand_words_for(ref.dtype)
        if self.rand_words + words > MAX_RAND_WORDS:
            raise self.err(e, f"too many rand_like() calls: a group draws at most {MAX_RAND_WORDS} "
                              "32-bit words per element (float64 takes 2)",
                           "reuse one rand_like() value")
        node = self.b.emit("rand", (), ref.dtype, self.rand_words)
        self.rand_words += words
        return _Val(node, ref.dtype, None)

    def apply(self, op: OpDef, args: list, e: Expr) -> _Val:
        present = [a for a in args if a is not None]
        rule = op.rule
        if op.name == "where":
            cond = self.materialize(args[0], dt.bool_, e)
            t = self.promote(args[1:])
            x, y = (self.materialize(a, t, e) for a in args[1:])
            return _Val(self.b.emit("where", (cond, x, y), t), t, self._weak(args[1:]))
        if rule in ("logical", "pred"):
            if rule == "pred":
                a = args[0]
                if not a.dtype.is_float:   # ints are never nan/inf
                    return _Val(self.b.const(op.name == "isfinite", dt.bool_), dt.bool_, None)
                t = self.promote([a])
                return _Val(self.b.emit(op.name, (self.materialize(a, t, e),), dt.bool_),
                            dt.bool_, None)
            nodes = tuple(self.materialize(a, dt.bool_, e) for a in present)
            return _Val(self.b.emit(op.name, nodes, dt.bool_), dt.bool_, None)
        t = self.promote(present)
        if rule == "float" and not t.is_float:
            t = dt.float32
        if rule in ("arith", "round") and t.is_bool:
            raise self.err(e, f"{op.name}() is not defined on bool",
                           "cast first, e.g. int32(x)")
        if rule == "bitwise" and t.is_float:
            raise self.err(e, f"{op.name}() needs integer or bool operands, got {t.name}",
                           "cast first, e.g. int32(x)")
        if rule == "shift" and not t.is_int:
            raise self.err(e, f"{op.name}() needs integer operands, got {t.name}",
                           "cast first, e.g. int32(x)")
        if rule == "round" and t.is_int:
            return present[0]
        if self.expand and op.name == "pow" and args[1].weak == "literal" \
                and args[1].value in (1, 2, 3) and args[0].weak is None:
            x = self.materialize(args[0], t, e)
            r = x
            for _ in range(int(args[1].value) - 1):
                r = self.b.emit("mul", (r, x), t)
            return _Val(r, t, None)
        nodes = [None if a is None else self.materialize(a, t, e) for a in args]
        if op.composite and self.expand:
            self.b.t = t
            node = EXPANSIONS[op.name](self.b, *nodes)
        elif op.composite:  # kept whole for the reference evaluator; attr names the params given
            given = tuple(p for p, n in zip(op.params, nodes) if n is not None)
            node = self.b.emit(op.name, tuple(n for n in nodes if n is not None), t, given)
        else:
            node = self.b.emit(op.name, tuple(nodes), dt.bool_ if rule == "cmp" else t)
        out = self.b.nodes[node].dtype
        return _Val(node, out, self._weak(present) if out == t else None)

    @staticmethod
    def _weak(vals: list[_Val]) -> str | None:
        """A result is weak only if every operand was (e.g. `lr * 2` with lr a scalar)."""
        if all(v.weak for v in vals):
            return "scalar"
        return None


def _dce(k: Kernel) -> Kernel:
    """Drop nodes no output needs and renumber the rest."""
    live = set()
    stack = [p for o in k.outputs for p in o.parts]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(k.nodes[n].args)
    order = sorted(live)
    new = {old: i for i, old in enumerate(order)}
    nodes = tuple(Node(k.nodes[o].op, tuple(new[a] for a in k.nodes[o].args), k.nodes[o].dtype,
                       k.nodes[o].attr) for o in order)
    outs = tuple(KernelOutput(o.name, o.dtype, tuple(new[p] for p in o.parts), o.cat, o.row)
                 for o in k.outputs)
    return Kernel(k.group, k.in_dtypes, nodes, outs, k.chunks, k.rand_words, k.n_scalars,
                  k.reduce)


def instantiate(group: Group, dtypes: dict[str, dt.DType], expand: bool = True) -> Kernel:
    """Type `group` for the given tensor-input dtypes; raises SpecError on type errors.

    With expand=False composite ops stay whole (for the reference evaluator).
    """
    return _Typer(group, dtypes, expand).run()
