"""numpy reference evaluator of the IR: the oracle every numeric test compares against.

It evaluates an *unexpanded* typed graph (`ir.instantiate(..., expand=False)`), implementing each
op from its mathematical definition: float ops are computed in float64 and rounded to the node's
compute type (float32 for float32/float16/bfloat16 nodes), so each op is correctly rounded up to
libm's float64 error; integer ops are exact with two's-complement wrap-around; float16/bfloat16
values are held in float32 and rounded to storage only at casts and at the output, exactly as
the kernels do (scalar inputs enter them unrounded, in float32: `hold` nodes). `compare` states
the tolerances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import dtypes as dt
from .argspec import broadcast_shapes
from .ir import Kernel, int_range
from .ops import REDUCTIONS

# ---------------------------------------------------------------- Philox4x32-10 ----------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: tuple, key: tuple) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 arrays: counter (c0..c3), key (k0, k1)."""
    c = [np.asarray(x, np.uint64) & _M32 for x in counter]
    k0, k1 = (np.asarray(x, np.uint64) & _M32 for x in key)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(PHILOX_W[0])) & _M32
            k1 = (k1 + np.uint64(PHILOX_W[1])) & _M32
        p0 = np.uint64(PHILOX_M[0]) * c[0]
        p1 = np.uint64(PHILOX_M[1]) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & _M32]
    return tuple(x.astype(np.uint32) for x in c)


def philox_words(index: np.ndarray, seed: int, offset: int) -> tuple[np.ndarray, ...]:
    """The four 32-bit words of element `index`: counter (index, offset), key seed."""
    i = np.asarray(index, np.uint64)
    seed, offset = np.uint64(seed), np.uint64(offset)
    return philox4x32_10((i, i >> np.uint64(32), offset, offset >> np.uint64(32)),
                         (seed, seed >> np.uint64(32)))


def uniform_from_words(words: tuple[np.ndarray, ...], first: int, d: dt.DType) -> np.ndarray:
    """Uniform [0, 1) on the grid of dtype d (f64: 53 bits from two words, f32: 24, f16: 11,
    bf16: 8), returned in d's compute type."""
    w = words[first].astype(np.uint64)
    if d == dt.float64:
        bits = ((w << np.uint64(32)) | words[first + 1].astype(np.uint64)) >> np.uint64(11)
        return bits.astype(np.float64) * 2.0 ** -53
    mant = {"float32": 24, "float16": 11, "bfloat16": 8}[d.name]
    return ((w >> np.uint64(32 - mant)).astype(np.float64) * 2.0 ** -mant).astype(np.float32)


# ---------------------------------------------------------------- op implementations -----------

def _erf(x):
    return np.asarray(np.frompyfunc(math.erf, 1, 1)(x), np.float64)   # a float for 0-d x


def _erfc(x):
    return np.asarray(np.frompyfunc(math.erfc, 1, 1)(x), np.float64)


def _libm_lgamma():
    """The C library's lgamma: accurate near the roots at 1 and 2, unlike math.lgamma."""
    import ctypes
    import ctypes.util
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").lgamma
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_double]
    return fn


_C_LGAMMA = _libm_lgamma()


def _lgamma(x):
    def f(v):
        if _C_LGAMMA is not None:
            return _C_LGAMMA(v)
        try:
            return math.lgamma(v)
        except (ValueError, OverflowError):
            return math.inf if not math.isnan(v) and (v <= 0 or math.isinf(v)) else v
    return np.asarray(np.frompyfunc(f, 1, 1)(x), np.float64)


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _gelu(x):
    """0.5 x erfc(u), u = -x / sqrt 2, with the float64 rounding error l of u (from a long double
    product) added back to first order, erfc(u + l) = erfc(u) - 2 / sqrt(pi) exp(-u u) l: erfc's
    condition 2u**2 would amplify it ~100-fold in the tail of float64 results."""
    wide = np.asarray(x, np.longdouble) * -np.sqrt(np.longdouble(0.5))
    u = wide.astype(np.float64)
    lo = np.where(np.isfinite(u), (wide - u).astype(np.float64), 0.0)
    return 0.5 * x * (_erfc(u) - 2 / math.sqrt(math.pi) * np.exp(-u * u) * lo)


