"""CPU codegen: typed kernels -> numba Python source (one module per group).

Each ArgSpec becomes a function `kN(P, M, start, stop)` following `abi.Abi`; the numba toolchain
compiles them into one `.so` exporting one C symbol per ArgSpec. The loop nest walks rows of the
canonical iteration space; the inner loop has compile-time inner strides (1 for 'c', 0 for 'b'),
so LLVM's loop vectorizer turns it into SIMD code. float16/bfloat16 are converted by 32-bit integer
intrinsics (round-to-nearest-even, NaN preserved), which vectorize on every ISA level, and
float32 transcendentals use the branch-free approximations of `MATH_F32` instead of libm.
"""
from __future__ import annotations

import math
import re

from .. import __version__
from .. import dtypes as dt
from ..ir import Kernel, Node, int_range
from ..ops import PRIMITIVES
from ..schedule import Pass, Schedule, schedule
from .common import KernelSource, Renderer, check_complete

_NP = {"float32": "np.float32", "float64": "np.float64", "int8": "np.int8", "int16": "np.int16",
       "int32": "np.int32", "int64": "np.int64", "uint8": "np.uint8", "bool": "np.bool_"}

_F = "math.{}({{a}})"
NUMBA_OPS: dict[str, dict[str, str]] = {
    **{n: {"f": _F.format(n)} for n in ("exp", "expm1", "log", "log2", "log10", "log1p", "sqrt",
                                          "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
                                          "cosh", "tanh", "erf", "erfc", "lgamma")},
    "exp2": {"f": "np.exp2({a})"},
    "rsqrt": {"f": "{T}(1) / math.sqrt({a})"},
    "sigmoid": {"f": "sigmoid_{t}({a})"},
    "gelu": {"f": "gelu_{t}({a})"},
    "ceil": {"f": "np.ceil({a})"}, "floor": {"f": "np.floor({a})"},
    "round": {"f": "np.rint({a})"}, "trunc": {"f": "np.trunc({a})"},
    "abs": {"f": "abs({a})", "i": "{T}(abs({a}))"},
    "neg": {"f": "-{a}", "i": "{T}(-{a})"},
    "sign": {"f": "({T}(1) if {a} > 0 else ({T}(-1) if {a} < 0 else {a}))",
             "i": "({T}(1) if {a} > 0 else ({T}(-1) if {a} < 0 else {T}(0)))"},
    "isnan": {"f": "({a} != {a})"}, "isinf": {"f": "(abs({a}) == np.inf)"},
    "isfinite": {"f": "(abs({a}) < np.inf)"},
    "add": {"f": "({a} + {b})", "i": "{T}({a} + {b})"},
    "sub": {"f": "({a} - {b})", "i": "{T}({a} - {b})"},
    "mul": {"f": "({a} * {b})", "i": "{T}({a} * {b})"},
    "div": {"f": "({a} / {b})"},
    "floor_divide": {"*": "floordiv_{t}({a}, {b})"},
    "remainder": {"*": "remainder_{t}({a}, {b})"},
    "fmod": {"f": "np.fmod({a}, {b})", "i": "fmod_{t}({a}, {b})"},
    "pow": {"f": "pow_{t}({a}, {b})", "i": "pow_{t}({a}, {b})"},
    "atan2": {"f": "math.atan2({a}, {b})"},
    # NaN-propagating like torch.minimum/numpy.minimum
    "min": {"f": "({a} if ({a} < {b} or {a} != {a}) else {b})", "*": "({a} if {a} < {b} else {b})"},
    "max": {"f": "({a} if ({a} > {b} or {a} != {a}) else {b})", "*": "({a} if {a} > {b} else {b})"},
    "eq": {"*": "({a} == {b})"}, "ne": {"*": "({a} != {b})"}, "lt": {"*": "({a} < {b})"},
    "le": {"*": "({a} <= {b})"}, "gt": {"*": "({a} > {b})"}, "ge": {"*": "({a} >= {b})"},
    "logical_and": {"b": "({a} & {b})"}, "logical_or": {"b": "({a} | {b})"},
    "logical_xor": {"b": "({a} != {b})"}, "logical_not": {"b": "(not {a})"},
    "bitwise_and": {"i": "{T}({a} & {b})", "b": "({a} & {b})"},
    "bitwise_or": {"i": "{T}({a} | {b})", "b": "({a} | {b})"},
    "bitwise_xor": {"i": "{T}({a} ^ {b})", "b": "({a} != {b})"},
    "bitwise_not": {"i": "{T}(~{a})", "b": "(not {a})"},
    "lshift": {"i": "lshift_{t}({a}, {b})"}, "rshift": {"i": "rshift_{t}({a}, {b})"},
    "where": {"*": "select({a}, {b}, {c})"},
}

