"""Runtime for production: interop, threads, memoized hot path, thread safety, the miss loop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from fusebuild import build, runtime, spec
from fusebuild.errors import KernelNotFound
from fusebuild.runtime import dispatch, threads
from conftest import check_call


class ArrayInterfaceOnly:
    """A foreign host array that exposes only __array_interface__."""

    def __init__(self, a):
        self._a = a
        self.__array_interface__ = a.__array_interface__


def test_foreign_host_arrays_and_dlpack(examples_bundle):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    b = np.ones(8, np.float32)
    want = examples_bundle.bias_gelu(x, b)
    np.testing.assert_array_equal(examples_bundle.bias_gelu(ArrayInterfaceOnly(x), b), want)
    np.testing.assert_array_equal(examples_bundle.bias_gelu(memoryview(x), memoryview(b)), want)
    assert hasattr(np, "from_dlpack")
    capsule_owner = np.from_dlpack(x)             # a DLPack round trip is zero-copy
    np.testing.assert_array_equal(examples_bundle.bias_gelu(capsule_owner, b), want)


def test_torch_cpu_tensors_in_torch_out(examples_bundle):
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 8)
    b = torch.randn(8)
    y = examples_bundle.bias_gelu(x, b)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), examples_bundle.bias_gelu(x.numpy(), b.numpy()))
    with torch.no_grad():      # a tensor requiring grad, outside autograd: served as data
        assert torch.equal(examples_bundle.bias_gelu(x.clone().requires_grad_(), b), y)
    xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
    yb = examples_bundle.bias_gelu(xb, bb)
    assert yb.dtype == torch.bfloat16
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    examples_bundle.bias_gelu(xb, bb, out=out)
    assert torch.equal(out, yb)


def test_repeated_calls_skip_canonicalization(examples_bundle, monkeypatch):
    x = np.ones((3, 5), np.float32)
    b = np.ones(5, np.float32)
    first = examples_bundle.bias_gelu_tanh(x, b)

    def fail(*a, **k):
        raise AssertionError("canonicalized again")
    monkeypatch.setattr(dispatch, "prepare", fail)
    np.testing.assert_array_equal(examples_bundle.bias_gelu_tanh(x + 1, b), examples_bundle.
                                  bias_gelu_tanh(x + 1, b))
    np.testing.assert_array_equal(examples_bundle.bias_gelu_tanh(x, b), first)


def test_thread_ranges_cover_everything():
    for n in (0, 1, 5, threads.MIN_PER_THREAD, 3 * threads.MIN_PER_THREAD + 7, 10**7 + 3):
        for t in (1, 2, 3, 16):
            r = threads.ranges(n, t) if n else []
            assert sum(b - a for a, b in r) == n and all(a % 64 == 0 for a, _ in r)
            assert len(r) <= t


def test_large_calls_split_over_threads_give_identical_results(examples_bundle, monkeypatch):
    rng = np.random.default_rng(1)
    gates = rng.standard_normal((512, 4 * 300)).astype(np.float32)
    cx = rng.standard_normal((512, 300)).astype(np.float32)
    x = rng.standard_normal(1 << 19).astype(np.float32)
    monkeypatch.setattr(examples_bundle, "threads", 1)
    one = examples_bundle.lstm_cell(gates, cx), examples_bundle.bias_dropout_residual(
        x, x, x, 0.3, seed=9, offset=2)
    monkeypatch.setattr(examples_bundle, "threads", 3)
    three = examples_bundle.lstm_cell(gates, cx), examples_bundle.bias_dropout_residual(
        x, x, x, 0.3, seed=9, offset=2)
    for a, b in zip(one[0] + (one[1],), three[0] + (three[1],)):
        np.testing.assert_array_equal(a, b)
    check_call(examples_bundle, "lstm_cell", [gates, cx])


def test_sixteen_threads_ten_thousand_mixed_calls(examples_bundle):
    rng = np.random.default_rng(2)
    cases = []
    for shape in ((7,), (3, 9), (64, 33)):
        x = rng.standard_normal(shape).astype(np.float32)
        b = rng.standard_normal(shape[-1:]).astype(np.float32)
        cases.append(("bias_gelu", (x, b), {}, examples_bundle.bias_gelu(x, b)))
        h = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(np.float16)
        if len(shape) == 2:
            cases.append(("swiglu", (h,), {}, examples_bundle.swiglu(h)))
        cases.append(("bias_dropout_residual", (x, x, x, 0.25), {"seed": 5},
                      examples_bundle.bias_dropout_residual(x, x, x, 0.25, seed=5)))
        flat = x.ravel()[::3]
        cases.append(("silu_add", (flat, flat), {}, examples_bundle.silu_add(flat, flat)))
    errors = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(10_000 // 16 + 1):
                name, args, kw, want = cases[r.integers(len(cases))]
                got = examples_bundle[name](*args, **kw)
                if not np.array_equal(got, want):
                    errors.append(name)
        except Exception as e:  # noqa: BLE001 - collected and reported by the main thread
            errors.append(repr(e))
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:5]


LOOP_SPEC = """fusebuild: 1
bundle: {name: loop, version: "1"}
groups:
  - name: scale
    inputs: {x: tensor, s: scalar(float64)}
    outputs: [y]
    body: 'y = x * s + 1'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""


