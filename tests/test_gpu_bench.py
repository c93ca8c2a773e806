"""The parts of benchmarks/gpu_bench.py that need no GPU: the full-size case plan, the generated
peers (numpy, torch CPU eager, a whole-graph dynamo trace) against the reference on every example
group, the ElementwiseKernel bodies and every C template through NVRTC, the target bookkeeping
and the --dry-run command line."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fusebuild import dtypes as dt, spec
from conftest import ROOT, SPECS

BENCH = os.path.join(ROOT, "benchmarks", "gpu_bench.py")
PLAN = spec.load_plan([SPECS])
BROADCAST_GROUPS = {"bias_gelu", "bias_gelu_tanh", "quantize_int8", "dequantize_int8",
                    "bias_dropout_residual", "rotary_embedding", "scale_shift", "masked_scores"}


def _load_bench():
    module_spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["gpu_bench"] = module      # dataclasses look their module up while it executes
    module_spec.loader.exec_module(module)
    return module


gb = _load_bench()


@pytest.fixture(scope="module")
def small_cases():
    return gb.make_cases(PLAN, None, gb.DRY_ELEMENTS)


def _nvrtc_target() -> tuple:
    try:
        from fusebuild.toolchain import nvrtc
        archs = nvrtc.supported_archs()
    except Exception as e:  # noqa: BLE001 - no NVRTC wheel here
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc, "cuda:sm_90" if "sm_90" in archs else f"cuda:{archs[-1]}"


def test_import_needs_no_gpu_library():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; "
            "print(sorted(m for m in ('cupy', 'cupyx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_full_size_plan():
    cases = gb.make_cases(PLAN, None, gb.FULL_ELEMENTS)
    assert {c.name for c in cases} == {gp.group.name for gp in PLAN.groups if not (
        gp.group.reduces or gp.group.name.endswith("__grad"))}
    assert {c.name for c in cases if c.broadcast} == BROADCAST_GROUPS
    for c in cases:
        assert math.prod(c.iteration) == 1 << 26, c.row()
        assert dt.float64 not in c.dtypes
        if c.broadcast and len(c.iteration) == 2:
            assert c.iteration == (8192, 8192), c.row()
    bias = next(c for c in cases if c.name == "bias_gelu" and c.broadcast)
    assert bias.shapes == {"x": (8192, 8192), "bias": (8192,)}
    swiglu = next(c for c in cases if c.name == "swiglu" and c.dtypes == (dt.bfloat16,))
    assert swiglu.shapes == {"h": (8192, 16384)} and swiglu.nbytes() == 3 * 2 * (1 << 26)
    rotary = next(c for c in cases if c.name == "rotary_embedding")
    assert rotary.nbytes() == 4 * (2 * (1 << 27) + 2 * 128 * 8192)   # x and y, cos and sin


def _check_rows(rows: list[dict]) -> None:
    bad = [r for r in rows if not r["ok"]]
    assert not bad, json.dumps(bad[:3], indent=1)


def test_numpy_peers_match_the_reference(small_cases):
    F = gb.ArrayOps(np, gen=np.random.default_rng(0))
    for case in small_cases:
        rows = gb.dry_run_case(case, F, None)
        assert [r["check"] for r in rows] == ["numpy_unfused"]
        _check_rows(rows)


def test_torch_peers_match_the_reference_and_trace_whole(small_cases):
    torch = pytest.importorskip("torch")
    F = gb.ArrayOps(np, gen=np.random.default_rng(1))
    for case in small_cases:
        rows = gb.dry_run_case(case, F, torch)
        assert len(rows) == 3
        _check_rows(rows)


def test_random_outputs_are_compared_by_shape_only(small_cases):
    case = next(c for c in small_cases if c.name == "bias_dropout_residual")
    assert gb.random_outputs(case.kernel) == {"y"}
    row = gb.dry_run_case(case, gb.ArrayOps(np, gen=np.random.default_rng(2)), None)[0]
    assert row["outputs"]["y"] == {"ok": True, "compared": "shape and dtype (random)"}


def test_elementwise_bodies_compile(small_cases):
    _nvrtc_target()
    row = gb.nvrtc_check(small_cases)
    assert row["ok"], row.get("error")
    assert row["kernels"] == len({(c.name, c.dtypes) for c in small_cases})


def test_every_elementwise_template_compiles():
    nvrtc, target = _nvrtc_target()
    ctype = {"f": "float", "i": "int", "b": "bool", "*": "int"}
    lines = []
    for op, table in gb.EK_OPS.items():
        assert table, f"no C template for {op}"
        for cls, template in table.items():
            T = ctype[cls]
            expr = template.format(a="a", b="b", c="c", T=T, t="", bits=32)
            lines.append(f"  {{ const {T} a = ({T})x[0], b = ({T})x[1]; const bool c = x[2] > 0; "
                         f"y[0] += (float)({expr}); }}  // {op} {cls}")
    source = ('extern "C" __global__ void templates(const float* x, float* y) {\n'
              + "\n".join(lines) + "\n}\n")
    assert nvrtc.compile_cuda(gb.EK_PREAMBLE + source, target, "templates")


def test_cold_start_programs_are_python():
    programs = gb.cold_programs(PLAN, "/bundle", with_torch=True)
    assert {"cupy_import", "cupy_context", "fusebuild", "cupy_elementwise_cold_cache",
            "torch_eager", "torch_compile_cold_cache"} == set(programs)
    for impl, (code, _) in programs.items():
        compile(code, impl, "exec")


def test_targets_are_tallied():
    case = next(c for c in gb.make_cases(PLAN, ("silu_add",), gb.FULL_ELEMENTS)
                if c.dtypes == (dt.float32, dt.float32))
    copy_gbps = case.nbytes() / 270 / 1e3 / 0.99      # fusebuild at 0.99x copy bandwidth
    met = gb.kernel_summary(case, {"fusebuild": 270.0, "torch_compile": 280.0}, copy_gbps)
    missed = gb.kernel_summary(case, {"fusebuild": 300.0, "torch_compile": 280.0}, copy_gbps)
    assert met["target_copy_0.95"] and met["target_torch_compile_1.0"]
    assert not missed["target_copy_0.95"] and not missed["target_torch_compile_1.0"]
    overhead = [{"group": "silu_add", "impl": "fusebuild", "target_1.5x_raw": True},
                {"group": "silu_add", "impl": "torch_eager"}]
    s = gb.summary([met, missed], overhead)
    assert s["memory_bound_ge_0.95x_copy"] == {"met": 1, "of": 2, "missed": [gb._label(missed)]}
    assert s["overhead_le_1.5x_raw_kernel"] == {"met": 1, "of": 1, "missed": []}


def test_dry_run_command_line(tmp_path):
    out = tmp_path / "dry.jsonl"
    proc = subprocess.run([sys.executable, BENCH, "--dry-run", "--groups",
                           "silu_add,rotary_embedding", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["group"] for r in rows if r["what"] == "case_plan"} == {"silu_add",
                                                                       "rotary_embedding"}
    checks = [r for r in rows if r["what"] == "dry_run"]
    assert checks and all(r["ok"] for r in checks)