def _softplus(x, beta=1.0, th=20.0):
    return np.where(x * beta > th, x, np.log1p(np.exp(beta * x)) / beta)


def _clamp(x, lo=None, hi=None):
    if lo is not None:
        x = np.maximum(x, lo)
    return x if hi is None else np.minimum(x, hi)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)

# float ops, evaluated in float64 (unary and n-ary); composites written from their definitions
FLOAT_OPS = {
    "exp": np.exp, "exp2": np.exp2, "expm1": np.expm1, "log": np.log, "log2": np.log2,
    "log10": np.log10, "log1p": np.log1p, "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x),
    "reciprocal": lambda x: 1 / x, "sin": np.sin, "cos": np.cos, "tan": np.tan,
    "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh,
    "tanh": np.tanh, "erf": _erf, "erfc": _erfc, "lgamma": _lgamma,
    "ceil": np.ceil, "floor": np.floor, "round": np.rint, "trunc": np.trunc,
    "frac": lambda x: x - np.trunc(x), "abs": np.abs, "neg": np.negative, "sign": np.sign,
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "floor_divide": np.floor_divide, "fmod": np.fmod, "remainder": np.remainder,
    "pow": np.power, "atan2": np.arctan2, "min": np.minimum, "max": np.maximum,
    "sigmoid": _sigmoid,
    "leaky_relu": lambda x, s: np.where(x > 0, x, x * s),
    "elu": lambda x, a: np.where(x > 0, x, a * np.expm1(x)),
    "selu": lambda x: 1.0507009873554804934193349852946 * np.where(
        x > 0, x, 1.6732632423543772848170429916717 * np.expm1(x)),
    "gelu": _gelu,
    # 0.5 * (1 + tanh(u)) written as 1 / (1 + exp(-2u)), which float64 evaluates without cancellation
    "gelu_tanh": lambda x: x / (1 + np.exp(-2 * _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x * _sigmoid(x),
    "softplus": _softplus,
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "hardsigmoid": lambda x: _clamp(x + 3, 0.0, 6.0) / 6,
    "hardswish": lambda x: x * _clamp(x + 3, 0.0, 6.0) / 6,
    # in 80-bit long double: float64's log(z / (1 - z)) cancels near z = 0.5
    "logit": lambda x, eps=None: (lambda z: np.log(z / (1 - z)))(
        (x if eps is None else _clamp(x, eps, 1 - eps)).astype(np.longdouble)),
}

# Arithmetic composites are defined by their formula evaluated in the compute type, so the
# reference evaluates them step by step in that type (numpy rounds each step like the kernels).
STEPWISE = {
    "lerp": lambda a, b, w: np.where(np.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1 - w)),
    "addcmul": lambda s, a, b, v: s + v * a * b,
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "relu6": lambda x: _clamp(x, np.zeros((), x.dtype), np.full((), 6, x.dtype)),
    "hardtanh": lambda x, lo, hi: _clamp(x, lo, hi),
    "threshold": lambda x, th, v: np.where(x <= th, v, x),
}

CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
       "gt": np.greater, "ge": np.greater_equal}
LOGICAL = {"logical_and": np.logical_and, "logical_or": np.logical_or,
           "logical_xor": np.logical_xor, "logical_not": np.logical_not}
BITWISE = {"bitwise_and": np.bitwise_and, "bitwise_or": np.bitwise_or,
           "bitwise_xor": np.bitwise_xor, "bitwise_not": np.invert}


