"""Every example kernel, every op and the row reductions of tests/test_cuda_reductions.py on a
CUDA device, through the runtime, against the reference evaluator (and the reductions' oracles):
cupy arrays and, where torch is importable, torch CUDA tensors (bfloat16 included).
Random values and float16/bfloat16 roundings are checked bit for bit; calls past 2**31 elements,
in-place updates, streams, PTX loading and the errors of the CUDA path are covered too.
Skipped without a CUDA device."""
from __future__ import annotations

import dataclasses
import zlib

import ml_dtypes
import numpy as np
import pytest

from fusebuild import build, dtypes as dt, ir, syntax, reference, runtime, spec
from fusebuild.argspec import parse_key
from fusebuild.errors import ArgumentError, KernelNotFound
from fusebuild.runtime.cuda import max_ptx_isa
from fusebuild.toolchain import nvrtc
from conftest import SPECS, adam_case
from cuda_emulation.cases import Case, example_cases
from opcases import op_arrays, op_bodies, spec_text
from test_ops_cpu import relative_to_magnitude
import test_cuda_reductions as reductions_spec


def _device_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device: skip
        return 0


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_device_count() == 0, reason="needs a CUDA device and cupy")]
PLAN = spec.load_plan([SPECS])
BF16 = np.dtype(ml_dtypes.bfloat16)
PROBES = """fusebuild: 1
groups:
  - name: rand_probe
    inputs: {x: tensor}
    outputs: [y, z]
    body: |
      y = rand_like(x)
      z = rand_like(float64(x))
    matrix: {dtype: [float16, bfloat16, float32, float64], shapes: [{x: [B, C]}], strided: true}
  - name: narrow
    inputs: {x: tensor(float32)}
    outputs: {h: float16, b: bfloat16}
    body: |
      h = x
      b = x
    matrix: {shapes: [{x: [N]}]}
  - name: widen
    inputs: {h: tensor}
    outputs: {y: float32}
    body: y = h
    matrix: {dtype: [float16, bfloat16], shapes: [{h: [N]}]}
"""


@pytest.fixture(scope="module")
def cp():
    import cupy
    return cupy


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def arch(cp) -> str:
    arch = f"sm_{cp.cuda.Device().compute_capability}"
    if arch not in nvrtc.supported_archs():
        pytest.skip(f"NVRTC {nvrtc.versions()['nvrtc']} cannot compile for this device ({arch})")
    return arch


def build_for(plan: spec.Plan, targets: tuple[str, ...], out) -> runtime.Bundle:
    plan = dataclasses.replace(plan, groups=tuple(dataclasses.replace(gp, targets=targets)
                                                  for gp in plan.groups))
    return runtime.load(build.build(plan, str(out), progress=False).path)


@pytest.fixture(scope="module")
def examples(arch, tmp_path_factory):
    return build_for(PLAN, (f"cuda:{arch}",), tmp_path_factory.mktemp("gpu_examples"))


