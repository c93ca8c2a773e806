"""The v1 op table: signatures, typing rules and the expansion of composite ops.

Every op a spec body may call is listed here once. Primitive ops are rendered by each backend from
its own template table; composite ops (activations, clamp, lerp, ...) are expanded here into
primitives, so backends never see them. The reference evaluator implements every op directly from
its mathematical definition, which keeps it an independent oracle for these expansions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

REQUIRED = object()   # marks a parameter without default
ABSENT = None         # default of an optional parameter that may be left out (clamp's min/max)


@dataclass(frozen=True)
class OpDef:
    name: str
    params: tuple[str, ...]
    defaults: tuple = ()          # defaults of the trailing params (numbers or ABSENT)
    rule: str = "float"           # typing rule, see TYPE_RULES
    composite: bool = False       # expanded by EXPANSIONS into primitives

    @property
    def min_args(self) -> int:
        return len(self.params) - len(self.defaults)


# Typing rules (operands are promoted together, see dtypes.result_type):
#   float    result is the promoted float type; ints and bool compute in float32
#   arith    promoted type, bool not allowed
#   any      promoted type, bool allowed (min, max, clamp, where's branches)
#   round    float keeps its type, ints pass unchanged, bool not allowed
#   bitwise  ints or bool only
#   shift    ints only
#   cmp      operands promoted, result bool
#   logical  any operands, result bool
#   pred     any operand, result bool (isnan, isinf, isfinite)
#   reduce   a row reduction over the last dim (REDUCTIONS: operand types and results there)
TYPE_RULES = ("float", "arith", "any", "round", "bitwise", "shift", "cmp", "logical", "pred",
              "reduce")

_UNARY_FLOAT = ("exp exp2 expm1 log log2 log10 log1p sqrt rsqrt reciprocal sin cos tan asin acos "
                "atan sinh cosh tanh erf erfc lgamma frac sigmoid selu gelu gelu_tanh silu mish "
                "hardsigmoid hardswish").split()

OPS: dict[str, OpDef] = {}


def _add(name, params, defaults=(), rule="float", composite=False):
    OPS[name] = OpDef(name, tuple(params), tuple(defaults), rule, composite)


# gelu (0.5 x erfc(-x / sqrt 2)) is primitive: in its tail erfc amplifies the rounding error of
# its argument 2u**2-fold, so backends compute the argument beyond the compute type's precision.
for _n in _UNARY_FLOAT:
    _add(_n, ["x"], composite=_n in ("reciprocal", "frac", "selu", "gelu_tanh", "silu", "mish",
                                     "hardsigmoid", "hardswish"))
for _n in ("abs", "neg", "sign"):
    _add(_n, ["x"], rule="arith")
for _n in ("ceil", "floor", "round", "trunc"):
    _add(_n, ["x"], rule="round")
for _n in ("isnan", "isinf", "isfinite"):
    _add(_n, ["x"], rule="pred")
for _n in ("add", "sub", "mul", "floor_divide", "fmod", "remainder", "pow"):
    _add(_n, ["a", "b"], rule="arith")
_add("div", ["a", "b"])
_add("atan2", ["a", "b"])
for _n in ("min", "max"):
    _add(_n, ["a", "b"], rule="any")
for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    _add(_n, ["a", "b"], rule="cmp")
for _n in ("logical_and", "logical_or", "logical_xor"):
    _add(_n, ["a", "b"], rule="logical")
_add("logical_not", ["x"], rule="logical")
for _n in ("bitwise_and", "bitwise_or", "bitwise_xor"):
    _add(_n, ["a", "b"], rule="bitwise")
_add("bitwise_not", ["x"], rule="bitwise")
for _n in ("lshift", "rshift"):
    _add(_n, ["a", "b"], rule="shift")
_add("where", ["cond", "a", "b"], rule="any")
_add("lerp", ["a", "b", "weight"], composite=True)
_add("clamp", ["x", "min", "max"], (ABSENT, ABSENT), rule="any", composite=True)
_add("threshold", ["x", "threshold", "value"], rule="any", composite=True)
_add("addcmul", ["s", "a", "b", "value"], (1,), rule="arith", composite=True)
_add("relu", ["x"], rule="any", composite=True)
_add("relu6", ["x"], rule="any", composite=True)
_add("leaky_relu", ["x", "slope"], (0.01,), composite=True)
_add("elu", ["x", "alpha"], (1.0,), composite=True)
_add("softplus", ["x", "beta", "threshold"], (1.0, 20.0), composite=True)
_add("hardtanh", ["x", "min_val", "max_val"], (-1.0, 1.0), rule="any", composite=True)
_add("logit", ["x", "eps"], (ABSENT,), composite=True)

# Row reductions over the last dim (DESIGN §8). `dim` is checked by the parser (-1 or the last
# dim's index); the other parameters are uniform values (literals or scalar inputs).
_add("sum", ["x", "dim"], (-1,), rule="reduce")
_add("mean", ["x", "dim"], (-1,), rule="reduce", composite=True)
_add("amax", ["x", "dim"], (-1,), rule="reduce")
_add("amin", ["x", "dim"], (-1,), rule="reduce")
_add("var", ["x", "dim", "correction"], (-1, 0), rule="reduce", composite=True)
_add("softmax", ["x", "dim"], (-1,), rule="reduce", composite=True)
_add("log_softmax", ["x", "dim"], (-1,), rule="reduce", composite=True)
_add("logsumexp", ["x", "dim"], (-1,), rule="reduce", composite=True)
_add("layer_norm", ["x", "eps"], (1e-5,), rule="reduce", composite=True)
_add("rms_norm", ["x", "eps"], (1e-6,), rule="reduce", composite=True)


@dataclass(frozen=True)
class Reduction:
    """How a row reduction types: which operands it takes and what it gives."""
    ints: str        # integer/bool operands: 'int64' (summed in int64), 'keep' (their own type)
                     # or 'error' (float-only, like torch)
    row: bool        # gives one value per row (keepdim) rather than a full row


REDUCTIONS: dict[str, Reduction] = {
    "sum": Reduction("int64", True), "amax": Reduction("keep", True),
    "amin": Reduction("keep", True), "mean": Reduction("error", True),
    "var": Reduction("error", True), "logsumexp": Reduction("error", True),
    "softmax": Reduction("error", False), "log_softmax": Reduction("error", False),
    "layer_norm": Reduction("error", False), "rms_norm": Reduction("error", False),
}
# The typed graph's row primitives (never written in a body): sum, NaN-propagating max and min
# of the operand over the row, and the row length N. Backends render them in their row loops.
ROW_OPS = ("rsum", "rmax", "rmin", "rowlen")
PRIMITIVE_REDUCTION = {"sum": "rsum", "amax": "rmax", "amin": "rmin"}

# Spelled-out aliases of the body's operators, so `a + b` and `add(a, b)` are the same op.
BINOPS = {"Add": "add", "Sub": "sub", "Mult": "mul", "Div": "div", "FloorDiv": "floor_divide",
          "Mod": "remainder", "Pow": "pow", "LShift": "lshift", "RShift": "rshift",
          "BitAnd": "bitwise_and", "BitOr": "bitwise_or", "BitXor": "bitwise_xor"}
CMPOPS = {"Eq": "eq", "NotEq": "ne", "Lt": "lt", "LtE": "le", "Gt": "gt", "GtE": "ge"}
UNARYOPS = {"USub": "neg", "Invert": "bitwise_not", "Not": "logical_not"}

CASTS = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
         "uint8", "bool")
CONSTANTS = {"inf": math.inf, "nan": math.nan, "pi": math.pi}

# Ops a backend renders from its op table: everything that is neither composite nor a reduction.
PRIMITIVES = tuple(n for n, d in OPS.items() if not d.composite and d.rule != "reduce")


# --- expansions ------------------------------------------------------------------------------
# Each receives a builder `b` whose methods emit primitive nodes in the op's compute dtype `t`
# (all operands are already of that dtype). `b.c(v)` is a constant of dtype t.

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
SQRT_2_OVER_PI = 0.7978845608028654
GELU_TANH_K = 0.044715


def _clamp(b, x, lo, hi):
    # NaN in x propagates; min/max of the table propagate NaN of either operand.
    if lo is not None:
        x = b.op("max", x, lo)
    if hi is not None:
        x = b.op("min", x, hi)
    return x


def _logit(b, z):
    """log(z / (1 - z)); near z = 0.5 as log1p((2z - 1) / (1 - z)), where 2z - 1 is exact and
    nothing cancels."""
    one_minus = b.op("sub", b.c(1), z)
    central = b.op("log1p", b.op("div", b.op("sub", b.op("add", z, z), b.c(1)), one_minus))
    outer = b.op("log", b.op("div", z, one_minus))
    near_half = b.op("lt", b.op("abs", b.op("sub", z, b.c(0.5))), b.c(0.25))
    return b.op("where", near_half, central, outer)


EXPANSIONS: dict[str, Callable] = {
    "reciprocal": lambda b, x: b.op("div", b.c(1), x),
    "frac": lambda b, x: b.op("sub", x, b.op("trunc", x)),
    "lerp": lambda b, a, e, w: b.op(
        "where", b.op("lt", b.op("abs", w), b.c(0.5)),
        b.op("add", a, b.op("mul", w, b.op("sub", e, a))),
        b.op("sub", e, b.op("mul", b.op("sub", e, a), b.op("sub", b.c(1), w)))),
    "clamp": _clamp,
    # torch's threshold: x <= threshold gives value, otherwise x (so NaN stays NaN)
    "threshold": lambda b, x, th, v: b.op("where", b.op("le", x, th), v, x),
    "addcmul": lambda b, s, x, y, v: b.op("add", s, b.op("mul", b.op("mul", v, x), y)),
    "relu": lambda b, x: b.op("max", x, b.c(0)),   # NaN-propagating, like torch.relu
    "relu6": lambda b, x: _clamp(b, x, b.c(0), b.c(6)),
    "leaky_relu": lambda b, x, s: b.op("where", b.op("gt", x, b.c(0)), x, b.op("mul", x, s)),
    "elu": lambda b, x, a: b.op("where", b.op("gt", x, b.c(0)), x,
                                b.op("mul", a, b.op("expm1", x))),
    "selu": lambda b, x: b.op("mul", b.c(SELU_SCALE), b.op(
        "where", b.op("gt", x, b.c(0)), x, b.op("mul", b.c(SELU_ALPHA), b.op("expm1", x)))),
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): x * sigmoid(2u) avoids the cancellation at x << 0.
    "gelu_tanh": lambda b, x: b.op("mul", x, b.op("sigmoid", b.op(
        "mul", b.c(2 * SQRT_2_OVER_PI),
        b.op("add", x, b.op("mul", b.c(GELU_TANH_K), b.op("mul", x, b.op("mul", x, x))))))),
    "silu": lambda b, x: b.op("mul", x, b.op("sigmoid", x)),
    "softplus": lambda b, x, beta, th: b.op(
        "where", b.op("gt", b.op("mul", x, beta), th), x,
        b.op("div", b.op("log1p", b.op("exp", b.op("mul", x, beta))), beta)),
    "mish": lambda b, x: b.op("mul", x, b.op("tanh", EXPANSIONS["softplus"](b, x, b.c(1), b.c(20)))),
    "hardsigmoid": lambda b, x: b.op("div", _clamp(b, b.op("add", x, b.c(3)), b.c(0), b.c(6)), b.c(6)),
    "hardswish": lambda b, x: b.op("div", b.op("mul", x, _clamp(b, b.op("add", x, b.c(3)), b.c(0),
                                                                 b.c(6))), b.c(6)),
    "hardtanh": lambda b, x, lo, hi: _clamp(b, x, lo, hi),
    "logit": lambda b, x, eps: _logit(b, x if eps is None else _clamp(b, x, eps,
                                                                         b.op("sub", b.c(1), eps))),
}


# --- row reductions: expansions into the row primitives ------------------------------------
# Each receives the builder with `b.t` the accumulation type (float32 or float64) and operands in
# it; `b.row(op, x)` emits a row primitive, `b.n()` the row length in b.t.

def _mean(b, x):
    return b.op("div", b.row("rsum", x), b.n())


def _var(b, x, correction):
    """Two passes: the mean, then the sum of squared deviations (no cancellation of sums of
    squares); divided by N - correction like torch (N - correction <= 0 gives inf or NaN, an
    empty row NaN)."""
    d = b.op("sub", x, _mean(b, x))
    v = b.op("div", b.row("rsum", b.op("mul", d, d)), b.op("sub", b.n(), correction))
    return b.op("where", b.op("eq", b.n(), b.c(0)), b.c(math.nan), v)


def _shifted_exp(b, x, m):
    return b.op("exp", b.op("sub", x, m))


def _softmax(b, x):
    """exp(x - max) times the reciprocal of its sum (one division per row, as torch's CPU and
    CUDA kernels; within 1 ULP of dividing each element)."""
    e = _shifted_exp(b, x, b.row("rmax", x))
    return b.op("mul", e, b.op("div", b.c(1), b.row("rsum", e)))


def _lse_shift(b, x):
    """logsumexp's shift: the row max, taken as 0 where it is not finite."""
    m = b.row("rmax", x)
    return b.op("where", b.op("isfinite", m), m, b.c(0))


