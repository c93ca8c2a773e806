"""Canonical text of a body statement: `ast.unparse` of the body whitelist, without recursion.

`ast.unparse` recurses about three frames per level and fails on a sum of 330 terms; this
printer gives the same text (tests compare the two) for bodies of any depth. The text is the
group's canonical body: it goes into the manifest and the spec hash.
"""
from __future__ import annotations

import ast
import sys

from .deep import trampoline

# ast's operator precedence (ast._Precedence), lowest first
TUPLE, TEST, NOT, CMP, BOR, BXOR, BAND, SHIFT, ARITH, TERM, FACTOR, POWER, ATOM = range(13)
_BINOP = {"Add": ("+", ARITH), "Sub": ("-", ARITH), "Mult": ("*", TERM), "Div": ("/", TERM),
          "FloorDiv": ("//", TERM), "Mod": ("%", TERM), "Pow": ("**", POWER),
          "LShift": ("<<", SHIFT), "RShift": (">>", SHIFT), "BitOr": ("|", BOR),
          "BitXor": ("^", BXOR), "BitAnd": ("&", BAND)}
_UNARY = {"USub": ("-", FACTOR), "UAdd": ("+", FACTOR), "Invert": ("~", FACTOR),
          "Not": ("not ", NOT)}
_CMP = {"Eq": "==", "NotEq": "!=", "Lt": "<", "LtE": "<=", "Gt": ">", "GtE": ">="}
_INF = "1e" + repr(sys.float_info.max_10_exp + 1)   # as ast.unparse writes inf


def unparse(stmt: ast.stmt) -> str:
    """The canonical text of an `Assign` statement of a (parsed and checked) body."""
    targets = " = ".join(trampoline(_step, (t, TUPLE)) for t in stmt.targets)
    return f"{targets} = {trampoline(_step, (stmt.value, TEST))}"


def _constant(value) -> str:
    if isinstance(value, float):
        return repr(value).replace("inf", _INF).replace("nan", f"({_INF}-{_INF})")
    return repr(value)


def _step(item):
    """Text of `node` printed where an operand of precedence `context` is expected."""
    node, context = item
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.BinOp):
        op, prec = _BINOP[type(node.op).__name__]
        lhs, rhs = (prec + 1, prec) if op == "**" else (prec, prec + 1)
        left = yield node.left, lhs
        text, own = f"{left} {op} {(yield node.right, rhs)}", prec
    elif isinstance(node, ast.UnaryOp):
        op, own = _UNARY[type(node.op).__name__]
        text = op + (yield node.operand, own)
    elif isinstance(node, ast.Compare):
        text, own = (yield node.left, CMP + 1), CMP
        for op, right in zip(node.ops, node.comparators):
            text += f" {_CMP[type(op).__name__]} {(yield right, CMP + 1)}"
    elif isinstance(node, ast.IfExp):
        body, test = (yield node.body, TEST + 1), (yield node.test, TEST + 1)
        text, own = f"{body} if {test} else {(yield node.orelse, TEST)}", TEST
    elif isinstance(node, ast.Call):
        parts = []
        for a in node.args:
            parts.append((yield a, TEST))
        for k in node.keywords:
            parts.append(f"{k.arg}={(yield k.value, TEST)}")
        return f"{(yield node.func, ATOM)}({', '.join(parts)})"
    elif isinstance(node, (ast.List, ast.Tuple)):
        elts = []
        for e in node.elts:
            elts.append((yield e, TEST))
        if isinstance(node, ast.List):
            return f"[{', '.join(elts)}]"
        text, own = ", ".join(elts) + ("," if len(elts) == 1 else ""), TUPLE
        if not elts:
            return "()"
    else:
        raise TypeError(f"{type(node).__name__} is not part of a checked body")
    return f"({text})" if context > own else text
