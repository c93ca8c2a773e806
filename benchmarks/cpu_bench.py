"""CPU kernel benchmark (issue 6), JSON lines: every example group at 2^24 elements (and a
[4096, 4096] broadcast case where the group has a broadcast pattern), float32 and bfloat16,
1 and 2 threads, against numpy unfused, numexpr, numba @njit(parallel=True, fastmath=True) of
the same expression and, for silu_add, bias_gelu_tanh, lstm_cell and bias_gelu (glibc erff), a C
reference compiled here with the system compiler (-O3 -ffast-math -march=x86-64-v3 -fopenmp;
benchmark only).

    python benchmarks/cpu_bench.py [--out results.jsonl] [--quick] [--elements N] [--groups a,b]

Each row: time (best of the repeats), bytes moved (inputs at their own size, outputs) per second,
that bandwidth as a fraction of the memory-copy bandwidth measured in this run with the same
thread count, and the speedup of fusebuild over the row's implementation. bfloat16 peers compute
in float32 with casts (numpy astype in and out, timed). numpy is single-threaded: its rows are
measured once and serve as the baseline for both thread counts. fusebuild is called through the
public runtime with preallocated outputs; FUSEBUILD_NUM_THREADS is set before each runtime.load.

Targets (issue 6, 2 threads): >= 6x numpy on silu_add and bias_gelu_tanh (f32); >= 1.2x numexpr
and numba on every group; within 1.3x of the C reference; bfloat16 groups >= 4x numpy;
memory-bound groups >= 0.7x copy bandwidth.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32
K = F32(math.sqrt(2 / math.pi))
MEMORY_BOUND = {"hardswish_residual", "adam", "adamw", "quantize_int8", "dequantize_int8",
                "leaky_clip_u8", "rotary_embedding", "scale_shift", "masked_scores"}


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: a slow run of a tiny case never rounds to 0."""
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------ peers ----------------------
# numpy-style functions of float32 arrays (bfloat16 inputs are cast first); the same function is
# the numpy peer and, through njit(parallel=True, fastmath=True), the numba peer (so no helper
# functions inside: sigmoid is written out). numexpr peers evaluate the same formulas.

def np_bias_gelu_tanh(x, bias):
    z = x + bias
    return F32(0.5) * z * (F32(1) + np.tanh(K * (z + F32(0.044715) * z * z * z)))


def np_silu_add(x, b):
    return x / (F32(1) + np.exp(-x)) + b


def np_swiglu(h):
    f = h.shape[-1] // 2
    a, b = h[..., :f], h[..., f:]
    return a / (F32(1) + np.exp(-a)) * b


def np_softplus_act(x):
    return np.where(F32(2) * x > F32(10), x, np.log1p(np.exp(F32(2) * x)) / F32(2))


def np_mish(x):
    return x * np.tanh(np.where(x > F32(20), x, np.log1p(np.exp(x))))


def np_hardswish_residual(x, residual):
    return residual + x * np.minimum(np.maximum(x + F32(3), F32(0)), F32(6)) / F32(6)


def np_adam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, bias_c1, bias_c2):
    m = beta1 * exp_avg + (F32(1) - beta1) * grad
    v = beta2 * exp_avg_sq + (F32(1) - beta2) * grad * grad
    return param - lr * (m / bias_c1) / (np.sqrt(v / bias_c2) + eps), m, v


def np_adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias_c1,
             bias_c2):
    m = exp_avg + (F32(1) - beta1) * (grad - exp_avg)
    v = beta2 * exp_avg_sq + (F32(1) - beta2) * grad * grad
    p = param * (F32(1) - lr * weight_decay) - (lr / bias_c1) * m / (
        np.sqrt(v) / np.sqrt(bias_c2) + eps)
    return p, m, v


def np_quantize_int8(x, scale):
    return np.minimum(np.maximum(np.rint(x / scale), F32(-128)), F32(127)).astype(np.int8)


def np_dequantize_int8(q, scale):
    return q * scale


def np_leaky_clip_u8(img, offset):
    shifted = (img >> 1).astype(np.int32) + offset
    return np.minimum(np.maximum(shifted, 0), 255).astype(np.uint8), shifted > 100