def _log_softmax(b, x):
    """(x - m) - log(sum(exp(x - m))) with logsumexp's shift m, so that a group computing both
    computes exp(x - m) once. torch's NaN rows (holding +inf or NaN, or only -inf) come from
    subtracting 0 * max per row (NaN there, 0 otherwise)."""
    m = _lse_shift(b, x)
    r = b.op("log", b.row("rsum", _shifted_exp(b, x, m)))
    r = b.op("sub", r, b.op("mul", b.c(0), b.row("rmax", x)))
    return b.op("sub", b.op("sub", x, m), r)


def _logsumexp(b, x):
    """torch's: the max is taken as 0 where it is not finite, so a row of -inf gives -inf, a
    row holding +inf gives +inf (not NaN) and an empty row log(0) = -inf (a NaN still gives NaN:
    it reaches the sum)."""
    m = _lse_shift(b, x)
    return b.op("add", b.op("log", b.row("rsum", _shifted_exp(b, x, m))), m)


def _layer_norm(b, x, eps):
    d = b.op("sub", x, _mean(b, x))
    var = b.op("div", b.row("rsum", b.op("mul", d, d)), b.n())
    return b.op("mul", d, b.op("rsqrt", b.op("add", var, eps)))


def _rms_norm(b, x, eps):
    return b.op("mul", x, b.op("rsqrt", b.op("add", _mean(b, b.op("mul", x, x)), eps)))


