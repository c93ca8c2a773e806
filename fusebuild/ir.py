"""Fusion-group IR.

Two levels:
- `Group`: a parsed spec group. Its body is parsed with `ast` against a whitelist (never evaluated)
  into untyped statements; every construct keeps its position so errors point into the YAML file.
- `Kernel`: a group instantiated for concrete input dtypes (`instantiate`): a typed, topologically
  ordered graph of primitive ops in which every operand already has its op's dtype (casts are
  explicit), composite ops are expanded and dead values removed. Codegen consumes only this.

float16/bfloat16 values are *held* in float32: a node's dtype is its logical type, and backends
round to the storage type only at casts and stores. A `hold` node takes a value already in the
compute type as float16/bfloat16 without rounding: scalar inputs enter half-precision ops that way
(in the compute type, as torch keeps scalars in its opmath type, and like literals).
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import struct
import sys
import tokenize
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import dtypes as dt
from .deep import trampoline
from .errors import SpecError
from .ops import (ABSENT, BINOPS, CASTS, CMPOPS, CONSTANTS, EXPANSIONS, OPS, PRIMITIVE_REDUCTION,
                  REDUCTIONS, REQUIRED, ROW_OPS, UNARYOPS, OpDef)
from .unparse import unparse

MAX_RAND_WORDS = 4  # one Philox4x32 block per element: 4 words of 32 bits
MAX_NESTING = 1000  # operators and calls nested in one body expression (README: Specs)


@dataclass(frozen=True)
class SourceMap:
    """Maps (body line, body column) to a position in the spec file."""
    file: str = "<body>"
    first_line: int = 1                 # file line of body line 1
    col_offsets: tuple[int, ...] = ()   # file column (1-based) of column 0 of each body line

    def locate(self, line: int, col: int) -> tuple[str, int, int]:
        off = self.col_offsets[line - 1] if 0 < line <= len(self.col_offsets) else 1
        return self.file, self.first_line + line - 1, off + col

    def error(self, message: str, line: int, col: int, hint: str = "") -> SpecError:
        f, ln, c = self.locate(line, col)
        return SpecError(message, f, ln, c, hint)


# ---------------------------------------------------------------- untyped body -----------------

@dataclass(frozen=True)
class Expr:
    kind: str                 # 'num' | 'name' | 'call'
    value: object             # the number, the name, or the op/cast name
    args: tuple = ()
    kwargs: tuple = ()        # ((name, Expr), ...)
    line: int = 0
    col: int = 0


@dataclass(frozen=True)
class Stmt:
    kind: str                 # 'expr' | 'chunk' | 'cat'
    targets: tuple[str, ...]
    expr: Expr | None = None  # 'expr'
    parts: tuple = ()         # 'cat': part expressions
    source: str = ""          # 'chunk': input name
    n: int = 0                # 'chunk' / 'cat': number of pieces
    dim: int = 0              # 'chunk' / 'cat': dimension
    line: int = 0
    col: int = 0


@dataclass(frozen=True)
class InputDecl:
    name: str
    kind: str                          # 'tensor' | 'scalar'
    dtype: dt.DType | None = None      # fixed dtype (always set for scalars)
    chunk: tuple[int, int] | None = None   # (n, dim) when the body chunks it

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind,
                "dtype": self.dtype.name if self.dtype else None,
                "chunk": list(self.chunk) if self.chunk else None}


@dataclass(frozen=True)
class OutputDecl:
    name: str
    dtype: dt.DType | None = None      # forced output dtype
    cat: tuple[int, int] | None = None     # (n, dim) for a concat output
    row: bool = False                  # a row output: one value per row, shape [..., 1]

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype.name if self.dtype else None,
             "cat": list(self.cat) if self.cat else None}
        return {**d, "row": True} if self.row else d


@dataclass(frozen=True)
class Group:
    name: str
    inputs: tuple[InputDecl, ...]
    outputs: tuple[OutputDecl, ...]
    body: str                          # canonical body text
    stmts: tuple[Stmt, ...] = field(compare=False, repr=False)
    has_random: bool = False
    doc: str = ""
    source: SourceMap = field(default_factory=SourceMap, compare=False, repr=False)
    reduces: bool = False               # reduces over the last dim (DESIGN §8)
    dims: tuple = ()                    # (dim, line, col) of each reduction's non-negative dim=

    @property
    def tensor_inputs(self) -> tuple[InputDecl, ...]:
        return tuple(i for i in self.inputs if i.kind == "tensor")

    @property
    def scalar_inputs(self) -> tuple[InputDecl, ...]:
        return tuple(i for i in self.inputs if i.kind == "scalar")

    def to_json(self) -> dict:
        d = {"name": self.name, "doc": self.doc,
             "inputs": [i.to_json() for i in self.inputs],
             "outputs": [o.to_json() for o in self.outputs],
             "body": self.body, "has_random": self.has_random}
        return {**d, "reduce": True} if self.reduces else d

    def ir_json(self) -> dict:
        """to_json without the doc: everything that determines the generated code."""
        return {k: v for k, v in self.to_json().items() if k != "doc"}

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.ir_json(), sort_keys=True).encode()).hexdigest()

    def __reduce__(self):
        """Pickled (to compile workers) as its JSON and re-parsed: `stmts` may nest deeper than
        pickle recurses."""
        return group_from_json, (self.to_json(), self.source.file)


def group_from_json(d: dict, file: str = "<manifest>") -> Group:
    """Rebuild a Group from its manifest form (re-parses the canonical body)."""
    inputs = [(i["name"], i["kind"], dt.lookup(i["dtype"]) if i["dtype"] else None)
              for i in d["inputs"]]
    outputs = [(o["name"], dt.lookup(o["dtype"]) if o["dtype"] else None) for o in d["outputs"]]
    lines = d["body"].count("\n") + 1
    return parse_group(d["name"], inputs, outputs, d["body"],
                       SourceMap(file, 1, (1,) * lines), doc=d.get("doc", ""))


# ---------------------------------------------------------------- body parser ------------------

_ALLOWED_KW = {"chunk": {"dim"}, "cat": {"dim"}}


class _BodyParser:
    def __init__(self, smap: SourceMap, uniform: frozenset = frozenset()):
        self.smap = smap
        self.uniform = uniform      # names of scalar inputs (allowed as eps=, correction=)
        self.dims: list[tuple[int, int, int]] = []

    def err(self, node, message: str, hint: str = "") -> SpecError:
        return self.smap.error(message, getattr(node, "lineno", 1), getattr(node, "col_offset", 0),
                               hint)

    def int_literal(self, node, what: str) -> int:
        value = node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant):
            value = ast.Constant(-node.operand.value) if isinstance(node.operand.value, int) else node
        if isinstance(value, ast.Constant) and type(value.value) is int:
            return value.value
        raise self.err(node, f"{what} must be an integer literal", "write a plain integer such as 2 or -1")

    def expr(self, node) -> Expr:
        """The Expr of an ast expression, however deeply nested (see `deep.trampoline`)."""
        return trampoline(self._expr, node)

    def _expr(self, node):
        pos = dict(line=node.lineno, col=node.col_offset)
        if isinstance(node, ast.Constant):
            if type(node.value) is int and abs(node.value) > sys.float_info.max:
                raise self.err(node, "integer literal is too large (over 1.8e308, the float64 "
                                     "maximum)", "write a float literal such as 1e308, or inf")
            if type(node.value) in (int, float, bool):
                return Expr("num", node.value, **pos)
            raise self.err(node, f"unsupported literal {node.value!r}",
                           "only int, float and bool literals are allowed in a body")
        if isinstance(node, ast.Name):
            return Expr("name", node.id, **pos)
        if isinstance(node, ast.BinOp):
            op = BINOPS.get(type(node.op).__name__)
            if op is None:
                raise self.err(node, f"operator {type(node.op).__name__} is not supported",
                               "supported: + - * / // % ** << >> & | ^")
            left = yield node.left
            return Expr("call", op, (left, (yield node.right)), **pos)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.UAdd):
                return (yield node.operand)
            operand = yield node.operand
            if isinstance(node.op, ast.USub) and operand.kind == "num" \
                    and type(operand.value) is not bool:
                return Expr("num", -operand.value, **pos)
            return Expr("call", UNARYOPS[type(node.op).__name__], (operand,), **pos)
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                raise self.err(node, "chained comparisons are not supported",
                               "write logical_and(a < b, b < c)")
            op = CMPOPS.get(type(node.ops[0]).__name__)
            if op is None:
                raise self.err(node, f"comparison {type(node.ops[0]).__name__} is not supported",
                               "supported: == != < <= > >=")
            left = yield node.left
            return Expr("call", op, (left, (yield node.comparators[0])), **pos)
        if isinstance(node, ast.IfExp):
            test, body = (yield node.test), (yield node.body)
            return Expr("call", "where", (test, body, (yield node.orelse)), **pos)
        if isinstance(node, ast.BoolOp):
            raise self.err(node, "`and`/`or` are not supported",
                           "use logical_and(a, b) / logical_or(a, b), or & and | on bools")
        if isinstance(node, ast.Call):
            return (yield from self.call(node))
        if isinstance(node, ast.Attribute):
            raise self.err(node, "attribute access is not allowed in a body",
                           "call ops by their bare name, e.g. exp(x)")
        if isinstance(node, ast.Subscript):
            raise self.err(node, "subscripts are not allowed in a body",
                           "split tensors with `a, b = chunk(x, 2, dim=-1)`")
        if isinstance(node, ast.Lambda):
            raise self.err(node, "lambdas are not allowed in a body",
                           "assign the expression to a name instead")
        raise self.err(node, f"{type(node).__name__} is not allowed in a body",
                       "a body holds assignments of elementwise expressions only")

    def call(self, node: ast.Call):
        pos = dict(line=node.lineno, col=node.col_offset)
        if isinstance(node.func, ast.Attribute):
            raise self.err(node.func, "attribute access is not allowed in a body",
                           "call ops by their bare name, e.g. exp(x)")
        if not isinstance(node.func, ast.Name):
            raise self.err(node, "only ops of the table can be called",
                           "call ops by their bare name, e.g. exp(x)")
        name = node.func.id
        if any(isinstance(a, ast.Starred) for a in node.args) or \
                any(k.arg is None for k in node.keywords):
            raise self.err(node, "*args and **kwargs are not allowed in a body",
                           "pass arguments one by one")
        if name in ("chunk", "cat"):
            raise self.err(node, f"{name}() is only allowed as a whole statement",
                           "write `a, b = chunk(x, 2, dim=1)` or `y = cat([p, q], dim=-1)`"
                           if name == "chunk" else "cat([...]) builds an output: `y = cat([p, q], dim=-1)`")
        if name in CASTS:
            if len(node.args) != 1 or node.keywords:
                raise self.err(node, f"cast {name}() takes exactly one argument", f"{name}(x)")
            return Expr("call", name, ((yield node.args[0]),), **pos)
        if name == "rand_like":
            if len(node.args) != 1 or node.keywords:
                raise self.err(node, "rand_like() takes exactly one argument", "rand_like(x)")
            return Expr("call", name, ((yield node.args[0]),), **pos)
        op = OPS.get(name)
        if op is None:
            from difflib import get_close_matches
            near = get_close_matches(name, list(OPS) + list(CASTS) + ["rand_like"], n=3)
            raise self.err(node, f"unknown op '{name}'",
                           f"did you mean {', '.join(near)}?" if near else
                           "see the op table in the README (section Specs)")
        e = yield from self.bind(op, node, pos)
        if op.rule == "reduce":
            e = self.reduction(op, e)
        return e

    def reduction(self, op: OpDef, e: Expr) -> Expr:
        """A reduction without its `dim` argument, which must be -1 or a non-negative literal
        (checked against the shapes' rank by the spec); the rest must be uniform values."""
        params = dict(zip(op.params, e.args))
        dim = params.pop("dim", None)
        if dim is not None:
            if dim.kind != "num" or type(dim.value) is not int:
                raise self.smap.error(
                    f"dim= of {op.name}() must be an integer literal, got {_show(dim)}",
                    dim.line, dim.col, f"write {op.name}(x) or {op.name}(x, dim=-1): reductions "
                    "reduce the last dim")
            if dim.value < -1:
                raise self.smap.error(
                    f"{op.name}() reduces the last dim only: dim={dim.value} is not supported",
                    dim.line, dim.col, f"write {op.name}(x, dim=-1) and pass a view whose last "
                    "dim is the one to reduce (a transposed view is a strided call)")
            if dim.value >= 0:
                self.dims.append((dim.value, dim.line, dim.col))
        for name, a in params.items():
            if name != "x" and a.kind != "num" and not (a.kind == "name" and a.value in self.uniform):
                raise self.smap.error(f"{name}= of {op.name}() must be a number or a scalar input, "
                                      f"got {_show(a)}", a.line, a.col,
                                      f"e.g. {op.name}(x, {name}={_EXAMPLE.get(name, 1)}), or "
                                      f"declare a scalar input ({name}: scalar(float32))")
        return Expr("call", op.name, tuple(params.values()), line=e.line, col=e.col)

    def bind(self, op: OpDef, node: ast.Call, pos: dict):
        if len(node.args) > len(op.params):
            raise self.err(node, f"{op.name}() takes at most {len(op.params)} arguments "
                                 f"({len(node.args)} given)", f"{op.name}({', '.join(op.params)})")
        bound: dict[str, Expr] = {}
        for p, a in zip(op.params, node.args):
            bound[p] = yield a
        for kw in node.keywords:
            if kw.arg not in op.params:
                raise self.err(kw.value, f"{op.name}() got an unexpected keyword '{kw.arg}'",
                               _keyword_hint(op, kw.arg))
            if kw.arg in bound:
                raise self.err(kw.value, f"{op.name}() got multiple values for '{kw.arg}'",
                               f"{op.name}({', '.join(op.params)})")
            bound[kw.arg] = yield kw.value
        missing = [p for p in op.params[:op.min_args] if p not in bound]
        if missing:
            raise self.err(node, f"{op.name}() is missing argument '{missing[0]}'",
                           f"{op.name}({', '.join(op.params)})")
        if op.name == "clamp" and "min" not in bound and "max" not in bound:
            raise self.err(node, "clamp() needs min= or max=", "clamp(x, min=0.0, max=6.0)")
        args = []
        for p, default in zip(op.params, (REQUIRED,) * op.min_args + op.defaults):
            if p in bound:
                args.append(bound[p])
            elif default is ABSENT:
                args.append(None)
            else:
                args.append(Expr("num", default, **pos))
        return Expr("call", op.name, tuple(args), **pos)



def _show(e: Expr) -> str:
    if e.kind == "num":
        return repr(e.value)
    return e.value if e.kind == "name" else f"an expression ({e.value}(...))"


_EXAMPLE = {"eps": "1e-5", "correction": "1"}    # values shown in hints for reduction parameters
_KEEPDIM = ("reductions always keep the reduced dim (size 1, like torch's keepdim=True) and "
            "broadcast against full rows; drop {kw}=")
# Keywords of torch/numpy reductions that the spec language spells differently (or not at all).
_KEYWORD_HINTS = {
    "axis": "reductions take dim=, not axis=: did you mean {op}(x, dim=-1)?",
    "keepdim": _KEEPDIM, "keepdims": _KEEPDIM,
    "unbiased": "write correction=1 for torch's unbiased=True (the default is correction=0)",
    "normalized_shape": "{op}() normalizes the last dim; an affine weight and bias are written "
                        "in the body: {op}(x, eps=1e-5) * w + b",
}


def _keyword_hint(op: OpDef, kw: str) -> str:
    """The hint for an unknown keyword of `op`: a known torch spelling, a close parameter name,
    or the signature."""
    signature = f"{op.name}({', '.join(op.params)})"
    if op.rule == "reduce" and kw == "dim":
        return f"{op.name}() always normalizes the last dim: drop dim=, e.g. {op.name}(x, eps=1e-5)"
    if op.rule == "reduce" and kw in _KEYWORD_HINTS:
        return _KEYWORD_HINTS[kw].format(op=op.name, kw=kw)
    from difflib import get_close_matches
    near = get_close_matches(kw, op.params[1:], n=1)
    return f"did you mean {near[0]}=? {signature}" if near else signature


def _parse_body(body: str, smap: SourceMap) -> ast.Module:
    """`ast.parse` of a body, with its failures (syntax, NUL, nesting) as located SpecErrors."""
    hint = "a body is Python expression syntax, one `name = expr` per line"
    if "\0" in body:
        line = body.count("\n", 0, body.index("\0")) + 1
        col = body.index("\0") - (body.rfind("\n", 0, body.index("\0")) + 1)
        raise smap.error("the body contains a NUL character", line, col, hint)
    try:
        with warnings.catch_warnings():   # e.g. "invalid decimal literal": an error at its place
            warnings.simplefilter("error", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = ast.parse(body, mode="exec")
    except SyntaxError as e:
        raise smap.error(f"syntax error in body: {e.msg}", e.lineno or 1,
                         max(0, (e.offset or 1) - 1), hint) from None
    except (RecursionError, MemoryError):   # Python's own parser gave up on the nesting
        raise smap.error("expression nested too deeply for Python's parser",
                         *_deepest_statement(body), _NESTING_HINT) from None
    for st in module.body:
        _check_nesting(st, smap)
    return module


_NESTING_HINT = (f"a body nests operators and calls at most {MAX_NESTING} deep; "
                 "split the expression with intermediate names (t = ...)")


def _check_nesting(st: ast.stmt, smap: SourceMap) -> None:
    """SpecError at the first operator or call nested more than MAX_NESTING deep."""
    stack = [(st, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp,
                             ast.Call)):
            depth += 1
            if depth > MAX_NESTING:
                raise smap.error(f"expression nested more than {MAX_NESTING} levels deep",
                                 node.lineno, node.col_offset, _NESTING_HINT)
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))


