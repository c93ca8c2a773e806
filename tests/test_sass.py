"""SASS checks of every cubin (`pytest -m sass`): the example specs and the op table built by NVRTC
for sm_80, sm_90, sm_100 and sm_120 (where NVRTC has it), read by `fusebuild.sass`. Every kernel
has no spills and no local memory, runs no FP64 instruction unless its spec has a float64 operand
and reaches 50% theoretical occupancy (elementwise, 128-thread blocks) or 25% (reductions, at
every launch shape the runtime makes: each block size of `runtime.cuda.row_threads` with the
dynamic shared memory of its longest held row on that SM, `_launches`) on every SM that runs its
SASS; float kernels with 16-byte vector accesses (contiguous inner dimension, vector path) load
and store them as 128-bit global accesses in their hot loop. The examples' modules are those
tests/test_cuda_build.py builds (compile-cache hits)."""
from __future__ import annotations

import dataclasses
import os

import pytest

from fusebuild import build, dtypes as dt, sass, spec
from fusebuild.codegen.cuda import held_itemsizes, vector_width
from fusebuild.runtime import cuda
from fusebuild.errors import UsageError
from fusebuild.toolchain import nvrtc
from conftest import SPECS
from cuda_emulation.harness import device_limits
from opcases import spec_text

pytestmark = pytest.mark.sass
ARCHS = ("sm_80", "sm_90", "sm_100", "sm_120")


def _tools() -> None:
    try:
        sass.find_tool("nvdisasm"), sass.find_tool("cuobjdump")
    except UsageError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the SASS: {e}")
        pytest.skip(str(e))


def _archs() -> tuple[str, ...]:
    return tuple(a for a in ARCHS if a in nvrtc.supported_archs())


def _analyse(plan: spec.Plan, out: str) -> list[tuple]:
    """(target, group, KernelSource, KernelSass) of every kernel of `plan` built for every arch."""
    _tools()
    result = build.build(plan, out, progress=False)
    sources = {ks.symbol: (gp.group.name, ks) for gp in plan.groups
               for ks in build.kernel_sources(gp.group, gp.variants)}
    files = {os.path.join(result.path, k["file"]): k["target"] for k in result.manifest["kernels"]}
    return [(files[path], *sources[k.symbol], k)
            for path, kernels in sass.report(sorted(files)).items() for k in kernels]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    plan = spec.load_plan([SPECS], targets=[f"cuda:{a}" for a in _archs()])
    return _analyse(plan, str(tmp_path_factory.mktemp("sass_examples")))


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    d = tmp_path_factory.mktemp("sass_ops")
    (d / "ops.yaml").write_text(spec_text())
    plan = spec.load_plan([str(d / "ops.yaml")], targets=[f"cuda:{a}" for a in _archs()])
    return _analyse(plan, str(d / "out"))


def _spills(ks, k: sass.KernelSass) -> str:
    used = {"spill stores": k.spill_stores, "spill loads": k.spill_loads, "local": k.local,
            "stack": k.stack}
    return ", ".join(f"{n} {v} B" for n, v in used.items() if v)


def _wide(ks, k: sass.KernelSass) -> str:
    """Float kernels: 16-byte vector operands (both index widths of the vector path: twice each)
    moved by narrower accesses."""
    V = vector_width(ks)
    operands = [*ks.kernel.in_dtypes, *(o.dtype for o in ks.kernel.outputs)]
    if V == 1 or not all(d.is_float for d in operands):
        return ""
    inner = [lay[-1] if lay else "b" for lay in ks.layouts]
    loads = {n.attr for n in ks.kernel.nodes if n.op == "load"
             and inner[n.attr[0]] == "c" and ks.kernel.in_dtypes[n.attr[0]].itemsize * V == 16}
    stores = sum(len(o.parts) for o in ks.kernel.outputs
                 if not o.row and o.dtype.itemsize * V == 16)
    got_l, got_s = k.hot.loads.get(128, 0), k.hot.stores.get(128, 0)
    bad = [f"{got_l} LDG.128 for {len(loads)} 16-byte operands"] if got_l < 2 * len(loads) else []
    bad += [f"{got_s} STG.128 for {stores} 16-byte outputs"] if got_s < 2 * stores else []
    return "; ".join(bad)


def _fp64(ks, k: sass.KernelSass) -> str:
    dtypes = [*ks.kernel.in_dtypes, *(o.dtype for o in ks.kernel.outputs)]
    return "" if dt.float64 in dtypes or not k.fp64 else f"{k.fp64} FP64 instructions"


def _launches(ks, k: sass.KernelSass, sm: int) -> list[tuple[int, int]]:
    """(threads, shared memory bytes) of a reduction kernel's launches on SM `sm`, per block
    size: its static shared memory with the dynamic shared memory of the longest row of that
    block size the runtime holds there (`runtime.cuda.holds`, on the SM's documented limits)."""
    held, limits = tuple(held_itemsizes(ks)), device_limits(sm, k.shared)
    out, lo = [], 0
    for threads, hi in [(32, cuda.WARP_ROW_MAX)] + [
            (t, cuda.ROW_ELEMENTS * t) for t in (64, 128, 256, 512)] + [(1024, 1 << 24)]:
        flags = cuda.ROW_BLOCK if threads > 32 else 0
        top = lo    # the longest held row in (lo, hi], by bisection (shared memory grows with N)
        if cuda.holds(lo + 1, held, flags, limits):
            top, end = lo + 1, hi + 1
            while end - top > 1:
                mid = (top + end) // 2
                top, end = (mid, end) if cuda.holds(mid, held, flags, limits) else (top, mid)
        dynamic = cuda.shared_bytes(top, held, flags | cuda.HELD) if top > lo else 0
        out.append((cuda.block_threads(hi, flags), k.shared + dynamic))
        lo = hi
    return out