EXPANSIONS.update({"mean": _mean, "var": _var, "softmax": _softmax,
                   "log_softmax": _log_softmax, "logsumexp": _logsumexp,
                   "layer_norm": _layer_norm, "rms_norm": _rms_norm})

assert set(EXPANSIONS) == {n for n, d in OPS.items() if d.composite}


# --- derivatives (reverse mode, DESIGN §9) --------------------------------------------------
# Each rule receives a builder `d` (the expansion interface: d.op, d.c, d.row, d.n), the
# gradient `g` of the op's result, the result `y` and the operands; it returns one gradient term
# per operand (None where there is none). Formulas follow torch's derivatives.yaml, so ties and
# edges (relu at 0, max of equal operands, clamp at its bounds) give what torch gives.
# Composite ops without a rule here are differentiated through their expansion; ops in
# ZERO_GRAD contribute nothing (comparisons, rounding, integer ops), as in torch.

LN2, LN10 = math.log(2.0), math.log(10.0)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_HALF = math.sqrt(0.5)

ZERO_GRAD = frozenset(n for n, o in OPS.items() if o.rule in (
    "cmp", "logical", "pred", "bitwise", "shift", "round")) | {
    "sign", "floor_divide", "rand_like", "int8", "int16", "int32", "int64", "uint8", "bool"}
