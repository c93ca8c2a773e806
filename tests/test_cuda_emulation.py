"""The generated CUDA source run on the host: every example kernel, compiled with g++ against an
emulation header (tests/cuda_emulation/emu.h) and launched through the runtime's host-side launch
code over small shapes, on the vector and the scalar path and with 32- and 64-bit indexing,
compared with the reference evaluator. Random values, Philox and the float16/bfloat16
conversions are checked bit for bit."""
from __future__ import annotations

import ctypes
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

from fusebuild import build, dtypes as dt, ir, syntax, reference, runtime, spec
from fusebuild.argspec import format_key, parse_key
from fusebuild.codegen.common import KernelSource
from fusebuild.codegen.cuda import render_module, vector_width
from fusebuild.errors import ArgumentError
from fusebuild.runtime import cuda as runtime_cuda
from fusebuild.runtime.cuda import VECTOR, WIDE
from conftest import SPECS, adam_case, random_array
from cuda_emulation.cases import Case, check_outputs, example_cases
from cuda_emulation.fake_cupy import FakeArray, fake_cupy
from opcases import FLOAT_SPECIALS, op_arrays, op_bodies, spec_text
from test_ops_cpu import relative_to_magnitude
from cuda_emulation.harness import (EmulatedGroup, compile_source, have_compiler, kernel_sources,
                                    launchers)

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the host emulation")
PLAN = spec.load_plan([SPECS])


def emulate(group: syntax.Group, kernels: list[KernelSource], out_dir: str) -> EmulatedGroup:
    text = '#include "emu.h"\n' + render_module(kernels) + launchers([k.symbol for k in kernels])
    return EmulatedGroup(group, kernels, compile_source(text, out_dir, group.name))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> dict[str, EmulatedGroup]:
    out = str(tmp_path_factory.mktemp("emulation"))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        groups = pool.map(lambda gp: emulate(gp.group, kernel_sources(gp.group, gp.variants), out),
                          PLAN.groups)
        return {g.group.name: g for g in groups}


