"""Row reductions on the CPU (DESIGN §8): every kernel against `fusebuild.reference` and against an
independent float64 oracle (torch or numpy), plus the runtime paths of reduction calls.

Tolerance model (DESIGN §8), for a result y of output dtype `out` accumulated in dtype `acc`
(float32 for float16/bfloat16/float32, float64 for float64) over rows of N elements:
    |y - oracle| <= K ulp_out(oracle) + C eps_acc max(1, log2 N) S
with K = 4 ULPs for 32/64-bit outputs, 1 for 16-bit ones (rounded once on store), C = 4, and S
the scale of the rounding error of the row: sum |x| for a sum, max |x| of the row for softmax-like
functions and means, max |x| / std for normalizations. A kernel that summed a row in one
sequential chain (error ~ N eps S) would fail it at N = 5000 on adversarial rows; pairwise block
sums stay within log2 N (`test_sum_error_grows_like_log2_n` measures it).
The bundle is built once for the host's best ISA level (the one the runtime picks); the other
levels are built for one softmax and one layer_norm kernel and checked statically.
"""
from __future__ import annotations

import math
import os
import re
import shutil

import ml_dtypes      # its finfo knows bfloat16 (numpy's does only from ml_dtypes 0.7)
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusebuild import build, dtypes as dt, ir, reference, runtime, spec
from fusebuild.errors import ArgumentError
from fusebuild.runtime import threads
from fusebuild.runtime.cpu import LEVELS, host_isas
from conftest import group_of
from disassembly import disassemble, innermost_loops
from test_cpu_isa import NARROW, REGISTER, WIDEN, scalar_16bit_access, x86_conditional

ISAS = LEVELS["x86_64"]   # the x86-64 levels (aarch64: test_aarch64_isa.py)

SPEC = """
fusebuild: 1
bundle: {name: reductions, version: 0.1.0}
groups:
  - name: softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = softmax(x)
    matrix: {dtype: [float32, float16, bfloat16, float64], shapes: [{x: [B, N]}]}
  - name: masked_softmax
    inputs: {x: tensor, mask: tensor}
    outputs: [y]
    body: y = softmax(x + mask)
    matrix: {dtype: [float32], shapes: [{x: [B, H, T, S], mask: [B, 1, T, S]}]}
  - name: log_softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = log_softmax(x)
    matrix: {dtype: [float32], shapes: [{x: [B, N]}], strided: true}
  - name: logsumexp
    inputs: {x: tensor}
    outputs: [y]
    body: y = logsumexp(x)
    matrix: {dtype: [float32, float64], shapes: [{x: [B, N]}]}
  - name: log_softmax_lse
    inputs: {x: tensor}
    outputs: [y, lse]
    body: |
      y = log_softmax(x)
      lse = logsumexp(x)
    matrix: {dtype: [float32], shapes: [{x: [B, N]}]}
  - name: layer_norm
    inputs: {x: tensor, w: tensor, b: tensor}
    outputs: [y]
    body: y = layer_norm(x, eps=1e-5) * w + b
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [B, N], w: [N], b: [N]}]}
  - name: rms_norm
    inputs: {x: tensor, w: tensor}
    outputs: [y]
    body: y = rms_norm(x, eps=1e-6) * w
    matrix: {dtype: [float32], shapes: [{x: [B, N], w: [N]}]}
  - name: add_rms_norm
    inputs: {x: tensor, residual: tensor, w: tensor, eps: scalar(float32)}
    outputs: [y, h]
    body: |
      h = x + residual
      y = h * rsqrt(mean(h * h, dim=-1) + eps) * w
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [B, N], residual: [B, N], w: [N]}]}
  - name: quant
    inputs: {x: tensor}
    outputs: {q: int8, scale: float32}
    body: |
      scale = amax(abs(x), dim=-1) / 127.0
      q = int8(round(x / scale))
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [T, N]}]}
  - name: var1
    inputs: {x: tensor}
    outputs: [v]
    body: v = var(x, correction=1)
    matrix: {dtype: [float32, float64], shapes: [{x: [B, N]}]}
  - name: extrema
    inputs: {x: tensor}
    outputs: [hi, lo, s]
    body: |
      hi = amax(x)
      lo = amin(x)
      s = sum(x)
    matrix: {dtype: [float32, int8], shapes: [{x: [B, N]}]}
  - name: nested
    inputs: {x: tensor}
    outputs: [y, c]
    body: |
      d = x - mean(x)
      c = sum(abs(d - amax(d))) / sum(exp(d - amax(d)))
      y = d / (amax(abs(d)) + c)
    matrix: {dtype: [float32], shapes: [{x: [B, N]}]}
"""