FLOAT_CASTS = ("float16", "bfloat16", "float32", "float64")


def _mul(d, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = d.op("mul", out, x)
    return out


def _neg(d, x):
    return d.op("neg", x)


def _unary(f):
    """A rule for y = op(x) from dy/dx as f(d, x, y)."""
    return lambda d, g, y, x: (_mul(d, g, f(d, x, y)),)


def _max_rule(d, g, y, a, b, flip: bool):
    """torch's maximum/minimum backward: equal operands share the gradient."""
    half = d.op("div", g, d.c(2))
    lose_a, lose_b = ("gt", "lt") if flip else ("lt", "gt")
    return (d.op("where", d.op("eq", a, b), half, d.op("where", d.op(lose_a, a, b), d.c(0), g)),
            d.op("where", d.op("eq", a, b), half, d.op("where", d.op(lose_b, a, b), d.c(0), g)))


def _pow_rule(d, g, y, a, b):
    da = d.op("where", d.op("eq", b, d.c(0)), d.c(0),
              _mul(d, g, b, d.op("pow", a, d.op("sub", b, d.c(1)))))
    db = d.op("where", d.op("logical_and", d.op("eq", a, d.c(0)), d.op("ge", b, d.c(0))),
              d.c(0), _mul(d, g, y, d.op("log", a)))
    return da, db


def _atan2_rule(d, g, y, a, b):
    r = d.op("add", d.op("mul", a, a), d.op("mul", b, b))
    return d.op("div", d.op("mul", g, b), r), _neg(d, d.op("div", d.op("mul", g, a), r))


def _clamp_rule(d, g, y, x, lo, hi):
    inside = None
    for bound, cmp in ((lo, "ge"), (hi, "le")):
        if bound is not None:
            c = d.op(cmp, x, bound)
            inside = c if inside is None else d.op("logical_and", inside, c)
    dx = d.op("where", inside, g, d.c(0))
    dlo = None if lo is None else d.op("where", d.op("lt", x, lo), g, d.c(0))
    dhi = None if hi is None else d.op("where", d.op("gt", x, hi), g, d.c(0))
    return dx, dlo, dhi


def _inside_rule(lo, hi):
    """hardtanh/relu6: the gradient passes strictly between the bounds (torch)."""
    def rule(d, g, y, x, *bounds):
        a, b = bounds if bounds else (d.c(lo), d.c(hi))
        out = d.op("logical_or", d.op("le", x, a), d.op("ge", x, b))
        return (d.op("where", out, d.c(0), g),) + (None,) * len(bounds)
    return rule


def _softplus_rule(d, g, y, x, beta, th):
    z = d.op("mul", x, beta)
    return d.op("where", d.op("gt", z, th), g, d.op("mul", g, d.op("sigmoid", z))), None, None


def _logit_rule(d, g, y, x, eps):
    dx = d.op("div", g, d.op("mul", x, d.op("sub", d.c(1), x)))
    if eps is None:
        out, fill = d.op("logical_or", d.op("lt", x, d.c(0)), d.op("gt", x, d.c(1))), d.c(math.nan)
    else:
        out = d.op("logical_or", d.op("lt", x, eps), d.op("gt", x, d.op("sub", d.c(1), eps)))
        fill = d.c(0)
    return d.op("where", out, fill, dx), None


def _gelu_grad(d, x, y):
    """Phi(x) + x phi(x)."""
    cdf = d.op("mul", d.c(0.5), d.op("erfc", d.op("mul", x, d.c(-SQRT_HALF))))
    pdf = d.op("mul", d.c(INV_SQRT_2PI), d.op("exp", d.op("mul", d.c(-0.5), d.op("mul", x, x))))
    return d.op("add", cdf, d.op("mul", x, pdf))


def _mean_of(d, x):
    return d.op("div", d.row("rsum", x), d.n())


def _centered(d, x):
    return d.op("sub", x, _mean_of(d, x))


def _amax_rule(d, g, y, x, *_):
    """torch's amax/amin backward: the gradient is shared evenly by the values equal to y."""
    hit = d.op("eq", x, y)
    return (d.op("where", hit, d.op("div", g, d.row("rsum", hit)), d.c(0)),)


def _var_rule(d, g, y, x, correction):
    # d.n() is float32 (exact below 2**24): divide by it last, in the operand's type
    return d.op("div", _mul(d, g, d.c(2), _centered(d, x)), d.op("sub", d.n(), correction)), None


def _softmax_rule(d, g, y, x):
    return (d.op("mul", y, d.op("sub", g, d.row("rsum", d.op("mul", g, y)))),)


def _log_softmax_rule(d, g, y, x):
    return (d.op("sub", g, d.op("mul", d.op("exp", y), d.row("rsum", g))),)


def _layer_norm_rule(d, g, y, x, eps):
    c = _centered(d, x)
    rstd = d.op("rsqrt", d.op("add", _mean_of(d, d.op("mul", c, c)), eps))
    inner = d.op("sub", d.op("sub", g, _mean_of(d, g)), d.op("mul", y, _mean_of(d, d.op("mul", g, y))))
    return d.op("mul", rstd, inner), None


def _rms_norm_rule(d, g, y, x, eps):
    r = d.op("rsqrt", d.op("add", _mean_of(d, d.op("mul", x, x)), eps))
    return d.op("mul", r, d.op("sub", g, d.op("mul", y, _mean_of(d, d.op("mul", g, y))))), None


DERIVATIVES: dict[str, Callable] = {
    "exp": _unary(lambda d, x, y: y),
    "exp2": _unary(lambda d, x, y: d.op("mul", y, d.c(LN2))),
    "expm1": _unary(lambda d, x, y: d.op("add", y, d.c(1))),
    "log": lambda d, g, y, x: (d.op("div", g, x),),
    "log2": lambda d, g, y, x: (d.op("div", g, d.op("mul", x, d.c(LN2))),),
    "log10": lambda d, g, y, x: (d.op("div", g, d.op("mul", x, d.c(LN10))),),
    "log1p": lambda d, g, y, x: (d.op("div", g, d.op("add", x, d.c(1))),),
    "sqrt": lambda d, g, y, x: (d.op("div", g, d.op("mul", d.c(2), y)),),
    "rsqrt": _unary(lambda d, x, y: _mul(d, d.c(-0.5), y, y, y)),
    "sin": _unary(lambda d, x, y: d.op("cos", x)),
    "cos": _unary(lambda d, x, y: _neg(d, d.op("sin", x))),
    "tan": _unary(lambda d, x, y: d.op("add", d.c(1), d.op("mul", y, y))),
    "asin": _unary(lambda d, x, y: d.op("rsqrt", d.op("sub", d.c(1), d.op("mul", x, x)))),
    "acos": _unary(lambda d, x, y: _neg(d, d.op("rsqrt", d.op("sub", d.c(1), d.op("mul", x, x))))),
    "atan": lambda d, g, y, x: (d.op("div", g, d.op("add", d.op("mul", x, x), d.c(1))),),
    "sinh": _unary(lambda d, x, y: d.op("cosh", x)),
    "cosh": _unary(lambda d, x, y: d.op("sinh", x)),
    "tanh": _unary(lambda d, x, y: d.op("sub", d.c(1), d.op("mul", y, y))),
    "erf": _unary(lambda d, x, y: d.op("mul", d.c(TWO_OVER_SQRT_PI),
                                      d.op("exp", _neg(d, d.op("mul", x, x))))),
    "erfc": _unary(lambda d, x, y: d.op("mul", d.c(-TWO_OVER_SQRT_PI),
                                       d.op("exp", _neg(d, d.op("mul", x, x))))),
    "sigmoid": _unary(lambda d, x, y: d.op("mul", y, d.op("sub", d.c(1), y))),
    "gelu": _unary(_gelu_grad),
    "abs": _unary(lambda d, x, y: d.op("sign", x)),
    "neg": lambda d, g, y, x: (_neg(d, g),),
    "add": lambda d, g, y, a, b: (g, g),
    "sub": lambda d, g, y, a, b: (g, _neg(d, g)),
    "mul": lambda d, g, y, a, b: (d.op("mul", g, b), d.op("mul", g, a)),
    "div": lambda d, g, y, a, b: (d.op("div", g, b),
                                  _neg(d, d.op("div", d.op("mul", g, a), d.op("mul", b, b)))),
    "pow": _pow_rule,
    "atan2": _atan2_rule,
    "fmod": lambda d, g, y, a, b: (g, _neg(d, d.op("mul", g, d.op("trunc", d.op("div", a, b))))),
    "remainder": lambda d, g, y, a, b: (g, _neg(d, d.op("mul", g, d.op("floor", d.op("div", a, b))))),
    "max": lambda d, g, y, a, b: _max_rule(d, g, y, a, b, False),
    "min": lambda d, g, y, a, b: _max_rule(d, g, y, a, b, True),
    "where": lambda d, g, y, c, a, b: (None, d.op("where", c, g, d.c(0)),
                                       d.op("where", c, d.c(0), g)),
    "hardsigmoid": lambda d, g, y, x: (d.op("where", d.op("logical_and", d.op("gt", x, d.c(-3)),
                                                          d.op("lt", x, d.c(3))),
                                            d.op("div", g, d.c(6)), d.c(0)),),
    "hardswish": lambda d, g, y, x: (d.op("where", d.op("lt", x, d.c(-3)), d.c(0), d.op(
        "where", d.op("le", x, d.c(3)), d.op("mul", g, d.op("add", d.op("div", x, d.c(3)),
                                                           d.c(0.5))), g)),),
    "relu": lambda d, g, y, x: (d.op("where", d.op("le", y, d.c(0)), d.c(0), g),),
    "relu6": _inside_rule(0, 6),
    "hardtanh": _inside_rule(-1, 1),
    "clamp": _clamp_rule,
    "softplus": _softplus_rule,
    "logit": _logit_rule,
    "sum": lambda d, g, y, x: (g,),
    "mean": lambda d, g, y, x: (d.op("div", g, d.n()),),
    "amax": _amax_rule,
    "amin": _amax_rule,
    "var": _var_rule,
    "softmax": _softmax_rule,
    "log_softmax": _log_softmax_rule,
    "logsumexp": lambda d, g, y, x: (d.op("mul", g, d.op("exp", d.op("sub", x, y))),),
    "layer_norm": _layer_norm_rule,
    "rms_norm": _rms_norm_rule,
    **{c: (lambda d, g, y, x: (g,)) for c in FLOAT_CASTS},
}