def test_miss_loop_log_rebuild_hit(tmp_path, monkeypatch):
    from fusebuild.runtime.cpu import host_isas
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "s.yaml").write_text(LOOP_SPEC.replace("groups:", f"targets: [cpu:{host_isas()[-1]}]\ngroups:"))
    out = tmp_path / "out"
    plan = spec.load_plan([str(specs)])
    path = build.build(plan, str(out), progress=False).path
    log = tmp_path / "misses.jsonl"
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(log))
    x64 = np.arange(6, dtype=np.float64).reshape(2, 3)
    k = runtime.load(path)
    with pytest.raises(KernelNotFound, match=r"scale\(f64:c\)"):
        k.scale(x64, 2.0)
    jit = runtime.load(path, on_miss="jit")
    np.testing.assert_array_equal(jit.scale(x64[:, ::2], 2.0), x64[:, ::2] * 2 + 1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["key"] for r in records] == ["scale(f64:c)", "scale(f64:ss)"]
    assert records[1]["on_miss"] == "jit" and records[0]["id"] == k.id
    with open(log, "a") as f:       # a bad record and a repeated one are skipped, not fatal
        f.write("{truncated\n" + json.dumps(records[0]) + "\n")
    r = subprocess.run([sys.executable, "-m", "fusebuild", "compile", str(specs), "-o", str(out),
                        "--add-misses", str(log)], capture_output=True, text=True)
    assert r.returncode == 0 and "2 missing keys added, 1 duplicate record, 1 invalid record " \
        f"skipped\n  skipped {log}:3: not a miss record" in r.stderr, r.stderr
    monkeypatch.delenv("FUSEBUILD_MISS_LOG")
    again = runtime.load(path)
    assert {"scale(f64:c)", "scale(f64:ss)"} <= set(again.keys())
    np.testing.assert_array_equal(again.scale(x64, 2.0), x64 * 2 + 1)
    np.testing.assert_array_equal(again.scale(x64[:, ::2], 2.0), x64[:, ::2] * 2 + 1)


def test_jit_without_a_compiler_reports_why(tmp_path, monkeypatch, examples_bundle):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    k = runtime.load(examples_bundle.root, on_miss="jit")
    with pytest.raises(KernelNotFound, match=r"(?s)compiling it on the fly failed.*no C compiler"):
        k.bias_gelu(np.ones(4), np.ones(4))


def test_runtime_threads_and_archive_import_nothing_from_the_build_side(examples_bundle, tmp_path):
    from fusebuild.bundle import pack
    archive = pack(examples_bundle.root, str(tmp_path / "b.tar.gz"))
    code = f"""
import sys, numpy as np
from fusebuild import runtime
k = runtime.load({archive!r})
x = np.ones(1 << 20, np.float32)
k.silu_add(x, x)
k.bias_dropout_residual(x, x, x, 0.5, seed=1)
bad = [m for m in ("yaml", "click", "tqdm", "numba", "llvmlite", "fusebuild.syntax",
                   "fusebuild.ir", "fusebuild.runtime.cuda") if m in sys.modules]
print("BAD" if bad else "CLEAN", bad)
"""
    env = {**os.environ, "FUSEBUILD_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("CLEAN"), proc.stdout + proc.stderr