def _int_op(name: str, args: list[np.ndarray], d: dt.DType) -> np.ndarray:
    """Integer semantics shared by every backend: wrap-around, x // 0 == x % 0 == 0,
    MIN // -1 == MIN, shifts by >= bits give 0 (or -1 for negative >>), x ** -n by C rules."""
    t = d.numpy
    a = args[0]
    b = args[1] if len(args) > 1 else None
    if name in ("add", "sub", "mul", "neg", "abs"):
        fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative,
              "abs": np.abs}[name]
        return fn(*args).astype(t)
    if name == "sign":
        return np.sign(a).astype(t)
    if name in ("min", "max"):
        return (np.minimum if name == "min" else np.maximum)(a, b)
    if name in ("floor_divide", "remainder", "fmod"):
        zero = b == 0
        safe_b = np.where(zero, 1, b).astype(t)
        lo, _ = int_range(d)
        overflow = (a == lo) & (safe_b == -1) if d.kind == "i" else np.zeros(a.shape, bool)
        safe_b = np.where(overflow, 1, safe_b).astype(t)
        if name == "floor_divide":
            r = np.where(overflow, a, np.floor_divide(a, safe_b))
        elif name == "remainder":
            r = np.where(overflow, 0, np.remainder(a, safe_b))
        else:
            r = np.where(overflow, 0, np.fmod(a, safe_b))
        return np.where(zero, 0, r).astype(t)
    if name == "pow":
        return _int_pow(a, b, d)
    if name in ("lshift", "rshift"):
        bits = d.bits
        in_range = (b >= 0) & (b < bits)
        sb = np.where(in_range, b, 0).astype(t)
        if name == "lshift":
            return np.where(in_range, np.left_shift(a, sb), 0).astype(t)
        return np.where(in_range, np.right_shift(a, sb), np.where(a < 0, -1, 0)).astype(t)
    raise NotImplementedError(f"reference has no integer op {name}")


def _int_pow(a: np.ndarray, b: np.ndarray, d: dt.DType) -> np.ndarray:
    """Integer power by squaring modulo 2**64, truncated to d (wrap-around); negative exponents
    follow C integer division: 1 ** -n == 1, (-1) ** -n == +-1, anything else ** -n == 0."""
    shape = np.broadcast(a, b).shape
    a_full = np.broadcast_to(a, shape).astype(np.int64)
    e = np.broadcast_to(b, shape).astype(np.int64)
    base = a_full.astype(np.uint64)
    exp = np.where(e < 0, 0, e).astype(np.uint64)
    result = np.ones(shape, np.uint64)
    for _ in range(64):
        result = np.where((exp & np.uint64(1)).astype(bool), result * base, result)
        base = base * base
        exp = exp >> np.uint64(1)
    negative = np.where(a_full == 1, 1, np.where(a_full == -1, np.where(e % 2 == 0, 1, -1), 0))
    return np.where(e < 0, negative.astype(np.uint64), result).astype(d.numpy)


def _cast(x: np.ndarray, src: dt.DType, dst: dt.DType) -> np.ndarray:
    """Casts as every backend does them: float -> int saturates (NaN -> 0), int -> int wraps,
    anything -> float16/bfloat16 goes through float32, and float16/bfloat16 are held in float32."""
    if dst.is_bool:
        return x != 0
    if dst.is_float:
        if dst.name in ("float16", "bfloat16"):
            return x.astype(np.float32).astype(dst.numpy).astype(np.float32)
        return x.astype(dst.numpy)
    if src.is_float:
        lo, hi = int_range(dst)
        t = np.trunc(np.where(np.isnan(x), 0, x).astype(np.float64))
        over, under = t >= hi + 1.0, t < lo   # hi + 1.0: int64's max is not a float64
        mid = np.where(over | under, 0, t).astype(np.int64)
        return np.where(over, hi, np.where(under, lo, mid)).astype(dst.numpy)
    return x.astype(dst.numpy)  # int/bool -> int wraps like C


# ---------------------------------------------------------------- row reductions ---------------

def _row_max(x: np.ndarray, fn) -> np.ndarray:
    """NaN-propagating max/min over the last axis, keepdims; NaN for empty rows."""
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1] + (1,), np.nan if x.dtype.kind == "f" else 0, x.dtype)
    return fn(x, axis=-1, keepdims=True)


def _lsum(x: np.ndarray) -> np.ndarray:
    return np.sum(x, axis=-1, keepdims=True)


