"""The CPU benchmark runs end to end on a tiny size (two groups, one with a broadcast case and
one with a C reference), writes parseable JSON lines, and every peer computes what the fused
kernel computes; the runtime benchmark runs end to end in its --quick mode."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_rows(tmp_path, script: str, timeout: int) -> list[dict]:
    """The JSON rows of `benchmarks/<script> --quick`: the same on stdout and in --out, and
    none of them an error."""
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == rows
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r][:2]
    return rows


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
    assert rows["first_call_mssilu_add"]["ms"] > 0
    assert not [m for m in rows["first_call_mssilu_add"]["imports"]
                if m.startswith(("fusebuild.syntax", "fusebuild.ir", "fusebuild.runtime.cuda"))]
    assert rows["first_bf16_call_msbias_gelu"]["ms"] > 0
    assert {"threads_2p24silu_add", "threads_2p24bias_gelu_tanh"} <= set(rows)


def test_reduction_bench_quick_smoke(tmp_path):
    """The reduction benchmark's --quick run (float32, two small shapes, one of them with a row
    length that is no multiple of a vector): every implementation of every case ran and matches
    the float64 oracle, fusebuild matches fusebuild.reference too, and the targets are tallied;
    without a GPU the GPU section says why it skipped."""
    rows = _quick_rows(tmp_path, "reduction_bench.py", timeout=300)
    try:
        import torch  # noqa: F401
        impls = {"fusebuild", "fusebuild_alloc", "numpy", "torch_eager"}
    except ImportError:
        impls = {"fusebuild", "fusebuild_alloc", "numpy"}
    results = [r for r in rows if r["what"] == "cpu"]
    cases = {(r["op"], r["dtype"], tuple(r["shape"])) for r in results}
    assert cases == {(op, "f32", shape) for op in ("softmax", "log_softmax", "layer_norm",
                                                   "rms_norm", "add_rms_norm")
                     for shape in ((128, 1024), (33, 1000))}
    for case in cases:
        got = {r["impl"]: r for r in results if (r["op"], r["dtype"], tuple(r["shape"])) == case}
        assert set(got) == impls, case
        for name, r in got.items():
            assert r["ok"] and r["max_rel_err"] <= 1e-5 and r["ms"] > 0, (case, name, r)
        assert got["fusebuild"]["reference_ok"], (case, got["fusebuild"])
    summaries = [r for r in rows if r["what"] == "cpu_summary"]
    assert len(summaries) == len(cases) and all(r["frac_of_copy"] > 0 for r in summaries)
    targets = [r for r in rows if r["what"] == "cpu_target"]
    assert len(targets) == 5
    assert all(r.get("cases") == len(cases) for r in targets
               if "torch_eager" in impls or "torch" not in r["target"])
    gpu = [r for r in rows if r["what"].startswith("gpu")]
    assert gpu and (gpu[0].get("skipped", "").startswith("no GPU section: ")
                    or any(r["what"] == "gpu_summary" for r in gpu))


def test_reduction_bench_gpu_plan_and_targets():
    """The GPU section's plan (N = 128 ... 65,536 at 2^26 elements, bytes of inputs + outputs)
    and its target tally (the copy target counts N >= 1024 only), checked without a GPU."""
    module_spec = importlib.util.spec_from_file_location(
        "reduction_bench", os.path.join(ROOT, "benchmarks", "reduction_bench.py"))
    rb = importlib.util.module_from_spec(module_spec)
    sys.modules["reduction_bench"] = rb     # dataclasses look their module up while it executes
    module_spec.loader.exec_module(rb)
    cases = rb.gpu_cases(list(rb.OPS), ("f32", "bf16"), rb.GPU_NS, rb.GPU_ELEMENTS)
    assert len(cases) == 5 * 2 * 10 and {c.n for c in cases} == {1 << k for k in range(7, 17)}
    assert all(c.rows * c.n == 1 << 26 for c in cases)
    add = next(c for c in cases if c.op == "add_rms_norm" and c.dtype == "bf16" and c.n == 4096)
    assert add.nbytes() == 2 * (4 * (1 << 26) + 4096)        # x, residual, y, h and w
    fast, slow = (rb.gpu_summary(rb.Case("softmax", "f32", (1 << 26) // n, n),
                                 {"fusebuild": us, "torch_compile": 100.0}, 2 * (1 << 28) / 100e3)
                  for n, us in ((1024, 110.0), (2048, 150.0)))      # 0.91x and 0.67x copy
    short = rb.gpu_summary(rb.Case("softmax", "f32", 1 << 19, 128), {"fusebuild": 500.0}, 1e4)
    copy, compiled = rb.gpu_targets([fast, slow, short])
    assert (copy["met"], copy["cases"], len(copy["missed"])) == (False, 2, 1)
    assert (compiled["met"], compiled["cases"], len(compiled["missed"])) == (False, 2, 2)
    assert rb.gpu_targets([fast])[0]["met"] and not rb.gpu_targets([fast])[1]["met"]


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (it imports no GPU library nor torch at the top)."""
    module_spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module       # dataclasses look their module up while it executes
    module_spec.loader.exec_module(module)
    return module