# Helper functions emitted into the module when used; formatted with T, t, bits and the integer
# range of t (lo, hi). Each is compiled by numba and inlined by LLVM.
HELPERS: dict[str, str] = {
    "sigmoid": """
@njit
def sigmoid_{t}(x):
    # sigmoid(-|x|) = e / (1 + e), e = exp(-|x|); for x >= 0 one minus it (see sigmoid_f32)
    e = math.exp(-abs(x))
    s = e / ({T}(1) + e)
    return {T}(1) - s if x >= {T}(0) else s
""",
    "gelu": """
@njit
def gelu_{t}(x):
    # float64: 0.5 x erfc(u), u = -x / sqrt 2 = h + l with l the rounding error of h (Dekker's
    # exact product; |x| < 2**996 keeps the split finite) and erfc(h + l) = erfc(h) -
    # 2 / sqrt(pi) exp(-h h) l to first order: erfc's condition 2u**2 would amplify h's error
    h = x * -0.7071067811865476
    c = x * 134217729.0
    xh = c - (c - x)
    xl = x - xh
    l = (((xh * -0.7071067839860916 - h) + xh * 2.7995440410322203e-09) +
         xl * -0.7071067839860916) + xl * 2.7995440410322203e-09 + x * 4.833646656726457e-17
    l = l if abs(x) < 1e300 else 0.0
    return 0.5 * x * (math.erfc(h) - 1.1283791670955126 * math.exp(-h * h) * l)
""",
    "floordiv_f": """
@njit
def floordiv_{t}(a, b):
    # numpy's npy_divmod: floor(a / b) computed without double rounding
    mod = np.fmod(a, b)
    div = (a - mod) / b
    if mod != {T}(0) and ((b < {T}(0)) != (mod < {T}(0))):
        div = div - {T}(1)
    fl = np.floor(div)
    if div - fl > {T}(0.5):
        fl = fl + {T}(1)
    if div == {T}(0):
        fl = np.copysign({T}(0), a / b)
    return a / b if b == {T}(0) else fl
""",
    "remainder_f": """
@njit
def remainder_{t}(a, b):
    mod = np.fmod(a, b)
    if b != {T}(0):
        if mod != {T}(0):
            if (b < {T}(0)) != (mod < {T}(0)):
                mod = mod + b
        else:
            mod = np.copysign({T}(0), b)
    return mod
""",
    "pow_f": """
@njit
def pow_{t}(a, b):
    return {T}(math.pow(np.float64(a), np.float64(b)))
""",
    "floordiv_i": """
@njit
def floordiv_{t}(a, b):
    if b == 0:
        return {T}(0)
    if b == -1:
        return {T}(-a)
    return {T}(a // b)
""",
    "remainder_i": """
@njit
def remainder_{t}(a, b):
    if b == 0 or b == -1:
        return {T}(0)
    return {T}(a % b)
""",
    "fmod_i": """
@njit
def fmod_{t}(a, b):
    if b == 0 or b == -1:
        return {T}(0)
    r = a % b
    if r != 0 and ((r < 0) != (a < 0)):
        r = r - b
    return {T}(r)
""",
    "pow_i": """
@njit
def pow_{t}(a, b):
    if b < 0:
        if a == 1:
            return {T}(1)
        if a == -1:
            return {T}(1) if b % 2 == 0 else {T}(-1)
        return {T}(0)
    r = np.uint64(1)
    base = np.uint64(np.int64(a))
    e = np.int64(b)
    while e > 0:
        if e & 1:
            r = r * base
        base = base * base
        e = e >> 1
    return {T}(r)
""",
    "lshift_i": """
@njit
def lshift_{t}(a, b):
    return {T}(np.int64(a) << np.int64(b)) if (b >= 0 and b < {bits}) else {T}(0)
""",
    "rshift_i": """
@njit
def rshift_{t}(a, b):
    if b >= 0 and b < {bits}:
        return {T}(np.int64(a) >> np.int64(b))
    return {T}(-1) if a < 0 else {T}(0)
""",
    "to_int": """
@njit
def to_{d}_{t}(x):
    # saturating float -> int; NaN -> 0
    if x != x:
        return {D}(0)
    if x >= {hi1}:
        return {D}({hi})
    if x < {lo}:
        return {D}({lo})
    return {D}(x)
""",
    "philox": """
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@njit
def philox(index, seed, offset):
    # Philox4x32-10: counter (index, offset), key seed
    i = np.uint64(index)
    c0 = i & _M32
    c1 = i >> _S32
    c2 = offset & _M32
    c3 = offset >> _S32
    k0 = seed & _M32
    k1 = seed >> _S32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _M32, (p0 >> _S32) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3
""",
}