def check(em: EmulatedGroup, case: Case, flags=None, start: int = 0, magnitude: bool = True):
    launch = em(case.args, case.seed, case.offset, flags, start)
    tensors = [a for a, p in zip(case.args, em.group.inputs) if p.kind == "tensor"]
    scalars = [a for a, p in zip(case.args, em.group.inputs) if p.kind == "scalar"]
    dtypes = {i.name: d for i, d in zip(em.group.tensor_inputs, case.dtypes)}
    want = reference.evaluate(ir.instantiate(em.group, dtypes, expand=False), tensors, scalars,
                              case.seed, case.offset)
    n_row = want.part_magnitude.shape[-1] if em.group.reduces else 0    # DESIGN §8
    for o, got in zip(em.group.outputs, launch.outputs):
        bad = reference.compare(got, want.outputs[o.name],
                                want.magnitude[o.name] if magnitude else None, n_row=n_row)
        assert bad is None, f"{case.label} {launch.key} flags={launch.flags} output {o.name}: " \
                            f"{bad.message}"
    return launch


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_every_example_kernel_matches_reference(emulated, gp):
    em = emulated[gp.group.name]
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    has_strided = any(all(set(lay) == {"s"} for lay in ks.layouts) for ks in em.kernels.values())
    ran, vectorized = set(), set()
    for case in example_cases(gp, rng, has_strided):
        host = check(em, case)
        runs = [lambda f: f | WIDE]
        if host.flags & VECTOR:
            runs += [lambda f: f & ~VECTOR, lambda f: (f & ~VECTOR) | WIDE]
            vectorized.add(host.key)
        if "misaligned" in case.label:
            assert not host.flags & VECTOR, f"{case.label}: vector path on misaligned arrays"
        assert not host.flags & WIDE, "small calls index in 32 bits"
        for flags in runs:
            check(em, case, flags)
        if not gp.group.has_random:    # indices and offsets past 2**32 (rand would differ)
            n = host.outputs[0].size // (gp.group.outputs[0].cat or (1,))[0]
            check(em, case, lambda f: f | WIDE, start=n * ((1 << 33) // n + 1))
        ran.add(host.key)
    assert ran == set(em.kernels), f"kernels never run: {set(em.kernels) - ran}"
    assert vectorized == {k for k, ks in em.kernels.items() if vector_width(ks) > 1}


@pytest.fixture(scope="module")
def op_groups(tmp_path_factory):
    """The op-test groups of tests/opcases.py, emulated (one translation unit per CPU)."""
    out = tmp_path_factory.mktemp("ops")
    (out / "ops.yaml").write_text(spec_text())
    plan = spec.load_plan([str(out / "ops.yaml")])
    parts = [plan.groups[i::os.cpu_count() or 1] for i in range(os.cpu_count() or 1)]

    def compile_part(i: int) -> list[EmulatedGroup]:
        kernels = {gp.group.name: kernel_sources(gp.group, gp.variants) for gp in parts[i]}
        flat = [k for ks in kernels.values() for k in ks]
        text = '#include "emu.h"\n' + render_module(flat) + launchers([k.symbol for k in flat])
        lib = compile_source(text, str(out), f"ops{i}")
        return [EmulatedGroup(gp.group, kernels[gp.group.name], lib) for gp in parts[i]]

    with ThreadPoolExecutor(len(parts)) as pool:
        return plan, {em.group.name: em for ems in pool.map(compile_part, range(len(parts)))
                      for em in ems}


@pytest.mark.parametrize("name", list(op_bodies()))
def test_every_op_matches_reference_for_every_dtype(op_groups, name):
    """Special values (NaN, infinities, signed zeros, limits, shift counts) and random values,
    with the tolerances of tests/test_ops_cpu.py."""
    plan, groups = op_groups
    gp = next(g for g in plan.groups if g.group.name == f"op_{name}")
    em = groups[gp.group.name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for v in gp.variants:
        case = Case(v.key, v.dtypes, op_arrays(gp.group, v.dtypes, rng), 99, 5)
        for flags in (None, lambda f: (f & ~VECTOR) | WIDE):
            check(em, case, flags, magnitude=relative_to_magnitude(name))


def test_layout_corner_cases(tmp_path):
    """Inner-broadcast operands on the vector path, and outer strides that forbid it."""
    decl = [(n, "tensor", None) for n in ("x", "s", "t")]
    group = syntax.parse_group("layouts", decl, [("y", None)], "y = x * s + t", syntax.SourceMap())
    types = (dt.float32, dt.float16, dt.uint8, dt.float64)
    kernels = [KernelSource(ir.instantiate(group, dict.fromkeys("xst", d)),
                            format_key("layouts", [(d, x), (d, "sb"), (d, "bc")]))
               for d in types for x in ("cc", "sc")]
    kernels.append(KernelSource(ir.instantiate(group, dict.fromkeys("xst", dt.float16)),
                                format_key("layouts", [(dt.float16, "")] * 3)))
    em = emulate(group, kernels, str(tmp_path))
    rng = np.random.default_rng(11)
    scalars = Case("rank 0", (dt.float16,) * 3,
                   [np.array(random_array(dt.float16, (), rng)) for _ in "xst"])
    assert check(em, scalars).key == "layouts(f16:,f16:,f16:)"
    check(em, scalars, lambda f: f | WIDE)
    for d in types:
        V = 16 // d.itemsize
        for width in (16, 17, 16 + V, 20):
            x = random_array(d, (5, width), rng)[:, :16]
            case = Case(f"{d.name} x[:, :16] of width {width}", (d,) * 3,
                        [x, random_array(d, (5, 1), rng), random_array(d, (16,), rng)])
            host = check(em, case)
            assert host.key.startswith(f"layouts({d.short}:{'cc' if width == 16 else 'sc'},")
            assert bool(host.flags & VECTOR) == (width % V == 0), case.label
            for flags in (lambda f: f | WIDE, lambda f: f & ~VECTOR):
                check(em, case, flags)
            check(em, case, lambda f: f | WIDE, start=80 << 28)


def test_scalar_inputs_of_every_dtype(tmp_path):
    """Scalars arrive as meta words (float16/bfloat16 as float32 bits, rounded in the kernel)."""
    names = [f"s_{d.short}" for d in dt.ALL]
    decl = [("x", "tensor", None)] + [(n, "scalar", d) for n, d in zip(names, dt.ALL)]
    body = "\n".join(f"y_{n} = x + float64({n})" for n in names)
    group = syntax.parse_group("scalars", decl, [(f"y_{n}", None) for n in names], body,
                           syntax.SourceMap())
    kernels = [KernelSource(ir.instantiate(group, {"x": dt.float64}), "scalars(f64:c)")]
    em = emulate(group, kernels, str(tmp_path))
    values = [True, -100, -30000, -2**31, -2**63, 255, 1.0009765625 + 2**-12, 1.00390625 + 2**-9,
              0.1, 1e300]
    case = Case("scalars", (dt.float64,), [np.arange(5, dtype=np.float64), *values])
    check(em, case, magnitude=False)


def test_float32_pow_is_within_one_ulp_of_float64_pow(tmp_path):
    """The CUDA float32 pow (no FP64: codegen/cuda.py fb_pow) against numpy's float64 pow rounded
    to float32: at most 1 ulp for normal results, one subnormal spacing below, specials exact;
    over random magnitudes, bases near 1 with large exponents, integer exponents of negative
    bases and random bit patterns."""
    group = syntax.parse_group("powf", [("a", "tensor", None), ("b", "tensor", None)],
                               [("y", None)], "y = a ** b", syntax.SourceMap())
    ks = KernelSource(ir.instantiate(group, {"a": dt.float32, "b": dt.float32}),
                      "powf(f32:c,f32:c)")
    em = emulate(group, [ks], str(tmp_path))
    rng = np.random.default_rng(20)
    n = 50_000
    bits = [rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
            for _ in "ab"]
    a = np.concatenate([np.exp(rng.uniform(-88, 88, n)), 1 + rng.uniform(-1e-3, 1e-3, n),
                        rng.uniform(-10, 10, n)]).astype(np.float32)
    b = np.concatenate([rng.uniform(-20, 20, n), rng.uniform(-1e5, 1e5, n),
                        np.round(rng.uniform(-40, 40, n))]).astype(np.float32)
    specials = np.array(FLOAT_SPECIALS + [16777216.0, 16777217.0, -16777215.0, 1e-45],
                        np.float32)
    a = np.concatenate([a, bits[0], np.repeat(specials, len(specials))])
    b = np.concatenate([b, bits[1], np.tile(specials, len(specials))])
    got = em([a, b]).outputs[0]
    with np.errstate(all="ignore"):
        want = np.power(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)
    exact = ~np.isfinite(want) | ~np.isfinite(got)
    np.testing.assert_array_equal(got[exact], want[exact])
    g, w = got[~exact].astype(np.float64), want[~exact].astype(np.float64)
    spacing = np.maximum(np.spacing(np.abs(want[~exact])).astype(np.float64), 2.0 ** -149)
    err = np.abs(g - w) / spacing
    worst = int(np.argmax(err))
    assert err[worst] <= 1, (a[~exact][worst], b[~exact][worst], g[worst], w[worst])
    assert (np.signbit(g) == np.signbit(w)).all()


def test_float32_sin_cos_tan_are_within_one_ulp_of_float64_libm(tmp_path):
    """The CUDA float32 sin/cos/tan (no FP64, no local memory: codegen/cuda.py TRIG) against
    numpy's float64 ones: under 1 ulp of the exact value over moderate arguments, both sides of
    the switch to Payne-Hanek at 105615, huge magnitudes, the floats nearest to j pi/2 (where
    the reduction cancels), random bit patterns (subnormals among them); signed zeros kept,
    NaN for inf and NaN."""
    group = syntax.parse_group("trig", [("a", "tensor", None)], [("s", None), ("c", None),
                               ("t", None)], "s = sin(a)\nc = cos(a)\nt = tan(a)",
                               syntax.SourceMap())
    em = emulate(group, [KernelSource(ir.instantiate(group, {"a": dt.float32}), "trig(f32:c)")],
                 str(tmp_path))
    rng = np.random.default_rng(21)
    n = 40_000
    near = (np.arange(1, 70_000) * (np.pi / 2)).astype(np.float32)
    near = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                           np.nextafter(near, np.float32(0))])
    x = np.concatenate([rng.uniform(-4, 4, n), rng.uniform(-105615, 105615, n),
                        105615 * (1 + rng.uniform(-1e-3, 1e-3, n)),
                        np.exp(rng.uniform(-100, 88.7, n)) * rng.choice([-1, 1], n)])
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x.astype(np.float32), bits, near, -near,
                        np.float32(FLOAT_SPECIALS + [1e-45, 2.44140625e-04, 3.4e38, -3.4e38])])
    finite = np.isfinite(x)
    for got, f in zip(em([x]).outputs, (np.sin, np.cos, np.tan)):
        assert np.isnan(got[~finite]).all()
        want = f(x[finite].astype(np.float64))
        spacing = np.maximum(np.spacing(np.abs(want.astype(np.float32))), 2.0 ** -149)
        err = np.abs(got[finite] - want) / spacing
        worst = int(np.argmax(err))
        assert err[worst] < 1, (f.__name__, x[finite][worst], got[finite][worst], want[worst])
        assert (np.signbit(got[finite]) == np.signbit(want)).all(), f.__name__


