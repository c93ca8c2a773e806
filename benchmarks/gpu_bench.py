"""GPU benchmark (issue 3, item 6), JSON lines: fusebuild's CUDA kernels against the device's copy
bandwidth and against peers computing the same typed kernel graph on the same inputs.

    python benchmarks/gpu_bench.py [--out FILE] [--quick] [--bundle PATH] [--groups a,b]
                                   [--sections copy,kernels,overhead,cold] [--elements N]
                                   [--time-budget SECONDS]
    python benchmarks/gpu_bench.py --dry-run [--groups a,b]      # no GPU: checks the peers

Lines (`what`), each section wrapped so a failure is a line with "error" and the rest still runs:
- environment: device, compute capability, driver/runtime, cupy/torch/NVRTC/fusebuild versions.
- build: `fusebuild compile specs/ --target cuda:sm_XY` for this device (skipped with --bundle).
- copy: device-to-device memcpy of a large buffer: bytes read + written / time (CUDA events,
  median).
- kernel / kernel_summary: every example group at 2^26 iteration elements, once per shape pattern
  of its matrix (broadcast patterns as [8192, 8192] with the broadcast operand), in each dtype
  combination of its matrix without float64: fusebuild, torch eager, torch.compile, cupy unfused
  and cupy ElementwiseKernel; time per call (median of batches timed with CUDA events), bytes moved
  (each input at its own size + outputs) / time as a fraction of the copy bandwidth, and each peer's
  max abs/rel difference from fusebuild's output (random outputs: shape and dtype only).
- overhead: host time per call on 1,024 float32 elements (silu_add, bias_gelu_tanh), GPU
  synchronized before and after each timed loop, against a bare cupy RawKernel launch of the
  same body, cupy ElementwiseKernel, cupy unfused, torch eager and torch.compile.
- cold_start: a fresh `python -c` from interpreter start to the first result (load, call, sync).
- summary: the issue's targets, met or missed.

Peers are generated, not hand-written: the expanded typed graph (`ir.instantiate`) is rendered as a
Python function over an array namespace (torch or cupy; op by op, float16/bfloat16 computed in
float32 and rounded at casts and stores like the kernels; scalar-only nodes folded in numpy), the
same function runs under torch.compile, and the ElementwiseKernel body comes from a C renderer over
the same graph that reuses codegen/cuda.py's templates that need no prelude. cupy holds bfloat16
as uint16 bits. All timed work runs on the legacy default stream, which cupy and torch share.

Targets (issue 3): memory-bound groups >= 0.95x copy bandwidth at 2^26 elements in every float
dtype; >= 1.0x torch.compile on the same group; host overhead <= 1.5x a bare RawKernel launch.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fusebuild import __version__, dtypes as dt, ir, syntax, spec  # noqa: E402
from fusebuild.argspec import Dim, broadcast_shapes  # noqa: E402
from fusebuild.codegen.cuda import CUDA_OPS, CudaRenderer  # noqa: E402
from fusebuild.ops import PRIMITIVES  # noqa: E402

SPECS = os.path.join(ROOT, "specs")
FULL_ELEMENTS, QUICK_ELEMENTS, DRY_ELEMENTS = 1 << 26, 1 << 24, 1 << 8
QUICK_GROUPS = ("silu_add", "bias_gelu_tanh", "rotary_embedding")
OVERHEAD_GROUPS = ("silu_add", "bias_gelu_tanh")
OVERHEAD_ELEMENTS = 1024
COMPUTE_HEAVY = {"bias_dropout_residual"}    # Philox4x32-10 per element: no copy-bandwidth target
HALF = ("float16", "bfloat16")
POSITIVE_INPUTS = {"exp_avg_sq", "scale"}    # feed a square root or a division
SCALAR_VALUES = {"f": 0.125, "i": 7, "b": True}
SEED, OFFSET = 1234, 0
# max |difference| / max |fusebuild output| per output dtype (integers and bools must match)
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}
TARGET_COPY, TARGET_COMPILE, TARGET_OVERHEAD = 0.95, 1.0, 1.5
SECTIONS = ("copy", "kernels", "overhead", "cold")
RESERVE_S = 150          # time kept for the overhead and cold-start sections after the kernels


# ---------------------------------------------------------------- cases ------------------------

def _view(shape: tuple, chunk: tuple | None) -> tuple:
    """The shape of one chunk of an input (the input's own shape when it is not chunked)."""
    if not chunk:
        return tuple(shape)
    n, dim = chunk
    d = dim % len(shape)
    return tuple(shape[:d]) + (shape[d] // n,) + tuple(shape[d + 1:])


def _split(total: int, count: int) -> list[int]:
    """`total` (a power of two) as `count` power-of-two factors, the last taking the rest."""
    first = [1 << ((total.bit_length() - 1) // count)] * (count - 1)
    return first + [total // math.prod(first)]


def assign_sizes(iteration: tuple, elements: int, side: int) -> dict[str, int]:
    """Symbol values giving `elements` iteration elements: rank 1 takes them all, higher ranks put
    `side` in the inner dimension and split the rest over the outer ones."""
    rank = len(iteration)
    targets = [elements] if rank == 1 else _split(elements // side, rank - 1) + [side]
    values: dict[str, int] = {}
    for size, target in zip(iteration, targets):
        d = Dim.of(size)
        known = d.coef * math.prod(values[s] for s in d.syms if s in values)
        for k, s in enumerate(s for s in d.syms if s not in values):
            values[s] = max(1, target // known) if k == 0 else 1
    return values


def concrete(shape: tuple, values: dict[str, int]) -> tuple[int, ...]:
    return tuple(Dim.of(s).coef * math.prod(values[x] for x in Dim.of(s).syms) for s in shape)


def out_shape(iteration: tuple, cat: tuple | None) -> tuple[int, ...]:
    if not cat:
        return tuple(iteration)
    n, dim = cat
    d = dim % len(iteration)
    return tuple(iteration[:d]) + (iteration[d] * n,) + tuple(iteration[d + 1:])


@dataclass
class Case:
    """One measured configuration: a group, its tensor dtypes and concrete input shapes."""
    plan: spec.GroupPlan
    dtypes: tuple[dt.DType, ...]
    shapes: dict[str, tuple[int, ...]]
    broadcast: bool

    @property
    def group(self) -> syntax.Group:
        return self.plan.group

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def dtype_map(self) -> dict[str, dt.DType]:
        return {i.name: d for i, d in zip(self.group.tensor_inputs, self.dtypes)}

    @property
    def iteration(self) -> tuple[int, ...]:
        return tuple(np.broadcast_shapes(*(_view(self.shapes[i.name], i.chunk)
                                           for i in self.group.tensor_inputs)))

    @property
    def scalars(self) -> list:
        return [SCALAR_VALUES["f" if i.dtype.is_float else "b" if i.dtype.is_bool else "i"]
                for i in self.group.scalar_inputs]

    @functools.cached_property
    def kernel(self) -> ir.Kernel:
        return ir.instantiate(self.group, self.dtype_map)

    def call_args(self, tensors: list) -> list:
        """Tensors and scalar values in the group's declared input order."""
        it, sc = iter(tensors), iter(self.scalars)
        return [next(it) if i.kind == "tensor" else next(sc) for i in self.group.inputs]

    def nbytes(self) -> int:
        """Bytes moved: each input at its own size, then every output."""
        ins = sum(math.prod(self.shapes[i.name]) * d.itemsize
                  for i, d in zip(self.group.tensor_inputs, self.dtypes))
        return ins + sum(math.prod(out_shape(self.iteration, o.cat)) * o.dtype.itemsize
                         for o in self.kernel.outputs)

    def row(self) -> dict:
        shorts = [d.short for d in self.dtypes]
        return {"group": self.name,
                "dtype": shorts[0] if len(set(shorts)) == 1 else "/".join(shorts),
                "shape": " ".join(f"{n}[{'x'.join(map(str, s))}]" for n, s in self.shapes.items()),
                "broadcast": self.broadcast}


def pattern_shapes(group: syntax.Group, pattern: dict, elements: int, side: int
                   ) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Concrete input shapes of one symbolic pattern, and whether an input is broadcast."""
    inputs = group.tensor_inputs
    iteration = broadcast_shapes([_view(pattern[i.name], i.chunk) for i in inputs])
    values = assign_sizes(iteration, elements, side)
    full = concrete(iteration, values)
    views = [concrete(_view(pattern[i.name], i.chunk), values) for i in inputs]
    broadcast = any((1,) * (len(full) - len(v)) + v != full for v in views)
    return {i.name: concrete(pattern[i.name], values) for i in inputs}, broadcast


def side_of(elements: int) -> int:
    return 1 << ((elements.bit_length() - 1) // 2)


def make_cases(plan: spec.Plan, groups: tuple[str, ...] | None, elements: int) -> list[Case]:
    """Every dtype combination (float64 left out) times every shape pattern of each elementwise
    forward group (row reductions have their own benchmark, reduction_bench.py; backward groups
    torch_bench.py)."""
    cases = []
    for gp in plan.groups:
        if gp.group.reduces or gp.group.name.endswith("__grad") or \
                (groups and gp.group.name not in groups):
            continue
        for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
            if dt.float64 in dtypes:
                continue
            for pattern in gp.shapes:
                shapes, broadcast = pattern_shapes(gp.group, pattern, elements, side_of(elements))
                cases.append(Case(gp, dtypes, shapes, broadcast))
    return cases


def random_input(F: "ArrayOps", name: str, shape: tuple, d: dt.DType):
    """A storage array of random values (bfloat16 as uint16 bits) made by F's generator."""
    u = F.gen.random(shape, dtype=F.xp.float32)
    if d.is_bool:
        return u < 0.3
    if d.is_int:
        return (u * 256 - (128 if d.kind == "i" else 0)).astype(d.name)
    x = F.gen.standard_normal(shape, dtype=F.xp.float32) * 2
    if name in POSITIVE_INPUTS:
        x = F.xp.abs(x) + 0.01
    return F.to_storage(x, d.name)


def random_inputs(case: Case, F: "ArrayOps") -> list:
    return [random_input(F, i.name, case.shapes[i.name], d)
            for i, d in zip(case.group.tensor_inputs, case.dtypes)]


def random_outputs(k: ir.Kernel) -> set[str]:
    """Names of the outputs that depend on rand_like."""
    rand: set[int] = set()
    for i, n in enumerate(k.nodes):
        if n.op == "rand" or any(a in rand for a in n.args):
            rand.add(i)
    return {o.name for o in k.outputs if any(p in rand for p in o.parts)}


# ---------------------------------------------------------------- array namespaces -------------

NUMPY_NAMES = {"asin": "arcsin", "acos": "arccos", "atan": "arctan", "round": "rint",
               "neg": "negative", "sub": "subtract", "mul": "multiply", "div": "divide",
               "pow": "power", "atan2": "arctan2", "min": "minimum", "max": "maximum",
               "eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal",
               "gt": "greater", "ge": "greater_equal", "bitwise_not": "invert",
               "lshift": "left_shift", "rshift": "right_shift"}
SPECIAL = {"erf": "erf", "erfc": "erfc", "lgamma": "gammaln"}
TORCH_NAMES = {"min": "minimum", "max": "maximum", "lshift": "bitwise_left_shift",
               "rshift": "bitwise_right_shift"}


def _host_special(name: str) -> Callable:
    """erf, erfc or gammaln on numpy arrays through the math module, element by element."""
    fn = np.frompyfunc({"erf": math.erf, "erfc": math.erfc, "gammaln": math.lgamma}[name], 1, 1)
    return lambda x: fn(x).astype(x.dtype)


class ArrayOps:
    """The IR's primitives on numpy or cupy arrays, one array op each. float16/bfloat16 values are
    float32, rounded at casts and stores; bfloat16 storage is uint16 bits."""

    def __init__(self, xp, special=None, gen=None):
        self.xp, self.gen = xp, gen
        for op in PRIMITIVES:
            if op in SPECIAL:
                fn = getattr(special, SPECIAL[op]) if special else _host_special(SPECIAL[op])
            else:
                fn = getattr(xp, NUMPY_NAMES.get(op, op), None)
            if fn is not None:       # sigmoid and rsqrt are methods below
                setattr(self, op, fn)

    def sigmoid(self, x):
        return 1 / (1 + self.xp.exp(-x))

    def rsqrt(self, x):
        return 1 / self.xp.sqrt(x)

    def gelu(self, x):
        return 0.5 * x * self.erfc(x * -math.sqrt(0.5))

    def load(self, a, name: str):
        if name == "bfloat16":
            return self.bf16_to_f32(a)
        return a.astype(self.xp.float32) if name == "float16" else a

    def cast(self, x, name: str):
        xp = self.xp
        x = xp.asarray(x)
        if name == "bool":
            return x != 0
        if name == "float16":
            return x.astype(xp.float16).astype(xp.float32)
        if name == "bfloat16":
            return self.bf16_to_f32(self.f32_to_bf16(x.astype(xp.float32, copy=False)))
        return x.astype(name, copy=False)

    def to_storage(self, v, name: str):
        v = self.xp.asarray(v)
        return self.f32_to_bf16(v) if name == "bfloat16" else v.astype(name, copy=False)

    def store(self, v, name: str, shape: tuple):
        xp = self.xp
        return xp.ascontiguousarray(xp.broadcast_to(self.to_storage(v, name), shape))

    def chunk(self, a, n: int, dim: int) -> list:
        return self.xp.split(a, n, axis=dim)

    def cat(self, parts: list, dim: int):
        return self.xp.concatenate(parts, axis=dim)

    def rand(self, shape: tuple):
        return self.gen.random(shape, dtype=self.xp.float32)

    def const(self, value, name: str):
        return self.xp.asarray(value, name)

    def scalar(self, value, name: str):
        return self.cast(self.xp.asarray(value, np.float64 if dt.lookup(name).is_float else None),
                         name)

    def constant(self, value):
        """A host value as a 0-d array of this namespace."""
        return self.xp.asarray(value)

    def f32_to_bf16(self, x):
        """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet."""
        xp = self.xp
        u = x.view(xp.uint32)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return xp.where(xp.isnan(x), (u >> 16) | 0x40, rounded).astype(xp.uint16)

    def bf16_to_f32(self, bits):
        return (bits.astype(self.xp.uint32) << 16).view(self.xp.float32)

    def as_float64(self, a, name: str):
        return (self.bf16_to_f32(a) if name == "bfloat16" else a).astype(self.xp.float64)


class TorchOps:
    """The IR's primitives on torch tensors, one torch op each; float16/bfloat16 computed in
    float32 and rounded at casts and stores."""

    def __init__(self, torch, device: str):
        self.torch, self.device = torch, device
        self.dtypes = {d.name: getattr(torch, d.name) for d in dt.ALL}
        for op in PRIMITIVES:
            if not hasattr(type(self), op):      # gelu is a method below
                setattr(self, op, getattr(torch, TORCH_NAMES.get(op, op)))

    def gelu(self, x):
        return self.torch.nn.functional.gelu(x)

    def load(self, t, name: str):
        return t.float() if name in HALF else t

    def cast(self, x, name: str):
        if name == "bool":
            return x != 0
        if name in HALF:
            return x.to(self.dtypes[name]).float()
        return x.to(self.dtypes[name])

    def store(self, v, name: str, shape: tuple):
        return v.to(self.dtypes[name]).expand(shape).contiguous()

    def chunk(self, t, n: int, dim: int):
        return self.torch.chunk(t, n, dim)

    def cat(self, parts: list, dim: int):
        return self.torch.cat(parts, dim)

    def rand(self, shape: tuple):
        return self.torch.rand(shape, device=self.device)

    def constant(self, value):
        return self.torch.from_numpy(np.array(value)).to(self.device)


# ---------------------------------------------------------------- graph -> Python --------------

def host_nodes(k: ir.Kernel) -> set[int]:
    """Nodes computed from constants and scalars only (folded once, on the host)."""
    host: set[int] = set()
    for i, n in enumerate(k.nodes):
        if n.op in ("const", "scalar") or (n.op not in ("load", "rand") and n.args
                                           and all(a in host for a in n.args)):
            host.add(i)
    return host


def _literal(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "float('nan')" if math.isnan(value) else f"float('{'-' if value < 0 else ''}inf')"
    return repr(value)


def _py_expr(k: ir.Kernel, i: int, ref: Callable[[int], str]) -> str:
    n = k.nodes[i]
    if n.op == "load":
        pos, c = n.attr
        view = f"c{pos}[{c}]" if k.chunks[pos] else f"t{pos}"
        return f"F.load({view}, {n.dtype.name!r})"
    if n.op == "const":
        return f"F.const({_literal(n.attr)}, {n.dtype.compute.name!r})"
    if n.op == "scalar":
        return f"F.scalar(S[{n.attr}], {n.dtype.name!r})"
    if n.op == "cast":
        return f"F.cast({ref(n.args[0])}, {n.dtype.name!r})"
    if n.op == "hold":      # a value already in the compute type
        return ref(n.args[0])
    if n.op == "rand":
        return "F.rand(SHAPE)"
    return f"F.{n.op}({', '.join(ref(a) for a in n.args)})"


def _py_output(o: ir.KernelOutput, ref: Callable[[int], str]) -> str:
    parts = [f"F.store({ref(p)}, {o.dtype.name!r}, SHAPE)" for p in o.parts]
    return f"F.cat([{', '.join(parts)}], {o.cat[1]})" if o.cat else parts[0]


def host_source(k: ir.Kernel, host: set[int]) -> str:
    """`host(F, S)`: the folded nodes' values by node id (S: scalar values)."""
    lines = ["def host(F, S):"]
    lines += [f"    v{i} = {_py_expr(k, i, lambda a: f'v{a}')}" for i in sorted(host)]
    lines.append(f"    return {{{', '.join(f'{i}: v{i}' for i in sorted(host))}}}")
    return "\n".join(lines) + "\n"


def python_source(k: ir.Kernel, host: set[int]) -> str:
    """`make(F, K, SHAPE)` -> `run(t0, t1, ...)`: the graph op by op over namespace F, with the
    folded values K, returning the outputs in storage dtypes."""
    def ref(a: int) -> str:
        return f"K[{a}]" if a in host else f"v{a}"
    lines = ["def make(F, K, SHAPE):",
             f"    def run({', '.join(f't{p}' for p in range(len(k.in_dtypes)))}):"]
    lines += [f"        c{p} = F.chunk(t{p}, {ch[0]}, {ch[1]})" for p, ch in enumerate(k.chunks)
              if ch]
    lines += [f"        v{i} = {_py_expr(k, i, ref)}" for i in range(len(k.nodes)) if i not in host]
    lines += [f"        return ({', '.join(_py_output(o, ref) for o in k.outputs)},)",
              "    return run"]
    return "\n".join(lines) + "\n"


def _exec(source: str, name: str) -> Callable:
    scope: dict = {}
    exec(compile(source, f"<gpu_bench {name}>", "exec"), scope)  # noqa: S102 - our own render
    return scope[name]


def evaluator(k: ir.Kernel, F, scalars: list, shape: tuple) -> Callable[..., tuple]:
    """The unfused peer: `run(*storage_tensors)` -> outputs, op by op in namespace F."""
    host = host_nodes(k)
    values = _exec(host_source(k, host), "host")(ArrayOps(np), list(scalars))
    make = _exec(python_source(k, host), "make")
    return make(F, {i: F.constant(v) for i, v in values.items()}, tuple(shape))


# ---------------------------------------------------------------- graph -> ElementwiseKernel ---

_C_MATH = {**{n: f"{n}f" for n in ("exp exp2 expm1 log log2 log10 log1p sqrt rsqrt sin cos tan "
                                    "asin acos atan sinh cosh tanh erf erfc lgamma ceil floor "
                                    "trunc").split()},
           "round": "rintf"}
_EK_OWN: dict[str, dict[str, str]] = {
    **{op: {"f": f"{fn}({{a}})"} for op, fn in _C_MATH.items()},
    "sigmoid": {"f": "(1.0f / (1.0f + expf(-{a})))"},
    "gelu": {"f": "(0.5f * {a} * erfcf({a} * -0.70710678118654752f))"},
    "sign": {"f": "(({a} > 0.0f) ? 1.0f : (({a} < 0.0f) ? -1.0f : {a}))",
             "i": "(({T})(({a} > 0) - ({a} < 0)))"},
    "isinf": {"f": "isinf({a})"}, "isfinite": {"f": "isfinite({a})"},
    "pow": {"f": "powf({a}, {b})"}, "atan2": {"f": "atan2f({a}, {b})"},
    "fmod": {"f": "fmodf({a}, {b})"}, "floor_divide": {"f": "floorf({a} / {b})"},
    "remainder": {"f": "({a} - floorf({a} / {b}) * {b})"},
    "abs": {"f": "fabsf({a})", "i": "(({T})({a} < 0 ? -{a} : {a}))"},
    "neg": {"i": "(({T})-{a})"},
    **{op: {"i": f"(({{T}})({{a}} {sym} {{b}}))"} for op, sym in
       (("add", "+"), ("sub", "-"), ("mul", "*"), ("lshift", "<<"), ("rshift", ">>"))},
}
# codegen/cuda.py's templates that use no fb_ helper of its prelude, completed by our own
EK_OPS = {op: {**_EK_OWN.get(op, {}),
               **{c: t for c, t in CUDA_OPS.get(op, {}).items() if "fb_" not in t}}
          for op in PRIMITIVES}

EK_PREAMBLE = r"""
__device__ __forceinline__ float bk_f16_to_f32(unsigned short h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short bk_f32_to_f16(float f) {
  unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bk_bf16_to_f32(unsigned short h) {
  return __uint_as_float((unsigned)h << 16);
}
__device__ __forceinline__ unsigned short bk_f32_to_bf16(float f) {
  unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bk_round_f16(float f) { return bk_f16_to_f32(bk_f32_to_f16(f)); }
__device__ __forceinline__ float bk_round_bf16(float f) {
  return bk_bf16_to_f32(bk_f32_to_bf16(f));
}
// Philox4x32-10, counter (index, offset), key seed: the same stream as fusebuild's kernels
__device__ __forceinline__ void bk_philox(unsigned w[4], unsigned long long index,
                                          unsigned long long seed, unsigned long long offset) {
  unsigned c0 = (unsigned)index, c1 = (unsigned)(index >> 32);
  unsigned c2 = (unsigned)offset, c3 = (unsigned)(offset >> 32);
  unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}
"""
C_TYPES = {"float32": "float", "float64": "double", "uint16": "unsigned short", "bool": "bool",
           "int8": "signed char", "uint8": "unsigned char", "int16": "short", "int32": "int",
           "int64": "long long", "uint64": "unsigned long long"}


class ElementwiseRenderer(CudaRenderer):
    """C for an ElementwiseKernel body: input views `in{pos}_{chunk}`, scalars `a{k}`, outputs
    `out{o}_{part}`; float16/bfloat16 travel as uint16 bits."""
    ops = EK_OPS

    def load(self, node: ir.Node) -> str:
        pos, c = node.attr
        name = f"in{pos}_{c}"
        return f"bk_{node.dtype.short}_to_f32({name})" if node.dtype.name in HALF else name

    def store(self, value: str, d: dt.DType) -> str:
        return f"bk_f32_to_{d.short}({value})" if d.name in HALF else value

    def const(self, value, d: dt.DType) -> str:
        if d.is_float and not math.isfinite(value):
            bits = 0x7FC00000 if math.isnan(value) else 0xFF800000 if value < 0 else 0x7F800000
            return f"__int_as_float({bits:#x})"
        return super().const(value, d)

    def cast(self, x: str, src: dt.DType, dst: dt.DType) -> str:
        if dst.name in HALF:
            return f"bk_round_{dst.short}((float){x})"
        if src.is_float and dst.is_int:
            return f"(({self.type_name(dst)}){x})"
        return super().cast(x, src, dst)


@dataclass(frozen=True)
class ElementwiseSource:
    """A cupy ElementwiseKernel of a graph: (numpy type, name) parameters and the loop body."""
    inputs: tuple[tuple[str, str], ...]     # one per input view (chunks of chunked inputs)
    scalars: tuple[tuple[str, str], ...]    # scalar inputs, then rng_seed and rng_offset
    outputs: tuple[tuple[str, str], ...]    # one per output part
    body: str

    @property
    def in_params(self) -> str:
        return ", ".join(f"{t} {n}" for t, n in self.inputs + self.scalars)

    @property
    def out_params(self) -> str:
        return ", ".join(f"{t} {n}" for t, n in self.outputs)


def _ek_type(d: dt.DType) -> str:
    return "uint16" if d.name in HALF else d.name


def elementwise_source(k: ir.Kernel, scalar_dtypes: tuple[dt.DType, ...]) -> ElementwiseSource:
    inputs = tuple((_ek_type(d), f"in{p}_{c}")
                   for p, (d, ch) in enumerate(zip(k.in_dtypes, k.chunks))
                   for c in range(ch[0] if ch else 1))
    scalars = tuple((d.name, f"a{j}") for j, d in enumerate(scalar_dtypes))
    pre = []
    if k.rand_words:
        scalars += (("uint64", "rng_seed"), ("uint64", "rng_offset"))
        pre = ["unsigned rw[4];", "bk_philox(rw, (unsigned long long)i, rng_seed, rng_offset);"]
    r = ElementwiseRenderer()
    outputs, stores = [], []
    for o, out in enumerate(k.outputs):
        for c, part in enumerate(out.parts):
            outputs.append((_ek_type(out.dtype), f"out{o}_{c}"))
            stores.append(f"out{o}_{c} = {r.store(f'v{part}', out.dtype)};")
    return ElementwiseSource(inputs, scalars, tuple(outputs),
                             "\n".join(pre + r.render_nodes(k) + stores))


def raw_kernel_source(src: ElementwiseSource, name: str) -> str:
    """A plain CUDA kernel running `src`'s body once per element of equal-shape contiguous arrays
    (the bare launch of the overhead section; the dry run compiles every body this way)."""
    params = ([f"const {C_TYPES[t]}* p_{n}" for t, n in src.inputs]
              + [f"{C_TYPES[t]} {n}" for t, n in src.scalars]
              + [f"{C_TYPES[t]}* p_{n}" for t, n in src.outputs] + ["long long n"])
    lines = [f'extern "C" __global__ void {name}({", ".join(params)}) {{',
             "  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
             "  if (i >= n) return;"]
    lines += [f"  const {C_TYPES[t]} {n} = p_{n}[i];" for t, n in src.inputs]
    lines += [f"  {C_TYPES[t]} {n};" for t, n in src.outputs]
    lines += ["  " + line for line in src.body.splitlines()]
    lines += [f"  p_{n}[i] = {n};" for _, n in src.outputs] + ["}"]
    return "\n".join(lines) + "\n"


def case_source(case: Case) -> ElementwiseSource:
    return elementwise_source(case.kernel, tuple(i.dtype for i in case.group.scalar_inputs))


# ---------------------------------------------------------------- comparison -------------------

def errors(F: ArrayOps, got, want, d: dt.DType) -> dict:
    """Max |got - want| over finite elements, that over max |want|, and elements whose
    non-finite values differ; `ok` against TOLERANCE."""
    xp = F.xp
    g, w = F.as_float64(got, d.name), F.as_float64(want, d.name)
    finite = xp.isfinite(g) & xp.isfinite(w)
    nonfinite = int(xp.count_nonzero(~finite & ~(xp.isnan(g) & xp.isnan(w)) & (g != w)))
    diff = xp.abs(xp.where(finite, g, 0.0) - xp.where(finite, w, 0.0))
    max_abs = float(diff.max()) if g.size else 0.0
    scale = float(xp.where(xp.isfinite(w), xp.abs(w), 0.0).max()) if w.size else 0.0
    rel = max_abs / scale if scale else max_abs
    return {"max_abs_err": max_abs, "max_rel_err": rel, "nonfinite_mismatches": nonfinite,
            "ok": nonfinite == 0 and rel <= TOLERANCE.get(d.name, 0.0)}


def compare_outputs(F: ArrayOps, k: ir.Kernel, got: tuple, want: tuple) -> dict[str, dict]:
    """Per output: `errors`, or only shape and dtype for outputs drawn from rand_like."""
    randoms = random_outputs(k)
    result = {}
    for o, g, w in zip(k.outputs, got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            result[o.name] = {"ok": False, "got": f"{g.dtype}{list(g.shape)}",
                              "want": f"{w.dtype}{list(w.shape)}"}
        elif o.name in randoms:
            result[o.name] = {"ok": True, "compared": "shape and dtype (random)"}
        else:
            result[o.name] = errors(F, g, w, o.dtype)
    return result


def _all_ok(outputs: dict[str, dict]) -> bool:
    return all(r["ok"] for r in outputs.values())


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:3000]


# ---------------------------------------------------------------- dry run (no GPU) -------------

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_cpu(torch, a: np.ndarray, d: dt.DType):
    if d == dt.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_numpy(torch, t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def dry_run_case(case: Case, F: ArrayOps, torch) -> list[dict]:
    """The evaluator-based peers on numpy and torch CPU (eager, and traced whole by dynamo)
    against `fusebuild.reference` for one small case."""
    from fusebuild import reference
    inputs = random_inputs(case, F)
    ref_inputs = [a.view(dt.bfloat16.numpy) if d == dt.bfloat16 else a
                  for a, d in zip(inputs, case.dtypes)]
    ref = reference.evaluate(ir.instantiate(case.group, case.dtype_map, expand=False), ref_inputs,
                             case.scalars, SEED, OFFSET)
    want = tuple(ref.outputs[o.name].view(np.uint16) if o.dtype == dt.bfloat16 else
                 ref.outputs[o.name] for o in case.kernel.outputs)
    k, shape = case.kernel, case.iteration
    checks: dict[str, Callable[[], tuple]] = {
        "numpy_unfused": lambda: evaluator(k, F, case.scalars, shape)(*inputs)}
    if torch is not None:
        T = TorchOps(torch, "cpu")
        tin = [_torch_cpu(torch, a, d) for a, d in zip(inputs, case.dtypes)]
        checks["torch_eager"] = lambda: tuple(
            _torch_numpy(torch, t) for t in evaluator(k, T, case.scalars, shape)(*tin))
        checks["torch_compile_fullgraph_trace"] = lambda: tuple(_torch_numpy(torch, t) for t in (
            torch.compile(evaluator(k, T, case.scalars, shape), backend="eager",
                          fullgraph=True)(*tin)))
    rows = []
    for name, check in checks.items():
        row = {"what": "dry_run", "check": name, **case.row()}
        try:
            row["outputs"] = compare_outputs(F, k, check(), want)
            row["ok"] = _all_ok(row["outputs"])
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            row.update(error=_error(e), ok=False)
        rows.append(row)
    return rows


def nvrtc_check(cases: list[Case]) -> dict:
    """Every ElementwiseKernel body, wrapped in a raw kernel, compiled in one NVRTC program."""
    row: dict = {"what": "dry_run", "check": "nvrtc_elementwise_bodies"}
    try:
        from fusebuild.toolchain import nvrtc
        archs = nvrtc.supported_archs()
    except Exception as e:  # noqa: BLE001 - no NVRTC here: nothing to compile with
        return {**row, "skipped": _error(e), "ok": True}
    target = "cuda:sm_90" if "sm_90" in archs else f"cuda:{archs[-1]}"
    bodies = {(c.name, c.dtypes): case_source(c) for c in cases}
    source = EK_PREAMBLE + "\n".join(raw_kernel_source(src, f"bench_{n}")
                                     for n, src in enumerate(bodies.values()))
    try:
        cubin = nvrtc.compile_cuda(source, target, "gpu_bench")
    except Exception as e:  # noqa: BLE001 - reported with NVRTC's log
        return {**row, "target": target, "error": _error(e), "ok": False}
    return {**row, "target": target, "kernels": len(bodies), "cubin_bytes": len(cubin), "ok": True}


def dry_run(groups: tuple[str, ...] | None, emit: Callable[[dict], None]) -> bool:
    """Plan the full-size cases, run the peers on small cases against the reference, compile the
    ElementwiseKernel bodies; True when every check passed."""
    plan = spec.load_plan([SPECS])
    for case in make_cases(plan, groups, FULL_ELEMENTS):
        emit({"what": "case_plan", **case.row(), "iteration": list(case.iteration),
              "bytes": case.nbytes()})
    small = make_cases(plan, groups, DRY_ELEMENTS)
    F, torch = ArrayOps(np, gen=np.random.default_rng(0)), _import_torch()
    ok = True
    for case in small:
        for row in dry_run_case(case, F, torch):
            emit(row)
            ok = ok and row["ok"]
    row = nvrtc_check(small)
    emit(row)
    return ok and row["ok"]


# ---------------------------------------------------------------- device side ------------------

class CupyRandom:
    """cupy's cuRAND host-API generator (no kernel to compile) under numpy Generator's names."""

    def __init__(self, cp):
        self.state = cp.random.RandomState(0)

    def random(self, shape: tuple, dtype):
        return self.state.random_sample(shape, dtype)

    def standard_normal(self, shape: tuple, dtype):
        return self.state.standard_normal(shape, dtype)


class Gpu:
    """cupy, torch when it sees CUDA, the bundle, the timers and the array conversions."""

    def __init__(self, cp, torch, bundle, reps: int):
        import cupyx.scipy.special
        self.cp, self.torch, self.bundle, self.reps = cp, torch, bundle, reps
        self.cupy_ops = ArrayOps(cp, cupyx.scipy.special, CupyRandom(cp))
        self.torch_ops = TorchOps(torch, "cuda") if torch else None

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()

    def free(self) -> None:
        self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch:
            self.torch.cuda.empty_cache()

    def gpu_time_us(self, fn: Callable, batch_s: float = 0.01) -> float:
        """Device time per call: median over batches of back-to-back calls between two events."""
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        once = cp.cuda.get_elapsed_time(start, end) / 1e3
        iters = max(1, min(50, int(batch_s / max(once, 1e-6))))
        times = []
        for _ in range(self.reps):
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / iters)
        return statistics.median(times)

    def host_time_us(self, fn: Callable, calls: int) -> float:
        """Wall time per call: median over loops of `calls` calls, synchronized around each."""
        times = []
        for _ in range(self.reps):
            self.sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            self.sync()
            times.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(times)

    def to_torch(self, a, d: dt.DType):
        """A cupy storage array as a torch tensor (bfloat16 and bool cross DLPack as ints)."""
        cp, torch = self.cp, self.torch
        if d == dt.bfloat16:
            return torch.from_dlpack(a.view(cp.int16)).view(torch.bfloat16)
        if d == dt.bool_:
            return torch.from_dlpack(a.view(cp.uint8)).view(torch.bool)
        return torch.from_dlpack(a)

    def to_cupy(self, x):
        """A result as a cupy array in storage form (bfloat16 as uint16 bits)."""
        cp, torch = self.cp, self.torch
        if isinstance(x, cp.ndarray):
            return x.view(cp.uint16) if x.dtype == dt.bfloat16.numpy else x
        if x.dtype == torch.bfloat16:
            return cp.from_dlpack(x.view(torch.int16)).view(cp.uint16)
        if x.dtype == torch.bool:
            return cp.from_dlpack(x.view(torch.uint8)).view(cp.bool_)
        return cp.from_dlpack(x)

    def outputs(self, result) -> tuple:
        return tuple(self.to_cupy(x) for x in (result if isinstance(result, tuple) else (result,)))

    def fusebuild_call(self, case: Case, inputs: list) -> Callable:
        """Cases with bfloat16 inputs go through torch tensors (cupy may lack the dtype)."""
        if dt.bfloat16 in case.dtypes and self.torch:
            tensors = [self.to_torch(a, d) for a, d in zip(inputs, case.dtypes)]
        else:
            tensors = [a.view(dt.bfloat16.numpy) if d == dt.bfloat16 else a
                       for a, d in zip(inputs, case.dtypes)]
        args = case.call_args(tensors)
        kw = {"seed": SEED, "offset": OFFSET} if case.group.has_random else {}
        fn = self.bundle[case.name]
        return lambda: fn(*args, **kw)

    def elementwise_kernel(self, case: Case):
        src = case_source(case)
        return self.cp.ElementwiseKernel(src.in_params, src.out_params, src.body,
                                         f"bench_{case.name}", preamble=EK_PREAMBLE)

    def elementwise_call(self, case: Case, inputs: list) -> Callable:
        cp, k = self.cp, case.kernel
        ek = self.elementwise_kernel(case)
        views = []
        for a, d, ch in zip(inputs, case.dtypes, k.chunks):
            a = a.view(cp.uint16) if d == dt.float16 else a
            views += cp.split(a, ch[0], axis=ch[1]) if ch else [a]
        extra = case.scalars + ([SEED, OFFSET] if k.rand_words else [])

        def call() -> tuple:
            outs = [cp.empty(out_shape(case.iteration, o.cat), _ek_type(o.dtype))
                    for o in k.outputs]
            parts = [p for o, a in zip(k.outputs, outs)
                     for p in (cp.split(a, o.cat[0], axis=o.cat[1]) if o.cat else [a])]
            ek(*views, *extra, *parts)
            return tuple(a.view(cp.float16) if o.dtype == dt.float16 else a
                         for o, a in zip(k.outputs, outs))
        return call

    def impls(self, case: Case, inputs: list) -> dict[str, Callable[[], Callable]]:
        """Builders of the zero-argument calls to time, fusebuild first."""
        k, shape = case.kernel, case.iteration
        builders = {"fusebuild": lambda: self.fusebuild_call(case, inputs)}
        if self.torch:
            tin = [self.to_torch(a, d) for a, d in zip(inputs, case.dtypes)]
            builders["torch_eager"] = lambda: functools.partial(
                evaluator(k, self.torch_ops, case.scalars, shape), *tin)
            builders["torch_compile"] = lambda: functools.partial(self.torch.compile(
                evaluator(k, self.torch_ops, case.scalars, shape), dynamic=False), *tin)
        builders["cupy_unfused"] = lambda: functools.partial(
            evaluator(k, self.cupy_ops, case.scalars, shape), *inputs)
        builders["cupy_elementwise"] = lambda: self.elementwise_call(case, inputs)
        return builders


def _import_torch_cuda():
    torch = _import_torch()
    return torch if torch is not None and torch.cuda.is_available() else None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def _optional(fn: Callable):
    """fn(), or its error as text: a detail of the environment line."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the rest of the line still counts
        return _error(e)


def _nvidia_smi() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,"
                           "clocks.max.mem", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


def environment(cp) -> dict:
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    row = {"what": "environment", "device": name.decode() if isinstance(name, bytes) else name,
           "compute_capability": cp.cuda.Device().compute_capability,
           "sms": props["multiProcessorCount"],
           "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1),
           "l2_MiB": props.get("l2CacheSize", 0) / 2**20,
           "driver": cp.cuda.runtime.driverGetVersion(),
           "runtime": cp.cuda.runtime.runtimeGetVersion(), "cupy": cp.__version__,
           "numpy": np.__version__, "python": sys.version.split()[0], "fusebuild": __version__}
    from fusebuild.toolchain import nvrtc
    row["nvrtc"] = _optional(lambda: nvrtc.versions()["nvrtc"])
    torch = _import_torch()
    row["torch"] = torch.__version__ if torch else None
    row["torch_cuda"] = torch.version.cuda if torch and torch.cuda.is_available() else None
    row["nvidia_smi"] = _optional(_nvidia_smi)
    return row


def build_bundle(cp, tmp: str) -> tuple[str, dict]:
    """Compile specs/ for this device's arch through the CLI; (bundle path, build line)."""
    target = f"cuda:sm_{cp.cuda.Device().compute_capability}"
    cmd = [sys.executable, "-m", "fusebuild", "compile", SPECS, "-o", os.path.join(tmp, "build"),
           "--target", target, "--cache-dir", os.path.join(tmp, "cache"), "--json", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout)
    return info["bundle"], {"what": "build", "target": target, "seconds": info["seconds"],
                            "kernels": info["kernels"]}


def copy_bandwidth(gpu: Gpu, nbytes: int) -> dict:
    """memcpy device-to-device (the reference) and a cupy copy kernel, bytes read + written."""
    cp = gpu.cp
    src = cp.ones(nbytes // 4, cp.float32)
    dst = cp.empty_like(src)
    memcpy_us = gpu.gpu_time_us(lambda: dst.data.copy_from_device_async(src.data, src.nbytes))
    kernel = cp.ElementwiseKernel("float32 x", "float32 y", "y = x", "bench_copy")
    kernel_us = gpu.gpu_time_us(lambda: kernel(src, dst))
    return {"what": "copy", "bytes": nbytes, "memcpy_us": memcpy_us,
            "GBps": 2 * nbytes / memcpy_us / 1e3, "copy_kernel_GBps": 2 * nbytes / kernel_us / 1e3}


def _measure(gpu: Gpu, case: Case, name: str, build: Callable, want: tuple | None,
             copy_gbps: float | None) -> tuple[dict, tuple, float]:
    """One implementation of one case: (line, its outputs, microseconds per call)."""
    row = {"what": "kernel", **case.row(), "impl": name}
    start = time.perf_counter()
    call = build()
    got = gpu.outputs(call())
    gpu.sync()
    row["first_call_s"] = round(time.perf_counter() - start, 4)
    if want is not None:
        row["outputs"] = compare_outputs(gpu.cupy_ops, case.kernel, got, want)
        row["ok"] = _all_ok(row["outputs"])
    us = gpu.gpu_time_us(call)
    gbps = case.nbytes() / us / 1e3
    row.update(us=round(us, 2), GBps=round(gbps, 1),
               frac_of_copy=round(gbps / copy_gbps, 4) if copy_gbps else None)
    return row, got, us


def kernel_summary(case: Case, times: dict[str, float], copy_gbps: float | None) -> dict:
    row = {"what": "kernel_summary", **case.row(), "bytes": case.nbytes(),
           "memory_bound": case.name not in COMPUTE_HEAVY}
    fb = times.get("fusebuild")
    if fb is None:
        return {**row, "error": "fusebuild was not measured"}
    frac = case.nbytes() / fb / 1e3 / copy_gbps if copy_gbps else None
    compile_ratio = times["torch_compile"] / fb if "torch_compile" in times else None
    return {**row, "fusebuild_us": round(fb, 2),
            "frac_of_copy": round(frac, 4) if frac is not None else None,
            "speedup_vs": {n: round(t / fb, 3) for n, t in times.items() if n != "fusebuild"},
            f"target_copy_{TARGET_COPY}": frac >= TARGET_COPY
            if frac is not None and row["memory_bound"] else None,
            f"target_torch_compile_{TARGET_COMPILE}": compile_ratio >= TARGET_COMPILE
            if compile_ratio is not None else None}


def run_case(gpu: Gpu, case: Case, copy_gbps: float | None, emit: Callable) -> dict:
    inputs = random_inputs(case, gpu.cupy_ops)
    want, times = None, {}
    for name, build in gpu.impls(case, inputs).items():
        try:
            row, got, us = _measure(gpu, case, name, build, want, copy_gbps)
            times[name] = us
            if name == "fusebuild":
                want = got
        except Exception as e:  # noqa: BLE001 - one peer failing leaves the others
            row = {"what": "kernel", **case.row(), "impl": name, "error": _error(e)}
        emit(row)
    return kernel_summary(case, times, copy_gbps)


def kernels_section(gpu: Gpu, cases: list[Case], copy_gbps: float | None, deadline: float,
                    emit: Callable) -> list[dict]:
    summaries = []
    for case in cases:
        if time.perf_counter() > deadline:
            emit({"what": "kernel", **case.row(), "skipped": "time budget (--time-budget)"})
            continue
        try:
            summaries.append(run_case(gpu, case, copy_gbps, emit))
            emit(summaries[-1])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next case still runs
            emit({"what": "kernel", **case.row(), "error": _error(e)})
        finally:
            gpu.free()
    return summaries


def flat_case(plan: spec.Plan, name: str, n: int) -> Case:
    """Group `name` on contiguous float32 inputs of n elements each."""
    gp = next(g for g in plan.groups if g.group.name == name)
    shapes = {i.name: (n,) for i in gp.group.tensor_inputs}
    return Case(gp, (dt.float32,) * len(shapes), shapes, False)


def overhead_impls(gpu: Gpu, case: Case, inputs: list) -> tuple[dict[str, Callable], object]:
    """The small calls, a bare RawKernel launch of the same body first; outputs preallocated where
    the API allows. Also returns the raw kernel's output array."""
    cp, k, n = gpu.cp, case.kernel, OVERHEAD_ELEMENTS
    raw = cp.RawKernel(EK_PREAMBLE + raw_kernel_source(case_source(case), "bench_raw"), "bench_raw")
    y = cp.empty(n, cp.float32)
    grid = (n + 127) // 128
    ek = gpu.elementwise_kernel(case)
    fb, args = gpu.bundle[case.name], case.call_args(inputs)
    impls = {"raw_kernel": lambda: raw((grid,), (128,), (*inputs, y, np.int64(n))),
             "fusebuild": lambda: fb(*args),
             "fusebuild_out": lambda: fb(*args, out=y),
             "cupy_elementwise": lambda: ek(*inputs, y),
             "cupy_unfused": functools.partial(evaluator(k, gpu.cupy_ops, [], case.iteration),
                                               *inputs)}
    if gpu.torch:
        tin = [gpu.to_torch(a, dt.float32) for a in inputs]
        run = evaluator(k, gpu.torch_ops, [], case.iteration)
        impls["torch_eager"] = functools.partial(run, *tin)
        impls["torch_compile"] = functools.partial(gpu.torch.compile(run, dynamic=False), *tin)
    return impls, y


def overhead_row(gpu: Gpu, case: Case, name: str, fn: Callable, calls: int,
                 raw_us: float | None) -> dict:
    row = {"what": "overhead", "group": case.name, "elements": OVERHEAD_ELEMENTS, "impl": name}
    try:
        for _ in range(3):      # the first call compiles (torch.compile, ElementwiseKernel)
            fn()
        us = gpu.host_time_us(fn, calls)
    except Exception as e:  # noqa: BLE001 - one failing impl leaves the others
        return {**row, "error": _error(e)}
    row["us"] = round(us, 3)
    if raw_us:
        row["ratio_to_raw_kernel"] = round(us / raw_us, 3)
        if name.startswith("fusebuild"):
            row[f"target_{TARGET_OVERHEAD}x_raw"] = us / raw_us <= TARGET_OVERHEAD
    return row


def overhead_section(gpu: Gpu, plan: spec.Plan, calls: int, emit: Callable) -> list[dict]:
    """Host time per call on 1,024 float32 elements against a bare RawKernel launch."""
    rows = []
    for name in OVERHEAD_GROUPS:
        case = flat_case(plan, name, OVERHEAD_ELEMENTS)
        try:
            impls, y = overhead_impls(gpu, case, random_inputs(case, gpu.cupy_ops))
            impls["raw_kernel"]()
            emit({"what": "overhead_check", "group": name,
                  "raw_kernel_vs_fusebuild": compare_outputs(
                      gpu.cupy_ops, case.kernel, (y.copy(),), gpu.outputs(impls["fusebuild"]()))})
        except Exception as e:  # noqa: BLE001 - the other group still runs
            emit({"what": "overhead", "group": name, "error": _error(e)})
            continue
        raw_us = None
        for impl, fn in impls.items():
            rows.append(overhead_row(gpu, case, impl, fn, calls, raw_us))
            raw_us = rows[-1].get("us") if impl == "raw_kernel" else raw_us
            emit(rows[-1])
    return rows


def cold_programs(plan: spec.Plan, bundle_path: str, with_torch: bool
                  ) -> dict[str, tuple[str, tuple]]:
    """Per implementation: a `python -c` program computing silu_add on 1,024 float32 elements,
    and the cache variables pointed at empty directories."""
    src = case_source(flat_case(plan, "silu_add", OVERHEAD_ELEMENTS))
    x = "x = cupy.asarray(numpy.ones(1024, numpy.float32))"   # a copy, no cupy kernel
    ek = (f"k = cupy.ElementwiseKernel({src.in_params!r}, {src.out_params!r}, {src.body!r}, "
          f"'bench_cold', preamble={EK_PREAMBLE!r})")
    programs = {
        "cupy_import": ("import cupy", ()),
        "cupy_context": (f"import numpy, cupy\n{x}\nx.get()", ()),
        "fusebuild": (f"import numpy, cupy\nfrom fusebuild import runtime\n"
                      f"b = runtime.load({bundle_path!r})\n{x}\nb.silu_add(x, x).get()", ()),
        "cupy_elementwise_cold_cache": (f"import numpy, cupy\n{ek}\n{x}\nk(x, x).get()",
                                        ("CUPY_CACHE_DIR",))}
    if with_torch:
        t = "x = torch.ones(1024, device='cuda')"
        programs["torch_eager"] = (f"import torch\n{t}\n(x * torch.sigmoid(x) + x).cpu()", ())
        programs["torch_compile_cold_cache"] = (
            f"import torch\nf = torch.compile(lambda x, b: x * torch.sigmoid(x) + b)\n{t}\n"
            "f(x, x).cpu()", ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"))
    return programs


def cold_start(code: str, cache_vars: tuple, runs: int) -> dict:
    """Wall time of fresh processes running `code` (median), each with empty caches."""
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="fusebuild-cold-") as tmp:
            env = {**_env(), **{v: os.path.join(tmp, v.lower()) for v in cache_vars}}
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=300)
            times.append(time.perf_counter() - start)
        if proc.returncode:
            return {"rc": proc.returncode, "error": proc.stderr[-2000:]}
    return {"s": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times]}


def cold_section(gpu: Gpu, plan: spec.Plan, bundle_path: str, quick: bool,
                 emit: Callable) -> None:
    """Fresh processes to first result: 3 runs each (torch.compile, ~20 s, once); --quick: one
    run each and no torch.compile."""
    context = None
    for impl, (code, cache_vars) in cold_programs(plan, bundle_path, gpu.torch is not None).items():
        compiles = impl.startswith("torch_compile")
        if quick and compiles:
            continue
        row = {"what": "cold_start", "impl": impl}
        try:
            row.update(cold_start(code, cache_vars, 1 if quick or compiles else 3))
        except Exception as e:  # noqa: BLE001 - e.g. a timeout: the next program still runs
            row["error"] = _error(e)
        if impl == "cupy_context":
            context = row.get("s")
        elif context and "s" in row and impl != "cupy_import":
            row["minus_cupy_context_s"] = round(row["s"] - context, 3)
        emit(row)


def _label(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("group", "dtype", "shape", "impl") if k in row)


def summary(kernels: list[dict], overhead: list[dict]) -> dict:
    """The issue's targets: how many cases meet each, and which miss."""
    def tally(rows: list[dict], key: str) -> dict:
        judged = [r for r in rows if r.get(key) is not None]
        return {"met": sum(bool(r[key]) for r in judged), "of": len(judged),
                "missed": [_label(r) for r in judged if not r[key]]}
    return {"what": "summary",
            f"memory_bound_ge_{TARGET_COPY}x_copy": tally(kernels, f"target_copy_{TARGET_COPY}"),
            f"ge_{TARGET_COMPILE}x_torch_compile": tally(
                kernels, f"target_torch_compile_{TARGET_COMPILE}"),
            f"overhead_le_{TARGET_OVERHEAD}x_raw_kernel": tally(
                overhead, f"target_{TARGET_OVERHEAD}x_raw")}


# ---------------------------------------------------------------- main -------------------------

class Emitter:
    """Prints each line as JSON and writes it to --out as well."""

    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None

    def __call__(self, row: dict) -> None:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def section(name: str, emit: Callable, fn: Callable):
    """fn(), or None after emitting a line with the error."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the other sections still run
        emit({"what": name, "error": _error(e), "traceback": traceback.format_exc()[-2000:]})
        return None


def _build(cp, tmp: str, emit: Callable) -> str:
    path, row = build_bundle(cp, tmp)
    emit(row)
    return path


def gpu_run(args: argparse.Namespace, emit: Callable) -> int:
    import cupy as cp
    from fusebuild import runtime
    started = time.perf_counter()
    section("environment", emit, lambda: emit(environment(cp)))
    plan = spec.load_plan([SPECS])
    torch = _import_torch_cuda()
    kernels, overhead = [], []
    with tempfile.TemporaryDirectory(prefix="fusebuild-gpu-bench-") as tmp:
        path = (os.path.abspath(args.bundle) if args.bundle
                else section("build", emit, lambda: _build(cp, tmp, emit)))
        gpu = path and section("load", emit, lambda: Gpu(cp, torch, runtime.load(path),
                                                          3 if args.quick else 7))
        if not gpu:
            return 1
        copy = section("copy", emit, lambda: copy_bandwidth(
            gpu, (512 if args.quick else 1024) << 20)) if "copy" in args.sections else None
        if copy:
            emit(copy)
        if "kernels" in args.sections:
            elements = args.elements or (QUICK_ELEMENTS if args.quick else FULL_ELEMENTS)
            groups = args.groups or (QUICK_GROUPS if args.quick else None)
            deadline = started + args.time_budget - RESERVE_S
            kernels = section("kernels", emit, lambda: kernels_section(
                gpu, make_cases(plan, groups, elements), copy and copy["GBps"], deadline,
                emit)) or []
        if "overhead" in args.sections:
            overhead = section("overhead", emit, lambda: overhead_section(
                gpu, plan, 300 if args.quick else 2000, emit)) or []
        if "cold" in args.sections:
            section("cold_start", emit, lambda: cold_section(gpu, plan, path, args.quick, emit))
    emit(summary(kernels, overhead))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help=f"about a minute: 2^24 elements, groups {','.join(QUICK_GROUPS)}, "
                         "fewer repeats, no torch.compile cold start")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: plan the cases, check the peers against the reference on small "
                         "sizes (numpy, torch CPU) and compile the ElementwiseKernel bodies")
    ap.add_argument("--bundle", help="a prebuilt bundle with kernels for this device's arch")
    ap.add_argument("--groups", type=lambda s: tuple(s.split(",")),
                    help="comma-separated example groups (default: all; --quick: a subset)")
    ap.add_argument("--sections", type=lambda s: tuple(s.split(",")), default=SECTIONS,
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--elements", type=int, help="iteration elements per case (a power of two)")
    ap.add_argument("--time-budget", type=float,
                    help="seconds; kernel cases starting later than this minus "
                         f"{RESERVE_S} s are skipped (default 480, --quick 240)")
    args = ap.parse_args(argv)
    if args.elements and (args.elements < 4 or args.elements & (args.elements - 1)):
        ap.error("--elements must be a power of two >= 4")
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.time_budget = args.time_budget or (240 if args.quick else 480)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit = Emitter(args.out)
    try:
        if args.dry_run:
            return 0 if dry_run(args.groups, emit) else 1
        return gpu_run(args, emit)
    finally:
        emit.close()


if __name__ == "__main__":
    sys.exit(main())