def _deepest_statement(body: str) -> tuple[int, int]:
    """(line, column) of the first statement of `body` that Python's parser gives up on."""
    lines = body.splitlines(keepends=True)
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    start = None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(body).readline):
            if start is None and tok.type not in skip:
                start = tok.start
            elif tok.type == tokenize.NEWLINE and start is not None:
                try:
                    ast.parse("".join(lines[start[0] - 1:tok.end[0]]))
                except (RecursionError, MemoryError):
                    return start
                except SyntaxError:
                    pass
                start = None
    except (tokenize.TokenError, SyntaxError):
        pass
    return 1, 0


def parse_group(name: str, inputs: list[tuple[str, str, dt.DType | None]],
                outputs: list[tuple[str, dt.DType | None]], body: str,
                smap: SourceMap, doc: str = "") -> Group:
    """Parse and check a group body against its declared inputs and outputs."""
    input_kinds = {n: k for n, k, _ in inputs}
    p = _BodyParser(smap, frozenset(n for n, k in input_kinds.items() if k == "scalar"))
    module = _parse_body(body, smap)
    output_names = [n for n, _ in outputs]
    defined: dict[str, str] = {n: "input" for n in input_kinds}
    chunked: dict[str, tuple[int, int]] = {}
    used_whole: set[str] = set()
    cat_outputs: dict[str, tuple[int, int]] = {}
    stmts: list[Stmt] = []
    rand_count = 0

    def check_names(root: Expr):
        stack = [root]
        while stack:
            e = stack.pop()
            if e is not None:
                check_name(e)
                stack.extend(reversed(e.args))

    def check_name(e: Expr):
        nonlocal rand_count
        if e.kind == "name":
            if e.value in CONSTANTS and e.value not in defined:
                return
            if e.value not in defined:
                raise smap.error(f"undefined name '{e.value}'", e.line, e.col,
                                 "define it in an earlier statement or declare it under inputs")
            if defined[e.value] == "cat":
                raise smap.error(f"'{e.value}' is a cat output and cannot be used inside the group",
                                 e.line, e.col, "use the parts themselves")
            if defined[e.value] == "input" and e.value in chunked:
                raise smap.error(f"input '{e.value}' is chunked and cannot also be used whole",
                                 e.line, e.col, "use its chunks")
            if defined[e.value] == "input":
                used_whole.add(e.value)
        if e.kind == "call" and e.value == "rand_like":
            rand_count += 1

    def define(target: str, node, kind: str):
        if target in CONSTANTS:
            raise p.err(node, f"'{target}' is a built-in constant and cannot be assigned",
                        "pick another name")
        if target in defined:
            what = "an input" if defined[target] == "input" else "already assigned"
            raise p.err(node, f"'{target}' is {what} and cannot be reassigned",
                        "every name is assigned once; pick a new name")
        defined[target] = kind

    for st in module.body:
        if not isinstance(st, ast.Assign) or len(st.targets) != 1:
            raise p.err(st, f"{type(st).__name__} is not allowed in a body",
                        "a body holds statements `name = expr` only")
        target, value = st.targets[0], st.value
        pos = dict(line=st.lineno, col=st.col_offset)
        is_call = isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
        if is_call and value.func.id == "chunk":
            stmts.append(_parse_chunk(p, st, target, value, input_kinds, chunked, used_whole, pos))
            for t in stmts[-1].targets:
                define(t, st, "chunk")
            continue
        if isinstance(target, ast.Tuple):
            raise p.err(st, "only chunk() can assign several names", "a, b = chunk(x, 2, dim=1)")
        if not isinstance(target, ast.Name):
            raise p.err(st, "the target of an assignment must be a plain name", "name = expr")
        if is_call and value.func.id == "cat":
            parts, dim = _parse_cat(p, value)
            if target.id not in output_names:
                raise p.err(st, f"cat() result '{target.id}' must be a declared output",
                            "cat builds an output; it cannot be used inside the group")
            for part in parts:
                check_names(part)
            define(target.id, st, "cat")
            cat_outputs[target.id] = (len(parts), dim)
            stmts.append(Stmt("cat", (target.id,), parts=parts, n=len(parts), dim=dim, **pos))
            continue
        e = p.expr(value)
        check_names(e)
        define(target.id, st, "value")
        stmts.append(Stmt("expr", (target.id,), expr=e, **pos))

    for out in output_names:
        if out not in defined or defined[out] == "input":
            raise smap.error(f"output '{out}' is never assigned", len(body.splitlines()) or 1, 0,
                             f"add a statement `{out} = ...` to the body")
    if not any(k == "tensor" for k in input_kinds.values()):
        raise smap.error("a group needs at least one tensor input", 1, 0,
                         "declare one under inputs, e.g. x: tensor")

    canonical = "\n".join(unparse(st) for st in module.body)
    levels = _levels(stmts, input_kinds, smap)
    reduces = any(lv == ROW for lv in levels.values()) or _calls_reduction(stmts)
    in_decls = tuple(InputDecl(n, k, d, chunked.get(n)) for n, k, d in inputs)
    out_decls = tuple(OutputDecl(n, d, cat_outputs.get(n), reduces and levels[n] == ROW)
                      for n, d in outputs)
    return Group(name, in_decls, out_decls, canonical, tuple(stmts), rand_count > 0, doc, smap,
                 reduces, tuple(p.dims))