@pytest.fixture(scope="module")
def probes(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_probes")
    (d / "probes.yaml").write_text(PROBES)
    return build_for(spec.load_plan([str(d / "probes.yaml")]), (f"cuda:{arch}",), d / "out")


# ---------------------------------------------------------------- host <-> device --------------

def upload(a, xp: str):
    """A device copy of numpy array `a` with the same strides and the same offset from its
    allocation (so views stay strided and misaligned views stay misaligned)."""
    if not isinstance(a, np.ndarray):
        return a
    owner = a if a.base is None else a.base
    assert isinstance(owner, np.ndarray) and owner.flags.c_contiguous
    offset = a.ctypes.data - owner.ctypes.data
    if xp == "cupy":
        import cupy
        d = cupy.asarray(owner.reshape(-1).view(np.uint8))
        return cupy.ndarray(a.shape, a.dtype, d.data + offset, a.strides)
    import torch
    raw = torch.from_numpy(owner.reshape(-1).view(np.uint8).copy()).cuda()
    t = raw.view(torch_dtype(a.dtype))
    return torch.as_strided(t, a.shape, [s // a.itemsize for s in a.strides],
                            offset // a.itemsize)


def torch_dtype(d: np.dtype):
    import torch
    return torch.bfloat16 if d == BF16 else getattr(torch, np.dtype(d).name)


def download(x, want: np.dtype) -> np.ndarray:
    """A device result as numpy (cupy returns bfloat16 as its uint16 bits)."""
    if type(x).__module__.startswith("cupy"):
        host = x.get()
        return host.view(BF16) if want == BF16 else host
    if want == BF16:
        import torch
        return x.view(torch.int16).cpu().numpy().view(BF16)
    return x.cpu().numpy()


def run_and_check(bundle, group: syntax.Group, case, xp: str, magnitude: bool = True, n_row: int = 0,
                  oracle: list | None = None):
    """Run `case` on the device and compare with the reference (and `oracle`, per output, with
    the same tolerances); a reduction's outputs with the row term of rows of `n_row`."""
    args = [upload(a, xp) for a in case.args]
    kw = {"seed": case.seed, "offset": case.offset} if group.has_random else {}
    got = bundle[group.name](*args, **kw)
    got = got if isinstance(got, tuple) else (got,)
    if xp == "cupy":     # a repeated call runs by its memoized launch plan: the same bytes
        again = bundle[group.name](*args, **kw)
        for x, y in zip(got, again if isinstance(again, tuple) else (again,)):
            assert x.get().tobytes() == y.get().tobytes(), f"{case.label}: repeated call differs"
    tensors = [a for a, p in zip(case.args, group.inputs) if p.kind == "tensor"]
    scalars = [a for a, p in zip(case.args, group.inputs) if p.kind == "scalar"]
    dtypes = {i.name: d for i, d in zip(group.tensor_inputs, case.dtypes)}
    want = reference.evaluate(ir.instantiate(group, dtypes, expand=False), tensors, scalars,
                              case.seed, case.offset)
    for o, value in zip(group.outputs, got):
        w = want.outputs[o.name]
        if xp == "torch":
            import torch
            assert isinstance(value, torch.Tensor) and value.is_cuda
        host = download(value, w.dtype)
        bad = reference.compare(host, w, want.magnitude[o.name] if magnitude else None,
                                n_row=n_row)
        assert bad is None, f"{case.label} ({xp}) output {o.name}: {bad.message}"
        if oracle is not None:
            alt = np.asarray(oracle[group.outputs.index(o)]).astype(w.dtype)
            bad = reference.compare(host, alt, want.magnitude[o.name], n_row=n_row)
            assert bad is None, f"{case.label} ({xp}) output {o.name} vs oracle: {bad.message}"
    return got


def backends(case) -> list[str]:
    """cupy cannot hold bfloat16: those cases run through torch only."""
    import importlib.util
    xps = [] if any(d == dt.bfloat16 for d in case.dtypes) else ["cupy"]
    return xps + (["torch"] if importlib.util.find_spec("torch") else [])


# ---------------------------------------------------------------- numerics ---------------------

@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_every_example_kernel_on_the_device(examples, gp):
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    has_strided = any(all(set(lay) == {"s"} for _, lay in parse_key(v.key)[1]) for v in gp.variants)
    for case in example_cases(gp, rng, has_strided):
        for xp in backends(case):
            run_and_check(examples, gp.group, case, xp)


@pytest.fixture(scope="module")
def op_bundle(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_ops")
    (d / "ops.yaml").write_text(spec_text())
    plan = spec.load_plan([str(d / "ops.yaml")])
    return plan, build_for(plan, (f"cuda:{arch}",), d / "out")


@pytest.mark.parametrize("name", list(op_bodies()))
def test_every_op_on_the_device(op_bundle, name):
    """The CUDA math library (not the host's libm) within the CPU tests' tolerances."""
    plan, bundle = op_bundle
    gp = next(g for g in plan.groups if g.group.name == f"op_{name}")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for v in gp.variants:
        case = Case(v.key, v.dtypes, op_arrays(gp.group, v.dtypes, rng), 99, 5)
        for xp in backends(case)[:1]:
            # gelu: libdevice's erfc (5 ULP in float64) and one rounding exceed 4 ULP of the result
            run_and_check(bundle, gp.group, case, xp,
                          magnitude=relative_to_magnitude(name) or name == "gelu")


@pytest.fixture(scope="module")
def reductions(arch, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_reductions")
    (d / "reductions.yaml").write_text(reductions_spec.SPEC)
    plan = spec.load_plan([str(d / "reductions.yaml")])
    return plan, build_for(plan, (f"cuda:{arch}",), d / "out")


@pytest.mark.parametrize("name", list(reductions_spec.ORACLES))
def test_every_reduction_kernel_on_the_device(reductions, name):
    """Rows of N = 0, 1, odd, > 128 * V and up to 65536 (a warp and a block per row), rows of
    NaN and infinities, contiguous, misaligned and strided rows, against the reference and the
    oracle of tests/test_cuda_reductions.py."""
    plan, bundle = reductions
    gp = next(g for g in plan.groups if g.group.name == name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    strided = any(set("".join(lay for _, lay in parse_key(v.key)[1])) == {"s"}
                  for v in gp.variants)
    hows = ("contiguous", "misaligned") + (("strided rows", "every other") if strided else ())
    seed, offset = (reductions_spec.SEED, reductions_spec.OFFSET) if gp.group.has_random \
        else (0, 0)
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for n in reductions_spec.LENGTHS + (4100, 65536):
            for how in hows if n > 1 else ("contiguous",):
                args = reductions_spec._case(gp, dtypes, n, how, rng)
                case = Case(f"{'/'.join(d.short for d in dtypes)} N={n} {how}", dtypes, args,
                            seed, offset)
                oracle = reductions_spec._oracle(gp, args)
                for xp in backends(case):
                    run_and_check(bundle, gp.group, case, xp, n_row=n, oracle=oracle)


def test_reductions_over_many_rows_match_torch(reductions, torch):
    """Thousands of rows (many blocks in both modes) of softmax and rms_norm on torch CUDA
    tensors against torch in float64: the §8 row term, 4 log2(N) eps(float32) times the row's
    scale (max|x| times max softmax for softmax's shifted exponent, max|y| for rms_norm)."""
    _, bundle = reductions
    for rows, n in ((4099, 256), (3001, 1024), (513, 1032), (97, 65536)):
        x = torch.randn(rows, n, device="cuda")
        w = torch.randn(n, device="cuda")
        term = 4 * max(1.0, np.log2(n)) * 2.0 ** -24
        y, want = bundle.r_softmax(x).double(), torch.softmax(x.double(), -1)
        scale = (1 + x.abs().amax(-1, keepdim=True).double()) * want.amax(-1, keepdim=True)
        assert torch.all((y - want).abs() <= term * scale), (rows, n)
        z = bundle.r_rms_norm(x, w).double()
        want = torch.nn.functional.rms_norm(x.double(), (n,), w.double(), 1e-6)
        assert torch.all((z - want).abs() <= term * want.abs().amax(-1, keepdim=True)), (rows, n)


@pytest.mark.parametrize("d", dt.FLOATS, ids=lambda d: d.name)
def test_random_values_are_bit_identical_to_the_reference(probes, d):
    group = syntax.group_from_json(probes.manifest["groups"]["rand_probe"])
    rng = np.random.default_rng(2)
    xp = "torch" if d == dt.bfloat16 else "cupy"
    if xp == "torch":
        pytest.importorskip("torch")
    for x in (np.zeros((1000, 8), d.numpy), np.zeros((7, 64), d.numpy)[:, :33]):
        seed, offset = int(rng.integers(1 << 32, 1 << 63)), int(rng.integers(1 << 40))
        y, z = probes.rand_probe(upload(x, xp), seed=seed, offset=offset)
        want = reference.evaluate(ir.instantiate(group, {"x": d}, expand=False), [x], [], seed,
                                  offset)
        for got, w in ((y, want.outputs["y"]), (z, want.outputs["z"])):
            got = download(got, w.dtype)
            np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), w.view(f"u{w.itemsize}"))


def test_half_roundings_are_bit_identical_to_the_cpu_backend(probes):
    """cvt.rn on the device: every f16/bf16 tie and its neighbours, random bits, NaN payloads."""
    rng = np.random.default_rng(4)
    halves = np.arange(1 << 16, dtype=np.uint16)
    near = np.concatenate([halves.view(np.float16).astype(np.float32).view(np.uint32),
                           halves.astype(np.uint32) << 16]).astype(np.int64)
    bits = np.concatenate([near + k for k in (-1, 0, 1, 1 << 12, 1 << 15)] +
                          [rng.integers(0, 1 << 32, 1 << 20)]) & 0xFFFFFFFF
    x = bits.astype(np.uint32).view(np.float32)
    u = x.view(np.uint32)
    h, b = probes.narrow(upload(x, "cupy"))
    with np.errstate(over="ignore", invalid="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
        want_b = x.astype(BF16).view(np.uint16)
    nan = np.isnan(x)
    want_h = np.where(nan, ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF), want_h)
    want_b = np.where(nan, (u >> 16) | 0x40, want_b)
    np.testing.assert_array_equal(download(h, np.float16).view(np.uint16), want_h)
    np.testing.assert_array_equal(download(b, BF16).view(np.uint16), want_b)
    all_h = halves.view(np.float16)
    back = download(probes.widen(upload(all_h, "cupy")), np.float32).view(np.uint32)
    want = all_h.astype(np.float32).view(np.uint32)
    hn = (halves & 0x7FFF) > 0x7C00
    hu = halves.astype(np.uint32)
    np.testing.assert_array_equal(back, np.where(hn, ((hu & 0x8000) << 16) | 0x7F800000 |
                                                 ((hu & 0x3FF) << 13), want))


def test_calls_past_2_pow_31_elements(examples, cp):
    """64-bit indexing: a uint8 image of 2**31 + 2**16 pixels, checked at both ends."""
    n_rows, width = (1 << 16) + 2, 1 << 15
    if cp.cuda.Device().mem_info[0] < 4 * n_rows * width:
        pytest.skip("needs about 7 GB of free device memory")
    img = cp.random.randint(0, 256, (n_rows, width), dtype=cp.uint8)
    out, bright = examples.leaky_clip_u8(img, -7)
    group = syntax.group_from_json(examples.manifest["groups"]["leaky_clip_u8"])
    kernel = ir.instantiate(group, {"img": dt.uint8}, expand=False)
    for rows in (slice(0, 3), slice(n_rows - 3, n_rows)):
        want = reference.evaluate(kernel, [img[rows].get()], [-7])
        np.testing.assert_array_equal(out[rows].get(), want.outputs["out"])
        np.testing.assert_array_equal(bright[rows].get(), want.outputs["bright"])
    del img, out, bright


# ---------------------------------------------------------------- runtime behaviour ------------

def test_in_place_update_and_streams(examples, cp):
    (p, g, m, v), scalars, want = adam_case(examples, 4097)
    dp, dg, dm, dv = (cp.asarray(a) for a in (p, g, m, v))
    cp.cuda.Device().synchronize()      # the uploads ran on the null stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        result = examples.adam(dp, dg, dm, dv, *scalars, out=(dp, dm, dv))
    stream.synchronize()
    assert result[0] is dp and result[1] is dm and result[2] is dv
    for got, name in zip((dp, dm, dv), ("param_out", "exp_avg_out", "exp_avg_sq_out")):
        assert reference.compare(got.get(), want.outputs[name], want.magnitude[name]) is None


def test_torch_in_torch_out(examples, torch):
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    y = examples.bias_gelu(x, bias)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.device == x.device
    assert examples.bias_gelu.key(x, bias) == "bias_gelu(bf16:cc,bf16:bc)"
    want = torch.nn.functional.gelu((x.float() + bias.float())).to(torch.bfloat16)
    err = (y.float() - want.float()).abs().max().item()
    assert err <= 2 ** -7 * want.float().abs().max().item()


def test_errors_of_the_cuda_path(examples, cp):
    x, b = cp.ones(16, cp.float32), np.ones(16, np.float32)
    with pytest.raises(ArgumentError, match="are CUDA arrays but b is not"):
        examples.silu_add(x, b)
    with pytest.raises(ArgumentError, match="out= for 'y' must be float32"):
        examples.silu_add(x, x, out=cp.empty(16, cp.float64))
    with pytest.raises(ArgumentError, match="out= for 'y' must be a CUDA array"):
        examples.silu_add(x, x, out=np.empty(16, np.float32))
    with pytest.raises(ArgumentError, match="overlaps input 'x'"):
        big = cp.ones(17, cp.float32)
        examples.silu_add(big[:16], big[:16], out=big[1:])
    with pytest.raises(ArgumentError, match="pass seed="):
        examples.bias_dropout_residual(x, x, x, 0.5)
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            other = cp.ones(16, cp.float32)
        with pytest.raises(ArgumentError, match="different CUDA devices"):
            examples.silu_add(x, other)


def test_arch_absent_from_the_bundle(arch, cp, tmp_path):
    major = int(arch[3:-1])
    other = "cuda:sm_75" if major != 7 else "cuda:sm_80"
    plan = dataclasses.replace(PLAN, groups=tuple(g for g in PLAN.groups
                                                  if g.group.name == "silu_add"))
    bundle = build_for(plan, (other,), tmp_path)
    x = cp.ones(16, cp.float32)
    with pytest.raises(KernelNotFound, match=f"needs cuda:{arch}.*bundle CUDA targets: {other}"):
        bundle.silu_add(x, x)


def test_ptx_loads_where_the_driver_supports_its_isa(arch, cp, tmp_path):
    plan = dataclasses.replace(PLAN, groups=tuple(g for g in PLAN.groups
                                                  if g.group.name == "silu_add"))
    bundle = build_for(plan, (f"cuda:compute_{arch[3:]}",), tmp_path)
    isa = tuple(int(v) for v in bundle.manifest["kernels"][0]["ptx_isa"].split("."))
    x = cp.arange(1000, dtype=cp.float32) / 100
    if isa <= max_ptx_isa(cp.cuda.runtime.driverGetVersion()):
        y = bundle.silu_add(x, x).get()
        xs = x.get().astype(np.float64)
        np.testing.assert_allclose(y, xs / (1 + np.exp(-xs)) + xs, rtol=1e-6)
    else:
        with pytest.raises(KernelNotFound, match="holds PTX ISA .*newer than the driver"):
            bundle.silu_add(x, x)