def test_float64_sin_cos_tan_are_within_one_ulp_of_mpmath(tmp_path):
    """The CUDA float64 sin/cos/tan (no local memory: codegen/cuda.py TRIG) against mpmath at 40
    digits: under 1 ulp over moderate arguments, both sides of the switch to Payne-Hanek at
    2^30, huge magnitudes, the doubles nearest to j pi/2 and the worst case of the reduction
    (6381956970095103 2^797), random bit patterns (subnormals among them); signed zeros kept,
    NaN for inf and NaN."""
    mpmath = pytest.importorskip("mpmath")
    group = syntax.parse_group("trig", [("a", "tensor", None)], [("s", None), ("c", None),
                               ("t", None)], "s = sin(a)\nc = cos(a)\nt = tan(a)",
                               syntax.SourceMap())
    em = emulate(group, [KernelSource(ir.instantiate(group, {"a": dt.float64}), "trig(f64:c)")],
                 str(tmp_path))
    rng = np.random.default_rng(22)
    n = 1500
    near = np.concatenate([np.arange(1, 400) * (np.pi / 2),
                           np.float64(rng.integers(1, 1 << 40, 400)) * (np.pi / 2)])
    near = np.concatenate([near, np.nextafter(near, np.inf), np.nextafter(near, 0)])
    x = np.concatenate([rng.uniform(-4, 4, n), rng.uniform(-2.0 ** 30, 2.0 ** 30, n),
                        2.0 ** 30 * (1 + rng.uniform(-1e-6, 1e-6, n)),
                        np.exp(rng.uniform(-40, 709, n)) * rng.choice([-1, 1], n),
                        rng.integers(0, 1 << 64, n, dtype=np.uint64).view(np.float64),
                        near, -near, np.float64(FLOAT_SPECIALS + [
                            5e-324, 1.4901161193847656e-08, 7.450580596923828e-09, 1.7e308,
                            -1.7e308, 6381956970095103 * 2.0 ** 797])])
    finite = np.isfinite(x)
    mpmath.mp.dps = 40
    for got, f in zip(em([x]).outputs, (mpmath.sin, mpmath.cos, mpmath.tan)):
        assert np.isnan(got[~finite]).all()
        want = [f(mpmath.mpf(float(v))) for v in x[finite]]
        near_want = np.array([float(w) for w in want])   # +-0 at +-0 (mpmath has no -0)
        near_want = np.where(near_want == 0, np.copysign(0.0, x[finite]), near_want)
        spacing = np.maximum(np.spacing(np.abs(near_want)), 2.0 ** -1074)
        err = np.array([float(abs(mpmath.mpf(float(g)) - w)) for g, w in zip(got[finite], want)])
        err /= spacing
        worst = int(np.argmax(err))
        assert err[worst] < 1, (f.__name__, x[finite][worst], got[finite][worst], want[worst])
        assert (np.signbit(got[finite]) == np.signbit(near_want)).all(), f.__name__


