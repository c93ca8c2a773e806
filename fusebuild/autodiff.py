"""Reverse-mode differentiation of a group into its backward group `<group>__grad` (DESIGN §9).

`derive` is pure, Group -> Group: it lowers the body to single-op statements (left to right,
statement by statement, as `ir` types them, so every `rand_like` draws the same Philox words as
in the forward kernel), expands composite ops that have no derivative rule of their own, and
appends the adjoint statements built from `ops.DERIVATIVES` in reverse order. The result is an
ordinary group whose body is text: it is typed, compiled, cached, listed and verified like any
other. It takes the forward inputs and `grad_<output>` for each differentiable output, and
returns `grad_<input>` for each listed input at the iteration (broadcast) shape, typed by `ir` in
the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .abi import GRAD_SUFFIX
from .errors import SpecError
from .ops import (CASTS, DERIVATIVES, EXPANSIONS, OPS, PRIMITIVE_REDUCTION,
                  REDUCTIONS, ZERO_GRAD)
from .syntax import FULL, ROW, UNIFORM, Expr, Group, SourceMap, parse_group


_ROW_OP = {v: k for k, v in PRIMITIVE_REDUCTION.items()}   # rsum -> sum, ...


def grad_name(name: str) -> str:
    return f"grad_{name}"


@dataclass(frozen=True)
class _Let:
    """`name = op(args)` with atomic operands (names, numbers or None); op '' is `name = args[0]`."""
    name: str
    op: str
    args: tuple


@dataclass(frozen=True)
class _Chunk:
    targets: tuple[str, ...]
    source: str
    n: int
    dim: int


@dataclass(frozen=True)
class _Cat:
    target: str
    parts: tuple[str, ...]
    dim: int


def _name(n: str) -> Expr:
    return Expr("name", n)


class _Deriver:
    """Emits the backward body; also the builder (`op`, `c`, `row`, `n`) that expansions and
    derivative rules write into."""

    def __init__(self, group: Group, wrt: tuple[str, ...]):
        self.g, self.wrt = group, wrt
        used = {i.name for i in group.inputs} | {o.name for o in group.outputs} | \
            {t for st in group.stmts for t in st.targets}
        self.prefix = "_"
        while any(u.startswith(self.prefix) for u in used):
            self.prefix += "_"
        self.lines: list = []
        chunked = {i.name for i in group.inputs if i.chunk}
        self.active: set[str] = {w for w in wrt if w not in chunked}
        self.level: dict[str, int] = {i.name: FULL if i.kind == "tensor" else UNIFORM
                                      for i in group.inputs}
        self._count = 0
        self._n: Expr | None = None

    # ---- the builder interface of ops.EXPANSIONS / ops.DERIVATIVES
    def op(self, name: str, *args) -> Expr:
        self._count += 1
        t = f"{self.prefix}t{self._count}"
        self.lines.append(_Let(t, name, tuple(args)))
        self.level[t] = self._level(name, args)
        if name not in ZERO_GRAD and any(self._is_active(a) for a in args):
            self.active.add(t)
        return _name(t)

    def c(self, value) -> Expr:
        return Expr("num", value)

    def row(self, name: str, x: Expr) -> Expr:
        return self.op(_ROW_OP[name], x)

    def n(self) -> Expr:
        if self._n is None:
            self._n = self.op("sum", self.c(1.0))
        return self._n

    # ---- helpers
    def _is_active(self, a) -> bool:
        return a is not None and a.kind == "name" and a.value in self.active

    def _level(self, name: str, args) -> int:
        if name in REDUCTIONS:
            return ROW if REDUCTIONS[name].row else FULL
        if name == "rand_like":
            return FULL
        return max((self.level.get(a.value, UNIFORM) for a in args
                    if a is not None and a.kind == "name"), default=UNIFORM)

    def _error(self, e: Expr, message: str, hint: str) -> SpecError:
        return self.g.source.error(message, e.line, e.col, hint)

    # ---- forward: single-op statements in typing order
    def lower(self, root: Expr) -> Expr:
        stack, vals = [(root, False)], {}
        while stack:
            e, done = stack.pop()
            if e is None:
                continue
            if e.kind != "call":
                vals[id(e)] = Expr(e.kind, e.value)
                continue
            if not done:
                stack.append((e, True))
                stack.extend((a, False) for a in reversed(e.args))
                continue
            args = tuple(None if a is None else vals[id(a)] for a in e.args)
            vals[id(e)] = self.apply(e, args)
        return vals[id(root)]

    def apply(self, e: Expr, args: tuple) -> Expr:
        name = e.value
        if any(self._is_active(a) for a in args) and name not in ZERO_GRAD \
                and name not in DERIVATIVES:
            if name in EXPANSIONS:
                return EXPANSIONS[name](self, *args)
            raise self._error(e, f"{name}() has no derivative in fusebuild, and `grad:` "
                                 "differentiates through it",
                              "drop the input from grad:, or write the op differently")
        return self.op(name, *args)

    def alias(self, target: str, value: Expr) -> None:
        self.lines.append(_Let(target, "", (value,)))
        self.level[target] = self.level.get(value.value, UNIFORM) if value.kind == "name" \
            else UNIFORM
        if self._is_active(value):
            self.active.add(target)

    def forward(self) -> dict[str, tuple[Expr, ...]]:
        """Lower every statement; the atoms of each output (one per cat part)."""
        outs: dict[str, tuple[Expr, ...]] = {}
        wrt = set(self.wrt)
        for st in self.g.stmts:
            if st.kind == "chunk":
                self.lines.append(_Chunk(st.targets, st.source, st.n, st.dim))
                for t in st.targets:
                    self.level[t] = FULL
                    if st.source in wrt:
                        self.active.add(t)
            elif st.kind == "expr":
                self.alias(st.targets[0], self.lower(st.expr))
                outs[st.targets[0]] = (_name(st.targets[0]),)
            else:
                outs[st.targets[0]] = tuple(self.lower(p) for p in st.parts)
        return outs

    # ---- reverse
    def seeded(self, o, atoms: tuple[Expr, ...]) -> bool:
        """Whether output `o` (lowered to `atoms`) takes a gradient: a float output that
        depends on a listed input through differentiable ops."""
        return (o.dtype is None or o.dtype.is_float) and any(self._is_active(a) for a in atoms)

    def backward(self, outs: dict[str, tuple[Expr, ...]]) -> tuple[list[str], list, dict]:
        """Seed the output gradients, run the rules in reverse; (grad inputs, output lines,
        aliases)."""
        forward = [ln for ln in self.lines if isinstance(ln, _Let)]
        adj: dict[str, list[Expr]] = {}
        seeds = []
        for o in self.g.outputs:
            atoms = outs[o.name]
            if not self.seeded(o, atoms):
                continue
            seeds.append(grad_name(o.name))
            if o.cat:
                pieces = tuple(f"{self.prefix}g{o.name}_{k}" for k in range(o.cat[0]))
                self.lines.append(_Chunk(pieces, grad_name(o.name), o.cat[0], o.cat[1]))
            else:
                pieces = (grad_name(o.name),)
            self.level.update({p: ROW if o.row else FULL for p in pieces})
            grads = [_name(p) for p in pieces]
            for a, gr in zip(atoms, grads):
                if self._is_active(a):
                    adj.setdefault(a.value, []).append(gr)
        for let in reversed(forward):
            if let.name not in adj:
                continue
            g = self.total(adj.pop(let.name))
            if let.op == "":
                terms = (g,)
            else:
                terms = DERIVATIVES[let.op](self, g, _name(let.name), *let.args)
            for a, term in zip(let.args, terms):
                if term is not None and self._is_active(a):
                    if self.level[a.value] == ROW and self.level.get(term.value) == FULL:
                        term = self.op("sum", term)     # a row value broadcast over the row
                    adj.setdefault(a.value, []).append(term)
        return seeds, *self.results(adj, seeds)

    def total(self, terms: list[Expr]) -> Expr:
        out = terms[0]
        for t in terms[1:]:
            out = self.op("add", out, t)
        return out

    def full(self, value: Expr | None, like: str) -> Expr:
        """`value` as a value of every element (zero where nothing reached it)."""
        if value is None:
            return self.op("where", self.op("isnan", _name(like)), self.c(0.0), self.c(0.0))
        if value.kind != "name" or self.level.get(value.value, UNIFORM) != FULL:
            return self.op("where", self.op("isnan", _name(like)), value, value)
        return value

    def results(self, adj: dict[str, list[Expr]], seeds: list[str]) -> tuple[list, dict]:
        """The output statements, and the aliases: listed inputs whose gradient is the same value
        as an earlier one's or an output gradient given to the group (x + bias: one array)."""
        lines, alias, given = [], {}, {}
        inputs = {i.name: i for i in self.g.inputs}
        chunks = {ln.source: ln for ln in self.lines if isinstance(ln, _Chunk)}
        for w in self.wrt:
            if inputs[w].chunk is None:
                terms = adj.get(w)
                value = self.full(terms and self.total(terms), w).value
                if value in seeds or value in given:
                    alias[w] = given.get(value, value)
                else:
                    given[value] = grad_name(w)
                    lines.append(_Let(grad_name(w), "", (_name(value),)))
            else:
                ch = chunks[w]
                parts = []
                for piece in ch.targets:
                    terms = adj.get(piece)
                    parts.append(self.full(terms and self.total(terms), piece).value)
                lines.append(_Cat(grad_name(w), tuple(parts), ch.dim))
        if not lines:       # every gradient is an output gradient: return the first one
            w = self.wrt[0]
            lines.append(_Let(grad_name(w), "", (_name(alias.pop(w)),)))
        return lines, alias


