"""CPU codegen: typed kernels -> numba Python source (one module per group).

Each ArgSpec becomes a function `kN(P, M, start, stop)` following `abi.Abi`; the numba toolchain
compiles them into one `.so` exporting one C symbol per ArgSpec. The loop nest walks rows of the
canonical iteration space; the inner loop has compile-time inner strides (1 for 'c', 0 for 'b'),
so LLVM's loop vectorizer turns it into SIMD code. float16/bfloat16 are converted with integer
bit manipulation (round-to-nearest-even, NaN preserved), which vectorizes on every ISA level.
"""
from __future__ import annotations

import math

from .. import __version__
from .. import dtypes as dt
from ..ir import Node, int_range
from ..ops import PRIMITIVES
from .common import KernelSource, Renderer, check_complete

_NP = {"float32": "np.float32", "float64": "np.float64", "int8": "np.int8", "int16": "np.int16",
       "int32": "np.int32", "int64": "np.int64", "uint8": "np.uint8", "bool": "np.bool_"}
_STORAGE = {"float16": "u16", "bfloat16": "u16", "bool": "u8"}

_F = "math.{}({{a}})"
NUMBA_OPS: dict[str, dict[str, str]] = {
    **{n: {"f": _F.format(n)} for n in ("exp", "expm1", "log", "log2", "log10", "log1p", "sqrt",
                                          "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
                                          "cosh", "tanh", "erf", "erfc", "lgamma")},
    "exp2": {"f": "np.exp2({a})"},
    "rsqrt": {"f": "{T}(1) / math.sqrt({a})"},
    "sigmoid": {"f": "sigmoid_{t}({a})"},
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
    "where": {"*": "({b} if {a} else {c})"},
}