def test_torch_bench_quick_smoke(tmp_path):
    """The training benchmark's --quick run (float32, iteration space [64, 64]): fusebuild's
    torch ops, torch eager and torch.compile each ran forward + backward of every group and match
    float64 torch autograd of the expression (for dropout with each one's own mask: forward and
    backward agree on it, and about 1 - p of the elements are kept); the gradients of the
    deterministic groups match torch eager's; the overhead row and the targets come out."""
    rows = _quick_rows(tmp_path, "torch_bench.py", timeout=600)
    groups = ("bias_gelu", "bias_dropout_residual", "lstm_cell")
    build = next(r for r in rows if r["what"] == "build")
    assert build["backward_groups"] == sorted(f"{g}__grad" for g in groups)
    results = [r for r in rows if r["what"] == "train"]
    assert {(r["group"], r["dtype"]) for r in results} == {(g, "f32") for g in groups}
    for group in groups:
        got = {r["impl"]: r for r in results if r["group"] == group}
        assert set(got) == {"fusebuild", "torch_eager", "torch_compile"}, group
        for name, r in got.items():
            assert r["ok"] and r["max_rel_err"] <= 1e-4 and r["ms"] > 0, (group, name, r)
            if group == "bias_dropout_residual":
                assert 0.85 <= r["keep_fraction"] <= 0.95, (name, r)
            else:
                assert r["grad_max_abs_diff_vs_eager"] <= 1e-4, (group, name, r)
    summaries = [r for r in rows if r["what"] == "train_summary"]
    assert len(summaries) == 3
    assert all(r["vs_torch_eager"] > 0 and r["vs_torch_compile"] > 0 for r in summaries)
    call = next(r for r in rows if r["what"] == "call_overhead_1024_f32")
    assert call["torch_ops_us"] > 0 and call["runtime_us"] > 0
    targets = [r for r in rows if r["what"] == "target"]
    assert len(targets) == 3 and all(r["met"] is not None for r in targets)


def test_torch_bench_plan_and_targets():
    """The training benchmark's cases at 2^22 elements ([2048, 2048] iteration space; lstm_cell's
    gates [2048, 8192]) and its target tally, checked without torch or a build."""
    tb = _load_benchmark("torch_bench")
    cases = tb.cases(list(tb.OPS), tb.ELEMENTS, quick=False)
    assert [(c.group, c.dtype) for c in cases] == [(g, d) for g in tb.OPS for d in ("f32", "bf16")]
    shapes = {c.group: c.input_shapes() for c in cases}
    assert shapes == {"bias_gelu": ((2048, 2048), (2048,)),
                      "bias_dropout_residual": ((2048, 2048), (2048,), (2048, 2048)),
                      "lstm_cell": ((2048, 8192), (2048, 2048))}
    assert [c.input_shapes() for c in tb.cases(["bias_gelu"], 1 << 13, quick=True)] == [
        ((128, 64), (64,))]
    fast = {"group": "bias_gelu", "dtype": "f32", "vs_torch_eager": 2.5, "vs_torch_compile": 1.2}
    slow = {"group": "lstm_cell", "dtype": "bf16", "vs_torch_eager": 1.5, "vs_torch_compile": 0.9}
    eager, compiled, call = tb.targets([fast, slow], {"ratio": 1.5, "ratio_vs_eager": 0.6})
    assert (eager["met"], eager["cases"], eager["worst"]) == (False, 2, "lstm_cell bf16")
    assert (compiled["met"], compiled["missed"]) == (False, ["lstm_cell bf16: 0.9"])
    assert call["met"] and not tb.targets([fast], {"ratio": 1.6, "ratio_vs_eager": 0.6})[2]["met"]
    assert not tb.targets([fast], {"ratio": 1.2, "ratio_vs_eager": 1.1})[2]["met"]
    assert tb.targets([fast], None)[0]["met"] and tb.targets([], None)[2]["met"] is None