def differentiable(group: Group, name: str) -> bool:
    """Whether a float output of `group` depends on input `name` through differentiable ops
    (else its gradient is zero, and `grad:` refuses to list it). SpecError as `derive`'s for an
    op without derivative on the way."""
    d = _Deriver(group, (name,))
    outs = d.forward()
    return any(d.seeded(o, outs[o.name]) for o in group.outputs)


def derive(group: Group, wrt: tuple[str, ...], where: SourceMap) -> Group:
    """The backward group of `group` for the inputs `wrt` (float tensor inputs, checked by the
    spec). Errors in the body point at its ops; others at `where` (the `grad:` entry)."""
    d = _Deriver(group, wrt)
    outs = d.forward()
    seeds, results, alias = d.backward(outs)
    if not seeds:
        raise where.error(f"no output of group '{group.name}' depends on {', '.join(wrt)} "
                          "through differentiable ops", 1, 0,
                          "list inputs that reach a float output (comparisons, rounding and "
                          "integer ops have zero gradient)")
    lines = _used(d.lines + results)
    inputs = [(i.name, i.kind, i.dtype) for i in group.inputs] + \
        [(s, "tensor", None) for s in seeds]
    names = {i.name for i in group.inputs} | {o.name for o in group.outputs}
    clash = sorted(names & ({s for s in seeds} | {grad_name(w) for w in wrt}))
    if clash:
        raise where.error(f"the backward group's names {', '.join(clash)} are taken by group "
                          f"'{group.name}'", 1, 0, "rename those inputs or outputs (grad_<name> "
                          "is reserved for gradients when the group has grad:)")
    body = "\n".join(_text(ln) for ln in lines)
    doc = f"backward of {group.name}: gradients of {', '.join(wrt)}"
    outputs = [(grad_name(w), None) for w in wrt if w not in alias]
    bwd = parse_group(group.name + GRAD_SUFFIX, inputs, outputs, body,
                      SourceMap(where.file, where.first_line, (where.locate(1, 0)[2],) *
                                (body.count("\n") + 1)), doc)
    return replace(bwd, grad_alias=tuple(alias.items()))