# Helper functions emitted into the module when used; formatted with T, t, bits and the integer
# range of t (lo, hi). Each is compiled by numba and inlined by LLVM.
HELPERS: dict[str, str] = {
    "sigmoid": """
@njit
def sigmoid_{t}(x):
    e = math.exp(-abs(x))
    r = {T}(1) / ({T}(1) + e)
    return r if x >= {T}(0) else e * r
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
    "f16": """
@njit
def f16_to_f32(h):
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    bits = sign | ((e + 112) << 23) | (m << 13)
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    sub = np.float32(m) * np.float32(5.9604644775390625e-08)
    if sign != 0:
        sub = -sub
    return sub if e == 0 else f32_from_bits(np.uint32(bits))


@njit
def f32_to_f16(f):
    # round to nearest even; NaN stays NaN (quiet, top payload bits kept); overflow -> inf
    x = np.int64(bits_from_f32(f))
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    sub = np.int64(np.rint(abs(f) * np.float32(16777216.0)))
    r = sign | sub
    if a >= 0x38800000:
        r = sign | (((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10))
    if a >= 0x477FF000:
        r = sign | 0x7C00
    if a > 0x7F800000:
        r = sign | 0x7E00 | ((a >> 13) & 0x3FF)
    return np.uint16(r)


@njit
def round_f16(f):
    return f16_to_f32(f32_to_f16(f))
""",
    "bf16": """
@njit
def bf16_to_f32(h):
    return f32_from_bits(np.uint32(np.int64(h) << 16))


@njit
def f32_to_bf16(f):
    x = np.int64(bits_from_f32(f))
    r = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    if (x & 0x7FFFFFFF) > 0x7F800000:
        r = (x >> 16) | 0x40
    return np.uint16(r)


@njit
def round_bf16(f):
    return bf16_to_f32(f32_to_bf16(f))
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

_HEADER = """# fusebuild {version}: numba source of group '{group}'. Generated; do not edit.
import math

import numpy as np
from numba import njit

from fusebuild.toolchain.numba_support import *  # noqa: F401,F403  (ld_*, st_*, bit casts)
"""


class NumbaRenderer(Renderer):
    ops = NUMBA_OPS

    def __init__(self):
        self.helpers: dict[str, str] = {}   # name -> source, in first-use order

    def need(self, template: str, name: str, **fmt) -> None:
        if name not in self.helpers:
            self.helpers[name] = HELPERS[template].format(**fmt)

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
        kind = "f" if t.is_float else "i"
        helper = {"sigmoid": "sigmoid", "floor_divide": f"floordiv_{kind}",
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
        self.need(short, short)
        return f"round_{short}({x})"

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
            self.need(short, short)
            return f"{short}_to_f32(ld_u16({addr}, {index}))"
        if d.is_bool:
            return f"(ld_u8({addr}, {index}) != 0)"
        return f"ld_{d.short}({addr}, {index})"

    def store(self, addr: str, index: str, value: str, d: dt.DType) -> str:
        if d.name in ("float16", "bfloat16"):
            short = "f16" if d.name == "float16" else "bf16"
            self.need(short, short)
            return f"st_u16({addr}, {index}, f32_to_{short}({value}))"
        if d.is_bool:
            return f"st_u8({addr}, {index}, np.uint8({value}))"
        return f"st_{d.short}({addr}, {index}, {value})"

    def rand(self, node: Node) -> str:
        self.need("philox", "philox")
        w = node.attr
        if node.dtype == dt.float64:
            return (f"np.float64(((rw[{w}] << np.uint64(32)) | rw[{w + 1}]) >> np.uint64(11))"
                    " * 1.1102230246251565e-16")
        mant = {"float32": 24, "float16": 11, "bfloat16": 8}[node.dtype.name]
        return f"np.float32(rw[{w}] >> np.uint64({32 - mant})) * np.float32({2.0 ** -mant!r})"


check_complete(NumbaRenderer(), PRIMITIVES)


def _render_kernel(r: NumbaRenderer, ks: KernelSource, fn: str) -> list[str]:
    k, abi, rank, layouts = ks.kernel, ks.abi, ks.rank, ks.layouts
    n_in = len(k.in_dtypes)
    lines = [f"def {fn}(P, M, start, stop):", f"    # {ks.key}"]
    body: list[str] = []
    for d in range(rank):
        lines.append(f"    n{d} = M[{abi.size(d)}]")
    # operands: inputs 0..n_in-1, outputs n_in..; inner stride: 1 ('c'), 0 ('b') or runtime ('s')
    inner = []
    for op in range(abi.n_operands):
        if op < n_in:
            letter = layouts[op][-1] if rank else "b"
        else:   # plain outputs are C-contiguous; cat parts are views with a run-time stride
            letter = "s" if k.outputs[op - n_in].cat else "c"
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
        if d.is_bool:
            value = f"({word} != 0)"
        lines.append(f"    a{s} = {value}")

    def index(op: int) -> str:
        if not rank:
            return "0"
        term = {"c": " + j", "b": "", "s": f" + j * s{op}_{rank - 1}"}[inner[op]]
        return f"o{op}{term}"

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
    lines += [f"    i = start", "    while i < stop:",
              f"        row = i // n{rank - 1}",
              f"        j0 = i - row * n{rank - 1}",
              f"        j1 = min(n{rank - 1}, j0 + (stop - i))"]
    if abi.random:
        lines.append(f"        base = row * n{rank - 1}")
    rest = "row"
    for dim in range(rank - 2, -1, -1):
        if dim:
            lines += [f"        x{dim} = {rest} % n{dim}", f"        r{dim} = {rest} // n{dim}"]
            rest = f"r{dim}"
        else:
            lines.append(f"        x0 = {rest}")
    for op in range(abi.n_operands):
        terms = [f"x{dim} * s{op}_{dim}" for dim in range(rank - 1)
                 if op >= n_in or layouts[op][dim] != "b"]
        lines.append(f"        o{op} = {' + '.join(terms) or '0'}")
    lines.append("        for j in range(j0, j1):")
    lines += [f"            {b}" for b in body]
    lines.append("        i += j1 - j0")
    return lines


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