UNIFORM, ROW, FULL = 0, 1, 2    # what a value varies over: nothing, rows, every element


def _expr_level(e: Expr, env: dict[str, int]) -> int:
    """The level of an untyped expression: a reduction with row=True gives ROW values (whatever
    its operand), softmax-like ones FULL; other ops the highest level of their operands."""
    stack, order = [e], []
    while stack:
        x = stack.pop()
        order.append(x)
        stack.extend(a for a in x.args if a is not None)
    level: dict[int, int] = {}
    for x in reversed(order):
        if x.kind == "num":
            lv = UNIFORM
        elif x.kind == "name":
            lv = env.get(x.value, UNIFORM)
        elif x.value in REDUCTIONS:
            lv = ROW if REDUCTIONS[x.value].row else FULL
        elif x.value == "rand_like":
            lv = FULL
        else:
            lv = max((level[id(a)] for a in x.args if a is not None), default=UNIFORM)
        level[id(x)] = lv
    return level[id(e)]


def _levels(stmts, input_kinds: dict[str, str], smap: SourceMap) -> dict[str, int]:
    """Level of every name: tensor inputs and chunks FULL, scalars UNIFORM; a row value mixed
    into a cat output is a SpecError (a row output is never concatenated)."""
    env = {n: FULL if k == "tensor" else UNIFORM for n, k in input_kinds.items()}
    for st in stmts:
        if st.kind == "chunk":
            env.update({t: FULL for t in st.targets})
        elif st.kind == "expr":
            env[st.targets[0]] = _expr_level(st.expr, env)
        else:
            for part in st.parts:
                if _expr_level(part, env) == ROW:
                    raise smap.error(f"cat() part of '{st.targets[0]}' is a row value (one per "
                                     "row of a reduction) and cannot be concatenated with full "
                                     "rows", part.line, part.col,
                                     "return the row value as an output of its own")
            env[st.targets[0]] = FULL
    return env