def test_gpu_model_quick_smoke(tmp_path):
    """The roofline model's --quick run (four groups at 2^12 elements, counted in the host
    emulation): the calibration and the model's check against the H200 figures, a line per
    kernel with its traffic and H100/H200 predictions, and the summary (figures not checked
    beyond their sign and the counted bytes' consistency)."""
    from cuda_emulation.harness import have_compiler
    if not have_compiler():
        pytest.skip("needs g++ for the host emulation")
    rows = _quick_rows(tmp_path, "gpu_model.py", timeout=300)
    assert {r["device"] for r in rows if r["what"] == "calibration"} == {"H100", "H200"}
    assert len([r for r in rows if r["what"] == "model_check"]) == 8
    kernels = [r for r in rows if r["what"] == "kernel"]
    assert {r["group"] for r in kernels} == {"silu_add", "bias_gelu", "softmax", "layer_norm"}
    assert {r["N"] for r in kernels if r["kind"] == "reduction"} == {1024, 4096, 16384}
    for r in kernels:
        assert r["ratio"] == round(r["bytes_measured"] / r["bytes_ideal"], 4), r
        assert all(r[f"{d}_us{s}"] >= r[f"{d}_ideal_us{s}"] > 0 for d in ("H100", "H200")
                   for s in ("", "_2p26")), r
    summary = next(r for r in rows if r["what"] == "summary")
    assert summary["kernels"] == len(kernels)
    assert set(summary["reduction_max_ratio"]) == {"softmax", "layer_norm"}


def test_plot_draws_gbps_per_group_against_the_copy_line(tmp_path):
    """benchmarks/plot.py on tiny synthetic rows of cpu_bench (copy_bw per thread count) and
    reduction_bench (frac_of_copy, cpu_copy): one PNG per section, dtype and thread count, one
    bar per implementation, the copy line of each case."""
    pytest.importorskip("matplotlib")
    plot = _load_benchmark("plot")
    cpu = [{"what": "copy_bw", "threads": 2, "GBps": 40.0},
           *({"group": g, "dtype": "f32", "shape": "16777216", "threads": 2, "impl": impl,
              "GBps": gbps} for g in ("silu_add", "bias_gelu") for impl, gbps in
             (("fusebuild", 30.0), ("numpy", 5.0), ("numexpr", 12.0))),
           {"group": "silu_add", "dtype": "f32", "threads": 2, "impl": "numba", "ms": None}]
    reduction = [{"what": "cpu_copy", "op": "softmax", "dtype": "bf16", "shape": [64, 4096],
                  "threads": 2, "GBps": 50.0},
                 {"what": "cpu", "op": "softmax", "dtype": "bf16", "shape": [64, 4096],
                  "threads": 2, "impl": "fusebuild", "GBps": 25.0, "frac_of_copy": 0.5},
                 {"what": "cpu", "op": "softmax", "dtype": "bf16", "shape": [64, 4096],
                  "threads": 2, "impl": "torch_eager", "GBps": 10.0, "frac_of_copy": 0.2}]
    (tmp_path / "cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cpu))
    (tmp_path / "red.json").write_text(json.dumps(reduction))
    (chart,) = plot.charts(cpu).values()
    assert chart["cases"][("silu_add", "f32", "16777216", 2)] == {
        "fusebuild": 30.0, "numpy": 5.0, "numexpr": 12.0}
    assert set(chart["copy"].values()) == {40.0}
    assert list(plot.charts(reduction)[("cpu", "bf16", 2)]["copy"].values()) == [50.0]
    assert plot.main([str(tmp_path / "cpu.jsonl"), str(tmp_path / "red.json"),
                      "-o", str(tmp_path / "png")]) == 0
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert pngs == ["cpu-cpu-f32-2t.png", "red-cpu-bf16-2t.png"]
    assert all((tmp_path / "png" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_thp_runs_a_benchmark_with_torch_huge_pages_off_and_on(tmp_path):
    """benchmarks/thp.py: one child per setting, THP_MEM_ALLOC_ENABLE set before the benchmark
    starts (torch reads it at import), the huge-page run's implementations renamed."""
    thp = _load_benchmark("thp")
    script = tmp_path / "bench.py"
    script.write_text("import json, os, sys\n"
                      "print('not json')\n"
                      "row = {'impl': 'torch_eager', 'env': os.environ['THP_MEM_ALLOC_ENABLE']}\n"
                      "print(json.dumps({**row, 'argv': sys.argv[1:]}))\n"
                      "print(json.dumps({'what': 'machine'}))\n")
    out = tmp_path / "both.jsonl"
    assert thp.main(["--out", str(out), str(script), "--quick"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"impl": "torch_eager", "env": "0", "argv": ["--quick"], "torch_thp": 0},
        {"what": "machine", "torch_thp": 0},
        {"impl": "torch_eager+thp", "env": "1", "argv": ["--quick"], "torch_thp": 1},
        {"what": "machine", "torch_thp": 1}]