# float32 math (float16/bfloat16 compute in float32): branch-free approximations written with
# selects only, so the loop vectorizer turns them into SIMD code (libm's scalar expf & co. would
# keep the loop scalar). Accuracy against float64 references is measured in tests/test_cpu_math.py.
# The exp/log family works in float32 with Cody-Waite reduction and the cephes polynomials, and
# so do erf/erfc/gelu (within 2 ULP, see _erfc_big_f32); sin/cos/tan, sinh/cosh and pow evaluate
# in float64 lanes and round once. Helpers call
# each other by name; `MATH_F32` maps each to its source and `math_helpers` orders dependencies.
# Integer work goes through the 32-bit exponent intrinsics of toolchain/numba_support.py. numba
# compiles each helper once per module; the toolchain then has LLVM inline every one of them into
# the kernels (a call per element would keep the loop scalar).
MATH_F32: dict[str, str] = {
    "_F": """
_F = np.float32
""",
    "_expr_f32": """
@njit
def _expr_f32(r):
    # e**r - 1 - r on [-ln2/2, ln2/2] (cephes expf polynomial; Estrin's scheme: a shorter
    # dependency chain than Horner's, which matters when a kernel chains several functions)
    r2 = r * r
    p = muladd(_F(1.6666665459e-1), r, _F(5.0000001201e-1))
    q = muladd(_F(8.3334519073e-3), r, _F(4.1665795894e-2))
    s = muladd(_F(1.9875691500e-4), r, _F(1.3981999507e-3))
    return muladd(muladd(s, r2, q), r2, p) * r2
""",
    "_exp_reduce_f32": """
@njit
def _exp_reduce_f32(x):
    # x = n ln2 + r, |r| <= ln2/2, for x clamped to [-104, 89] (NaN -> -104: callers restore it);
    # n * ln2_hi is exact and so is the subtraction (Cody-Waite)
    xc = x if x > _F(-104.0) else _F(-104.0)
    xc = xc if xc < _F(89.0) else _F(89.0)
    n = np.rint(xc * _F(1.44269504089))
    return n, muladd(n, _F(-1.428606765330187e-06), muladd(n, _F(-0.693145751953125), xc))
""",
    "exp_f32": """
@njit
def exp_f32(x):
    n, r = _exp_reduce_f32(x)
    y = f32_ldexp((_expr_f32(r) + r) + _F(1.0), n)
    return y if x == x else x
""",
    "exp2_f32": """
@njit
def exp2_f32(x):
    xc = x if x > _F(-152.0) else _F(-152.0)
    xc = xc if xc < _F(129.0) else _F(129.0)
    n = np.rint(xc)
    r = xc - n
    # 2**r on [-1/2, 1/2] (cephes exp2f polynomial)
    p = muladd(_F(1.535336188319500e-4), r, _F(1.339887440266574e-3))
    p = muladd(p, r, _F(9.618437357674640e-3))
    p = muladd(p, r, _F(5.550332471162809e-2))
    p = muladd(p, r, _F(2.402264791363012e-1))
    p = muladd(p, r, _F(6.931472028550421e-1))
    y = f32_ldexp(muladd(p, r, _F(1.0)), n)
    return y if x == x else x
""",
    "expm1_f32": """
@njit
def expm1_f32(x):
    # 2**n (e**r - 1) + (2**n - 1); for n = 128 scale by 2**127, then by 2 (inf if it overflows)
    n, r = _exp_reduce_f32(x if x > _F(-30.0) else _F(-30.0))   # below -30 the result is -1
    em = _expr_f32(r) + r
    top = n > _F(127.0)
    s = f32_pow2(n - _F(1.0) if top else n)
    y = s * em + (s - _F(1.0))
    y = y * _F(2.0) if top else y
    return y if abs(x) > _F(0.0) else x
""",
    "_log_parts_f32": """
@njit
def _log_parts_f32(x):
    # x > 0 as 2**e (1 + f) with f in [sqrt(1/2) - 1, sqrt(2) - 1); subnormals scaled by 2**23
    sub = x < _F(1.1754943508222875e-38)
    xs = x * _F(8388608.0) if sub else x
    m = f32_significand(xs)
    e = f32_exponent(xs) - (_F(150.0) if sub else _F(127.0))
    big = m > _F(1.41421356)
    m = m * _F(0.5) if big else m
    e = e + _F(1.0) if big else e
    return e, m - _F(1.0)
""",
    "_log1p_tail_f32": """
@njit
def _log1p_tail_f32(f):
    # log(1 + f) - f on [sqrt(1/2) - 1, sqrt(2) - 1] (cephes logf polynomial, Estrin's scheme)
    z = f * f
    z2 = z * z
    p0 = muladd(_F(-2.4999993993e-1), f, _F(3.3333331174e-1))
    p1 = muladd(_F(-1.6668057665e-1), f, _F(2.0000714765e-1))
    p2 = muladd(_F(-1.2420140846e-1), f, _F(1.4249322787e-1))
    p3 = muladd(_F(-1.1514610310e-1), f, _F(1.1676998740e-1))
    p = muladd(_F(7.0376836292e-2), z2 * z2, muladd(muladd(p3, z, p2), z2, muladd(p1, z, p0)))
    return muladd(p * f, z, _F(-0.5) * z)
""",
    "_log_special_f32": """
@njit
def _log_special_f32(y, x):
    # the log family at x = 0 (-inf), x < 0 (NaN), +inf and NaN
    y = y if x > _F(0.0) else (_F(-np.inf) if x == _F(0.0) else _F(np.nan))
    return y if x < _F(np.inf) else x
""",
    "log_f32": """
@njit
def log_f32(x):
    e, f = _log_parts_f32(x)
    y = f + (_log1p_tail_f32(f) + e * _F(-2.12194440e-4)) + e * _F(0.693359375)
    return _log_special_f32(y, x)
""",
    "log2_f32": """
@njit
def log2_f32(x):
    e, f = _log_parts_f32(x)
    l = f + _log1p_tail_f32(f)
    y = e + (l * _F(1.44269502162933349609375) + l * _F(1.925963033500011079e-8))
    return _log_special_f32(y, x)
""",
    "log10_f32": """
@njit
def log10_f32(x):
    e, f = _log_parts_f32(x)
    l = f + _log1p_tail_f32(f)
    y = e * _F(0.30102539062) + (l * _F(0.4342944819) + e * _F(4.6050389811952135e-6))
    return _log_special_f32(y, x)
""",
    "log1p_f32": """
@njit
def log1p_f32(x):
    # log(u) for u = 1 + x, plus the rounding error of u relative to u
    u = _F(1.0) + x
    e, f = _log_parts_f32(u)
    c = (x - (u - _F(1.0))) / u
    y = f + (_log1p_tail_f32(f) + (e * _F(-2.12194440e-4) + c)) + e * _F(0.693359375)
    y = _log_special_f32(y, u)
    return y if abs(x) > _F(0.0) else x
""",
    "tanh_f32": """
@njit
def tanh_f32(x):
    a = abs(x)
    z = x * x
    # |x| < 0.625: odd polynomial (cephes tanhf); otherwise 1 - 2 / (e**2|x| + 1), signed
    p = muladd(_F(-5.70498872745e-3), z, _F(2.06390887954e-2))
    p = muladd(p, z, _F(-5.37397155531e-2))
    p = muladd(p, z, _F(1.33314422036e-1))
    p = muladd(p, z, _F(-3.33332819422e-1))
    p = muladd(p * z, x, x)
    q = _F(1.0) - _F(2.0) / (exp_f32(a + a) + _F(1.0))
    q = q if x > _F(0.0) else -q
    y = p if a < _F(0.625) else q
    return y if a > _F(0.0) else x
""",
    "sigmoid_f32": """
@njit
def sigmoid_f32(x):
    # sigmoid(-|x|) = e / (1 + e) with e = exp(-|x|) (no overflow, no cancellation); for x >= 0
    # one minus it: rounded once, so the saturation towards 1 is correctly rounded (1 / (1 + e)
    # rounds 1 + e first and reaches 1.0 while the exact value is still below 1 - 2**-25)
    e = exp_f32(-abs(x))
    s = e / (_F(1.0) + e)
    return _F(1.0) - s if x >= _F(0.0) else s
""",
    "_exp_f64": """
@njit
def _exp_f64(y):
    # e**y in float64 to 2**-34 relative (float32 results), y clamped to [-700, 700]
    # (NaN -> -700: callers restore it); minimax polynomial on [-ln2/2, ln2/2]
    y = y if y > -700.0 else -700.0
    y = y if y < 700.0 else 700.0
    n = np.rint(y * 1.4426950408889634)
    s = (y - n * 0.6931471803691238) - n * 1.9082149292705877e-10
    p = muladd(0.00019775175135311387, s, 0.0013948196642978323)
    p = muladd(p, s, 0.008333561159718918)
    p = muladd(p, s, 0.041666225228416925)
    p = muladd(p, s, 0.1666666512526597)
    p = muladd(p, s, 0.5000000104605771)
    p = muladd(p, s, 1.0000000002432943)
    p = muladd(p, s, 0.9999999999616481)
    return p * f64_pow2(n)
""",
    "_split_f32": """
@njit
def _split_f32(x):
    # x = hi + lo with 12-bit halves (Veltkamp), so products of halves are exact without FMA
    # (x86-64-v2 has none); |x| < 2**114
    c = x * _F(4097.0)
    hi = c - (c - x)
    return hi, x - hi
""",
    "_erf_poly_f32": """
@njit
def _erf_poly_f32(z):
    # erf(x) = x + x P(x*x) on |x| < 0.75 (minimax, float32)
    p = muladd(_F(-0.0006749479798600078), z, _F(0.005114341154694557))
    p = muladd(p, z, _F(-0.026834622025489807))
    p = muladd(p, z, _F(0.11283376812934875))
    p = muladd(p, z, _F(-0.3761261999607086))
    return muladd(p, z, _F(0.12837916612625122))
""",
    "_erfc_parts_f32": """
@njit
def _erfc_parts_f32(a, d):
    # The pieces of erfc(a + d) = e**-(a + d)**2 erfcx(a + d) for 0.75 <= a <= 10.5 and
    # |d| <= ulp(a) (the rounding error of a computed argument). e**-(a + d)**2 = 2**n (1 + r + e):
    # (a + d)**2 exact to 2**-48 (Veltkamp products) folded into r (Cody-Waite). erfcx: for
    # a < 1.5 (`near`) C + v P(v), v = a - 1.130859375 + d, C = erfcx(1.130859375); otherwise
    # z (Q0 + w G(w)), z = 1/a, w = z - 0.3896484375, Q0 = Q(0.3896484375), with the residual
    # k = 1 - z (a + d). Minimax fits, 2**-30 and 2**-29.7 relative; the centres make C and Q0
    # float32 numbers to 2**-32, so only the smaller parts v P and w G are rounded.
    ah, al = _split_f32(a)
    s = a * a
    t = (((ah * ah - s) + (ah + ah) * al) + al * al) + (a + a) * d
    n = np.rint(s * _F(-1.4426950408889634))
    r = muladd(n, _F(-1.428606765330187e-06), muladd(n, _F(-0.693145751953125), -s)) - t
    v = (a - _F(1.130859375)) + d
    p = muladd(_F(0.0007605924620293081), v, _F(-0.001967379590496421))
    p = muladd(p, v, _F(0.0048576113767921925))
    p = muladd(p, v, _F(-0.012054133228957653))
    p = muladd(p, v, _F(0.028264658525586128))
    p = muladd(p, v, _F(-0.06212792173027992))
    p = muladd(p, v, _F(0.1267843246459961))
    p = muladd(p, v, _F(-0.23656630516052246)) * v
    near = a < _F(1.5)
    z = _F(1.0) / (_F(1.5) if near else a)
    zh, zl = _split_f32(z)
    k = ((((_F(1.0) - zh * ah) - zh * al) - zl * ah) - zl * al) - z * d
    w = z - _F(0.3896484375)
    g = muladd(_F(-0.5525282025337219), w, _F(0.23406699299812317))
    g = muladd(g, w, _F(0.16495180130004883))
    g = muladd(g, w, _F(-0.24897339940071106))
    g = muladd(g, w, _F(0.17036345601081848))
    g = muladd(g, w, _F(-0.021337004378437996))
    g = muladd(g, w, _F(-0.11843745410442352))
    g = muladd(g, w, _F(0.17038054764270782))
    g = muladd(g, w, _F(-0.08440069854259491))
    g = muladd(g, w, _F(-0.15416935086250305)) * w
    return n, r, _expr_f32(r), near, p, z, zh, zl, k, g
""",
    "_erfc_join_f32": """
@njit
def _erfc_join_f32(hi, lo, n, r, e):
    # 2**n (hi + lo) (1 + r + e), rounded once but for the smaller terms (|lo| < |hi| / 4)
    b = muladd(hi, r, muladd(hi, e, muladd(lo, r + e, lo)))
    return f32_ldexp(hi + b, n)
""",
    "_erfc_big_f32": """
@njit
def _erfc_big_f32(a):
    # erfc(a) for a >= 0.75 (~1.5 ULP); beyond 10.0546875 (clamped) it rounds to 0
    a = a if a < _F(10.0546875) else _F(10.0546875)
    n, r, e, near, p, z, zh, zl, k, g = _erfc_parts_f32(a, _F(0.0))
    hi = z * _F(0.5286206603050232)
    lo = (((zh * _F(0.528564453125) - hi) + zh * _F(5.620718002319336e-05)) +
          zl * _F(0.528564453125)) + zl * _F(5.620718002319336e-05)
    lo = muladd(z, g, lo)
    e = e + (_F(0.0) if near else muladd(k, r, k))
    return _erfc_join_f32(_F(0.39430758357048035) if near else hi, p if near else lo, n, r, e)
""",
    "erf_f32": """
@njit
def erf_f32(x):
    # |x| < 0.75: x + x P(x*x); otherwise 1 - erfc(|x|), signed
    a = abs(x)
    q = _F(1.0) - _erfc_big_f32(a)
    q = q if x > _F(0.0) else -q
    y = muladd(_erf_poly_f32(x * x), x, x) if a < _F(0.75) else q
    return y if x == x else x
""",
    "erfc_f32": """
@njit
def erfc_f32(x):
    # |x| < 0.75: c + (cl - x P(x*x)) with c + cl = 1 - x exactly (Fast2Sum); otherwise
    # erfc(|x|), or 2 minus it for x < 0
    a = abs(x)
    e = _erfc_big_f32(a)
    e = e if x > _F(0.0) else _F(2.0) - e
    c = _F(1.0) - x
    y = c + (((_F(1.0) - c) - x) - x * _erf_poly_f32(x * x)) if a < _F(0.75) else e
    return y if x == x else x
""",
    "gelu_f32": """
@njit
def gelu_f32(x):
    # x/2 erfc(u), u = -x / sqrt 2 = h + l: l is h's rounding error (Veltkamp products), passed
    # on to erfc, whose condition 2u**2 would amplify it ~200-fold in the tail. |u| < 0.75:
    # x/2 c + x/2 (cl - h P(h*h) - 2 / sqrt(pi) l), c + cl = 1 - h exactly. Otherwise
    # t = -|x|/2 erfc(|u|) and the result is t (x < 0) or x + t: for |u| < 1.5, -|x|/2 C exact
    # as a pair; beyond, -|x|/2 z = -(1 - k) / sqrt 2, so t = -(Q0 + w G) / sqrt 2 e**-u**2
    # (-Q0 / sqrt 2 as a pair); |u| > 10.5 (clamped) rounds to -0. Within 2 ULP.
    h = x * _F(-0.7071067690849304)
    xh, xl = _split_f32(x)
    l = ((xh * _F(-0.70703125) - h) + xh * _F(-7.551908493041992e-05)) + xl * _F(-0.70703125)
    l = (l + xl * _F(-7.551908493041992e-05)) + x * _F(-1.2101617e-08)
    hx = _F(0.5) * x
    b = muladd(h, _erf_poly_f32(h * h), l * _F(1.128379225730896))
    c = _F(1.0) - h
    small = muladd(hx, c, hx * (((_F(1.0) - c) - h) - b))
    a = abs(h)
    clamp = a >= _F(10.5)
    n, r, e, near, p, z, zh, zl, k, g = _erfc_parts_f32(
        _F(10.5) if clamp else a, _F(0.0) if clamp else (l if h > _F(0.0) else -l))
    sh = xh * _F(-0.5) if x > _F(0.0) else xh * _F(0.5)     # -|x|/2 = sh + sl
    sl = xl * _F(-0.5) if x > _F(0.0) else xl * _F(0.5)
    s = sh + sl
    hi = s * _F(0.39430758357048035)
    lo = ((sh * _F(0.394287109375) - hi) + s * _F(2.047419548034668e-05)) + sl * _F(0.394287109375)
    lo = muladd(s, p, lo)
    t = _erfc_join_f32(hi if near else _F(-0.37379124760627747),
                       lo if near else muladd(_F(-0.7071067690849304), g,
                                              _F(-5.992652152286837e-09)), n, r, e)
    y = small if a < _F(0.75) else (t if x < _F(0.0) else x + t)
    y = x if x > _F(10.0) else y
    y = y if x > _F(-np.inf) else _F(np.nan)
    return y if abs(x) > _F(0.0) else x
""",
    "_reduce_pio2_f64": """
_TWO_OVER_PI = 0xA2F9836E4E441529FC2757D1F534DDC0DB6295993C439041FE5163ABDEBBC561  # 2/pi * 2**256


def _two_over_pi_chunks():
    # row i: four 24-bit chunks of 2/pi starting at bit i + 1 (float64, exact); float32
    # x < 2**(i + 26) times the bits before bit i + 1 is a multiple of 4, which the reduction drops
    return np.array([[math.ldexp((_TWO_OVER_PI >> (233 - j - 24 * k)) & 0xFFFFFF,
                                 -(j + 24 * k + 23)) for k in range(4)] for j in range(1, 104)],
                    dtype=np.float64)


_PIO2_CHUNKS = _two_over_pi_chunks()


@njit
def _reduce_pio2_f64(x):
    # float32 x = (n + f) pi/2 with |f| <= 1/2, for every finite x (Payne-Hanek without branches):
    # the row of chunks is picked by x's exponent, each product x * chunk is exact, and the sum is
    # ordered so that the terms that cancel are added exactly. Returns (f pi/2, n mod 4).
    xd = np.float64(x)
    i = f32_exponent(x) - _F(152.0)
    at = np.int32(i if i > _F(0.0) else _F(0.0)) * 4
    table = _PIO2_CHUNKS.ctypes.data   # loaded with ld_f64: read-only, not aliasing stores
    p0 = xd * ld_f64(table, at)
    p0 = p0 - 4.0 * np.rint(p0 * 0.25)
    p1 = xd * ld_f64(table, at + 1)
    n = np.rint(p0 + p1)
    f = (((p0 - n) + p1) + xd * ld_f64(table, at + 2)) + xd * ld_f64(table, at + 3)
    return f * 1.5707963267948966, n - 4.0 * np.floor(n * 0.25)
""",
    "_sincos_f64": """
@njit
def _sincos_f64(r):
    # sin(r), cos(r) on [-pi/4, pi/4] (minimax, 2**-37 and 2**-33.8 relative)
    z = r * r
    s = muladd(2.7181203543346494e-06, z, -0.00019839312137211185)
    s = muladd(s, z, 0.008333329304436077)
    s = muladd(s, z, -0.1666666664079359)
    s = muladd(s * z, r, r)
    c = muladd(2.4383553527311877e-05, z, -0.0013886681502362115)
    c = muladd(c, z, 0.04166662035255256)
    c = muladd(c, z, -0.49999999694435826)
    c = muladd(c, z, 1.0)
    return s, c
""",
    "_sin_quadrant_f32": """
@njit
def _sin_quadrant_f32(x, quarter):
    # sin(x + quarter pi/2), rounded once to float32
    r, q = _reduce_pio2_f64(x)
    s, c = _sincos_f64(r)
    q = q + quarter
    q = q - 4.0 if q > 3.0 else q
    y = c if (q == 1.0) | (q == 3.0) else s
    return np.float32(-y if q >= 2.0 else y)
""",
    "sin_f32": """
@njit
def sin_f32(x):
    y = _sin_quadrant_f32(x, 0.0)
    return y if x != _F(0.0) else x
""",
    "cos_f32": """
@njit
def cos_f32(x):
    return _sin_quadrant_f32(x, 1.0)
""",
    "tan_f32": """
@njit
def tan_f32(x):
    r, q = _reduce_pio2_f64(x)
    s, c = _sincos_f64(r)
    odd = (q == 1.0) | (q == 3.0)
    y = np.float32((-c if odd else s) / (s if odd else c))
    return y if x != _F(0.0) else x
""",
    "sinh_f32": """
@njit
def sinh_f32(x):
    # float64: |x| < 1/2 odd Taylor polynomial, else (e - 1/e) / 2 with e = exp(|x|); signed
    a = np.float64(abs(x))
    z = a * a
    p = muladd(2.7557319223985893e-06, z, 0.0001984126984126984)
    p = muladd(p, z, 0.008333333333333333)
    p = muladd(p, z, 0.16666666666666666)
    e = _exp_f64(a)
    h = muladd(p * z, a, a) if a < 0.5 else 0.5 * (e - 1.0 / e)
    y = np.float32(h)
    y = y if x > _F(0.0) else -y
    return y if abs(x) > _F(0.0) else x
""",
    "cosh_f32": """
@njit
def cosh_f32(x):
    e = _exp_f64(np.float64(abs(x)))
    y = np.float32(0.5 * (e + 1.0 / e))
    return y if x == x else x
""",
    "pow_f32": """
@njit
def pow_f32(a, b):
    # |a|**b = e**(b ln|a|) in float64: ln(1 + f) = 2 atanh(s), s = f / (2 + f), to 2**-37.6
    # relative, so b ln|a| is good to ~2**-30 wherever the result is finite and nonzero. Then
    # C99 powf's special cases: sign for odd integer b, NaN for a < 0 and non-integer b, 1 for
    # b = 0, a = 1 and a = -1 with b = +-inf.
    ax = abs(a)
    e, f = _log_parts_f32(ax)
    fd = np.float64(f)
    s = fd / (2.0 + fd)
    z = s * s
    p = muladd(0.23581965320337014, z, 0.2853732258156679)
    p = muladd(p, z, 0.40000334890944544)
    p = muladd(p, z, 0.6666666564720684)
    ln = np.float64(e) * 0.6931471805599453 + muladd(p * z, s, s + s)
    ln = ln if ax > _F(0.0) else -np.inf
    ln = ln if ax < _F(np.inf) else np.inf
    y = np.float32(_exp_f64(np.float64(b) * ln))
    integer = np.trunc(b) == b
    odd = integer & (np.trunc(b * _F(0.5)) != b * _F(0.5))
    y = -y if odd & (np.copysign(_F(1.0), a) < _F(0.0)) else y
    y = _F(np.nan) if (a < _F(0.0)) & (a > _F(-np.inf)) & ~integer else y
    y = a + b if (a != a) | (b != b) else y
    one = (b == _F(0.0)) | (a == _F(1.0)) | ((a == _F(-1.0)) & (abs(b) == _F(np.inf)))
    return _F(1.0) if one else y
""",
}
_CALL = re.compile(r"\b(_F|_?[a-z0-9]+(?:_[a-z0-9]+)*_f(?:32|64))\b")