def _reduction(name: str, x: np.ndarray, extra: list, d: dt.DType) -> tuple[np.ndarray, np.ndarray]:
    """(value, magnitude) of row reduction `name` of x (broadcast to the iteration shape): floats
    in 80-bit long double from the definition, ints exactly. The magnitude is the scale of the
    rounding error a kernel may make, before the log2(N) factor of `compare(n_row=)`: Σ|x| for
    sum (the condition of the sum), the largest |x| over the row for the others, amplified by
    1/std for layer_norm."""
    n = x.shape[-1]
    if not d.is_float:
        if name == "sum":
            return _lsum(x.astype(np.int64)), np.zeros(())
        return _row_max(x, np.max if name == "amax" else np.min), np.zeros(())
    w = x.astype(np.longdouble)
    big = _row_max(np.abs(w), np.max) if n else np.zeros(w.shape[:-1] + (1,), w.dtype)
    big = np.where(np.isnan(big), 0, big)
    if name in ("amax", "amin"):
        return _row_max(w, np.max if name == "amax" else np.min), np.zeros(())
    if name == "sum":
        return _lsum(w), _lsum(np.abs(w))
    mean = _lsum(w) / n if n else np.full(w.shape[:-1] + (1,), np.nan, w.dtype)
    if name == "mean":
        return mean, big
    if name == "var":
        dev = w - mean
        v = _lsum(dev * dev) / (n - extra[0].astype(np.longdouble)) if n else mean   # NaN
        return v, 2 * big * _row_max(np.abs(dev), np.max) + np.abs(v) if n else big
    if name in ("softmax", "log_softmax", "logsumexp"):
        m = _row_max(w, np.max)
        if name == "logsumexp":
            m = np.where(np.isfinite(m), m, 0)
        s = _lsum(np.exp(w - m))
        value = {"softmax": lambda: np.exp(w - m) / s, "log_softmax": lambda: (w - m) - np.log(s),
                 "logsumexp": lambda: np.log(s) + m}[name]()
        return value, big
    eps = extra[0].astype(np.longdouble)
    if name == "layer_norm":
        dev = w - mean
        r = 1 / np.sqrt(_lsum(dev * dev) / n + eps)
        return dev * r, big * np.where(np.isfinite(r), r, 0)
    if name == "rms_norm":
        out = w / np.sqrt(_lsum(w * w) / n + eps)
        return out, np.maximum(big, _row_max(np.abs(out), np.max) if n else big)
    raise KeyError(name)


# ---------------------------------------------------------------- evaluation -------------------

@dataclass
class Result:
    outputs: dict[str, np.ndarray]       # in storage dtype, full output shapes
    magnitude: dict[str, np.ndarray]     # per output element: max |value| over the graph
    parts: dict[str, list[np.ndarray]]   # per output its cat parts (or itself), iteration shape
    part_magnitude: np.ndarray           # magnitude over the iteration shape