RAND_BODY = "y = rand_like(x)\nz = rand_like(float64(x))"


@pytest.mark.parametrize("d", dt.FLOATS, ids=lambda d: d.name)
def test_random_values_are_bit_identical_to_the_reference(tmp_path, d):
    group = syntax.parse_group("rand_probe", [("x", "tensor", None)], [("y", None), ("z", None)],
                           RAND_BODY, syntax.SourceMap())
    keys = [format_key("rand_probe", [(d, "c")]), format_key("rand_probe", [(d, "sc")])]
    kernels = [KernelSource(ir.instantiate(group, {"x": d}), k) for k in keys]
    em = emulate(group, kernels, str(tmp_path))
    rng = np.random.default_rng(5)
    for shape, view in (((1000,), None), ((1024,), None), ((7, 64), lambda a: a[:, :32])):
        x = np.zeros(shape, d.numpy)
        x = view(x) if view else x
        seed = int(rng.integers(1 << 32, 1 << 64, dtype=np.uint64))
        offset = int(rng.integers(1 << 40))
        for flags in (None, lambda f: f | WIDE):
            launch = em([x], seed, offset, flags)
            want = reference.evaluate(ir.instantiate(group, {"x": d}, expand=False), [x], [], seed,
                                      offset)
            for name, got in zip("yz", launch.outputs):
                w = want.outputs[name]
                np.testing.assert_array_equal(got.view(f"u{got.itemsize}"),
                                              w.view(f"u{w.itemsize}"), err_msg=f"{name} {shape}")