def math_helpers(name: str) -> list[str]:
    """`name` and the math helpers it uses, dependencies first."""
    out: list[str] = []

    def visit(n: str) -> None:
        if n in out:
            return
        for dep in _CALL.findall(MATH_F32[n]):
            if dep != n and dep in MATH_F32:
                visit(dep)
        out.append(n)
    visit(name)
    return out


_HEADER = """# fusebuild {version}: numba source of group '{group}'. Generated; do not edit.
import math

import numpy as np
from numba import njit

from fusebuild.toolchain.numba_support import *  # noqa: F401,F403  (ld_*, st_*, intrinsics)
"""


class NumbaRenderer(Renderer):
    ops = NUMBA_OPS

    def __init__(self):
        self.helpers: dict[str, str] = {}   # name -> source, in first-use order

    def need(self, template: str, name: str, **fmt) -> None:
        if name not in self.helpers:
            self.helpers[name] = HELPERS[template].format(**fmt)

    def need_math(self, name: str) -> None:
        for n in math_helpers(name):
            self.helpers.setdefault(n, MATH_F32[n])

    def type_name(self, d: dt.DType) -> str:
        return _NP[d.compute.name]

    def assign(self, var: str, d: dt.DType, expr: str) -> str:
        return f"{var} = {expr}"

    def const(self, value, d: dt.DType) -> str:
        if d.is_bool:
            return "True" if value else "False"
        if d.is_float:
            text = "np.inf" if value == math.inf else "-np.inf" if value == -math.inf else \
                "np.nan" if math.isnan(value) else repr(float(value))
            return f"{self.type_name(d)}({text})"
        return f"{self.type_name(d)}({int(value)})"

    def fmt(self, t: dt.DType) -> dict:
        return dict(T=self.type_name(t), t=t.compute.short, bits=t.bits)

    def op(self, name: str, args: list[str], t: dt.DType) -> str:
        if t.compute == dt.float32 and f"{name}_f32" in MATH_F32:
            self.need_math(f"{name}_f32")
            return f"{name}_f32({', '.join(args)})"
        kind = "f" if t.is_float else "i"
        helper = {"sigmoid": "sigmoid", "gelu": "gelu", "floor_divide": f"floordiv_{kind}",
                  "remainder": f"remainder_{kind}", "pow": f"pow_{kind}"}.get(name)
        if name == "fmod" and kind == "i":
            helper = "fmod_i"
        if name in ("lshift", "rshift"):
            helper = f"{name}_i"
        if helper:
            self.need(helper, f"{helper}_{t.compute.short}", **self.fmt(t))
        return super().op(name, args, t)

    def round_to(self, x: str, d: dt.DType) -> str:
        """Round a float32-held value to float16/bfloat16 precision (kept in float32)."""
        short = "f16" if d.name == "float16" else "bf16"
        return f"{short}_value({short}_bits({x}))"

    def cast(self, x: str, src: dt.DType, dst: dt.DType) -> str:
        if dst.is_bool:
            return f"({x} != 0)"
        if dst.is_float:
            if dst.name in ("float16", "bfloat16"):
                return self.round_to(f"np.float32({x})", dst)
            return f"{self.type_name(dst)}({x})"
        if src.is_float:
            lo, hi = int_range(dst)
            name = f"to_{dst.short}_{src.compute.short}"
            self.need("to_int", name, d=dst.short, t=src.compute.short, D=self.type_name(dst),
                      lo=lo, hi=hi, hi1=repr(float(hi + 1)))
            return f"{name}({x})"
        return f"{self.type_name(dst)}({x})"

    # loads and stores use the index expressions the kernel renderer sets per operand
    def load(self, node: Node) -> str:
        pos, k = node.attr
        d = node.dtype
        addr, index = f"p{pos}_{k}", self.index[pos]
        if d.name in ("float16", "bfloat16"):
            short = "f16" if d.name == "float16" else "bf16"
            return f"{short}_value(ld_u16({addr}, {index}))"
        if d.is_bool:
            return f"(ld_u8({addr}, {index}) != 0)"
        return f"ld_{d.short}({addr}, {index})"

    def prefetch(self, addr: str, index: str, d: dt.DType) -> str:
        """A hint to bring the cache line of element `index` of an input into the caches."""
        short = "u16" if d.name in ("float16", "bfloat16") else "u8" if d.is_bool else d.short
        return f"pf_{short}({addr}, {index})"

    def store(self, addr: str, index: str, value: str, d: dt.DType) -> str:
        if d.name in ("float16", "bfloat16"):
            short = "f16" if d.name == "float16" else "bf16"
            return f"st_u16({addr}, {index}, {short}_bits({value}))"
        if d.is_bool:
            return f"st_u8({addr}, {index}, np.uint8({value}))"
        return f"st_{d.short}({addr}, {index}, {value})"

    def rowlen(self, d: dt.DType) -> str:
        return f"{self.type_name(d)}({self.row_size})"

    def rand(self, node: Node) -> str:
        self.need("philox", "philox")
        w = node.attr
        if node.dtype == dt.float64:
            return (f"np.float64(((rw[{w}] << np.uint64(32)) | rw[{w + 1}]) >> np.uint64(11))"
                    " * 1.1102230246251565e-16")
        mant = {"float32": 24, "float16": 11, "bfloat16": 8}[node.dtype.name]
        return f"np.float32(rw[{w}] >> np.uint64({32 - mant})) * np.float32({2.0 ** -mant!r})"