def _used(lines: list) -> list:
    """`lines` without the statements nothing needs, keeping every forward `rand_like` (each
    one's Philox words depend on those before it) and every chunk (they declare the input's
    layout)."""
    needed: set[str] = set()
    keep = []
    for ln in reversed(lines):
        if isinstance(ln, _Cat):
            needed.update(ln.parts)
            keep.append(ln)
        elif isinstance(ln, _Chunk):
            keep.append(ln)
        elif ln.name.startswith("grad_") or ln.name in needed or ln.op == "rand_like":
            needed.update(a.value for a in ln.args if a is not None and a.kind == "name")
            keep.append(ln)
    return keep[::-1]


def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return repr(v)
    if v != v:
        return "nan"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def _atom(a: Expr) -> str:
    return a.value if a.kind == "name" else _num(a.value)


def _text(ln) -> str:
    if isinstance(ln, _Chunk):
        return f"{', '.join(ln.targets)} = chunk({ln.source}, {ln.n}, dim={ln.dim})"
    if isinstance(ln, _Cat):
        return f"{ln.target} = cat([{', '.join(ln.parts)}], dim={ln.dim})"
    if ln.op == "":
        return f"{ln.name} = {_atom(ln.args[0])}"
    if ln.op in CASTS or ln.op == "rand_like":
        return f"{ln.name} = {ln.op}({_atom(ln.args[0])})"
    op = OPS[ln.op]
    params = [p for p in op.params if not (op.rule == "reduce" and p == "dim")]
    parts, keyword = [], op.rule == "reduce"
    for p, a in zip(params, ln.args):
        if a is None:
            keyword = True
        elif keyword and parts:
            parts.append(f"{p}={_atom(a)}")
        else:
            parts.append(_atom(a))
    return f"{ln.name} = {ln.op}({', '.join(parts)})"