def chunk_views(kernel: Kernel, arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The views each tensor input contributes (its chunks, or itself)."""
    views = []
    for a, ch in zip(arrays, kernel.chunks):
        if ch is None:
            views.append([a])
        else:
            n, dim = ch
            views.append(np.split(a, n, axis=dim))
    return views


def evaluate(kernel: Kernel, arrays: list[np.ndarray], scalars: list = (), seed: int = 0,
             offset: int = 0) -> Result:
    """Evaluate an unexpanded kernel graph on numpy arrays (tensor inputs in declared order)."""
    return evaluate_views(kernel, chunk_views(kernel, [np.asarray(a) for a in arrays]), scalars,
                          seed, offset)


def evaluate_views(kernel: Kernel, views: list[list[np.ndarray]], scalars: list = (),
                   seed: int = 0, offset: int = 0) -> Result:
    """Evaluate on per-input views (each input's chunks, or the input itself)."""
    with np.errstate(all="ignore"):
        return _evaluate(kernel, views, scalars, seed, offset)


def _evaluate(kernel: Kernel, views: list, scalars, seed: int, offset: int) -> Result:
    shape = broadcast_shapes([v.shape for vs in views for v in vs])
    values: list[np.ndarray] = []
    mag = np.zeros(shape, np.float64)
    scales: list[np.ndarray | None] = []
    words = None
    for node in kernel.nodes:
        d = node.dtype
        extra_mag = None
        if node.op in REDUCTIONS:
            x = np.broadcast_to(values[node.args[0]], shape)
            v, extra_mag = _reduction(node.op, x, [values[a] for a in node.args[1:]], d)
            v = v.astype(d.compute.numpy)
        elif node.op == "load":
            pos, k = node.attr
            v = views[pos][k].astype(d.compute.numpy)
        elif node.op == "scalar":
            v = np.array(scalars[node.attr]).astype(d.numpy).astype(d.compute.numpy)
        elif node.op == "const":
            v = np.array(node.attr, d.compute.numpy)
        elif node.op == "rand":
            if words is None:
                words = philox_words(np.arange(math.prod(shape), dtype=np.uint64).reshape(shape),
                                     seed, offset)
            v = uniform_from_words(words, node.attr, d)
        elif node.op == "cast":
            src = kernel.nodes[node.args[0]].dtype
            v = _cast(values[node.args[0]], src, d)
            if d.name in ("float16", "bfloat16"):
                v = v.astype(np.float32)
        elif node.op == "hold":
            v = values[node.args[0]]
        else:
            v = _eval_op(node, [values[a] for a in node.args],
                         [kernel.nodes[a].dtype for a in node.args])
        v = np.asarray(v)
        if v.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                finite = np.where(np.isfinite(v), np.abs(v.astype(np.float64)), 0)
            mag = np.maximum(mag, finite)
        if extra_mag is not None:
            extra_mag = np.where(np.isfinite(extra_mag), extra_mag, 0).astype(np.float64)
            mag = np.maximum(mag, extra_mag)
        values.append(v)
        scales.append(_scale(node, v, finite if v.dtype.kind == "f" else None, extra_mag,
                             values, scales))
    outputs, magnitude, all_parts = {}, {}, {}
    for o in kernel.outputs:
        part_mags = [mag if scales[p] is None else np.maximum(mag, scales[p]) for p in o.parts]
        if o.row:   # one value per row: the row's largest magnitude bounds its error
            row_shape = shape[:-1] + (1,)
            v = np.broadcast_to(values[o.parts[0]], row_shape).astype(o.dtype.numpy)
            outputs[o.name], all_parts[o.name] = v, [v]
            magnitude[o.name] = np.max(part_mags[0], axis=-1, keepdims=True, initial=0.0)
            continue
        parts = [np.broadcast_to(values[p], shape).astype(o.dtype.numpy) for p in o.parts]
        all_parts[o.name] = parts
        if o.cat:
            outputs[o.name] = np.concatenate(parts, axis=o.cat[1])
            magnitude[o.name] = np.concatenate(part_mags, axis=o.cat[1])
        else:
            outputs[o.name], magnitude[o.name] = parts[0], part_mags[0]
    return Result(outputs, magnitude, all_parts, mag)


def _eval_op(node, args: list[np.ndarray], arg_dtypes: list[dt.DType]) -> np.ndarray:
    name, d = node.op, node.dtype
    with np.errstate(all="ignore"):
        if name in CMP:
            t = arg_dtypes[0]
            if t.is_float:
                return CMP[name](*(a.astype(np.float64) for a in args))
            return CMP[name](*args)
        if name in LOGICAL:
            return LOGICAL[name](*args)
        if name in ("isnan", "isinf", "isfinite"):
            return getattr(np, name)(args[0])
        if name == "where":
            return np.where(args[0], args[1], args[2]).astype(d.compute.numpy)
        if name in BITWISE:
            return BITWISE[name](*args).astype(d.numpy)
        if name == "clamp":
            bounds = dict(zip(node.attr[1:], args[1:]))
            return _clamp(args[0], bounds.get("min"), bounds.get("max")).astype(d.compute.numpy)
        if name in STEPWISE:
            return np.asarray(STEPWISE[name](*args)).astype(d.compute.numpy)
        if d.is_float:
            r = FLOAT_OPS[name](*(a.astype(np.float64) for a in args))
            return np.asarray(r).astype(d.compute.numpy)
        return _int_op(name, args, d)


# ---------------------------------------------------------------- comparison -------------------

_PRECISION = {"float16": (11, -14), "bfloat16": (8, -126), "float32": (24, -126),
              "float64": (53, -1022)}


def ulp(x: np.ndarray, d: dt.DType) -> np.ndarray:
    """Spacing of float dtype d at |x| (subnormal spacing below the smallest normal)."""
    p, emin = _PRECISION[d.name]
    _, e = np.frexp(np.abs(np.asarray(x, np.float64)))
    return np.ldexp(1.0, np.maximum(e - 1, emin) - (p - 1))


@dataclass
class Mismatch:
    count: int
    worst_index: tuple
    got: object
    want: object
    message: str


def _scale(node, v, finite, extra_mag, values, scales) -> np.ndarray | None:
    """The error scale of a float node: |value|, or more where an operand's own scale (its
    cancellation error) is multiplied or divided by a large factor (first-order propagation:
    s(a b) = max(|a b|, s(a) |b|, |a| s(b)), s(a / b) = max(|a / b|, s(a) / |b|, |a / b| s(b) /
    |b|)); sums of a row Σ s(terms); other ops the largest scale of their operands."""
    if finite is None:
        return None
    args = [a for a in node.args if scales[a] is not None]
    out = finite
    with np.errstate(all="ignore"):
        if node.op in ("mul", "div") and len(args) == 2:
            a, b = (np.abs(values[i].astype(np.float64)) for i in node.args)
            sa, sb = scales[node.args[0]], scales[node.args[1]]
            terms = (sa * b, a * sb) if node.op == "mul" else (sa / b, finite * sb / b)
        elif node.op == "rsum" and args:
            terms = (np.sum(np.broadcast_to(scales[args[0]], values[args[0]].shape), axis=-1,
                            keepdims=True),)
        else:
            terms = tuple(scales[a] for a in args)
        for t in terms + ((extra_mag,) if extra_mag is not None else ()):
            out = np.maximum(out, np.where(np.isfinite(t), t, 0))
    return out


def compare(got: np.ndarray, want: np.ndarray, magnitude: np.ndarray | None = None,
            ulps: float | None = None, n_row: int = 0) -> Mismatch | None:
    """Check a kernel output against the reference; None when it matches.

    Integers and bools must be equal. Floats: NaN where the reference has NaN, infinities equal,
    and otherwise |got - want| <= k * ulp_storage(want) + 4 * ulp_compute(magnitude) + tiny,
    with k = 4 for float32/float64 and 1 for float16/bfloat16 (one unit in the last place of
    storage). `magnitude` (the largest intermediate value at that element) bounds cancellation
    error; without it the check is purely relative. `tiny`, the smallest normal number of the
    compute type, leaves results in the subnormal range to absolute accuracy.

    Outputs of a reduction kernel over rows of `n_row` elements (DESIGN §8): the magnitude term
    grows to 4 * max(1, log2(n_row)) ulp_compute(magnitude), the error bound of a pairwise
    (tree) sum, where the reference's magnitude of a sum is Σ|terms| (its condition).
    """
    d = dt.from_numpy(want.dtype)
    if got.shape != want.shape or got.dtype != want.dtype:
        return Mismatch(0, (), got.shape, want.shape,
                        f"got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    if not d.is_float:
        bad = got != want
    else:
        g, w = got.astype(np.float64), want.astype(np.float64)
        k = ulps if ulps is not None else (4 if d.bits >= 32 else 1)
        tol = k * ulp(w, d) + float(np.finfo(d.compute.numpy).tiny)
        if magnitude is not None:
            tol = tol + 4 * max(1.0, math.log2(max(n_row, 1))) * ulp(magnitude, d.compute)
        with np.errstate(invalid="ignore"):
            both_nan = np.isnan(g) & np.isnan(w)
            inf = np.isinf(w) | np.isinf(g)
            bad = ~both_nan & np.where(inf, g != w, ~(np.abs(g - w) <= tol))
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return Mismatch(int(bad.sum()), idx, got[idx], want[idx],
                    f"{int(bad.sum())} of {bad.size} elements differ; first at {idx}: "
                    f"got {got[idx]!r}, want {want[idx]!r}")