def np_lstm_cell(gates, cx):
    h = cx.shape[1]
    i, f, g, o = gates[:, :h], gates[:, h:2 * h], gates[:, 2 * h:3 * h], gates[:, 3 * h:]
    cy = cx / (F32(1) + np.exp(-f)) + np.tanh(g) / (F32(1) + np.exp(-i))
    return np.tanh(cy) / (F32(1) + np.exp(-o)), cy


def np_gru_cell(gi, gh, hx):
    h = hx.shape[1]
    r = F32(1) / (F32(1) + np.exp(-(gi[:, :h] + gh[:, :h])))
    z = F32(1) / (F32(1) + np.exp(-(gi[:, h:2 * h] + gh[:, h:2 * h])))
    n = np.tanh(gi[:, 2 * h:] + r * gh[:, 2 * h:])
    return (F32(1) - z) * n + z * hx


def np_bias_dropout_residual(x, bias, residual, p):
    keep = np.random.random(x.shape).astype(F32) >= p
    return residual + np.where(keep, (x + bias) / (F32(1) - p), F32(0))


def np_rotary_embedding(x, cos, sin):
    r = x.shape[-1] // 2
    x1, x2 = x[..., :r], x[..., r:]
    return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def np_scale_shift(x, scale, shift):
    return x * (F32(1) + scale) + shift


def np_masked_scores(scores, mask, scale):
    return np.where(mask, F32(-np.inf), scores * scale), (~mask).astype(np.uint8)


def rows_of(shape: tuple) -> int:
    """Row length used to lay a flat case out as a matrix (so rows can be split over threads)."""
    n = math.prod(shape)
    return shape[-1] if len(shape) > 1 else 1 << (int(math.log2(n)) // 2)


_NB_GELU = None


def nb_bias_gelu(x, bias):
    """numba peer of bias_gelu (numpy and numexpr have no erf): a prange loop over rows."""
    global _NB_GELU
    if _NB_GELU is None:
        import numba

        @numba.njit(parallel=True, fastmath=True)
        def gelu_rows(x, b, y):
            for r in numba.prange(x.shape[0]):
                for c in range(x.shape[1]):
                    z = x[r, c] + b[r, c]
                    y[r, c] = F32(0.5) * z * (F32(1) + math.erf(z * F32(0.70710678)))
        _NB_GELU = gelu_rows
    shape = np.broadcast_shapes(x.shape, bias.shape)
    cols = rows_of(shape)
    y = np.empty(shape, F32)
    _NB_GELU(np.broadcast_to(x, shape).reshape(-1, cols),
             np.broadcast_to(bias, shape).reshape(-1, cols), y.reshape(-1, cols))
    return y


def ne(expr: str, **names):
    import numexpr
    return numexpr.evaluate(expr, local_dict=names)


def sig_ne(x: str) -> str:
    return f"(1 / (1 + exp(-{x})))"


def ne_adam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, bias_c1, bias_c2):
    m = ne("b1 * m + (1 - b1) * g", b1=beta1, m=exp_avg, g=grad)
    v = ne("b2 * v + (1 - b2) * g * g", b2=beta2, v=exp_avg_sq, g=grad)
    p = ne("param - lr * (m / c1) / (sqrt(v / c2) + eps)", param=param, m=m, v=v, lr=lr,
           c1=bias_c1, c2=bias_c2, eps=eps)
    return p, m, v


def ne_adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias_c1,
             bias_c2):
    m = ne("m + (1 - b1) * (g - m)", b1=beta1, m=exp_avg, g=grad)
    v = ne("b2 * v + (1 - b2) * g * g", b2=beta2, v=exp_avg_sq, g=grad)
    p = ne("param * (1 - lr * wd) - (lr / c1) * m / (sqrt(v) / sqrt(c2) + eps)", param=param,
           m=m, v=v, lr=lr, wd=weight_decay, c1=bias_c1, c2=bias_c2, eps=eps)
    return p, m, v


def ne_leaky_clip_u8(img, offset):
    shifted = ne("(img >> 1) + offset", img=img, offset=offset)
    return ne("minimum(maximum(s, 0), 255)", s=shifted).astype(np.uint8), ne("s > 100", s=shifted)