def _calls_reduction(stmts) -> bool:
    for st in stmts:
        stack = [st.expr] if st.expr is not None else list(st.parts)
        while stack:
            e = stack.pop()
            if e is None:
                continue
            if e.kind == "call" and e.value in REDUCTIONS:
                return True
            stack.extend(e.args)
    return False


def _parse_chunk(p: _BodyParser, st, target, value: ast.Call, input_kinds, chunked, used_whole,
                 pos) -> Stmt:
    if not isinstance(target, ast.Tuple) or not all(isinstance(t, ast.Name) for t in target.elts):
        raise p.err(st, "chunk() must be assigned to a tuple of names", "a, b = chunk(x, 2, dim=1)")
    if len(value.args) != 2 or any(k.arg not in _ALLOWED_KW["chunk"] for k in value.keywords) \
            or len(value.keywords) != 1:
        raise p.err(value, "chunk() takes (input, n, dim=d)", "a, b = chunk(x, 2, dim=1)")
    src = value.args[0]
    if not isinstance(src, ast.Name) or input_kinds.get(src.id) != "tensor":
        raise p.err(src, "chunk() applies to tensor inputs only",
                    "chunk a declared tensor input; intermediate values cannot be chunked")
    n = p.int_literal(value.args[1], "the number of chunks")
    dim = p.int_literal(value.keywords[0].value, "dim")
    if n < 2:
        raise p.err(value.args[1], "chunk() needs n >= 2", "a, b = chunk(x, 2, dim=1)")
    if len(target.elts) != n:
        raise p.err(st, f"chunk(..., {n}, ...) gives {n} values but {len(target.elts)} names are "
                        "assigned", f"assign {n} names, one per chunk")
    if src.id in chunked:
        raise p.err(value, f"input '{src.id}' is already chunked", "chunk each input once")
    if src.id in used_whole:
        raise p.err(value, f"input '{src.id}' is used whole and cannot also be chunked",
                    "use its chunks only, or declare it twice as two inputs")
    chunked[src.id] = (n, dim)
    return Stmt("chunk", tuple(t.id for t in target.elts), source=src.id, n=n, dim=dim, **pos)