check_complete(NumbaRenderer(), PRIMITIVES)


def _prologue(r: NumbaRenderer, ks: KernelSource, fn: str) -> tuple[list[str], list[str]]:
    """The kernel's first lines (sizes, strides, pointers, seed, scalars) and each operand's
    inner letter: 1 ('c'), 0 ('b', row outputs too) or a run-time stride ('s')."""
    k, abi, rank, layouts = ks.kernel, ks.abi, ks.rank, ks.layouts
    n_in = len(k.in_dtypes)
    lines = [f"def {fn}(P, M, start, stop):", f"    # {ks.key}"]
    for d in range(rank):
        lines.append(f"    n{d} = M[{abi.size(d)}]")
    # operands: inputs 0..n_in-1, outputs n_in..; inner stride: 1 ('c'), 0 ('b') or runtime ('s')
    inner = []
    for op in range(abi.n_operands):
        if op < n_in:
            letter = layouts[op][-1] if rank else "b"
        else:   # plain outputs are C-contiguous; cat parts are views with a run-time stride
            out = k.outputs[op - n_in]
            letter = "s" if out.cat else "b" if out.row else "c"
        for dim in range(rank):
            needed = dim < rank - 1 and (op >= n_in or layouts[op][dim] != "b") or \
                dim == rank - 1 and letter == "s"
            if needed:
                lines.append(f"    s{op}_{dim} = M[{abi.stride(op, dim)}]")
        inner.append(letter)
    for i, c in enumerate(abi.chunks):
        for j in range(c):
            lines.append(f"    p{i}_{j} = P[{abi.in_ptr(i, j)}]")
    for o, c in enumerate(abi.parts):
        for j in range(c):
            lines.append(f"    q{o}_{j} = P[{abi.out_ptr(o, j)}]")
    if abi.random:
        lines += [f"    seed = np.uint64(M[{abi.seed}])", f"    offset = np.uint64(M[{abi.offset}])"]
    scalars = {n.attr: n.dtype for n in k.nodes if n.op == "scalar"}
    for s, d in sorted(scalars.items()):
        word = f"M[{abi.scalar(s)}]"
        value = {"float32": f"f32_from_bits(np.uint32({word}))",
                 "float64": f"f64_from_bits({word})"}.get(d.name, f"{r.type_name(d)}({word})")
        if d.name in ("float16", "bfloat16"):     # passed as float32 bits, held rounded
            value = r.round_to(f"f32_from_bits(np.uint32({word}))", d)
        if d.is_bool:
            value = f"({word} != 0)"
        lines.append(f"    a{s} = {value}")
    return lines, inner