def ne_lstm_cell(gates, cx):
    h = cx.shape[1]
    i, f, g, o = gates[:, :h], gates[:, h:2 * h], gates[:, 2 * h:3 * h], gates[:, 3 * h:]
    cy = ne(f"{sig_ne('f')} * cx + {sig_ne('i')} * tanh(g)", i=i, f=f, g=g, cx=cx)
    return ne(f"{sig_ne('o')} * tanh(cy)", o=o, cy=cy), cy


def ne_gru_cell(gi, gh, hx):
    h = hx.shape[1]
    r = ne(sig_ne("(a + b)"), a=gi[:, :h], b=gh[:, :h])
    z = ne(sig_ne("(a + b)"), a=gi[:, h:2 * h], b=gh[:, h:2 * h])
    return ne("(1 - z) * tanh(i_n + r * h_n) + z * hx", i_n=gi[:, 2 * h:], h_n=gh[:, 2 * h:],
              r=r, z=z, hx=hx)


def ne_rotary_embedding(x, cos, sin):
    r = x.shape[-1] // 2
    x1, x2 = x[..., :r], x[..., r:]
    return np.concatenate((ne("x1 * c - x2 * s", x1=x1, x2=x2, c=cos, s=sin),
                           ne("x2 * c + x1 * s", x1=x1, x2=x2, c=cos, s=sin)), axis=-1)