def _parse_cat(p: _BodyParser, value: ast.Call) -> tuple[tuple[Expr, ...], int]:
    if len(value.args) != 1 or not isinstance(value.args[0], (ast.List, ast.Tuple)) \
            or len(value.keywords) != 1 or value.keywords[0].arg != "dim":
        raise p.err(value, "cat() takes ([e1, e2, ...], dim=d)", "y = cat([p, q], dim=-1)")
    parts = tuple(p.expr(e) for e in value.args[0].elts)
    if len(parts) < 2:
        raise p.err(value, "cat() needs at least two parts", "y = cat([p, q], dim=-1)")
    return parts, p.int_literal(value.keywords[0].value, "dim")


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
            d = o.dtype or self.promote(list(vals))
            parts = tuple(self.b.cast(self.materialize(v, d), d) for v in vals)
            outs.append(KernelOutput(o.name, d, parts, o.cat, o.row))
        in_dtypes = tuple(self.dtypes[i.name] for i in self.g.tensor_inputs)
        chunks = tuple(i.chunk for i in self.g.tensor_inputs)
        return _dce(Kernel(self.g.name, in_dtypes, tuple(self.b.nodes), tuple(outs), chunks,
                           self.rand_words, len(self.g.scalar_inputs), self.g.reduces))

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