def _offsets(ks: KernelSource) -> list[str]:
    """Per row of the canonical space (`row`, C order over the outer dims): each operand's
    element offset `o{op}` (indented for the row loop)."""
    rank, layouts, n_in = ks.rank, ks.layouts, len(ks.kernel.in_dtypes)
    lines, rest = [], "row"
    for dim in range(rank - 2, -1, -1):
        if dim:
            lines += [f"        x{dim} = {rest} % n{dim}", f"        r{dim} = {rest} // n{dim}"]
            rest = f"r{dim}"
        else:
            lines.append(f"        x0 = {rest}")
    for op in range(ks.abi.n_operands):
        terms = [f"x{dim} * s{op}_{dim}" for dim in range(rank - 1)
                 if op >= n_in or layouts[op][dim] != "b"]
        lines.append(f"        o{op} = {' + '.join(terms) or '0'}")
    return lines


def _indexer(ks: KernelSource, inner: list[str]):
    rank = ks.rank

    def index(op: int) -> str:
        if not rank:
            return "0"
        term = {"c": " + j", "b": "", "s": f" + j * s{op}_{rank - 1}"}[inner[op]]
        return f"o{op}{term}"
    return index


def _render_kernel(r: NumbaRenderer, ks: KernelSource, fn: str) -> list[str]:
    if ks.kernel.reduce:
        return _render_rows(r, ks, fn)
    k, abi, rank = ks.kernel, ks.abi, ks.rank
    n_in = len(k.in_dtypes)
    lines, inner = _prologue(r, ks, fn)
    index = _indexer(ks, inner)
    body: list[str] = []
    r.index = [index(op) for op in range(n_in)]
    if any(n.op == "rand" for n in k.nodes):
        body.append(f"rw = philox({'base + j' if rank > 1 else 'j'}, seed, offset)")
    body += r.render_nodes(k)
    for o, out in enumerate(k.outputs):
        for j, part in enumerate(out.parts):
            body.append(r.store(f"q{o}_{j}", index(n_in + o), f"v{part}", out.dtype))

    if rank <= 1:
        for op in range(abi.n_operands):
            lines.append(f"    o{op} = 0")
        lines.append("    for j in range(start, stop):")
        lines += [f"        {b}" for b in body]
        return lines
    lines += ["    i = start", "    while i < stop:",
              f"        row = i // n{rank - 1}",
              f"        j0 = i - row * n{rank - 1}",
              f"        j1 = min(n{rank - 1}, j0 + (stop - i))"]
    if abi.random:
        lines.append(f"        base = row * n{rank - 1}")
    lines += _offsets(ks)
    lines.append("        for j in range(j0, j1):")
    lines += [f"            {b}" for b in body]
    lines.append("        i += j1 - j0")
    return lines