NUMEXPR: dict[str, Callable] = {
    "bias_gelu_tanh": lambda x, bias: ne(
        "0.5 * (x + bias) * (1 + tanh(k * ((x + bias) + 0.044715 * (x + bias) ** 3)))",
        x=x, bias=bias, k=K),
    "silu_add": lambda x, b: ne(f"x * {sig_ne('x')} + b", x=x, b=b),
    "swiglu": lambda h: ne(f"a * {sig_ne('a')} * b", a=h[..., :h.shape[-1] // 2],
                           b=h[..., h.shape[-1] // 2:]),
    "softplus_act": lambda x: ne("where(2 * x > 10, x, log1p(exp(2 * x)) / 2)", x=x),
    "mish": lambda x: ne("x * tanh(where(x > 20, x, log1p(exp(x))))", x=x),
    "hardswish_residual": lambda x, residual: ne(
        "residual + x * minimum(maximum(x + 3, 0), 6) / 6", x=x, residual=residual),
    "adam": ne_adam,
    "adamw": ne_adamw,
    "quantize_int8": lambda x, scale: ne(
        "minimum(maximum(round(x / scale), -128), 127)", x=x, scale=scale).astype(np.int8),
    "dequantize_int8": lambda q, scale: ne("q * scale", q=q, scale=scale),
    "leaky_clip_u8": ne_leaky_clip_u8,
    "lstm_cell": ne_lstm_cell,
    "gru_cell": ne_gru_cell,
    "bias_dropout_residual": lambda x, bias, residual, p: ne(
        "residual + where(u >= p, (x + bias) / (1 - p), 0)",
        u=np.random.random(x.shape).astype(F32), x=x, bias=bias, residual=residual, p=p),
    "rotary_embedding": ne_rotary_embedding,
    "scale_shift": lambda x, scale, shift: ne("x * (1 + scale) + shift", x=x, scale=scale,
                                              shift=shift),
    "masked_scores": lambda scores, mask, scale: (
        ne("where(mask, ninf, scores * scale)", mask=mask, ninf=F32(-np.inf), scores=scores,
           scale=scale), ne("~mask", mask=mask).astype(np.uint8)),
}
NUMPY: dict[str, Callable | None] = {
    "bias_gelu": None, "bias_gelu_tanh": np_bias_gelu_tanh, "silu_add": np_silu_add,
    "swiglu": np_swiglu, "softplus_act": np_softplus_act, "mish": np_mish,
    "hardswish_residual": np_hardswish_residual, "adam": np_adam, "adamw": np_adamw,
    "quantize_int8": np_quantize_int8, "dequantize_int8": np_dequantize_int8,
    "leaky_clip_u8": np_leaky_clip_u8, "lstm_cell": np_lstm_cell, "gru_cell": np_gru_cell,
    "bias_dropout_residual": np_bias_dropout_residual, "rotary_embedding": np_rotary_embedding,
    "scale_shift": np_scale_shift, "masked_scores": np_masked_scores,
}
UNAVAILABLE = {("numpy", "bias_gelu"): "numpy has no erf", ("numexpr", "bias_gelu"):
               "numexpr has no erf"}
RANDOM = {"bias_dropout_residual"}    # peers draw their own random numbers: outputs not compared


# ------------------------------------------------------------------ cases ----------------------

@dataclass
class Case:
    group: str
    dtype: str                             # f32 | bf16 | u8 (the group's float dtype)
    shape: str                             # label of the shapes
    tensors: dict[str, np.ndarray]         # storage dtypes, keyed by input name
    scalars: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.group} {self.dtype} {self.shape}"


def group_shapes(n: int, side: int) -> dict[str, list[tuple[str, dict[str, tuple]]]]:
    """Per group: (label, {input: shape}) with n = side**2 output elements, then the broadcast
    case."""
    r = c = side
    b, t = 16, n // (16 * side)
    return {
        "bias_gelu": [(f"[{n}]", {"x": (n,), "bias": (n,)}),
                      (f"[{side},{side}]+[{side}]", {"x": (side, side), "bias": (side,)})],
        "bias_gelu_tanh": [(f"[{n}]", {"x": (n,), "bias": (n,)}),
                           (f"[{side},{side}]+[{side}]", {"x": (side, side), "bias": (side,)})],
        "silu_add": [(f"[{n}]", {"x": (n,), "b": (n,)})],
        "swiglu": [(f"[{r},{2 * c}]", {"h": (r, 2 * c)})],
        "softplus_act": [(f"[{n}]", {"x": (n,)})],
        "mish": [(f"[{n}]", {"x": (n,)})],
        "hardswish_residual": [(f"[{n}]", {"x": (n,), "residual": (n,)})],
        "adam": [(f"[{n}]", dict.fromkeys(("param", "grad", "exp_avg", "exp_avg_sq"), (n,)))],
        "adamw": [(f"[{n}]", dict.fromkeys(("param", "grad", "exp_avg", "exp_avg_sq"), (n,)))],
        "quantize_int8": [(f"[{n}]", {"x": (n,), "scale": (n,)}),
                          (f"[{side},{side}]+[{side}]", {"x": (side, side), "scale": (side,)})],
        "dequantize_int8": [(f"[{side},{side}]+[{side}]", {"q": (side, side), "scale": (side,)})],
        "leaky_clip_u8": [(f"[{r},{c}]", {"img": (r, c)})],
        "lstm_cell": [(f"[{r},{4 * c}]", {"gates": (r, 4 * c), "cx": (r, c)})],
        "gru_cell": [(f"[{r},{3 * c}]", {"gi": (r, 3 * c), "gh": (r, 3 * c), "hx": (r, c)})],
        "bias_dropout_residual": [
            (f"[{n}]", dict.fromkeys(("x", "bias", "residual"), (n,))),
            (f"[{side},{side}]+[{side}]", {"x": (side, side), "bias": (side,),
                                           "residual": (side, side)})],
        "rotary_embedding": [(f"[{b},{t},{side}]+[{t},{side // 2}]",
                              {"x": (b, t, side), "cos": (t, side // 2), "sin": (t, side // 2)})],
        "scale_shift": [(f"[{b},{t},{side}]+[{b},1,{side}]",
                         {"x": (b, t, side), "scale": (b, 1, side), "shift": (b, 1, side)}),
                        (f"[{side},{side}]+[{side}]",
                         {"x": (side, side), "scale": (side,), "shift": (side,)})],
        "masked_scores": [(f"[{n}]", {"scores": (n,), "mask": (n,)}),
                          (f"[4,{b},{t // 4},{side}]+[4,1,{t // 4},{side}]",
                           {"scores": (4, b, t // 4, side), "mask": (4, 1, t // 4, side)})],
    }


SCALARS = {
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "bias_c1": 0.1,
             "bias_c2": 0.001},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
              "bias_c1": 0.1, "bias_c2": 0.001},
    "leaky_clip_u8": {"offset": 7}, "bias_dropout_residual": {"p": 0.1},
    "masked_scores": {"scale": 0.125},
}


def make_cases(manifest: dict, groups: list[str], n: int, side: int, rng) -> list[Case]:
    import ml_dtypes
    storage = {"f32": np.dtype(F32), "bf16": np.dtype(ml_dtypes.bfloat16)}
    keys = {k["key"] for k in manifest["kernels"]}
    cases = []
    for group in groups:
        g = manifest["groups"][group]
        fixed = {i["name"]: i["dtype"] for i in g["inputs"] if i["kind"] == "tensor" and i["dtype"]}
        for label, shapes in group_shapes(n, side)[group]:
            for dtype in ("f32", "bf16") if len(fixed) < len(shapes) else ("u8",):
                # the group's float tensors take `dtype` unless its spec fixes them (adam: grad)
                if not any(k.startswith(f"{group}(") and f"{dtype}:" in k for k in keys):
                    continue
                tensors = {}
                for name, shape in shapes.items():
                    if name in fixed:
                        t = np.dtype(fixed[name])
                    elif group in ("adam", "adamw") and name != "grad":
                        t = storage["f32"]
                    else:
                        t = storage[dtype]
                    tensors[name] = random_tensor(name, shape, t, rng)
                cases.append(Case(group, dtype, label, tensors, SCALARS.get(group, {})))
    return cases


def random_tensor(name: str, shape: tuple, t: np.dtype, rng) -> np.ndarray:
    if t == np.bool_:
        return rng.random(shape) < 0.3
    if t == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if t == np.int8:
        return rng.integers(-128, 128, shape, dtype=np.int8)
    x = rng.standard_normal(shape, dtype=F32) * F32(2)
    if name in ("exp_avg_sq", "scale") and t.itemsize >= 2:
        x = np.abs(x) + F32(0.01)
    return x.astype(t)


# ------------------------------------------------------------------ C reference ---------------

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                           : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float sig(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float gelu_tanh(float z) {
    return 0.5f * z * (1.0f + tanhf(0.7978845608f * (z + 0.044715f * z * z * z)));
}
static inline float gelu(float z) { return 0.5f * z * (1.0f + erff(0.70710678f * z)); }
void set_threads(int t) { omp_set_num_threads(t); }
void copy_bytes(int64_t n, const char *src, char *dst) {
    #pragma omp parallel
    {
        int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
        int64_t a = n * t / k / 64 * 64, b = t == k - 1 ? n : n * (t + 1) / k / 64 * 64;
        memcpy(dst + a, src + a, b - a);
    }
}
#define ROWS(T, LD, ST, NAME, BODY) \
void NAME(int64_t rows, int64_t cols, int64_t bstride, const T *x, const T *b, T *y) { \
    _Pragma("omp parallel for schedule(static)") \
    for (int64_t r = 0; r < rows; r++) { \
        _Pragma("omp simd") \
        for (int64_t c = 0; c < cols; c++) { \
            float v = LD(x[r * cols + c]), w = LD(b[r * bstride + c]); \
            y[r * cols + c] = ST(BODY); \
        } \
    } \
}
#define ID(v) (v)
ROWS(float, ID, ID, silu_add_f32, v * sig(v) + w)
ROWS(uint16_t, bf2f, f2bf, silu_add_bf16, v * sig(v) + w)
ROWS(float, ID, ID, bias_gelu_tanh_f32, gelu_tanh(v + w))
ROWS(uint16_t, bf2f, f2bf, bias_gelu_tanh_bf16, gelu_tanh(v + w))
ROWS(float, ID, ID, bias_gelu_f32, gelu(v + w))
ROWS(uint16_t, bf2f, f2bf, bias_gelu_bf16, gelu(v + w))
#define LSTM(T, LD, ST, NAME) \
void NAME(int64_t rows, int64_t h, const T *gates, const T *cx, T *hy, T *cy) { \
    _Pragma("omp parallel for schedule(static)") \
    for (int64_t r = 0; r < rows; r++) { \
        const T *g = gates + r * 4 * h; \
        _Pragma("omp simd") \
        for (int64_t c = 0; c < h; c++) { \
            float cn = sig(LD(g[h + c])) * LD(cx[r * h + c]) \
                       + sig(LD(g[c])) * tanhf(LD(g[2 * h + c])); \
            cy[r * h + c] = ST(cn); \
            hy[r * h + c] = ST(sig(LD(g[3 * h + c])) * tanhf(cn)); \
        } \
    } \
}
LSTM(float, ID, ID, lstm_cell_f32)
LSTM(uint16_t, bf2f, f2bf, lstm_cell_bf16)
"""
C_GROUPS = ("silu_add", "bias_gelu_tanh", "lstm_cell", "bias_gelu")   # glibc erff for bias_gelu
C_FLAGS = ["-O3", "-ffast-math", "-march=x86-64-v3", "-fopenmp", "-shared", "-fPIC"]


def build_c(tmp: str) -> tuple[ctypes.CDLL | None, str]:
    """The C reference library, or None and why not."""
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc):
        return None, f"no C compiler ({cc})"
    src, lib = os.path.join(tmp, "cref.c"), os.path.join(tmp, "cref.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    proc = subprocess.run([cc, *C_FLAGS, "-o", lib, src, "-lm"], capture_output=True, text=True)
    if proc.returncode:
        return None, f"{cc} {' '.join(C_FLAGS)} failed: {proc.stderr.strip()[:300]}"
    return ctypes.CDLL(lib), " ".join([cc, *C_FLAGS])


def c_call(lib, case: Case, outs: tuple[np.ndarray, ...]) -> Callable | None:
    """A C reference call writing into `outs`, if the case has one."""
    if lib is None or case.group not in C_GROUPS \
            or case.dtype not in ("f32", "bf16"):
        return None
    fn = getattr(lib, f"{case.group}_{case.dtype}")
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    ts = list(case.tensors.values())
    if case.group == "lstm_cell":
        gates, cx = ts
        args = (ctypes.c_int64(cx.shape[0]), ctypes.c_int64(cx.shape[1]), ptr(gates), ptr(cx),
                ptr(outs[0]), ptr(outs[1]))
    else:
        x, b = ts
        cols = rows_of(x.shape)
        args = (ctypes.c_int64(x.size // cols), ctypes.c_int64(cols),
                ctypes.c_int64(0 if b.ndim < x.ndim else cols), ptr(x), ptr(b), ptr(outs[0]))
    return lambda: fn(*args)


# ------------------------------------------------------------------ timing ---------------------

def best_ms(fn: Callable, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def copy_gbps(lib, nbytes: int, repeats: int) -> float:
    """Memory-copy bandwidth (bytes read + written per second) with the current thread count."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    if lib is None:
        ms = best_ms(lambda: np.copyto(dst, src), repeats)
    else:
        args = (ctypes.c_int64(nbytes), ctypes.c_void_p(src.ctypes.data),
                ctypes.c_void_p(dst.ctypes.data))
        ms = best_ms(lambda: lib.copy_bytes(*args), repeats)
    return 2 * nbytes / ms / 1e6


def as_f32(a: np.ndarray) -> np.ndarray:
    return a.astype(F32) if a.dtype.name == "bfloat16" else a


def numba_views(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Inputs broadcast (as views) to the first input's shape, keeping their own last dimension:
    numba's parallel array expressions only combine arrays of equal shapes."""
    lead = arrays[0].shape[:-1]
    return [np.broadcast_to(a, lead + a.shape[-1:]) for a in arrays]


def peer(fn: Callable, case: Case, views: bool = False) -> Callable:
    """fn on float32 views of the case's inputs; float outputs cast back to bfloat16 for bf16."""
    bf16 = [t.dtype for t in case.tensors.values() if t.dtype.name == "bfloat16"]
    scalars = {k: (F32(v) if isinstance(v, float) else np.int32(v)) for k, v in
               case.scalars.items()}

    def call():
        tensors = [as_f32(t) for t in case.tensors.values()]
        out = fn(*(numba_views(tensors) if views else tensors), *scalars.values())
        out = out if isinstance(out, tuple) else (out,)
        if bf16 and case.group not in ("adam", "adamw"):
            out = tuple(o.astype(bf16[0]) if o.dtype == F32 else o for o in out)
        return out
    return call


def rel_diff(got: tuple, want: tuple) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        finite = np.isfinite(w64)
        scale = max(float(np.abs(w64[finite]).max(initial=0.0)), 1e-30)
        if not np.array_equal(np.isfinite(g64), finite):
            return math.inf
        worst = max(worst, float(np.abs(g64[finite] - w64[finite]).max(initial=0.0)) / scale)
    return worst


def nbytes(case: Case, outs: tuple) -> int:
    return sum(t.nbytes for t in case.tensors.values()) + sum(o.nbytes for o in outs)


# ------------------------------------------------------------------ main -----------------------

def build_examples(tmp: str, groups: list[str] | None) -> str:
    from fusebuild import build, spec
    from fusebuild.runtime.cpu import host_isas
    isa = host_isas()[-1]
    plan = spec.load_plan([os.path.join(ROOT, "specs")], targets=[f"cpu:{isa}"])
    # every elementwise forward group by default (row reductions have their own
    # reduction_bench.py, backward groups torch_bench.py)
    plan = replace(plan, groups=tuple(gp for gp in plan.groups if (
        gp.group.name in groups if groups else not (gp.group.reduces or
                                                    gp.group.name.endswith("__grad")))))
    # no cache: measure what the code generator of this checkout emits
    return build.build(plan, os.path.join(tmp, "bundle"), progress=False, cache_dir=None).path


def cpu_model() -> str:
    """The CPU's model name from lscpu (else platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine() -> dict:
    model = cpu_model()
    import numba
    import numexpr
    from fusebuild.runtime.cpu import host_isas
    return {"what": "machine", "cpu": model, "cores": os.cpu_count(), "isa": host_isas()[-1],
            "loadavg": os.getloadavg(), "numpy": np.__version__, "numexpr": numexpr.__version__,
            "numba": numba.__version__, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2^18 elements, [512, 512] broadcast, 2 repeats")
    ap.add_argument("--elements", type=int, help="elements per case (a power of 4; default 2^24)")
    ap.add_argument("--groups", help="comma-separated example groups (default: all)")
    args = ap.parse_args()
    n = args.elements or (1 << 18 if args.quick else 1 << 24)
    side = 1 << (int(math.log2(n)) // 2)
    repeats = 2 if args.quick else 5
    out = open(args.out, "w") if args.out else None
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    import numba
    import numexpr
    from fusebuild import runtime
    emit(machine())
    with tempfile.TemporaryDirectory(prefix="fusebuild-cpu-bench-") as tmp:
        groups = args.groups.split(",") if args.groups else None
        start = time.perf_counter()
        path = build_examples(tmp, groups)
        emit({"what": "build", "seconds": round(time.perf_counter() - start, 2)})
        lib, c_note = build_c(tmp)
        emit({"what": "c_reference", "available": lib is not None, "note": c_note})
        bundle = runtime.load(path)
        cases = make_cases(bundle.manifest, groups or list(bundle.groups), n, side,
                           np.random.default_rng(0))
        numba_fns = {g: numba.njit(parallel=True, fastmath=True)(fn) for g, fn in NUMPY.items()
                     if fn is not None}
        numpy_ms: dict[str, float] = {}
        for threads in (1, 2):
            os.environ["FUSEBUILD_NUM_THREADS"] = str(threads)
            bundle = runtime.load(path)
            numexpr.set_num_threads(threads)
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            if lib is not None:
                lib.set_threads(threads)
            copy = copy_gbps(lib, 1 << 28 if not args.quick else 1 << 24, repeats)
            emit({"what": "copy_bw", "threads": threads, "GBps": sig(copy)})
            for case in cases:
                run_case(case, bundle, threads, copy, lib, numba_fns, numpy_ms, repeats, emit)
    for row in target_rows(rows):
        emit(row)
    emit({"what": "loadavg_at_end", "loadavg": os.getloadavg()})
    if out:
        out.close()


def target_rows(rows: list[dict]) -> list[dict]:
    """The issue's targets at 2 threads, each with its worst case and the cases that miss it."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("threads") == 2 and "impl" in r and r.get("ms"):
            by_case.setdefault((r["group"], r["dtype"], r["shape"]), {})[r["impl"]] = r
    checks = {   # name: (bound, value per case or None where the target does not apply)
        "6x numpy (silu_add, bias_gelu_tanh; f32)": (6.0, lambda c, i: i["numpy"][
            "fusebuild_speedup"] if c[0] in ("silu_add", "bias_gelu_tanh") and c[1] == "f32"
            and "numpy" in i else None),
        "1.2x numexpr": (1.2, lambda c, i: i["numexpr"]["fusebuild_speedup"]
                         if "numexpr" in i else None),
        "1.2x numba parallel": (1.2, lambda c, i: i["numba"]["fusebuild_speedup"]
                                if "numba" in i else None),
        "within 1.3x of C (C time / fusebuild time >= 1/1.3)": (
            1 / 1.3, lambda c, i: i["c_fastmath"]["fusebuild_speedup"] if "c_fastmath" in i
            else None),
        "bf16 4x numpy (f32 compute with casts)": (4.0, lambda c, i: i["numpy"][
            "fusebuild_speedup"] if c[1] == "bf16" and "numpy" in i else None),
        "memory-bound 0.7x copy bandwidth": (0.7, lambda c, i: i["fusebuild"]["frac_of_copy"]
                                             if i["fusebuild"]["memory_bound"] else None),
    }
    out = []
    for name, (bound, value) in checks.items():
        values = {c: v for c, i in by_case.items() if (v := value(c, i)) is not None}
        if not values:
            continue
        worst = min(values, key=values.get)
        out.append({"what": "target", "target": name, "bound": round(bound, 3),
                    "met": all(v >= bound for v in values.values()), "cases": len(values),
                    "worst": " ".join(worst), "worst_value": values[worst],
                    "missed": [" ".join(c) + f": {v}" for c, v in values.items() if v < bound]})
    return out


def run_case(case: Case, bundle, threads: int, copy: float, lib, numba_fns, numpy_ms,
             repeats: int, emit) -> None:
    caller = bundle[case.group]
    g = bundle.manifest["groups"][case.group]
    args = [case.tensors[i["name"]] if i["kind"] == "tensor" else case.scalars[i["name"]]
            for i in g["inputs"]]
    seed = {"seed": 1} if g["has_random"] else {}
    outs = caller(*args, **seed)
    outs = outs if isinstance(outs, tuple) else (outs,)
    fused = lambda: caller(*args, out=outs if len(outs) > 1 else outs[0], **seed)  # noqa: E731
    moved = nbytes(case, outs)
    fb_ms = best_ms(fused, repeats)
    impls: list[tuple[str, Callable | None, str | None]] = []
    numpy_fn = NUMPY[case.group]
    impls.append(("numpy", peer(numpy_fn, case) if numpy_fn else None,
                  UNAVAILABLE.get(("numpy", case.group))))
    impls.append(("numexpr", peer(NUMEXPR[case.group], case) if case.group in NUMEXPR else None,
                  UNAVAILABLE.get(("numexpr", case.group))))
    nb = numba_fns.get(case.group)
    impls.append(("numba", peer(nb, case, views=True) if nb else peer(nb_bias_gelu, case), None))
    c_outs = tuple(np.empty_like(o) for o in outs)
    c_fn = c_call(lib, case, c_outs)
    base = {"group": case.group, "dtype": case.dtype, "shape": case.shape, "threads": threads,
            "bytes": moved, "memory_bound": case.group in MEMORY_BOUND}
    emit({**base, "impl": "fusebuild", "ms": sig(fb_ms), "GBps": sig(moved / fb_ms / 1e6),
          "frac_of_copy": sig(moved / fb_ms / 1e6 / copy)})
    for name, fn, why in impls:
        if fn is None:
            emit({**base, "impl": name, "ms": None, "note": why})
            continue
        if name == "numpy" and threads > 1:
            ms = numpy_ms[case.label]       # numpy is single-threaded
        else:
            ms = best_ms(fn, repeats)
        if name == "numpy":
            numpy_ms[case.label] = ms
        row = {**base, "impl": name, "ms": sig(ms), "GBps": sig(moved / ms / 1e6),
               "frac_of_copy": sig(moved / ms / 1e6 / copy),
               "fusebuild_speedup": sig(ms / fb_ms)}
        if case.group not in RANDOM:
            row["max_rel_diff"] = float(f"{rel_diff(fn(), outs):.3g}")
        emit(row)
    if c_fn is not None:
        ms = best_ms(c_fn, repeats)
        emit({**base, "impl": "c_fastmath", "ms": sig(ms),
              "GBps": sig(moved / ms / 1e6), "frac_of_copy": sig(moved / ms / 1e6 / copy),
              "fusebuild_speedup": sig(ms / fb_ms),
              "max_rel_diff": float(f"{rel_diff(c_outs, outs):.3g}")})


if __name__ == "__main__":
    sys.exit(main())