PROBES = r"""
extern "C" void probe_philox(const unsigned long long *index, int n, unsigned long long seed,
                             unsigned long long offset, unsigned *out) {
  for (int i = 0; i < n; ++i) fb_philox(out + 4 * i, index[i], seed, offset);
}
extern "C" void probe_to_f16(const float *x, unsigned short *y, int n) {
  for (int i = 0; i < n; ++i) y[i] = fb_f32_to_f16(x[i]);
}
extern "C" void probe_to_bf16(const float *x, unsigned short *y, int n) {
  for (int i = 0; i < n; ++i) y[i] = fb_f32_to_bf16(x[i]);
}
extern "C" void probe_from_f16(const unsigned short *x, float *y, int n) {
  for (int i = 0; i < n; ++i) y[i] = fb_f16_to_f32(x[i]);
}
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    text = '#include "emu.h"\n' + render_module([]) + PROBES
    lib = compile_source(text, str(tmp_path_factory.mktemp("probes")), "probes")
    p, n = ctypes.c_void_p, ctypes.c_int
    lib.probe_philox.argtypes = [p, n, ctypes.c_ulonglong, ctypes.c_ulonglong, p]
    for name in ("probe_to_f16", "probe_to_bf16", "probe_from_f16"):
        getattr(lib, name).argtypes = [p, p, n]
    return lib


def test_philox_matches_the_reference_on_high_counter_and_key_words(probes):
    index = np.array([0, 1, 2**32 - 1, 2**32, 2**40 + 7, 2**63, 2**64 - 1], np.uint64)
    out = np.empty((len(index), 4), np.uint32)
    for seed, offset in ((0, 0), (2**64 - 1, 2**64 - 1), (0x123456789ABCDEF0, 2**33 + 5)):
        probes.probe_philox(index.ctypes.data, len(index), seed, offset, out.ctypes.data)
        want = np.stack(reference.philox_words(index, seed, offset), axis=1)
        np.testing.assert_array_equal(out, want)


def _convert(fn, x: np.ndarray, out_dtype) -> np.ndarray:
    y = np.empty(x.shape, out_dtype)
    fn(x.ctypes.data, y.ctypes.data, len(x))
    return y


def _float32_samples() -> np.ndarray:
    rng = np.random.default_rng(3)
    halves = np.arange(1 << 16, dtype=np.uint16)
    f16 = halves.view(np.float16).astype(np.float32).view(np.uint32).astype(np.int64)
    bf16 = halves.astype(np.int64) << 16
    near = np.concatenate([f16, bf16])
    near = np.concatenate([near + k for k in (-1, 0, 1)] +
                          [f16 + (1 << 12), f16 + (1 << 12) - 1, bf16 + (1 << 15)])  # midpoints
    bits = np.concatenate([near & 0xFFFFFFFF, rng.integers(0, 1 << 32, 1 << 18)])
    return bits.astype(np.uint32).view(np.float32)


def test_float32_to_float16_and_bfloat16_round_like_the_cpu_backend(probes):
    x = _float32_samples()
    bits = x.view(np.uint32)
    nan = np.isnan(x)
    for fn, storage, nan_bits in (
            (probes.probe_to_f16, np.float16,
             ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)),
            (probes.probe_to_bf16, ml_dtypes.bfloat16, (bits >> 16) | 0x40)):
        got = _convert(fn, x, np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(storage).view(np.uint16)
        want = np.where(nan, nan_bits.astype(np.uint16), want)
        np.testing.assert_array_equal(got, want, err_msg=storage.__name__)


def test_float16_to_float32_is_exact_for_every_value(probes):
    h = np.arange(1 << 16, dtype=np.uint16)
    got = _convert(probes.probe_from_f16, h, np.float32).view(np.uint32)
    want = h.view(np.float16).astype(np.float32).view(np.uint32)
    nan = (h & 0x7FFF) > 0x7C00
    hu = h.astype(np.uint32)
    nan_bits = ((hu & 0x8000) << 16) | 0x7F800000 | ((hu & 0x3FF) << 13)
    np.testing.assert_array_equal(got, np.where(nan, nan_bits, want))


@pytest.fixture(scope="module")
def fake_device(emulated, tmp_path_factory):
    """The examples bundle for sm_90 with cupy replaced by `fake_cupy` over the emulation."""
    plan = spec.load_plan([SPECS], targets=["cuda:sm_90"])
    bundle = runtime.load(build.build(plan, str(tmp_path_factory.mktemp("fake")),
                                      progress=False).path)
    libs = {ks.symbol: em.lib for em in emulated.values() for ks in em.kernels.values()}
    return bundle, fake_cupy(libs)


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_runtime_call_path_on_the_emulated_device(fake_device, monkeypatch, gp):
    bundle, cp = fake_device
    monkeypatch.setattr(runtime_cuda, "_cupy", lambda: cp)
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()) + 1)
    has_strided = any(all(set(lay) == {"s"} for _, lay in parse_key(v.key)[1]) for v in gp.variants)
    for case in example_cases(gp, rng, has_strided):
        args = [FakeArray(a) if isinstance(a, np.ndarray) else a for a in case.args]
        kw = {"seed": case.seed, "offset": case.offset} if gp.group.has_random else {}
        got = bundle[gp.group.name](*args, **kw)
        assert bundle[gp.group.name].key(*args) == bundle[gp.group.name].key(*case.args)
        check_outputs(gp, case, got if isinstance(got, tuple) else (got,))
    assert cp.launched


def test_runtime_in_place_update_on_the_emulated_device(fake_device, monkeypatch):
    bundle, cp = fake_device
    monkeypatch.setattr(runtime_cuda, "_cupy", lambda: cp)
    (p, g, m, v), scalars, want = adam_case(bundle, 1001)
    dp, dg, dm, dv = (FakeArray(a.copy()) for a in (p, g, m, v))
    result = bundle.adam(dp, dg, dm, dv, *scalars, out=(dp, dm, dv))
    assert result[0] is dp and result[1] is dm and result[2] is dv
    for got, name in zip((dp, dm, dv), ("param_out", "exp_avg_out", "exp_avg_sq_out")):
        assert reference.compare(got.get(), want.outputs[name], want.magnitude[name]) is None
    buffer = np.zeros(1002, np.float32)
    shifted = FakeArray(buffer[1:])
    with pytest.raises(ArgumentError, match="out= for 'param_out' overlaps input 'grad'"):
        bundle.adam(dp, FakeArray(buffer[:1001]), dm, dv, *scalars, out=(shifted, dm, dv))
    with pytest.raises(ArgumentError, match="out= arrays overlap each other"):
        bundle.adam(dp, dg, dm, dv, *scalars, out=(dp, FakeArray(dp.host), dv))
    with pytest.raises(ArgumentError, match="must be float32.1001."):
        bundle.adam(dp, dg, dm, dv, *scalars, out=(FakeArray(np.empty(1001)), dm, dv))


# ---------------------------------------------------------------- the emulator itself ----------

SYNC_KERNELS = r"""
#include "emu.h"
struct args { const float* x; float* out; long long n, a, b; };

