"""CUDA row-reduction kernels (DESIGN §8) without a GPU: cubins for sm_80 and sm_90 from NVRTC,
and every kernel of a representative set of groups run through the host emulation (each thread
a fiber: __syncthreads, warp shuffles, shared memory) in both modes (a warp per row, a block per
row), on the vector and the scalar path, with 32- and 64-bit indexing, over rows of N = 0, 1, odd
and longer than 128 * V, rows holding NaN and infinities, contiguous, broadcast, strided and
misaligned operands.

Every output is checked against `fusebuild.reference` and against an independent oracle (torch
or numpy in float64, numpy float32 where the semantics are float32 ones), both with the
tolerance model of DESIGN §8 (`reference.compare(n_row=N)`): k ulps of the result (4 for 32/64-
bit outputs, 1 for float16/bfloat16) plus 4 * max(1, log2 N) ulps of the reference's magnitude
of the row (sum |terms| for sums, the largest |x| of the row for the others).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusebuild import build, dtypes as dt, ir, reference, runtime, spec
from fusebuild.artifact import read_description
from fusebuild.codegen.cuda import held_inputs, held_itemsizes, render_module, vector_width
from fusebuild.elf import cubin_sm, functions
from fusebuild.runtime import cuda as runtime_cuda
from fusebuild.schedule import schedule
from fusebuild.runtime.cuda import HELD, ROW_BLOCK, VECTOR, WARP_ROW_MAX, WIDE
from fusebuild.toolchain import nvrtc
from conftest import strided_view
from cuda_emulation.fake_cupy import FakeArray, fake_cupy
from cuda_emulation.harness import (EmulatedGroup, compile_source, have_compiler, kernel_sources,
                                    launchers)

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the host emulation")

SPEC = """
fusebuild: 1
groups:
  - name: r_softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = softmax(x)
    matrix: {dtype: [float32, float16, bfloat16], shapes: [{x: [B, N]}], strided: true}
  - name: r_masked_softmax
    inputs: {x: tensor, mask: tensor}
    outputs: [y]
    body: y = softmax(x + mask)
    matrix: {dtype: [float32, float16], shapes: [{x: [B, H, N], mask: [B, 1, N]}]}
  - name: r_log_softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = log_softmax(x)
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [B, N]}]}
  - name: r_logsumexp
    inputs: {x: tensor}
    outputs: [y]
    body: y = logsumexp(x)
    matrix: {dtype: [float32, float16], shapes: [{x: [B, N]}], strided: true}
  - name: r_layer_norm
    inputs: {x: tensor, w: tensor, b: tensor, eps: scalar(float32)}
    outputs: [y]
    body: y = layer_norm(x, eps=eps) * w + b
    matrix: {dtype: [float32, float16, bfloat16], shapes: [{x: [B, N], w: [N], b: [N]}],
             strided: true}
  - name: r_rms_norm
    inputs: {x: tensor, w: tensor}
    outputs: [y]
    body: y = rms_norm(x) * w
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [B, N], w: [N]}]}
  - name: r_add_rms_norm
    inputs: {x: tensor, residual: tensor, w: tensor, eps: scalar(float32)}
    outputs: [y, h]
    body: |
      h = x + residual
      y = h * rsqrt(mean(h * h, dim=-1) + eps) * w
    matrix: {dtype: [float32, float16, bfloat16], shapes: [{x: [B, N], residual: [B, N], w: [N]}]}
  - name: r_quant
    inputs: {x: tensor}
    outputs: {q: int8, scale: float32}
    body: |
      scale = amax(abs(x), dim=-1) / 127.0
      q = int8(round(x / scale))
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [T, N]}], strided: true}
  - name: r_var
    inputs: {x: tensor}
    outputs: [v, m]
    body: |
      v = var(x, correction=1)
      m = mean(x)
    matrix: {dtype: [float32, float64], shapes: [{x: [B, N]}]}
  - name: r_dropout_softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = softmax(x) * (rand_like(x) < 0.75) / 0.75
    matrix: {dtype: [float32], shapes: [{x: [B, N]}]}
  - name: r_int
    inputs: {x: tensor}
    outputs: [s, hi, lo]
    body: |
      s = sum(x)
      hi = amax(x)
      lo = amin(x)
    matrix: {dtype: [int8, int32], shapes: [{x: [B, N]}]}
