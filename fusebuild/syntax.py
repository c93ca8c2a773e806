"""Fusion-group bodies: the untyped first stage of the IR.

A `Group` is a parsed spec group. Its body is parsed with `ast` against a whitelist (never
evaluated) into untyped statements; every construct keeps its position so errors point into the
YAML file. The group also knows, from the body alone, whether it reduces rows (DESIGN §8) and which
outputs are row outputs (UNIFORM / ROW / FULL levels). `ir.instantiate` types it into a kernel.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
import warnings
from dataclasses import dataclass, field, replace

from . import dtypes as dt
from .deep import trampoline
from .errors import SpecError
from .runtime.manifest import group_hash
from .ops import (ABSENT, BINOPS, CASTS, CMPOPS, CONSTANTS, OPS, REDUCTIONS, REQUIRED, UNARYOPS,
                  OpDef)
from .unparse import unparse

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
    grad_alias: tuple = ()              # backward groups: (input, name) for each listed input
                                        # whose gradient is an output or input named there

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
        if self.reduces:
            d["reduce"] = True
        if self.grad_alias:
            d["grad_alias"] = dict(self.grad_alias)
        return d

    def ir_json(self) -> dict:
        """to_json without the doc: everything that determines the generated code."""
        return {k: v for k, v in self.to_json().items() if k != "doc"}

    @property
    def spec_hash(self) -> str:
        return group_hash(self.ir_json())

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
    group = parse_group(d["name"], inputs, outputs, d["body"], SourceMap(file, 1, (1,) * lines),
                        doc=d.get("doc", ""))
    return replace(group, grad_alias=tuple(d.get("grad_alias", {}).items()))


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
