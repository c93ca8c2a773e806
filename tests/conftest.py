"""Shared fixtures: bundles built once per session, random inputs, reference checks."""
from __future__ import annotations

import os
import tempfile
import zlib
from typing import Iterator

import numpy as np
import pytest

from fusebuild import build, dtypes as dt, ir, syntax, reference, runtime, spec
from fusebuild.argspec import Dim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")
# Tests (and the CLI processes they start) never touch the user's cache: they share one cache
# per checkout, content-addressed like every fusebuild cache (keys cover fusebuild's code and the
# toolchain), so the capped second pass of the README's test command reuses the first pass's
# modules. Tests of the cache itself use caches of their own.
os.environ["FUSEBUILD_CACHE_DIR"] = os.path.join(ROOT, "build", "test-cache")
os.environ.pop("FUSEBUILD_CACHE_URL", None)     # nor the user's shared cache
# torch.compile's caches do not see a changed backward of a custom op (pytorch#144344): each
# session compiles into a fresh Inductor cache, so a test never runs a stale compiled graph.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusebuild-inductor-")


def pytest_sessionfinish(session, exitstatus):
    """A run in which no test passed is a failure (pytest's 'no tests ran' included)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    """Say which ISA levels ran kernels here, which ran under qemu (test_aarch64_emulated) and
    which were only checked statically."""
    from fusebuild.runtime.cpu import FAMILY_OF, host_family, host_isas
    from fusebuild.targets import CPU_ISAS
    ran = host_isas()
    emulated: dict[str, list[str]] = {}      # level -> SVE vector lengths
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "emulated":
                level, _, bits = value.partition(":")
                emulated.setdefault(level, []).extend([bits] if bits else [])
    static = [i for i in CPU_ISAS if i not in ran and i not in emulated]
    capped = os.environ.get("FUSEBUILD_CPU_ISA")
    family = host_family()
    here = [i for i in static if FAMILY_OF[i] == family]
    foreign = [i for i in static if FAMILY_OF[i] != family]
    reasons = ([f"{', '.join(here)}: {'capped' if capped else 'this host cannot run them'}"]
               if here else []) + ([f"{', '.join(foreign)}: another architecture, not emulated "
                                    "in this run"] if foreign else [])
    terminalreporter.write_line(
        f"fusebuild: CPU kernels ran at {', '.join(ran) or 'no level'}"
        + (f" (capped by FUSEBUILD_CPU_ISA={capped})" if capped else "")
        + ("; under qemu-user at " + ", ".join(
            level + (f" (SVE {', '.join(bits)} bit)" if bits else "")
            for level, bits in emulated.items()) if emulated else "")
        + ("; built and checked statically only (disassembly), not run: " + "; ".join(reasons)
           if static else "; every level ran"))


@pytest.fixture(scope="session")
def examples_bundle(tmp_path_factory):
    """The example specs built for every CPU ISA level of both families, whatever this host
    runs: the loaded bundle runs the best level the host supports, tests inspect the others
    statically, and test_aarch64_emulated runs the aarch64 ones under qemu (one build: the numba
    lowering of a group, half its compile time, serves all six levels)."""
    out = tmp_path_factory.mktemp("examples")
    plan = spec.load_plan([SPECS], targets=["cpu:x86-64", "cpu:aarch64"])
    result = build.build(plan, str(out), progress=False)
    return runtime.load(result.path)


@pytest.fixture(scope="session")
def op_bundles(tmp_path_factory):
    """The op-test groups of tests/opcases.py built for every host ISA level; (plan, one loaded
    Bundle per level). test_ops_cpu checks every op on them, test_cpu_math sweeps the math
    functions' op_<f> kernels."""
    from opcases import spec_text
    return bundles_per_isa(tmp_path_factory, "ops", spec_text())


def bundles_per_isa(tmp_path_factory, name: str, text: str):
    """Build spec `text` for every host ISA level; (plan, {isa: Bundle loaded at that level})."""
    from fusebuild.runtime.cpu import host_isas
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.yaml").write_text(text)
    plan = spec.load_plan([str(d / f"{name}.yaml")], targets=[f"cpu:{i}" for i in host_isas()])
    path = build.build(plan, str(d / "out"), progress=False).path
    bundles = {}
    mp = pytest.MonkeyPatch()
    for isa in host_isas():
        mp.setenv("FUSEBUILD_CPU_ISA", isa)
        bundles[isa] = runtime.load(path)
    mp.undo()
    return plan, bundles


def adam_case(bundle, n: int, seed: int = 8):
    """Inputs, scalars and the reference result of one float32 Adam step of `n` elements."""
    rng = np.random.default_rng(seed)
    p, g, m, v = (random_array(dt.float32, (n,), rng) for _ in range(4))
    v = np.abs(v)
    scalars = [1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001]
    group = syntax.group_from_json(bundle.manifest["groups"]["adam"])
    want = reference.evaluate(ir.instantiate(group, dict.fromkeys(
        ("param", "grad", "exp_avg", "exp_avg_sq"), dt.float32), expand=False), [p, g, m, v],
        scalars)
    return (p, g, m, v), scalars, want


def no_lld() -> str:
    """Why aarch64 levels cannot be linked here ('' when ld.lld is found)."""
    from fusebuild.errors import ToolchainError
    from fusebuild.toolchain import lld
    try:
        lld.find()
        return ""
    except ToolchainError as e:
        return str(e)