# Elements per block of a row sweep that sums floats: a block's sum is SIMD partial sums of a
# few elements each (the vectorizer's lanes), and block sums are combined pairwise
# (`cascade_push`), so the rounding error grows like log2(N), not N.
BLOCK = 256


def _render_rows(r: NumbaRenderer, ks: KernelSource, fn: str) -> list[str]:
    """A reduction kernel (DESIGN §8) in the order of `schedule`: per row of the rows the ABI
    assigns to [start, stop), one sweep over the row per pass accumulating its reductions, the
    pass's row values, the row outputs (stored once), then a sweep computing and storing the
    full outputs. Uniform nodes are computed once per call. Costly values of the last pass that
    the final sweep needs (`_kept`) are kept for the final sweep: in the row of the output that
    holds them (`_held_in_output`, any N), else in row scratch buffers for rows that fit."""
    k, rank = ks.kernel, ks.rank
    n_in, size = len(k.in_dtypes), f"n{rank - 1}"
    sch = schedule(k)
    lines, inner = _prologue(r, ks, fn)
    index = _indexer(ks, inner)
    r.index = [index(op) for op in range(n_in)]
    r.row_size = size
    for p in sch.passes:
        for i in p.reds:
            n = k.nodes[i]
            if n.op == "rsum" and n.dtype.is_float:
                lines.append(f"    stk{i} = cascade_stack({r.type_name(n.dtype)}(0))")
    keep = _kept(k, sch)
    held = _held_in_output(k, sch, keep)
    if held is None:
        for i in keep:
            lines.append(f"    sc{i} = row_scratch({r.type_name(k.nodes[i].dtype.compute)}(0))")
    lines.append(f"    w = {size} if {size} > 1 else 1")
    lines += [f"    {b}" for b in r.render_nodes(k, sch.hoisted)]
    lines.append("    for row in range((start + w - 1) // w, (stop + w - 1) // w):")
    lines += _offsets(ks) if rank > 1 else [f"        o{op} = 0" for op in range(ks.abi.n_operands)]
    for p in sch.passes[:-1]:
        lines += _sweep(r, k, p, size)
        lines += [f"        {b}" for b in r.render_nodes(k, p.after)]
    row_stores = [f"        {r.store(f'q{o}_0', index(n_in + o), f'v{out.parts[0]}', out.dtype)}"
                  for o, out in enumerate(k.outputs) if out.row]
    stores = [r.store(f"q{o}_{j}", index(n_in + o), f"v{part}", out.dtype)
              for o, out in enumerate(k.outputs) if not out.row for j, part in enumerate(out.parts)]

    def tail(keep: tuple[int, ...]) -> list[str]:
        if held is None:
            put = [f"sc_st_{k.nodes[i].dtype.compute.short}(sc{i}, j, v{i})" for i in keep]
            loads = [f"v{i} = sc_ld_{k.nodes[i].dtype.compute.short}(sc{i}, j)" for i in keep]
        else:
            at, short = index(n_in + held), k.outputs[held].dtype.short
            put = [f"st_{short}(q{held}_0, {at}, v{keep[0]})"]
            loads = [f"v{keep[0]} = ldb_{short}(q{held}_0, {at})"]
        out = []
        if sch.passes:
            out += _sweep(r, k, sch.passes[-1], size, put if keep else [],
                          _prefetches(r, ks, inner))
            out += [f"        {b}" for b in r.render_nodes(k, sch.passes[-1].after)]
        out += row_stores
        if stores:
            out.append(f"        for j in range({size}):")
            out += [f"            {b}" for b in loads +
                    _elements(r, k, _needed_without(k, sch, keep), size) + stores]
        return out
    if keep and held is None:
        lines.append(f"        if {size} <= SCRATCH:")
        lines += [f"    {b}" for b in tail(keep)]
        lines.append("        else:")
        lines += [f"    {b}" for b in tail(())]
    else:
        lines += tail(keep)
    return lines


