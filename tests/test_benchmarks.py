"""The CPU benchmark runs end to end on a tiny size (two groups, one with a broadcast case and
one with a C reference), writes parseable JSON lines, and every peer computes what the fused
kernel computes; the runtime benchmark runs end to end in its --quick mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cpu_bench_quick_smoke(tmp_path):
    pytest.importorskip("numexpr")
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "cpu_bench.py"), "--quick",
         "--elements", "4096", "--groups", "silu_add,bias_gelu_tanh", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == rows
    assert {r["threads"] for r in rows if r.get("what") == "copy_bw"} == {1, 2}
    results = [r for r in rows if "impl" in r]
    cases = {(r["group"], r["dtype"], r["shape"], r["threads"]) for r in results}
    assert {(g, d) for g, d, _, _ in cases} == {(g, d) for g in ("silu_add", "bias_gelu_tanh")
                                               for d in ("f32", "bf16")}
    assert any("+" in shape for _, _, shape, _ in cases)          # the broadcast case ran
    c_available = next(r for r in rows if r.get("what") == "c_reference")["available"]
    impls = {"fusebuild", "numpy", "numexpr", "numba"} | ({"c_fastmath"} if c_available else set())
    for case in cases:
        got = {r["impl"]: r for r in results
               if (r["group"], r["dtype"], r["shape"], r["threads"]) == case}
        assert set(got) == impls, case
        for name, r in got.items():
            assert r["ms"] > 0 and r["GBps"] > 0, (case, name)
            if name != "fusebuild":
                tolerance = 1e-2 if case[1] == "bf16" else 1e-5
                assert r["max_rel_diff"] <= tolerance, (case, name, r["max_rel_diff"])


def test_runtime_bench_quick_smoke(tmp_path, examples_bundle):
    """Every row of the runtime benchmark comes out (figures are not checked: no timed tests).
    (`examples_bundle` first: the benchmark's build of the example specs then comes from the
    shared compile cache instead of compiling them a second time.)"""
    pytest.importorskip("numexpr")
    out = tmp_path / "runtime.jsonl"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "runtime_bench.py"), "--quick",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["what"] + r.get("group", ""): r for r in map(json.loads, out.read_text().splitlines())}
    call = rows["call_overhead_1024_f32silu_add"]
    assert all(call[k] > 0 for k in ("bare_ctypes_us", "fusebuild_out_us", "fusebuild_alloc_us",
                                     "numpy_unfused_us", "numexpr_us"))
    if "call_overhead_1024_f32_torch_cpusilu_add" in rows:
        assert rows["call_overhead_1024_f32_torch_cpusilu_add"]["fusebuild_out_us"] > 0
    assert rows["load_ms"]["kernels"] > 0 and rows["load_ms"]["ms"] > 0
    assert rows["cold_start_ms"]["first_result_ms"] > 0
    assert {"threads_2p24silu_add", "threads_2p24bias_gelu_tanh"} <= set(rows)