def random_array(d: dt.DType, shape, rng: np.random.Generator, scale: float = 2.0) -> np.ndarray:
    if d.is_float:
        return (rng.standard_normal(shape) * scale).astype(d.numpy)
    if d.is_bool:
        return rng.random(shape) < 0.5
    info = np.iinfo(d.numpy)
    lo, hi = (info.min, info.max) if d.bits <= 16 else (-1000, 1000) if d.kind == "i" else (0, 255)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(d.numpy)


def concrete(shape: tuple, values: dict[str, int]) -> tuple[int, ...]:
    out = []
    for size in shape:
        d = Dim.of(size)
        n = d.coef
        for sym in d.syms:
            n *= values[sym]
        out.append(n)
    return tuple(out)


def scalar_value(d: dt.DType, rng) -> object:
    if d.is_float:
        return float(rng.uniform(0.05, 0.95))
    if d.is_bool:
        return bool(rng.integers(2))
    return int(rng.integers(-50, 50))


def make_args(gp, dtypes, shapes, rng, view=None):
    tensors = iter(zip(dtypes, gp.group.tensor_inputs))
    args = []
    for p in gp.group.inputs:
        if p.kind == "scalar":
            args.append(scalar_value(p.dtype, rng))
            continue
        d, inp = next(tensors)
        a = random_array(d, shapes[inp.name], rng)
        args.append(view(a) if view else a)
    return args


def strided_view(a: np.ndarray) -> np.ndarray:
    """A non-contiguous view holding `a`'s values (every other element of a bigger array)."""
    if a.ndim == 0:
        return a
    big = np.empty(a.shape[:-1] + (a.shape[-1] * 2,), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def symbols(gp) -> list[str]:
    """The size symbols of planned group `gp`'s shape patterns."""
    return sorted({s for pattern in gp.shapes for shape in pattern.values() for d in shape
                   for s in Dim.of(d).syms})


def example_calls(gp) -> Iterator[tuple[list, dict, bool]]:
    """Calls of planned group `gp` on random inputs, as (args, seed kwargs, served): random
    sizes, 1-element, 0-size, broadcast operands (from the patterns) and non-contiguous views,
    which only a group built with `strided: true` serves (`served` False: KernelNotFound; not
    made for chunked groups, whose contiguous calls are strided already)."""
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    seed = dict(seed=int(rng.integers(0, 2**63)), offset=int(rng.integers(0, 2**40))) \
        if gp.group.has_random else {}
    syms = symbols(gp)
    assignments = [{s: int(rng.integers(2, 9)) for s in syms} for _ in range(3)]
    assignments += [{s: 1 for s in syms}]                       # one element
    assignments += [{**assignments[0], s: 1} for s in syms]     # one symbol of size 1
    if syms:
        assignments += [{**{s: 3 for s in syms}, syms[0]: 0}]    # empty
    strided = any("s" * len(lay) == lay and lay for v in gp.variants
                  for lay in [v.key.split(":")[-1].rstrip(")")])
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for pattern in gp.shapes:
            for values in assignments:
                shapes = {k: concrete(s, values) for k, s in pattern.items()}
                yield make_args(gp, dtypes, shapes, rng), seed, True
            shapes = {k: concrete(s, assignments[0]) for k, s in pattern.items()}
            args = make_args(gp, dtypes, shapes, rng, view=strided_view)
            if strided or not any(p.chunk for p in gp.group.inputs):
                yield args, seed, strided


def group_of(bundle, name: str) -> syntax.Group:
    return syntax.group_from_json(bundle.manifest["groups"][name])


def check_call(bundle, name: str, args: list, seed=None, offset=0, out=None):
    """Call group `name` and compare every output with the reference evaluator."""
    g = group_of(bundle, name)
    kw = {} if seed is None else {"seed": seed, "offset": offset}
    got = bundle[name](*args, out=out, **kw)
    got = got if isinstance(got, tuple) else (got,)
    if out is None:      # the C fast path (a repeated call) gives the Python path's bytes
        again = bundle[name](*args, **kw)
        slow = bundle[name]._call(tuple(args), None, seed, offset)
        for x, y, z in zip(got, again if isinstance(again, tuple) else (again,),
                           slow if isinstance(slow, tuple) else (slow,)):
            assert x.tobytes() == y.tobytes() == z.tobytes(), f"{name}: fast and Python paths differ"
    check_outputs(g, got, expected(g, args, seed, offset), bundle[name].key(*args))
    return got


def expected(g: syntax.Group, args: list, seed=None, offset=0):
    """The reference evaluator's result for a call of group `g`."""
    tensors = [a for a, p in zip(args, g.inputs) if p.kind == "tensor"]
    scalars = [a for a, p in zip(args, g.inputs) if p.kind == "scalar"]
    dtypes = {p.name: dt.from_numpy(a.dtype) for a, p in zip(tensors, g.tensor_inputs)}
    return reference.evaluate(ir.instantiate(g, dtypes, expand=False), tensors, scalars,
                              seed or 0, offset)


def check_outputs(g: syntax.Group, got: tuple, want, key: str) -> None:
    """Compare the outputs `got` of kernel `key` of group `g` with the reference result `want`
    (`expected`), within the tolerances of `reference.compare`."""
    assert len(got) == len(g.outputs), f"{g.name} ({key}): {len(got)} outputs"
    n_row = want.part_magnitude.shape[-1] if g.reduces else 0     # reductions: DESIGN §8
    for o, value in zip(g.outputs, got):
        mismatch = reference.compare(value, want.outputs[o.name], want.magnitude[o.name],
                                     n_row=n_row)
        assert mismatch is None, f"{g.name} output {o.name} ({key}): {mismatch.message}"