def _prefetches(r: NumbaRenderer, ks: KernelSource, inner: list[str]) -> list[str]:
    """Hints for the last sweep over a row, per block [jb, je): the same elements of the next
    row (along the second-to-last dim) of every input with contiguous rows, one per cache line,
    so that the next row's first sweep finds them in cache while this one computes."""
    k, rank = ks.kernel, ks.rank
    if rank < 2:
        return []
    out = []
    for op, d in enumerate(k.in_dtypes):
        if inner[op] != "c" or ks.layouts[op][rank - 2] == "b":
            continue
        step = 64 // (d.bits // 8 if d.bits >= 8 else 1)
        for c in range(k.chunks[op][0] if k.chunks[op] else 1):
            out += [f"for c in range(jb, je, {step}):",
                    f"    {r.prefetch(f'p{op}_{c}', f'o{op} + s{op}_{rank - 2} + c', d)}"]
    return out


# Ops worth computing once per element rather than in two sweeps (math helpers, libm)
COSTLY = frozenset(("exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "sin", "cos",
                    "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "erf", "erfc",
                    "lgamma", "sigmoid", "gelu", "pow", "atan2", "rand"))


def _kept(k: Kernel, sch: Schedule) -> tuple[int, ...]:
    """Values of the last pass's sweep that the final sweep needs and that cost a math function
    to compute: up to two of them, in float32/float64 (softmax's exp(x - max))."""
    if not sch.passes or not sch.final:
        return ()
    shared = set(sch.passes[-1].elem) & set(sch.final)
    users = [a for i in set(sch.final) - shared for a in k.nodes[i].args] + \
        [p for o in k.outputs if not o.row for p in o.parts]
    frontier = sorted({i for i in users if i in shared and k.nodes[i].dtype.compute in
                       (dt.float32, dt.float64) and _costly(k, i, shared)})
    return tuple(frontier[:2])


def _costly(k: Kernel, i: int, within: set[int]) -> bool:
    """Whether node i, or a node it depends on within `within`, is a COSTLY op."""
    stack, seen = [i], set()
    while stack:
        n = stack.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        if k.nodes[n].op in COSTLY:
            return True
        stack.extend(k.nodes[n].args)
    return False


def _held_in_output(k: Kernel, sch: Schedule, keep: tuple[int, ...]) -> int | None:
    """The full output whose row can hold the one kept value until the final sweep reads it
    back (in its dtype: float32 or float64), when that sweep needs nothing else from memory (it
    may then run in place: the output may be the input)."""
    if len(keep) != 1 or any(k.nodes[i].op in ("load", "rand")
                             for i in _needed_without(k, sch, keep)):
        return None
    return next((o for o, out in enumerate(k.outputs) if not out.row and not out.cat
                 and out.dtype == k.nodes[keep[0]].dtype.compute), None)


def _needed_without(k: Kernel, sch: Schedule, keep: tuple[int, ...]) -> tuple[int, ...]:
    """The final sweep's nodes that the full outputs need when the `keep` values are read back."""
    final, seen = set(sch.final), set()
    stack = [p for o in k.outputs if not o.row for p in o.parts]
    while stack:
        n = stack.pop()
        if n in seen or n not in final or n in keep:
            continue
        seen.add(n)
        stack.extend(k.nodes[n].args)
    return tuple(sorted(seen))


def _elements(r: NumbaRenderer, k: Kernel, ids: tuple[int, ...], size: str) -> list[str]:
    """Per-element nodes `ids` inside a sweep (Philox counter: the element's linear index)."""
    head = [f"rw = philox(row * {size} + j, seed, offset)"] \
        if any(k.nodes[i].op == "rand" for i in ids) else []
    return head + r.render_nodes(k, ids)


def _sweep(r: NumbaRenderer, k: Kernel, p: Pass, size: str, put: list[str] = (),
           hints: list[str] = ()) -> list[str]:
    """One pass over the row accumulating the reductions `p.reds`: float sums per block of
    BLOCK elements, combined pairwise; max/min (NaN-propagating) and integer sums across the
    row. Empty rows: sums 0, float max/min NaN, integer max/min 0. The lines `put` (stores of
    kept values) run per element, the lines `hints` after each block."""
    sums, others = [], []
    for i in p.reds:
        n = k.nodes[i]
        (sums if n.op == "rsum" and n.dtype.is_float else others).append(i)
    init, step, done = [], [], []
    for i in others:
        n = k.nodes[i]
        T, x = r.type_name(n.dtype), f"v{n.args[0]}"
        if n.op == "rsum":
            init.append(f"a{i} = {T}(0)")
            step.append(f"a{i} = acc_add(a{i}, {x})")
            done.append(f"v{i} = a{i}")
            continue
        hi = n.op == "rmin"
        if n.dtype.is_float:
            start, empty = ("np.inf" if hi else "-np.inf"), "np.nan"
        else:
            lo_, hi_ = int_range(n.dtype)
            start, empty = str(hi_ if hi else lo_), "0"
        init.append(f"a{i} = {T}({start})")
        step.append(f"a{i} = acc_{n.op[1:]}(a{i}, {x})")
        done.append(f"v{i} = select({size} > 0, a{i}, {T}({empty}))")
    body = _elements(r, k, p.elem, size) + list(put)
    out = [f"        {b}" for b in init]
    if not sums:
        out.append(f"        for j in range({size}):")
        out += [f"            {b}" for b in body + step]
    else:
        out += ["        b = 0", "        jb = 0", f"        while jb < {size}:",
                f"            je = min({size}, jb + {BLOCK})"]
        out += [f"            a{i} = {r.type_name(k.nodes[i].dtype)}(0)" for i in sums]
        out.append("            for j in range(jb, je):")
        out += [f"                {b}" for b in body + step +
                [f"a{i} = acc_add(a{i}, v{k.nodes[i].args[0]})" for i in sums]]
        out += [f"            cascade_push_{k.nodes[i].dtype.short}(stk{i}, b, a{i})" for i in sums]
        out += [f"            {h}" for h in hints]
        out += ["            b += 1", "            jb = je"]
        done += [f"v{i} = cascade_total_{k.nodes[i].dtype.short}(stk{i}, b, "
                 f"{r.type_name(k.nodes[i].dtype)}(0))" for i in sums]
    return out + [f"        {b}" for b in done]


def render_group(kernels: list[KernelSource]) -> tuple[str, dict[str, str]]:
    """numba source for one group's ArgSpecs, and {function name: exported symbol}."""
    r = NumbaRenderer()
    functions, entries = [], {}
    for n, ks in enumerate(kernels):
        fn = f"k{n}"
        functions.append("\n".join(_render_kernel(r, ks, fn)))
        entries[fn] = ks.symbol
    group = kernels[0].kernel.group if kernels else ""
    parts = [_HEADER.format(version=__version__, group=group)]
    parts += [h.strip("\n") for h in r.helpers.values()]
    parts += functions
    return "\n\n\n".join(parts) + "\n", entries