"""

ROWS = 5
LENGTHS = (0, 1, 37, 1040)         # 1040 > 128 * 8 (bfloat16's V) and > WARP_ROW_MAX
EPS = 1e-5


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float64))


def _nan_if_empty(x: np.ndarray, v: torch.Tensor) -> np.ndarray:
    """fusebuild's empty-row rule where torch differs or raises: mean and var of an empty row
    are NaN (torch.var warns and gives NaN too), amax/amin NaN (torch raises)."""
    v = v.numpy()
    return np.full(v.shape, np.nan) if x.shape[-1] == 0 else v


def _quant(x):
    """float32 semantics: scale = amax|x| / 127 rounded to float32, q = int8(rint(x / scale))
    saturating, NaN -> 0."""
    x32 = x.astype(np.float32)
    with np.errstate(all="ignore"):
        big = np.max(np.abs(x32), axis=-1, keepdims=True, initial=-np.inf)
        big = np.where(np.isnan(np.abs(x32)).any(-1, keepdims=True), np.nan, big)
        scale = (np.float32(big) if x.shape[-1] else np.full(big.shape, np.nan, np.float32)) \
            / np.float32(127.0)
        r = np.rint(x32 / scale)
    q = np.where(np.isnan(r), 0, np.clip(np.nan_to_num(r, posinf=127, neginf=-128), -128, 127))
    return q.astype(np.int8), scale.astype(np.float32)


SEED, OFFSET = 0x9E3779B97F4A7C15, 3 << 33


def _dropout_softmax(x):
    """Philox4x32-10 uniform of element index i (DESIGN §1), the first word's top 24 bits."""
    words = reference.philox_words(np.arange(x.size, dtype=np.uint64), SEED, OFFSET)
    keep = ((words[0] >> 8) * 2.0 ** -24 < 0.75).reshape(x.shape)
    return (torch.softmax(_t(x), -1).numpy() * keep / np.float32(0.75),)


def _ints(x):
    if x.shape[-1] == 0:
        zero = np.zeros(x.shape[:-1] + (1,), x.dtype)
        return np.zeros(zero.shape, np.int64), zero, zero
    return (x.astype(np.int64).sum(-1, keepdims=True), x.max(-1, keepdims=True),
            x.min(-1, keepdims=True))


# The independent oracle of each group: float64 inputs (ints as given) -> its outputs.
ORACLES = {
    "r_softmax": lambda x: (torch.softmax(_t(x), -1).numpy(),),
    "r_masked_softmax": lambda x, mask: (torch.softmax(_t(x) + _t(mask), -1).numpy(),),
    "r_log_softmax": lambda x: (torch.log_softmax(_t(x), -1).numpy(),),
    "r_logsumexp": lambda x: (torch.logsumexp(_t(x), -1, keepdim=True).numpy(),),   # empty: -inf
    "r_layer_norm": lambda x, w, b, eps: (
        F.layer_norm(_t(x), (x.shape[-1],), _t(w), _t(b), float(np.float32(eps))).numpy(),),
    "r_rms_norm": lambda x, w: (F.rms_norm(_t(x), (x.shape[-1],), _t(w), 1e-6).numpy(),),
    "r_add_rms_norm": lambda x, residual, w, eps: (
        F.rms_norm(_t(x) + _t(residual), (x.shape[-1],), _t(w), float(np.float32(eps))).numpy(),
        (_t(x) + _t(residual)).numpy()),
    "r_quant": _quant,
    # numpy's two-pass var: torch's (Welford) is off by ~300 ulps at N = 8192, |x| ~ 1e4
    "r_var": lambda x: (_nan_if_empty(x, torch.from_numpy(np.var(x, -1, ddof=1, keepdims=True))),
                        _nan_if_empty(x, torch.mean(_t(x), -1, keepdim=True))),
    "r_dropout_softmax": _dropout_softmax,
    "r_int": _ints,
}


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> spec.Plan:
    d = tmp_path_factory.mktemp("reductions")
    (d / "reductions.yaml").write_text(SPEC)
    return spec.load_plan([str(d / "reductions.yaml")], targets=["cuda:sm_80", "cuda:sm_90"])