STATIC_SPEC = """
fusebuild: 1
bundle: {name: reductions_isa, version: 0.1.0}
groups:
  - name: softmax
    inputs: {x: tensor}
    outputs: [y]
    body: y = softmax(x)
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [B, N]}]}
  - name: layer_norm
    inputs: {x: tensor, w: tensor, b: tensor}
    outputs: [y]
    body: y = layer_norm(x, eps=1e-5) * w + b
    matrix: {dtype: [float32], shapes: [{x: [B, N], w: [N], b: [N]}]}
"""

SIZES = (1, 7, 33, 5000)          # N = 1, short rows, not a multiple of any vector width, long
HOST = host_isas()
pytestmark = pytest.mark.skipif(not HOST, reason="not an x86-64 host")


def _build(tmp_path_factory, name: str, text: str, targets: list[str]) -> str:
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.yaml").write_text(text)
    plan = spec.load_plan([str(d / f"{name}.yaml")], targets=targets)
    return build.build(plan, str(d / "out"), progress=False).path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The reduction groups for the host's best ISA level (the level the runtime runs)."""
    return runtime.load(_build(tmp_path_factory, "reductions", SPEC, [f"cpu:{HOST[-1]}"]))


# ------------------------------------------------------------------ the oracle ---------------

def acc_of(d: dt.DType) -> dt.DType:
    return dt.float64 if d == dt.float64 else dt.float32


def check_oracle(got: np.ndarray, want: np.ndarray, d: dt.DType, n: int, scale) -> None:
    """`got` (output dtype d) against a float64 oracle, with the tolerance model above; NaN
    where the oracle is NaN, infinities equal."""
    want = np.asarray(want, np.float64)
    g = got.astype(np.float64)
    k = 4 if d.bits >= 32 else 1
    tol = k * reference.ulp(want, d) + 4 * float(np.finfo(acc_of(d).numpy).eps) * \
        max(1.0, math.log2(max(n, 1))) * np.broadcast_to(scale, want.shape)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(g), nan), f"NaN at {np.argwhere(np.isnan(g) != nan)[:5]}"
    inf = np.isinf(want)
    assert np.array_equal(g[inf], want[inf]), "infinities differ"
    ok = nan | inf
    err = np.where(ok, 0, np.abs(g - np.where(ok, 0, want)))
    bad = err > np.where(ok, 0, tol)
    assert not bad.any(), f"{bad.sum()} beyond tolerance, worst {np.max(err - tol):.3g} at " \
                          f"{np.unravel_index(np.argmax(err - tol), err.shape)}"


def row_max_abs(x: np.ndarray) -> np.ndarray:
    a = np.abs(x.astype(np.float64))
    a = np.where(np.isfinite(a), a, 0)
    return a.max(axis=-1, keepdims=True, initial=0.0)


def check_reference(bundle, name: str, args: list, n: int) -> tuple:
    """Call group `name` (the first call takes the Python path, the repeated one the C fast path:
    same bytes) and check every output against the reference within the reduction tolerance of
    `reference.compare` for rows of n elements; the outputs, as a tuple."""
    got = bundle[name](*args)
    again = bundle[name](*args)
    got, again = (x if isinstance(x, tuple) else (x,) for x in (got, again))
    assert [a.tobytes() for a in got] == [a.tobytes() for a in again], "fast and Python paths"
    g = group_of(bundle, name)
    tensors = [a for a, p in zip(args, g.inputs) if p.kind == "tensor"]
    scalars = [a for a, p in zip(args, g.inputs) if p.kind == "scalar"]
    dtypes = {p.name: dt.from_numpy(a.dtype) for a, p in zip(tensors, g.tensor_inputs)}
    want = reference.evaluate(ir.instantiate(g, dtypes, expand=False), tensors, scalars)
    for o, value in zip(g.outputs, got):
        m = reference.compare(value, want.outputs[o.name], want.magnitude[o.name], n_row=n)
        assert m is None, f"{name}.{o.name} {bundle[name].key(*args)} N={n}: {m.message}"
    return got