def _occupancy(ks, k: sass.KernelSass) -> str:
    if not ks.kernel.reduce:
        return ", ".join(f"{round(100 * o)}% on sm_{s} ({k.registers} registers)"
                         for s, o in k.occupancy.items() if o < 0.5)
    return ", ".join(f"{round(100 * o)}% on sm_{s} ({k.registers} registers, {t} threads, "
                     f"{b} B shared)" for s in k.occupancy for t, b in _launches(ks, k, s)
                     for o in [sass.occupancy(k.registers, b, s, t)] if o < 0.25)


CHECKS = {"spills": _spills, "wide": _wide, "fp64": _fp64, "occupancy": _occupancy}


def _failures(kernels: list[tuple], check: str) -> dict[str, list[str]]:
    """Failing kernels by group: 'target key: what'."""
    out: dict[str, list[str]] = {}
    for target, group, ks, k in kernels:
        why = CHECKS[check](ks, k)
        if why:
            out.setdefault(group, []).append(f"{target} {ks.key}: {why}")
    return out


def _check(kernels: list[tuple], check: str) -> None:
    bad = _failures(kernels, check)
    assert not bad, "\n".join(line for lines in bad.values() for line in lines)


@pytest.mark.parametrize("check", list(CHECKS))
def test_example_kernels(examples, check):
    assert {t for t, *_ in examples} == {f"cuda:{a}" for a in _archs()}
    _check(examples, check)


@pytest.mark.parametrize("check", list(CHECKS))
def test_op_table_kernels(ops, check):
    _check(ops, check)


def test_inspect_sass_prints_the_table_and_names_the_wheels_when_missing(tmp_path, monkeypatch):
    from click.testing import CliRunner
    import nvidia
    from fusebuild.cli import main
    _tools()
    plan = spec.load_plan([SPECS], targets=["cuda:sm_90"])
    gp = next(g for g in plan.groups if g.group.name == "softmax")
    out = build.build(dataclasses.replace(plan, groups=(gp,)), str(tmp_path), progress=False).path
    run = CliRunner().invoke
    r = run(main, ["inspect", out, "--sass"])
    assert r.exit_code == 0, r.output
    head, *rows = r.output.splitlines()
    assert head.split()[:4] == ["target", "key", "regs", "spill"]
    assert len(rows) == len(gp.variants)
    key = gp.variants[0].key
    r = run(main, ["inspect", out, "--sass", key, "--target", "cuda:sm_90"])
    assert r.exit_code == 0 and len(r.output.splitlines()) == 2, r.output
    target, got, regs, spills, local = r.output.splitlines()[1].split()[:5]
    assert (target, got, spills, local) == ("cuda:sm_90", key, "0/0", "0") and int(regs) > 0
    assert run(main, ["inspect", out, "--sass", "nope(f32:c)"]).exit_code == 1
    monkeypatch.setattr(nvidia, "__path__", [])
    r = run(main, ["inspect", out, "--sass"])
    assert r.exit_code == 2
    assert "nvidia-cuda-nvdisasm" in r.output and "nvidia-cuda-cuobjdump" in r.output


@pytest.mark.parametrize("regs,shared,sm,want", [
    (32, 0, 80, 1.0), (40, 0, 80, 0.75), (64, 0, 90, 0.5), (128, 0, 100, 0.25),
    (32, 0, 86, 1.0), (72, 0, 89, 28 / 48), (32, 48 << 10, 86, 8 / 48), (32, 1152, 120, 1.0),
    (255, 0, 80, 8 / 64), (24, 0, 89, 1.0)])
def test_occupancy_follows_the_calculator(regs, shared, sm, want):
    """Values of NVIDIA's occupancy calculator at 128 threads a block: registers per warp in
    units of 256 over 4 sub-partitions, 1 KB reserved per block, the per-SM warp and block caps."""
    assert sass.occupancy(regs, shared, sm) == pytest.approx(want)


def test_hot_loop_is_the_innermost_loop_touching_global_memory_outside_subroutines():
    code = [(0x00, "S2R", "R0, SR_TID.X"),
            (0x10, "LDG.E.128", "R4, desc[UR4][R2.64]"),      # row loop: 0x10-0x40
            (0x20, "IADD3", "R1, R1, 0x1, RZ"),               # fmod-like loop, no global access
            (0x30, "BRA", "0x20"),
            (0x40, "BRA", "0x10"),
            (0x50, "CALL.REL.NOINC", "0x80"),
            (0x60, "STG.E", "desc[UR4][R2.64], R4"),
            (0x70, "EXIT", ""),
            (0x80, "LDG.E.64.CONSTANT", "R6, desc[UR4][R8.64]"),   # subroutine loop
            (0x90, "BRA", "0x80"),
            (0xa0, "DMUL", "R6, R6, R6"),
            (0xb0, "RET.REL.NODEC", "R20 0x0")]
    hot, looped = sass.hot_loop(code)
    assert looped and [a for a, _, _ in hot] == [0x10, 0x20, 0x30, 0x40]
    assert sass.mix(hot).loads == {128: 1}
    assert sass.hot_loop(code[5:8]) == (code[5:8], False)
    assert [op for _, op, _ in code if sass.is_fp64(op)] == ["DMUL"]
    assert all(sass.is_fp64(op) for op in ("I2F.F64.S64", "F2F.F32.F64", "MUFU.RCP64H", "DSETP.GT"))
    assert not any(sass.is_fp64(op) for op in ("I2F.U64.RP", "F2I.U64.TRUNC", "FRND.TRUNC"))