// Sum of each block's row of n: per-thread partials, a warp tree by xor shuffles, the warps'
// sums through shared memory, a second tree by down shuffles, broadcast by __shfl_sync and by
// shared memory; every thread stores what it got.
__global__ void block_sum(const args p) {
  FB_SHARED(float, partial, 32);
  FB_SHARED(float, total, 1);
  const unsigned t = threadIdx.x, lane = t & 31, warp = t / 32, warps = blockDim.x / 32;
  const float* row = p.x + (long long)blockIdx.x * p.n;
  float s = 0.0f;
  for (long long i = t; i < p.n; i += blockDim.x) s += row[i];
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  s = lane < warps ? partial[lane] : 0.0f;
  for (int o = 16; o; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  s = __shfl_sync(0xffffffffu, s, 0);
  if (t == 0) total[0] = s;
  __syncthreads();
  float* out = p.out + 2 * ((long long)blockIdx.x * blockDim.x + t);
  out[0] = s;
  out[1] = total[0];
}

// out[t] = the value thread t gets from shuffle kind p.a (0 sync, 1 xor, 2 down, 3 up) with
// lane argument p.b and width p.n, of the 8-byte values t * 2^40 + blockIdx.x; mask of the warp.
__global__ void shuffles(const args p) {
  const unsigned t = threadIdx.x, lanes = blockDim.x - t / 32 * 32;
  const unsigned mask = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1;
  const long long v = ((long long)t << 40) + blockIdx.x;
  const int w = (int)p.n, k = (int)p.b;
  long long r = p.a == 0 ? __shfl_sync(mask, v, k, w) : p.a == 1 ? __shfl_xor_sync(mask, v, k, w)
              : p.a == 2 ? __shfl_down_sync(mask, v, k, w) : __shfl_up_sync(mask, v, k, w);
  __syncwarp(mask);
  ((long long*)p.out)[(long long)blockIdx.x * blockDim.x + t] = r;
}

// Thread 5 never writes its shared slot, which thread 4 reads.
__global__ void unwritten(const args p) {
  FB_SHARED(float, buf, 128);
  const unsigned t = threadIdx.x;
  if (t != 5) buf[t] = (float)(t + 1000 * blockIdx.x);
  __syncthreads();
  p.out[blockIdx.x * blockDim.x + t] = buf[(t + 1) % blockDim.x];
}

__global__ void early_exit(const args p) {        // threads >= 64 leave before the barrier
  if (threadIdx.x >= 64) return;
  __syncthreads();
}
__global__ void exit_in_shuffle(const args p) {   // lane 3 of warp 1 leaves before a shuffle
  if (threadIdx.x == 35) return;
  p.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void mixed_barriers(const args p) {    // lane 0 at __syncthreads, lanes 1-31 shuffle
  if (threadIdx.x == 0) __syncthreads();
  else p.out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}
__global__ void partial_mask(const args p) {
  p.out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

#define LAUNCHER(k) extern "C" int emu_##k(const long long* w, unsigned grid, unsigned block) \
  { return fb_emulate(k, w, grid, block); }
LAUNCHER(block_sum) LAUNCHER(shuffles) LAUNCHER(unwritten) LAUNCHER(early_exit)
LAUNCHER(exit_in_shuffle) LAUNCHER(mixed_barriers) LAUNCHER(partial_mask)
"""


class SyncKernels:
    """SYNC_KERNELS compiled with g++ against emu.h, launched on numpy arrays."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.fb_emu_error.restype = ctypes.c_char_p

    def __call__(self, name: str, grid: int, block: int, x=None, out=None, n=0, a=0, b=0):
        words = np.array([0 if x is None else x.ctypes.data, 0 if out is None else out.ctypes.data,
                          n, a, b], np.int64)
        fn = getattr(self.lib, f"emu_{name}")
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint], ctypes.c_int
        return fn(words.ctypes.data, grid, block), self.lib.fb_emu_error().decode()

    def block_sum(self, x: np.ndarray, block: int) -> np.ndarray:
        out = np.full((x.shape[0], block, 2), -1.0, np.float32)
        rc, error = self("block_sum", x.shape[0], block, x, out, x.shape[1])
        assert rc == 0, error
        return out


@pytest.fixture(scope="module", params=["switch", "ucontext"])
def sync_kernels(request, tmp_path_factory) -> SyncKernels:
    """Both context switches: the x86-64 stack switch and the portable ucontext one."""
    flags = ("-DFB_EMU_UCONTEXT",) if request.param == "ucontext" else ()
    out = str(tmp_path_factory.mktemp(f"sync_{request.param}"))
    return SyncKernels(compile_source(SYNC_KERNELS, out, f"sync_{request.param}", flags))


@pytest.mark.parametrize("block", [32, 128, 1024])
def test_block_reduction_with_shared_memory_and_shuffles(sync_kernels, block):
    rng = np.random.default_rng(block)
    for n in (1, 7, block, 5 * block + 3):
        x = rng.standard_normal((3, n)).astype(np.float32)
        out = sync_kernels.block_sum(x, block)
        want = x.astype(np.float64).sum(axis=1)
        # float32 partial sums: |error| <= eps32 * (n / block + log2(block)) * sum |x|
        bound = 2.0 ** -24 * (n / block + np.log2(block) + 1) * np.abs(x).astype(np.float64).sum(1)
        for r in range(3):
            assert np.all(out[r] == out[r, 0, 0]), "every thread sees the same sum, bit for bit"
            assert abs(out[r, 0, 0] - want[r]) <= bound[r], (n, r)


def _shuffle_model(kind: int, k: int, width: int, block: int) -> np.ndarray:
    """CUDA's documented shuffle semantics, lane by lane."""
    got = []
    for t in range(block):
        lane, warp_base = t % 32, t - t % 32
        group = lane - lane % width
        if kind == 0:
            src = group + k % width
        elif kind == 1:
            src = lane ^ k
            src = lane if src - src % width > group else src
        elif kind == 2:
            src = lane + k if lane % width + k < width else lane
        else:
            src = lane - k if lane % width >= k else lane
        got.append(warp_base + src)
    return np.array(got, np.int64)


@pytest.mark.parametrize("kind", range(4), ids=["sync", "xor", "down", "up"])
def test_shuffles_follow_cuda_semantics(sync_kernels, kind):
    for block, width, k in ((64, 32, 1), (64, 32, 17), (64, 8, 3), (64, 8, 13), (48, 16, 5),
                            (64, 1, 0), (64, 32, 31)):
        out = np.zeros((2, block), np.int64)
        rc, error = sync_kernels("shuffles", 2, block, out=out, n=width, a=kind, b=k)
        assert rc == 0, error
        src = _shuffle_model(kind, k, width, block)
        np.testing.assert_array_equal(out, (src[None, :] << 40) + np.arange(2)[:, None],
                                      err_msg=f"block {block} width {width} lane arg {k}")


def test_never_written_shared_memory_reads_as_nan_in_every_block(sync_kernels):
    out = np.zeros((2, 128), np.float32)
    rc, error = sync_kernels("unwritten", 2, 128, out=out)
    assert rc == 0, error
    want = (np.arange(1, 129) % 128 + 1000 * np.arange(2)[:, None]).astype(np.float32)
    want[:, 4] = np.nan
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name, block, message", [
    ("shuffles", 32, "block 0 thread 0: __shfl_sync with width 3: not a power of two in [1, 32]"),
    ("early_exit", 128, "deadlock in block 0; threads 0-63 wait at __syncthreads; threads "
                        "64-127 exited"),
    ("exit_in_shuffle", 64, "deadlock in block 0; threads 32-34, 36-63 wait at a warp barrier "
                            "(__syncwarp or a shuffle); threads 0-31, 35 exited"),
    ("mixed_barriers", 32, "deadlock in block 0; threads 0 wait at __syncthreads; threads 1-31 "
                           "wait at a warp barrier"),
    ("partial_mask", 32, "block 0 thread 0: __shfl_xor_sync with mask 0x0000ffff: only the mask "
                         "of every lane of the warp (0xffffffff) is emulated"),
    ("block_sum", 2048, "cannot emulate blocks of 2048 threads"),
])
def test_deadlocks_and_unsupported_uses_fail_the_launch(sync_kernels, name, block, message):
    out = np.zeros(block * 4, np.float32)
    rc, error = sync_kernels(name, 3, block, np.zeros(block, np.float32), out, 3)
    assert rc == 1 and error.startswith(message), error
    x = np.ones((1, 10), np.float32)         # the next launch runs normally
    assert np.all(sync_kernels.block_sum(x, 64) == 10)


def test_emulation_runs_on_several_threads_at_once(sync_kernels):
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((8, 300)).astype(np.float32) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: sync_kernels.block_sum(x, 128), xs))
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, sync_kernels.block_sum(x, 128))
        np.testing.assert_allclose(out[:, 0, 0], x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)