def rows(d: dt.DType, shape, rng, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(d.numpy)


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float64))


# ------------------------------------------------------------------ numerics -----------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_softmax_matches_torch_and_rows_sum_to_one(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(1)
    for n in SIZES + (9000,):                        # 9000: beyond the row scratch buffer
        x = rows(d, (3, n), rng)
        if n > 1:
            x[1, 0], x[2, n // 2] = np.inf, np.nan      # torch: NaN rows
        y, = check_reference(bundle, "softmax", [x], n)
        want = torch.softmax(t64(x.astype(np.float64)), -1).numpy()
        check_oracle(y, want, d, n, row_max_abs(x))
        # the final sweep divides the very values the sum added: only the sum's error and the
        # rounding of each quotient remain
        tol = float(ml_dtypes.finfo(d.numpy).eps) + 4 * float(np.finfo(acc_of(d).numpy).eps) * \
            max(1.0, math.log2(n))
        assert abs(y[0].astype(np.float64).sum() - 1) <= tol, f"row sum {y[0].sum()} (N={n})"


def test_masked_attention_softmax_broadcasts_the_mask(bundle):
    rng = np.random.default_rng(2)
    b, h, t, s = 2, 3, 4, 37
    x = rows(dt.float32, (b, h, t, s), rng)
    mask = np.where(rng.random((b, 1, t, s)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[1, 0, 2, :] = -np.inf                          # a fully masked row: NaN, as torch
    assert bundle.masked_softmax.key(x, mask) == "masked_softmax(f32:cccc,f32:sbcc)"
    y, = check_reference(bundle, "masked_softmax", [x, mask], s)
    want = torch.softmax(t64(x) + t64(mask), -1).numpy()
    check_oracle(y, want, dt.float32, s, row_max_abs(x))
    assert np.isnan(y[1, :, 2]).all() and not np.isnan(y[0]).any()


def test_log_softmax_on_strided_rows(bundle):
    rng = np.random.default_rng(3)
    base = rows(dt.float32, (6, 2 * 300), rng)
    for x, key in ((base[:, :300], "log_softmax(f32:sc)"), (base[::2, ::2], "log_softmax(f32:ss)"),
                   (base[:3, :300].T, "log_softmax(f32:ss)")):
        assert bundle.log_softmax.key(x) == key
        y, = check_reference(bundle, "log_softmax", [x], x.shape[-1])
        check_oracle(y, F.log_softmax(t64(x), -1).numpy(), dt.float32, x.shape[-1],
                     row_max_abs(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logsumexp_is_a_row_output_with_torch_infinities(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(4)
    for n in SIZES:
        x = rows(d, (4, n), rng)
        x[1] = -np.inf                                   # -inf, not NaN
        x[2, 0] = np.inf                                 # +inf
        y, = check_reference(bundle, "logsumexp", [x], n)
        assert y.shape == (4, 1)
        want = torch.logsumexp(t64(x), -1, keepdim=True).numpy()
        check_oracle(y, want, d, n, row_max_abs(x))


def test_log_softmax_and_logsumexp_share_one_exp_with_torch_special_rows(bundle):
    """A group computing log_softmax and logsumexp evaluates exp once per element (they share
    logsumexp's shift) and keeps torch's special rows: NaN rows for a row holding +inf or NaN
    or only -inf (log_softmax), +inf / -inf / NaN (logsumexp)."""
    from fusebuild.inspection import kernel_source
    rng = np.random.default_rng(16)
    for n in SIZES + (9000,):
        x = rows(dt.float32, (5, n), rng)
        x[1] = -np.inf
        x[2, 0] = np.inf
        x[3, -1] = np.nan
        x[4, : n // 2] = -np.inf
        y, lse = check_reference(bundle, "log_softmax_lse", [x], n)
        tx = t64(x)
        check_oracle(y, F.log_softmax(tx, -1).numpy(), dt.float32, n, row_max_abs(x))
        check_oracle(lse, torch.logsumexp(tx, -1, keepdim=True).numpy(), dt.float32, n,
                     row_max_abs(x))
    source = kernel_source(bundle.manifest, "log_softmax_lse(f32:cc)")
    assert len(re.findall(r"= exp_f32\(", source)) == 1, source


def test_softmax_keeps_exp_in_its_float32_output_for_any_n(bundle):
    """float32/float64 softmax stores exp(x - max) in its output row and scales it there, for
    any N (exp once per element, no scratch-size limit), also in place; 16-bit outputs keep
    the float32 row scratch buffer (N <= SCRATCH, else exp again)."""
    from fusebuild.inspection import kernel_source
    for key, exps in (("softmax(f32:cc)", 1), ("softmax(f64:cc)", 1), ("softmax(bf16:cc)", 3)):
        source = kernel_source(bundle.manifest, key)
        assert len(re.findall(r"= (?:exp_f32|math\.exp)\(", source)) == exps, source
    x = rows(dt.float32, (3, 9000), np.random.default_rng(17))
    want = bundle.softmax(x)
    check_oracle(want, torch.softmax(t64(x), -1).numpy(), dt.float32, 9000, row_max_abs(x))
    inplace = x.copy()
    bundle.softmax(inplace, out=inplace)
    assert inplace.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_matches_torch_and_normalizes_rows(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(5)
    for n in SIZES:
        x = (rows(d, (3, n), rng).astype(np.float64) + 10).astype(d.numpy)  # mean far from 0
        w, b = rows(d, (n,), rng, 1.0), rows(d, (n,), rng, 1.0)
        y, = check_reference(bundle, "layer_norm", [x, w, b], n)
        x64 = x.astype(np.float64)
        want = F.layer_norm(t64(x64), (n,), t64(w), t64(b), eps=1e-5).numpy()
        std = np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
        scale = row_max_abs(x) / std * np.abs(w.astype(np.float64)) + row_max_abs(x) / std
        check_oracle(y, want, d, n, scale)
        if n > 1 and d == dt.float32:   # w = 1, b = 0: rows of mean 0, variance v / (v + eps)
            z = bundle.layer_norm(x, np.ones(n, d.numpy), np.zeros(n, d.numpy)).astype(np.float64)
            v = x64.var(-1)
            eps, cond = float(np.finfo(np.float32).eps), row_max_abs(x)[:, 0] / np.sqrt(v)
            assert (np.abs(z.mean(-1)) <= 4 * eps * math.log2(n) * cond + 4 * eps * cond).all()
            assert (np.abs(z.var(-1) - v / (v + 1e-5)) <=
                    8 * eps * math.log2(n) * (1 + cond)).all(), z.var(-1) - v / (v + 1e-5)


def test_rms_norm_with_weight_matches_torch(bundle):
    rng = np.random.default_rng(6)
    for n in SIZES:
        x, w = rows(dt.float32, (3, n), rng), rows(dt.float32, (n,), rng, 1.0)
        y, = check_reference(bundle, "rms_norm", [x, w], n)
        want = F.rms_norm(t64(x), (n,), t64(w), eps=1e-6).numpy()
        rms = np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
        check_oracle(y, want, dt.float32, n, row_max_abs(x) / rms * np.abs(w))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_add_rms_norm_returns_both_outputs(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(7)
    for n in SIZES:
        x, r, w = rows(d, (4, n), rng), rows(d, (4, n), rng), rows(d, (n,), rng, 1.0)
        y, h = check_reference(bundle, "add_rms_norm", [x, r, w, 1e-6], n)
        h_want = (torch.from_numpy(x.astype(np.float32)) + torch.from_numpy(
            r.astype(np.float32))).numpy().astype(d.numpy)       # rounded once, as torch
        assert h.tobytes() == h_want.tobytes()
        h64 = x.astype(np.float64) + r.astype(np.float64)   # y uses h unrounded (held in f32)
        want = F.rms_norm(t64(h64), (n,), t64(w), eps=1e-6).numpy()
        rms = np.sqrt((h64 ** 2).mean(-1, keepdims=True) + 1e-6)
        check_oracle(y, want, d, n, row_max_abs(h64) / rms * np.abs(w.astype(np.float64)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_token_quantization_row_scale(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(8)
    for n in SIZES:
        x = rows(d, (5, n), rng)
        x[3] = 0                                        # scale 0: q = int8(NaN) = 0
        q, scale = check_reference(bundle, "quant", [x], n)
        x32 = x.astype(np.float32)
        want_scale = np.abs(x32).max(-1, keepdims=True) / np.float32(127)
        assert scale.shape == (5, 1) and scale.tobytes() == want_scale.tobytes()
        with np.errstate(invalid="ignore", divide="ignore"):
            qf = np.rint(x32 / want_scale)
        want_q = np.where(np.isnan(qf), 0, np.clip(qf, -128, 127)).astype(np.int8)
        assert np.array_equal(q, want_q)


@pytest.mark.filterwarnings("ignore:var:UserWarning")      # torch at N = 1: no degrees of freedom
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_var_with_correction_matches_torch(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(9)
    for n in SIZES:
        x = (rows(d, (3, n), rng).astype(np.float64) + 100).astype(d.numpy)
        v, = check_reference(bundle, "var1", [x], n)
        want = torch.var(t64(x), -1, correction=1, keepdim=True).numpy()   # N = 1: NaN
        dev = row_max_abs(x - x.astype(np.float64).mean(-1, keepdims=True))
        check_oracle(v, want, d, n, 2 * dev * dev * n / max(n - 1, 1))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_amax_amin_sum_with_nan_rows_and_integer_sums(bundle, dtype):
    d = dt.lookup(dtype)
    rng = np.random.default_rng(10)
    for n in SIZES:
        if d.is_float:
            x = rows(d, (4, n), rng)
            x[1, n // 2] = np.nan                       # NaN propagates through amax and amin
            x[2, 0], x[3, -1] = np.inf, -np.inf
        else:
            x = rng.integers(-128, 128, (4, n)).astype(np.int8)
        hi, lo, s = check_reference(bundle, "extrema", [x], n)
        tx = torch.from_numpy(x)
        assert np.array_equal(hi, torch.amax(tx, -1, keepdim=True).numpy(), equal_nan=True)
        assert np.array_equal(lo, torch.amin(tx, -1, keepdim=True).numpy(), equal_nan=True)
        if d.is_float:
            check_oracle(s, t64(x).sum(-1, keepdim=True).numpy(), d, n,
                         np.abs(np.where(np.isfinite(x), x, 0)).astype(np.float64).sum(
                             -1, keepdims=True))
        else:   # int8 sums in int64, like torch
            assert s.dtype == np.int64 and np.array_equal(s, tx.sum(-1, keepdim=True).numpy())


def test_chained_and_nested_reductions(bundle):
    rng = np.random.default_rng(11)
    for n in SIZES:
        x = rows(dt.float32, (3, n), rng)
        y, c = check_reference(bundle, "nested", [x], n)
        x64 = x.astype(np.float64)
        dv = x64 - x64.mean(-1, keepdims=True)
        m = dv.max(-1, keepdims=True)
        c_want = np.abs(dv - m).sum(-1, keepdims=True) / np.exp(dv - m).sum(-1, keepdims=True)
        with np.errstate(invalid="ignore"):                  # N = 1: 0 / 0
            y_want = dv / (np.abs(dv).max(-1, keepdims=True) + c_want)
        check_oracle(c, c_want, dt.float32, n, 4 * n * row_max_abs(x))
        check_oracle(y, y_want, dt.float32, n, 4 * row_max_abs(x))


def test_sum_error_grows_like_log2_n(bundle):
    """The measured error of float32 row sums of 2**10 .. 2**20 elements stays within
    C eps log2(N) sum|x| (C = 4; a sequential sum's bound is N eps sum|x|), and on rows built to
    make a sequential float32 sum drift, the kernel's error is far below that drift."""
    rng = np.random.default_rng(12)
    eps = float(np.finfo(np.float32).eps)
    for k in (10, 14, 20):
        n = 1 << k
        x = rng.random((2, n)).astype(np.float32)       # all positive: no cancellation
        _, _, s = bundle.extrema(x)
        exact = x.astype(np.float64).sum(-1, keepdims=True)
        rel = np.abs(s - exact) / exact
        assert (rel <= 4 * eps * k).all(), (n, rel / eps)
    x = np.full((1, 1 << 20), 0.1, np.float32)
    sequential = np.cumsum(x, dtype=np.float32)[-1]     # numpy's cumsum is sequential
    exact = float(x.astype(np.float64).sum())
    got = float(bundle.extrema(x)[2][0, 0])
    assert abs(got - exact) < abs(sequential - exact) / 100, (got, sequential, exact)


# ------------------------------------------------------------------ runtime paths ------------

def test_zero_rows_and_empty_rows(bundle):
    x0 = np.empty((0, 7), np.float32)
    y, = check_reference(bundle, "softmax", [x0], 7)
    assert y.shape == (0, 7)
    q, scale = bundle.quant(x0)
    assert q.shape == (0, 7) and scale.shape == (0, 1)
    e = np.empty((3, 0), np.float32)                    # rows of N = 0: row outputs written
    hi, lo, s = check_reference(bundle, "extrema", [e], 0)
    assert np.isnan(hi).all() and np.isnan(lo).all() and (s == 0).all() and hi.shape == (3, 1)
    hi, lo, s = bundle.extrema(np.empty((2, 0), np.int8))
    assert (hi == 0).all() and (s == 0).all() and s.dtype == np.int64
    v, = check_reference(bundle, "logsumexp", [np.empty((2, 3, 0))], 0)
    assert v.shape == (2, 3, 1)
    y = bundle.layer_norm(np.empty((4, 0), np.float32), np.empty(0, np.float32),
                          np.empty(0, np.float32))
    assert y.shape == (4, 0)


def test_other_ranks_run_on_the_built_kernels(bundle):
    """A single row (key rank 1) and rank-3 calls (outer dims merged) run on the [B, N]
    kernels, the reduced dim kept innermost; size-1 dims keep N even when N = 1."""
    rng = np.random.default_rng(13)
    x1 = rows(dt.float32, (37,), rng)
    assert bundle.softmax.key(x1) == "softmax(f32:c)"
    y, = check_reference(bundle, "softmax", [x1], 37)
    check_oracle(y, torch.softmax(t64(x1), -1).numpy(), dt.float32, 37, row_max_abs(x1))
    x3 = rows(dt.float32, (2, 3, 1), rng)
    assert bundle.softmax.key(x3) == "softmax(f32:cc)"
    assert (check_reference(bundle, "softmax", [x3], 1)[0] == 1).all()
    x3 = rows(dt.float32, (2, 3, 40), rng)
    w, b = rows(dt.float32, (40,), rng), rows(dt.float32, (1, 40), rng)
    assert bundle.layer_norm.key(x3, w, b) == "layer_norm(f32:cc,f32:bc,f32:bc)"
    check_reference(bundle, "layer_norm", [x3, w, b], 40)


def test_row_split_over_threads_gives_the_same_bytes(bundle, monkeypatch):
    """A call big enough to split over threads computes each row once, in one thread: the
    bytes equal those of a one-thread call (rows are never split)."""
    rng = np.random.default_rng(14)
    x = rows(dt.float32, (67, 4099), rng)               # > 2 * MIN_PER_THREAD elements
    assert x.size >= 2 * threads.MIN_PER_THREAD
    monkeypatch.setattr(bundle, "threads", 3)
    split = bundle.softmax._call((x,), None, None, 0)
    assert len(threads.ranges(x.size, 3)) == 3
    monkeypatch.setattr(bundle, "threads", 1)
    one = bundle.softmax._call((x,), None, None, 0)
    assert split.tobytes() == one.tobytes()
    check_oracle(one, torch.softmax(t64(x), -1).numpy(), dt.float32, 4099, row_max_abs(x))


def test_out_in_place_and_row_outputs(bundle):
    rng = np.random.default_rng(15)
    x = rows(dt.float32, (3, 50), rng)
    want = bundle.softmax(x)
    inplace = x.copy()
    got = bundle.softmax._call((inplace,), inplace, None, 0)     # the Python path, in place
    assert got is inplace and inplace.tobytes() == want.tobytes()
    again = x.copy()                                    # the C fast path, in place
    bundle.softmax(again, out=again)
    assert again.tobytes() == want.tobytes() and bundle.softmax._fast_plans >= 1
    col = rows(dt.float32, (3, 1), rng)
    with pytest.raises(ArgumentError, match="row output"):
        bundle.quant(col, out=(np.empty((3, 1), np.int8), col))


def test_verify_numerics_runs_every_reduction_kernel(bundle):
    from fusebuild.verify import verify
    report = verify(bundle.root, numerics=True)
    assert report.numerics == len(bundle.manifest["kernels"]) and not report.skipped


# ------------------------------------------------------------------ vectorization ------------

@pytest.fixture(scope="module")
def isa_bundle(tmp_path_factory):
    """One softmax (float32, bfloat16) and one layer_norm group for every ISA level; only
    disassembled."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    return runtime.load(_build(tmp_path_factory, "reductions_isa", STATIC_SPEC,
                               [f"cpu:{i}" for i in ISAS]))


PACKED = re.compile(r"^v?(add|sub|mul|div|max|min)ps$|^vfn?m(add|sub)\d+ps$")
SCALAR = re.compile(r"^v?(add|sub|mul|div|max|min)ss$|^vfn?m(add|sub)\d+ss$")


def sweeps(function, register: str) -> list[list]:
    """The vector main loops of a function: innermost loops (conditional backward branches)
    doing packed float arithmetic on `register`s and no scalar float arithmetic."""
    return [loop for loop in innermost_loops(function, x86_conditional)
            if any(PACKED.match(op) and register in args for _, op, args in loop)
            and not any(SCALAR.match(op) for _, op, _ in loop)]


def stores(loop) -> bool:
    return any(args.rstrip().endswith(")") for _, _, args in loop)   # AT&T: memory destination


@pytest.mark.parametrize("isa", ISAS)
def test_every_pass_over_a_row_is_vectorized(isa_bundle, isa):
    """softmax sweeps a row three times (max, sum of exp, store): float32 keeps exp(x - max) in
    its output row, bfloat16 has two versions of its last two sweeps (exp(x - max) kept in a row
    scratch buffer for rows that fit, else computed again); layer_norm sweeps three times (mean,
    variance, store): every sweep has a vector main
    loop on the level's widest registers (xmm for v2, ymm for v3, zmm for v4), 16-bit
    values widened and narrowed as vectors; the kernels call no function (no libm, every helper
    inlined), v2 uses no AVX encoding and no level uses registers wider than its own."""
    reg = REGISTER[isa]
    wider = {"x86-64-v2": ("ymm", "zmm"), "x86-64-v3": ("zmm",), "x86-64-v4": ()}[isa]
    entries = [k for k in isa_bundle.manifest["kernels"] if k["target"] == f"cpu:{isa}"]
    assert len(entries) == 3
    for k in entries:
        function = disassemble(os.path.join(isa_bundle.root, k["file"]))[k["symbol"]]
        loops = sweeps(function, reg)
        listing = "\n\n".join("\n".join(f"  {op} {args}" for _, op, args in loop)
                              for loop in loops)
        where = f"{k['key']} at {isa}"
        assert len(loops) >= (5 if k["key"] == "softmax(bf16:cc)" else 3), f"{where}:\n{listing}"
        loads_only = 1 if k["key"] == "softmax(f32:cc)" else 2    # its sum sweep stores exp
        assert len([x for x in loops if not stores(x)]) >= loads_only, f"{where}:\n{listing}"
        assert [x for x in loops if stores(x)], f"{where}: no vector store loop:\n{listing}"
        if "bf16" in k["key"]:
            ops = [op for loop in loops for _, op, _ in loop]
            assert any(WIDEN.match(op) for op in ops) and any(NARROW.match(op) for op in ops)
            assert not [1 for loop in loops for _, op, args in loop
                        if scalar_16bit_access(op, args)], f"{where}:\n{listing}"
        calls = [f"{op} {args}" for _, op, args in function if op == "call"]
        assert not calls, f"{where} calls {calls}"
        assert not [i for i in function if any(w in i[2] for w in wider)], where
        if isa == "x86-64-v2":
            assert not [i for i in function if i[1].startswith("v")], where