@pytest.fixture(scope="module")
def emulated(plan, tmp_path_factory) -> dict[str, EmulatedGroup]:
    """One emulation module per group, compiled two at a time."""
    out = str(tmp_path_factory.mktemp("reductions_emu"))

    def compile_group(gp) -> EmulatedGroup:
        ks = kernel_sources(gp.group, gp.variants)
        text = '#include "emu.h"\n' + render_module(ks) + launchers([k.symbol for k in ks])
        return EmulatedGroup(gp.group, ks, compile_source(text, out, gp.group.name))

    with ThreadPoolExecutor(2) as pool:
        return {em.group.name: em for em in pool.map(compile_group, plan.groups)}


# ---------------------------------------------------------------- inputs -----------------------

def _special_rows(x: np.ndarray, d: dt.DType) -> None:
    """Rows 1-4 of a float input: a NaN, a +inf, all -inf, large values (softmax needs its
    shift; float16 stays finite)."""
    n = x.shape[-1]
    if not n or not d.is_float:
        return
    big = 3e4 if d == dt.float16 else 1e4
    x[1, n // 2] = np.nan
    x[2, n // 3] = np.inf
    x[3, :] = -np.inf
    x[4, :] = (np.linspace(-1, 1, n) * big).astype(x.dtype)


def _values(d: dt.DType, shape, rng) -> np.ndarray:
    if d.is_float:
        return (rng.standard_normal(shape) * 2).astype(d.numpy)
    info = np.iinfo(d.numpy)
    a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(d.numpy)
    if shape[-1]:
        a[0] = info.max        # sums beyond the type: accumulated in int64
    return a


def _layout(a: np.ndarray, how: str) -> np.ndarray:
    """`a` as a contiguous array, a row-strided view (rows of a wider array: layout 'sc'), a view
    of every other element ('ss') or a contiguous copy one element past an aligned address (no
    vector path)."""
    if how == "every other":
        return strided_view(a)
    if how == "strided rows":
        wide = np.zeros(a.shape[:-1] + (a.shape[-1] + 3,), a.dtype)
        wide[..., :a.shape[-1]] = a
        return wide[..., :a.shape[-1]]
    if how == "misaligned":
        flat = np.zeros(a.size + 16, a.dtype)
        start = (-flat.ctypes.data) % 16 // a.itemsize + 1
        view = flat[start:start + a.size].reshape(a.shape)
        view[...] = a
        return view
    return a


def _case(gp, dtypes, n: int, how: str, rng) -> list:
    """Arguments of group plan `gp` for rows of length n: full-row inputs in layout `how`,
    rows 1-4 of the first input special, weights [N] contiguous, eps a scalar."""
    shapes = {"x": (ROWS, n), "residual": (ROWS, n), "w": (n,), "b": (n,)}
    if gp.group.name == "r_masked_softmax":
        shapes = {"x": (ROWS, 3, n), "mask": (ROWS, 1, n)}
    args, tensors = [], iter(dtypes)
    for p in gp.group.inputs:
        if p.kind == "scalar":
            args.append(EPS)
            continue
        d = next(tensors)
        a = _values(d, shapes[p.name], rng)
        if p.name == "x" and a.ndim == 2:
            _special_rows(a, d)
        args.append(_layout(a, how) if p.name in ("x", "residual") else a)
    return args


# ---------------------------------------------------------------- checks -----------------------

def _oracle(gp, args) -> list[np.ndarray]:
    wide = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
            or isinstance(a, np.ndarray) and a.dtype == ml_dtypes.bfloat16 else a for a in args]
    with np.errstate(all="ignore"):
        return list(ORACLES[gp.group.name](*wide))


def check(em: EmulatedGroup, gp, args, want, oracle, label: str, flags=None, start: int = 0):
    launch = em(args, SEED, OFFSET, flags=flags, start=start)
    n = args[0].shape[-1]
    for o, got, alt in zip(gp.group.outputs, launch.outputs, oracle):
        where = f"{label} {launch.key} flags={launch.flags} output {o.name}"
        bad = reference.compare(got, want.outputs[o.name], want.magnitude[o.name], n_row=n)
        assert bad is None, f"{where} vs reference: {bad.message}"
        alt = np.asarray(alt).astype(got.dtype)
        bad = reference.compare(got, alt, want.magnitude[o.name], n_row=n)
        assert bad is None, f"{where} vs oracle: {bad.message}"
    return launch


def _runs(host: int) -> list:
    """Flag overrides beside the host's choice: the other mode, the scalar path of both,
    64-bit indexing and, for a held row, the multi-pass path."""
    other = host ^ ROW_BLOCK
    runs = [lambda f: other, lambda f: f | WIDE]
    if host & VECTOR:
        runs += [lambda f: f & ~VECTOR, lambda f: other & ~VECTOR]
    if host & HELD:
        runs += [lambda f: f & ~HELD, lambda f: other & ~HELD]
    return runs


@pytest.mark.filterwarnings("ignore:var:UserWarning")      # torch at N = 1: no degrees of freedom
@pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning")     # numpy's, likewise
@pytest.mark.parametrize("name", [n for n in ORACLES])
def test_every_reduction_kernel_matches_reference_and_oracle(plan, emulated, name):
    gp = next(g for g in plan.groups if g.group.name == name)
    em = emulated[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    modes, ran, vectorized = set(), set(), set()
    strided = any(set("".join(ks.layouts)) == {"s"} for ks in em.kernels.values())
    layouts = {37: ("contiguous",) + (("every other",) if strided else ()),
               LENGTHS[-1]: ("contiguous", "misaligned") + (("strided rows",) if strided else ())}
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for n in LENGTHS:
            for how in layouts.get(n, ("contiguous",)):
                args = _case(gp, dtypes, n, how, rng)
                tensors = [a for a, p in zip(args, gp.group.inputs) if p.kind == "tensor"]
                scalars = [a for a, p in zip(args, gp.group.inputs) if p.kind == "scalar"]
                kernel = ir.instantiate(gp.group, {i.name: d for i, d in
                                                   zip(gp.group.tensor_inputs, dtypes)},
                                        expand=False)
                want = reference.evaluate(kernel, tensors, scalars, SEED, OFFSET)
                oracle = _oracle(gp, args)
                label = f"{'/'.join(d.short for d in dtypes)} N={n} {how}"
                host = check(em, gp, args, want, oracle, label)
                assert bool(host.flags & ROW_BLOCK) == (n > WARP_ROW_MAX), label
                assert bool(host.flags & HELD) == (n > 0 and bool(held_inputs(
                    em.kernels[host.key]))), label
                assert not host.flags & WIDE, label
                if how == "misaligned" or n % vector_width(em.kernels[host.key]):
                    assert not host.flags & VECTOR, label
                if how != "contiguous" and how != "misaligned":
                    assert ":ss" in host.key, host.key
                for flags in _runs(host.flags):
                    modes.add(check(em, gp, args, want, oracle, label, flags).flags & ROW_BLOCK)
                if n and how == "contiguous" and not gp.group.has_random:
                    # row indices beyond 2^33, offsets beyond (random values would differ)
                    work, rows = args[0].size, args[0].size // n
                    check(em, gp, args, want, oracle, label, lambda f: f | WIDE,
                          start=work * ((1 << 33) // rows + 1))
                ran.add(host.key)
                if host.flags & VECTOR:
                    vectorized.add(host.key)
    assert ran == set(em.kernels), f"kernels never run: {set(em.kernels) - ran}"
    assert modes == {0, ROW_BLOCK}
    assert vectorized == {k for k, ks in em.kernels.items() if vector_width(ks) > 1}


def test_softmax_rows_sum_to_one_and_layer_norm_rows_are_standardized(plan, emulated):
    """DESIGN §8: |sum(softmax) - 1| and |mean|, |var - 1| of layer_norm within
    4 * log2(N) * eps(float32) (inputs of magnitude ~1; w = 1, b = 0)."""
    rng = np.random.default_rng(8)
    n = 1040
    bound = 4 * np.log2(n) * 2.0 ** -23
    x = rng.standard_normal((ROWS, n)).astype(np.float32)
    for flags in (None, lambda f: f ^ ROW_BLOCK):
        y = emulated["r_softmax"]([x], flags=flags).outputs[0].astype(np.float64)
        assert np.all(np.abs(y.sum(-1) - 1) <= bound)
        ln = emulated["r_layer_norm"]([x, np.ones(n, np.float32), np.zeros(n, np.float32), 0.0],
                                      flags=flags).outputs[0].astype(np.float64)
        assert np.all(np.abs(ln.mean(-1)) <= bound)
        assert np.all(np.abs(ln.var(-1) - 1) <= bound * 4)


# ---------------------------------------------------------------- single-read rows -------------

# Kernels with one or two held inputs of 2, 4 and 8 bytes, row outputs (r_logsumexp, r_var) and
# strided rows (the 'ss' kernels of r_softmax and r_logsumexp), by group and first dtype
BOUNDARY_KERNELS = [("r_softmax", "f32"), ("r_softmax", "bf16"), ("r_logsumexp", "f16"),
                    ("r_var", "f64"), ("r_add_rms_norm", "f32"), ("r_add_rms_norm", "bf16")]


def _expected_shared(n: int, sizes: list[int]) -> int:
    """The dynamic shared memory of a held launch: per held input a slot of n * size bytes,
    rounded up to 16, per row of the block (4 rows for a warp per row)."""
    return (1 if n > WARP_ROW_MAX else 4) * sum((n * s + 15) // 16 * 16 for s in sizes)


def _held_bound(em: EmulatedGroup, sizes: list[int]) -> int:
    """The longest row whose `sizes` the emulated device (sm_90's limits) holds, a block per
    row of 1024 threads: at least 16384 4-byte elements for at most three such inputs."""
    lo, hi = 16384, 1 << 22
    assert runtime_cuda.holds(lo, tuple(sizes), ROW_BLOCK, em.limits)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runtime_cuda.holds(mid, tuple(sizes), ROW_BLOCK, em.limits) \
            else (lo, mid)
    return lo


@pytest.mark.parametrize("name,first", BOUNDARY_KERNELS)
def test_held_size_classes_and_their_bounds(plan, emulated, name, first):
    """The size classes the host picks from N: a warp per row held (N <= 512), a block per row
    of 64 threads (N = 513) and of 1024 held up to the bound of sm_90's 227 KiB of shared memory a
    block (`_held_bound`), and the multi-pass path one element above; at, below and above both
    bounds (vector and scalar paths), strided rows at the bound; against the reference and the
    oracle."""
    gp = next(g for g in plan.groups if g.group.name == name)
    em = emulated[name]
    dtypes = next(v.dtypes for v in gp.variants if v.dtypes[0].short == first)
    contiguous = next(ks for ks in em.kernels.values()
                      if tuple(ks.kernel.in_dtypes) == tuple(dtypes) and ":ss" not in ks.key)
    sizes = held_itemsizes(contiguous)
    bound = _held_bound(em, sizes)
    rng = np.random.default_rng(zlib.crc32(f"{name} {first}".encode()))
    strided = any(":ss" in k for k in em.kernels)
    runs = [(n, "contiguous") for n in (WARP_ROW_MAX, WARP_ROW_MAX + 1, bound - 1, bound,
                                        bound + 1)]
    runs += [(bound, "every other")] if strided else []
    for n, how in runs:
        args = _case(gp, dtypes, n, how, rng)
        tensors = [a for a, p in zip(args, gp.group.inputs) if p.kind == "tensor"]
        scalars = [a for a, p in zip(args, gp.group.inputs) if p.kind == "scalar"]
        kernel = ir.instantiate(gp.group, {i.name: d for i, d in
                                           zip(gp.group.tensor_inputs, dtypes)}, expand=False)
        want = reference.evaluate(kernel, tensors, scalars, SEED, OFFSET)
        label = f"{first} N={n} {how}"
        launch = check(em, gp, args, want, _oracle(gp, args), label)
        assert bool(launch.flags & ROW_BLOCK) == (n > WARP_ROW_MAX), label
        assert bool(launch.flags & HELD) == (n <= bound), label
        assert launch.shared == (_expected_shared(n, sizes) if n <= bound else 0), label
        assert launch.block == runtime_cuda.block_threads(n, launch.flags), label
        assert bool(launch.flags & VECTOR) == (how == "contiguous" and n % vector_width(
            em.kernels[launch.key]) == 0), label


COUNTER = """
static unsigned long long fb_loaded[64];     // bytes loaded from global memory, per ptr word
template <typename T, int V>
inline fb_vec<T, V> fb_counted_load(int word, const T* p) {
  fb_loaded[word] += sizeof(T) * V;
  return fb_load<T, V>(p);
}
extern "C" unsigned long long* fb_loaded_bytes(void) { return fb_loaded; }
"""
_GLOBAL_LOAD = re.compile(r"fb_load<([^<>]+)>\(\(const ([^*]+)\*\)p\.ptr\[(\d+)\]")


def _counting(source: str) -> str:
    """`source` with every load from global memory (`fb_load` of a `p.ptr` word) counted in
    fb_loaded[word]; loads from shared memory are not counted."""
    head, sep, kernels = source.partition("struct fb_args_0 ")
    counted, loads = _GLOBAL_LOAD.subn(r"fb_counted_load<\1>(\3, (const \2*)p.ptr[\3]",
                                       kernels)
    assert loads
    return head + COUNTER + sep + counted


COUNTED_GROUPS = ("r_softmax", "r_add_rms_norm", "r_logsumexp")


@pytest.fixture(scope="module")
def counted(plan, tmp_path_factory) -> dict[str, EmulatedGroup]:
    out = str(tmp_path_factory.mktemp("reductions_counted"))
    groups = {}
    for gp in plan.groups:
        if gp.group.name in COUNTED_GROUPS:
            ks = kernel_sources(gp.group, gp.variants)
            text = '#include "emu.h"\n' + _counting(render_module(ks)) + \
                launchers([k.symbol for k in ks])
            groups[gp.group.name] = EmulatedGroup(
                gp.group, ks, compile_source(text, out, gp.group.name + "_counted"))
    return groups


def _sweeps_loading(k: ir.Kernel) -> dict[tuple[int, int], int]:
    """Per (input, chunk), the sweeps over the row that load it (DESIGN §8 schedule)."""
    sched = schedule(k)
    sweeps = [p.elem for p in sched.passes] + \
        ([sched.final] if any(not o.row for o in k.outputs) else [])
    loads = [k.nodes[i].attr for ids in sweeps for i in set(ids) if k.nodes[i].op == "load"]
    return {x: loads.count(x) for x in set(loads)}


@pytest.mark.parametrize("name", COUNTED_GROUPS)
def test_held_rows_are_read_from_global_memory_once(plan, counted, name):
    """Bytes loaded from global memory, counted per input pointer by the emulated kernel: with
    HELD each input is read once (rows * N * itemsize: the ideal) but a broadcast one (`w` of
    r_add_rms_norm, re-read from cache on a GPU), with the flag cleared (the multi-pass path)
    once per sweep that needs it. Every class: a warp per row and a block per row, vector and
    scalar paths, strided rows."""
    gp = next(g for g in plan.groups if g.group.name == name)
    em = counted[name]
    counter = em.lib.fb_loaded_bytes
    counter.restype = ctypes.POINTER(ctypes.c_ulonglong)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 2)
    strided = any(":ss" in k for k in em.kernels)
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for n, how in [(37, "contiguous"), (1024, "contiguous"), (3000, "contiguous"),
                       (3001, "contiguous")] + ([(37, "every other"), (3000, "every other")]
                                                if strided else []):
            args = _case(gp, dtypes, n, how, rng)
            for clear in (0, HELD):
                loaded = counter()
                for w in range(64):
                    loaded[w] = 0
                launch = em(args, flags=lambda f: f & ~clear)
                ks = em.kernels[launch.key]
                rows = args[0].size // n
                label = f"{launch.key} N={n} {how} flags={launch.flags}"
                assert bool(launch.flags & HELD) == (not clear), label
                for (pos, c), times in _sweeps_loading(ks.kernel).items():
                    once = rows * n * ks.kernel.in_dtypes[pos].itemsize
                    held = launch.flags & HELD and (pos, c) in held_inputs(ks)
                    assert loaded[ks.abi.in_ptr(pos, c)] == (once if held else times * once), \
                        f"{label} input {pos}"
                    # held: every input read once but the broadcast ones
                    assert held or clear or times == 1 or "b" in ks.layouts[pos], label
                assert not clear or max(_sweeps_loading(ks.kernel).values()) > 1, label


# ---------------------------------------------------------------- NVRTC and the runtime --------

RUNTIME_GROUPS = ("r_layer_norm", "r_quant", "r_add_rms_norm", "r_int")
# The kernels built by NVRTC, the last k of each group (~0.3 s a kernel and arch): the runtime
# tests' groups, and shuffles of every kind of accumulator (float, double, int8, int64)
CUBIN_KERNELS = {"r_layer_norm": 2, "r_quant": 1, "r_add_rms_norm": 1, "r_int": 2, "r_var": 1,
                 "r_dropout_softmax": 1}


@pytest.fixture(scope="module")
def cuda_plan(plan) -> spec.Plan:
    return dataclasses.replace(plan, groups=tuple(
        dataclasses.replace(gp, variants=gp.variants[-CUBIN_KERNELS[gp.group.name]:])
        for gp in plan.groups if gp.group.name in CUBIN_KERNELS))


@pytest.fixture(scope="module")
def cuda_bundle(cuda_plan, tmp_path_factory):
    return build.build(cuda_plan, str(tmp_path_factory.mktemp("reductions_cuda")), progress=False)


def test_cubins_for_sm80_and_sm90_export_every_reduction_kernel(cuda_plan, cuda_bundle):
    m = cuda_bundle.manifest
    assert {(k["key"], k["target"]) for k in m["kernels"]} == \
        {(v.key, t) for gp in cuda_plan.groups for v in gp.variants for t in ("cuda:sm_80",
                                                                               "cuda:sm_90")}
    by_file: dict[str, set[str]] = {}
    for k in m["kernels"]:
        by_file.setdefault(k["file"], set()).add(k["symbol"])
    assert len(by_file) == 2 * len(cuda_plan.groups)
    sources = {ks.key: ks for gp in cuda_plan.groups for ks in kernel_sources(gp.group,
                                                                               gp.variants)}
    bundle = runtime.load(cuda_bundle.path)
    held = {}       # the held inputs' sizes, which the host sizes HELD launches by
    for rel, symbols in by_file.items():
        with open(os.path.join(cuda_bundle.path, rel), "rb") as f:
            data = f.read()
        for k in json.loads(read_description(data, rel))["kernels"]:     # what the cubin says
            held[k["key"]] = k["held"]
            assert k["held"] == held_itemsizes(sources[k["key"]]), (rel, k["key"])
            assert bundle.held(rel, k["key"]) == tuple(k["held"]), (rel, k["key"])
        assert cubin_sm(data) == int(rel.split("/")[1][3:]), rel
        assert symbols <= functions(data), rel
    assert any(held.values()) and all("held" not in k for k in m["kernels"])   # no manifest field


def test_reduction_ptx_uses_shuffles_barriers_and_vector_loads(plan):
    """The PTX of a block/warp reduction: butterfly shuffles, a block barrier, 16-byte loads of
    bfloat16 rows (and shared memory for the warps' partial results)."""
    gp = next(g for g in plan.groups if g.group.name == "r_add_rms_norm")
    ks = [k for k in kernel_sources(gp.group, gp.variants) if k.key.startswith(
        "r_add_rms_norm(bf16:cc")]
    ptx = nvrtc.compile_cuda(render_module(ks), "cuda:compute_90", "r").decode()
    assert re.search(r"shfl\.sync\.bfly\.b32", ptx)
    assert re.search(r"bar\.sync\s+0", ptx)
    assert re.search(r"ld\.global\.v4\.(u32|b32)", ptx)
    assert ".shared" in ptx


@pytest.fixture(scope="module")
def fake_device(cuda_bundle, emulated):
    bundle = runtime.load(cuda_bundle.path)
    libs = {ks.symbol: em.lib for em in emulated.values() for ks in em.kernels.values()}
    return bundle, fake_cupy(libs)


@pytest.mark.parametrize("name", RUNTIME_GROUPS)
def test_runtime_call_path_on_the_emulated_device(fake_device, monkeypatch, cuda_plan, name):
    """cupy-like arrays through the runtime: key, row outputs [..., 1], out=, the plan memo of a
    repeated call, N = 0 rows (row outputs written) and zero rows (nothing launched)."""
    bundle, cp = fake_device
    monkeypatch.setattr(runtime_cuda, "_cupy", lambda: cp)
    gp = next(g for g in cuda_plan.groups if g.group.name == name)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    dtypes = gp.variants[-1].dtypes
    for n in (1040, 37, 0):
        args = _case(gp, dtypes, n, "contiguous", rng)
        fake = [FakeArray(a) if isinstance(a, np.ndarray) else a for a in args]
        tensors = [a for a, p in zip(args, gp.group.inputs) if p.kind == "tensor"]
        scalars = [a for a, p in zip(args, gp.group.inputs) if p.kind == "scalar"]
        want = reference.evaluate(ir.instantiate(gp.group, {i.name: d for i, d in zip(
            gp.group.tensor_inputs, dtypes)}, expand=False), tensors, scalars)
        before = len(cp.launched)
        for repeat in range(2):           # the second call runs by the remembered plan
            got = bundle[name](*fake)
            got = got if isinstance(got, tuple) else (got,)
            for o, value in zip(gp.group.outputs, got):
                w = want.outputs[o.name]
                assert value.shape == w.shape == ((ROWS, 1) if o.row else (ROWS, n))
                bad = reference.compare(value.get().view(w.dtype), w, want.magnitude[o.name],
                                        n_row=n)
                assert bad is None, f"{name} N={n} call {repeat} {o.name}: {bad.message}"
        assert len(cp.launched) == before + 2
        ks = kernel_sources(gp.group, gp.variants)[-1]
        held = held_itemsizes(ks) if n else []
        assert cp.shared_bytes[-2:] == [_expected_shared(n, held) if held else 0] * 2, name
        assert cp.blocks[-2:] == [runtime_cuda.row_threads(n) if n > WARP_ROW_MAX else 128] * 2
        outs = [FakeArray(np.full(w.shape, 7, w.dtype)) for w in want.outputs.values()]
        bundle[name](*fake, out=tuple(outs) if len(outs) > 1 else outs[0])
        for o, value in zip(gp.group.outputs, outs):
            assert reference.compare(value.get(), want.outputs[o.name],
                                     want.magnitude[o.name], n_row=n) is None
    empty = [FakeArray(np.zeros((0,) + a.shape[1:], a.dtype)) if isinstance(a, np.ndarray)
             and a.ndim == 2 else FakeArray(a) if isinstance(a, np.ndarray) else a for a in args]
    before = len(cp.launched)
    got = bundle[name](*empty)
    assert all(g.shape[0] == 0 for g in (got if isinstance(got, tuple) else (got,)))
    assert len(cp.launched) == before
