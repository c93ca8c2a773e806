"""The miss loop and its hints: misses looked up and logged once, KernelNotFound saying what is
wrong (an ISA level the host cannot run, a fixed dtype, a Python list, a JIT type error), the
FUSEBUILD_CPU_ISA cap, `--add-misses` with bad and repeated records, and CUDA misses logged and
JIT-compiled with NVRTC (run on the host emulation of the kernels)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import numpy as np
import pytest

from fusebuild import build, elf, runtime, spec
from fusebuild.argspec import symbol_name
from fusebuild.errors import BundleError, KernelNotFound, SpecError, UsageError
from fusebuild.runtime import cpu, cuda, dispatch
from cuda_emulation.fake_cupy import FakeArray, fake_cupy
from cuda_emulation.harness import (EmulatedGroup, compile_source, have_compiler, kernel_sources,
                                    launchers)

SPEC = """fusebuild: 1
targets: [cpu:x86-64-v2]
groups:
  - name: scale
    inputs: {x: tensor, s: scalar(float32)}
    outputs: [y]
    body: 'y = x * s + 1'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
  - name: pick
    inputs: {x: tensor, m: tensor(bool)}
    outputs: [y]
    body: 'y = where(m, x, 0.0)'
    matrix: {dtype: [float32], shapes: [{x: [N], m: [N]}]}
  - name: inv
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = ~x'
    targets: [cpu:x86-64-v3]
    matrix: {dtype: [int32], shapes: [{x: [N]}]}
"""
V2_FLAGS = cpu._REQUIRED["x86-64-v2"]
V3_FLAGS = V2_FLAGS | cpu._REQUIRED["x86-64-v3"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    d = tmp_path_factory.mktemp("miss_specs")
    (d / "s.yaml").write_text(SPEC)
    return str(d / "s.yaml")


@pytest.fixture(scope="module")
def bundle_path(specs, tmp_path_factory):
    """scale and pick at x86-64-v2, inv at x86-64-v3 only."""
    out = tmp_path_factory.mktemp("miss_bundle")
    return build.build(spec.load_plan([specs]), str(out), progress=False).path


@pytest.fixture
def v2_host(monkeypatch):
    """A host that runs x86-64-v2 only, whatever this machine is."""
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set(V2_FLAGS))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("FUSEBUILD_CPU_ISA", raising=False)


def test_a_level_the_host_cannot_run_is_named_as_the_problem(bundle_path, v2_host):
    k = runtime.load(bundle_path)
    with pytest.raises(KernelNotFound) as e:
        k.inv(np.arange(4, dtype=np.int32))
    text = str(e.value)
    assert "has inv(i32:c) only for cpu:x86-64-v3, which this CPU cannot run " \
           "(it runs cpu:x86-64-v2)" in text and "--target cpu:x86-64-v2" in text
    assert "matrix.dtype" not in text and e.value.nearest == ()
    np.testing.assert_array_equal(k.scale(np.ones(3, np.float32), 2.0), np.full(3, 3, np.float32))


def test_a_cap_above_the_cpu_caps_at_the_cpu_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set(V3_FLAGS))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "_WARNED", set())
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "x86-64-v4")
    with pytest.warns(RuntimeWarning, match="FUSEBUILD_CPU_ISA=x86-64-v4, but this CPU runs "
                                            "only x86-64-v2, x86-64-v3: using x86-64-v3"):
        assert cpu.host_isas() == ("x86-64-v2", "x86-64-v3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.host_isas() == ("x86-64-v2", "x86-64-v3")        # warned once
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "x86-64-v2")
    assert cpu.host_isas() == ("x86-64-v2",)
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "x86-64-v9")
    with pytest.raises(BundleError, match="is not one of x86-64-v2, x86-64-v3, x86-64-v4"):
        cpu.host_isas()


def test_a_fixed_dtype_input_is_told_its_dtype_not_offered_a_map(bundle_path, v2_host,
                                                                 tmp_path, monkeypatch):
    log = tmp_path / "misses.jsonl"
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(log))
    for on_miss in ("error", "jit"):
        k = runtime.load(bundle_path, on_miss=on_miss)
        with pytest.raises(KernelNotFound) as e:
            k.pick(np.ones(4, np.float32), np.ones(4, np.uint8))
        text = str(e.value)
        assert "input 'm' is declared tensor(bool) and was passed uint8" in text
        assert "m.astype(bool)" in text and "matrix.dtype" not in text
    assert not log.exists()         # never logged: no rebuild could add it
    want = np.array([1, 0, 3], np.float32)
    got = k.pick(np.array([1, 2, 3], np.float32), np.array([True, False, True]))
    np.testing.assert_array_equal(got, want)


def test_python_lists_and_numbers_are_told_to_pass_arrays(bundle_path, v2_host):
    k = runtime.load(bundle_path)
    with pytest.raises(KernelNotFound) as e:
        k.scale([1.0, 2.0], 2.0)
    text = str(e.value)
    assert "input 'x' is a Python list, which numpy made float64; pass " \
           "np.asarray(x, np.float32)" in text
    assert "float64}" not in text and "matrix.dtype" not in text
    with pytest.raises(KernelNotFound, match=r"input 'x' is a Python int, which numpy made "
                                             r"int64; pass np.asarray\(x, np.float32\)"):
        k.scale(3, 2.0)
    np.testing.assert_array_equal(k.scale(np.asarray([1.0, 2.0], np.float32), 2.0), [3, 5])


def test_a_repeated_miss_is_looked_up_and_logged_once(bundle_path, v2_host, tmp_path,
                                                      monkeypatch):
    log = tmp_path / "misses.jsonl"
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(log))
    lookups, nearest = [], dispatch.nearest_keys
    monkeypatch.setattr(dispatch, "nearest_keys", lambda *a: lookups.append(a) or nearest(*a))
    x = np.ones(8)
    k = runtime.load(bundle_path)
    messages = set()
    for _ in range(50):
        with pytest.raises(KernelNotFound) as e:
            k.scale(x, 2.0)
        messages.add(str(e.value))
    assert len(lookups) == 1 and len(messages) == 1 and "scale(f64:c)" in messages.pop()
    with pytest.raises(KernelNotFound):
        runtime.load(bundle_path).scale(x, 2.0)      # another load in the same process
    with pytest.raises(KernelNotFound):
        k.scale(x.astype(np.float16), 2.0)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["key"], r["target"]) for r in records] == [("scale(f64:c)", "cpu:x86-64-v2"),
                                                          ("scale(f16:c)", "cpu:x86-64-v2")]


def test_a_jit_type_error_is_reported_as_the_type_error(bundle_path, v2_host):
    k = runtime.load(bundle_path, on_miss="jit")
    with pytest.raises(KernelNotFound) as e:
        k.inv(np.ones(4, np.float32))
    text = str(e.value)
    assert "group 'inv' does not type-check for these dtypes" in text
    assert "bitwise_not() needs integer or bool operands, got float32" in text
    assert "pip install" not in text and "<manifest>" not in text


def test_jit_without_the_build_extras_says_which_extra_to_install(bundle_path, v2_host,
                                                                 tmp_path, monkeypatch):
    (tmp_path / "yaml.py").write_text("raise ImportError(\"No module named 'yaml'\")\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with pytest.raises(KernelNotFound) as e:
        runtime.load(bundle_path, on_miss="jit").scale(np.ones(4), 2.0)
    assert "needs the build extras (`pip install 'fusebuild[build]'`): ImportError: No module " \
           "named 'yaml'" in str(e.value)


def test_add_misses_skips_bad_records_and_counts_repeats_once(specs, tmp_path):
    log = tmp_path / "misses.jsonl"
    lines = ['{"key": "scale(f64:c)", "target": "cpu:x86-64-v2"}',
             '{"key": "scale(f64:c)", "target": "cpu:x86-64-v2"}',
             "not json",
             '{"key": "pick(f32:c,f32:c)", "target": "cpu:x86-64-v2"}',
             '{"key": "inv(f32:c)"}',
             '{"key": "elsewhere(f32:c)"}',
             '{"key": "scale(f32:c,f32:c)"}',
             "[1, 2]",
             '{"key": "scale(f16:c)", "target": "cuda:sm_90"}',
             '{"key": "inv(i32:c)", "target": "cpu:x86-64-v3"}']
    deep = "[" * 100_000 + "]" * 100_000            # once a RecursionError traceback
    log.write_text("\n".join(lines) + f"\n\xff\n{deep}\n")
    plan = spec.load_plan([specs])
    fold = spec.add_misses(plan, str(log))
    variants = {g.group.name: [v.key for v in g.variants] for g in fold.plan.groups}
    assert variants["scale"] == ["scale(f32:c)", "scale(f64:c)", "scale(f16:c)"]
    assert variants["pick"] == ["pick(f32:c,b8:c)"] and variants["inv"] == ["inv(i32:c)"]
    assert (fold.added, fold.duplicates, fold.other_groups) == (2, 1, 1)
    assert [b.split(": ", 1)[0] for b in fold.bad] == [f"{log}:{n}"
                                                       for n in (3, 4, 5, 7, 8, 11, 12)]
    assert "input 'm' is fixed to bool" in fold.bad[1] and "bitwise_not()" in fold.bad[2]
    assert "2 tensor inputs" in fold.bad[3] and "nested deeper than 64 levels" in fold.bad[6]
    assert fold.unbuilt == ("cuda:sm_90",)


# ---------------------------------------------------------------- CUDA misses ------------------

@pytest.fixture(scope="module")
def cuda_bundle(specs, tmp_path_factory):
    """scale built for cuda:sm_80 only (its plan, the bundle) and the host emulation of the
    kernel a JIT compiles for a call on float32 arrays."""
    if not have_compiler():
        pytest.skip("needs g++ for the host emulation")
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    plan = spec.load_plan([specs])
    gp = dataclasses.replace(next(g for g in plan.groups if g.group.name == "scale"),
                             targets=("cuda:sm_80",))
    plan = dataclasses.replace(plan, groups=(gp,))
    out = tmp_path_factory.mktemp("cuda_miss")
    path = build.build(plan, str(out), progress=False).path
    ks = kernel_sources(gp.group, gp.variants)
    text = '#include "emu.h"\n' + build.render_source(gp.group, gp.variants, "cuda")[0] + \
        launchers([k.symbol for k in ks])
    return plan, path, EmulatedGroup(gp.group, ks, compile_source(text, str(out), "emu")).lib


def test_a_cuda_miss_is_logged_and_compiled_for_the_device(cuda_bundle, tmp_path, monkeypatch):
    plan, path, lib = cuda_bundle
    key = "scale(f32:c)"
    cp = fake_cupy({symbol_name(key): lib}, capability="90")
    monkeypatch.setattr(cuda, "_cupy", lambda: cp)
    logs = tmp_path / "error.jsonl", tmp_path / "jit.jsonl"
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(logs[0]))
    k = runtime.load(path)
    for _ in range(3):
        with pytest.raises(KernelNotFound, match="needs cuda:sm_90.*CUDA targets: cuda:sm_80"):
            k.scale(FakeArray(x), 0.75)
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(logs[1]))
    k = runtime.load(path, on_miss="jit")
    y = k.scale(FakeArray(x), 0.75)
    np.testing.assert_array_equal(y.get(), x * np.float32(0.75) + np.float32(1))   # exact ops
    entry = k._cuda._entries[key]["cuda:sm_90"]
    with open(entry["file"], "rb") as f:
        assert elf.cubin_sm(f.read()) == 90                   # a real sm_90 cubin from NVRTC
    assert entry["symbol"] == symbol_name(key) and cp.launched == [entry["symbol"]]
    np.testing.assert_array_equal(k.scale(FakeArray(x), 0.5).get(), x * np.float32(0.5) + 1)
    records = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert [(r["key"], r["target"], r["on_miss"]) for r in records] == [
        (key, "cuda:sm_90", "error"), (key, "cuda:sm_90", "jit")]
    fold = spec.add_misses(plan, str(logs[0]))
    assert fold.added == 0 and fold.unbuilt == ("cuda:sm_90",) and not fold.bad


# ---------------------------------------------------------------- miss logs that are no files --

def _fusebuild(*args, timeout: float = 60, memory: int | None = 4 << 30):
    """The CLI in a child bounded in time and address space: a regression fails, never hangs
    or fills the machine."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run([sys.executable, "-m", "fusebuild", *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit if memory else None)


def test_add_misses_refuses_a_fifo_and_a_device(specs, tmp_path):
    fifo = tmp_path / "misses.fifo"
    os.mkfifo(fifo)
    for log in (str(fifo), "/dev/zero"):
        r = _fusebuild("compile", specs, "-o", str(tmp_path / "out"), "--add-misses", log)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{log}:0:0: error: cannot read miss log: not a regular file" in r.stderr

def test_add_misses_reads_a_log_up_to_a_limit(specs, tmp_path, monkeypatch):
    log = tmp_path / "misses.jsonl"
    log.write_text('{"key": "scale(f64:c)"}\n' * 10)
    monkeypatch.setattr(spec, "MAX_MISS_LOG_BYTES", 100)
    with pytest.raises(SpecError, match="cannot read miss log: 240 bytes, over the limit of 100"):
        spec.add_misses(spec.load_plan([specs]), str(log))


MISSES = """
import sys, warnings
import numpy as np
from fusebuild import runtime
from fusebuild.errors import KernelNotFound
k = runtime.load(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for dtype in (np.float64, np.float16, np.float64):
        try:
            k.scale(np.ones(4, dtype), 2.0)
        except KernelNotFound as e:
            print(e.key)
print(*(f"{w.category.__name__}: {w.message}" for w in caught), sep="\\n")
"""


def test_a_miss_log_at_a_fifo_warns_once_and_never_blocks(bundle_path, tmp_path):
    import subprocess
    import sys
    lonely, read = tmp_path / "lonely.fifo", tmp_path / "read.fifo"
    for fifo in (lonely, read):
        os.mkfifo(fifo)
    reader = os.open(read, os.O_RDONLY | os.O_NONBLOCK)     # with a reader, open() would succeed
    try:
        for fifo in (lonely, read):
            r = subprocess.run([sys.executable, "-c", MISSES, bundle_path], capture_output=True,
                               text=True, timeout=60,
                               env={**os.environ, "FUSEBUILD_MISS_LOG": str(fifo)})
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines() == [
                "scale(f64:c)", "scale(f16:c)", "scale(f64:c)",
                f"RuntimeWarning: FUSEBUILD_MISS_LOG={fifo} is not a regular file (a FIFO, "
                "device or folder): misses are not logged there"]
        assert os.read(reader, 100) == b""                 # nothing was written
    finally:
        os.close(reader)


def test_add_misses_keeps_to_max_kernels_and_the_runtime_rank(specs, tmp_path):
    log = tmp_path / "misses.jsonl"
    keys = [f"scale({d}:{'s' * r})" for r in range(1, 1501) for d in ("f64", "f16")]
    log.write_text("".join(json.dumps({"key": k, "target": "cpu:x86-64-v2"}) + "\n"
                           for k in keys))
    plan = spec.load_plan([specs])          # 3 kernels
    with pytest.raises(UsageError, match=rf"--add-misses {log}: with the keys logged up to line "
                                         r"8 the build would have 11 kernels, over the limit of 10"):
        spec.add_misses(plan, str(log), max_kernels=10)
    r = _fusebuild("compile", specs, "-o", str(tmp_path / "out"), "--max-kernels", "10",
                   "--add-misses", str(log))
    assert r.returncode == 2 and "over the limit of 10" in r.stderr, r.stderr
    log.write_text(json.dumps({"key": "scale(f64:" + "c" * 65 + ")"}) + "\n" +
                   json.dumps({"key": "scale(f64:" + "c" * 64 + ")"}) + "\n")
    fold = spec.add_misses(plan, str(log))
    assert fold.added == 1 and fold.bad == (f"{log}:1: scale(f64:{'c' * 65}): has rank 65; "
                                            "arrays have at most 64 dims",)


# ---------------------------------------------------------------- backward keys of misses ------

def test_the_backward_key_of_every_example_forward_key_is_the_one_the_build_pairs():
    """`add_misses` derives the backward key of a logged forward key: for each forward key of
    the example specs it is a backward key of the plan (or one an all-strided kernel serves)."""
    from conftest import SPECS
    plan = spec.load_plan([SPECS])
    groups = {gp.group.name: gp for gp in plan.groups}
    checked = 0
    for bwd in (gp for gp in plan.groups if gp.forward):
        fwd = groups[bwd.forward]
        have = {v.key: tuple(lay for _, lay in spec.parse_key(v.key)[1]) for v in bwd.variants}
        for v in fwd.variants:
            key = spec._backward_key(fwd, bwd, v.key)
            lays = tuple(lay for _, lay in spec.parse_key(key)[1])
            assert key in have or any(dispatch.serves(h, lays) for h in have.values()), key
            checked += 1
    assert checked > 40


def test_a_new_layout_of_a_group_with_cat_outputs_is_reported_without_backward_key(tmp_path,
                                                                                   capsys):
    from conftest import SPECS
    from fusebuild.cli import _report_misses
    log = tmp_path / "misses.jsonl"
    keys = ["bias_gelu(f32:sc,f32:bc)", "rotary_embedding(f32:sss,f32:bcc,f32:bcc)",
            "rotary_embedding(f64:ssc,f64:bcc,f64:bcc)"]
    log.write_text("".join(json.dumps({"key": k}) + "\n" for k in keys))
    fold = spec.add_misses(spec.load_plan([SPECS]), str(log))
    assert (fold.added, fold.backward) == (3, 2) and fold.underived == (keys[1],)
    variants = {v.key for gp in fold.plan.groups for v in gp.variants}
    assert {"bias_gelu__grad(f32:sc,f32:bc,f32:cc)",
            "rotary_embedding__grad(f64:ssc,f64:bcc,f64:bcc,f64:ssc)"} <= variants
    _report_misses(str(log), fold)
    assert capsys.readouterr().err == (
        f"{log}: 3 missing keys added, 2 backward keys with them\n  no backward key for "
        f"{keys[1]}: the layout is none of the matrix's and the group has cat outputs; add a "
        "shape pattern of the call\n")


@pytest.fixture
def grad_spec(tmp_path):
    """A group with grad: for float32 rank-1 calls, at the best CPU level of this host."""
    d = tmp_path / "specs"
    d.mkdir()
    (d / "g.yaml").write_text(f"""fusebuild: 1
targets: [cpu:{cpu.host_isas()[-1]}]
groups:
  - name: g
    inputs: {{x: tensor, b: tensor}}
    outputs: [y]
    grad: [x, b]
    body: 'y = sin(x) * b'
    matrix:
      dtype: [float32]
      shapes: [{{x: [N], b: [N]}}]
""")
    return d


def test_a_logged_forward_miss_of_a_grad_group_rebuilds_its_backward_too(grad_spec, tmp_path,
                                                                          monkeypatch):
    torch = pytest.importorskip("torch")
    out, log = tmp_path / "out", tmp_path / "misses.jsonl"
    path = build.build(spec.load_plan([str(grad_spec)]), str(out), progress=False).path
    monkeypatch.setenv("FUSEBUILD_MISS_LOG", str(log))
    x, b = (torch.linspace(-2, 2, 9, dtype=torch.float64, requires_grad=True) for _ in "xb")
    with pytest.raises(KernelNotFound, match=r"no kernel g\(f64:c,f64:c\)"):
        runtime.load(path).torch_library("miss_fwd").g(x, b)
    fold = spec.add_misses(spec.load_plan([str(grad_spec)]), str(log))
    assert (fold.added, fold.backward) == (1, 1) and not fold.bad
    assert [v.key for gp in fold.plan.groups for v in gp.variants][-1] == \
        "g__grad(f64:c,f64:c,f64:c)"
    monkeypatch.delenv("FUSEBUILD_MISS_LOG")
    r = _fusebuild("compile", str(grad_spec), "-o", str(out), "--add-misses", str(log),
                   timeout=300, memory=None)
    assert r.returncode == 0 and f"{log}: 1 missing key added, 1 backward key with them\n" \
        in r.stderr, r.stderr
    ops = runtime.load(path).torch_library("miss_bwd")
    y = ops.g(x, b)
    y.backward(torch.cos(y.detach()))
    xr, br = (t.detach().clone().requires_grad_() for t in (x, b))
    yr = torch.sin(xr) * br
    yr.backward(torch.cos(yr.detach()))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(b.grad, br.grad)


# ---------------------------------------------------------------- hints, applied ---------------

HINT_BODIES = {"f": "y = x * b + 1", "g": "y = sin(x) * b"}


def _hint_spec(matrices: dict) -> str:
    """Groups f and g (g with grad:) at this host's best CPU level, with `matrices`:
    group -> (dtype items, shape patterns, strided)."""
    text = f"fusebuild: 1\ntargets: [cpu:{cpu.host_isas()[-1]}]\ngroups:\n"
    for name, (dtypes, shapes, strided) in matrices.items():
        text += (f"  - name: {name}\n    inputs: {{x: tensor, b: tensor}}\n    outputs: [y]\n"
                 + ("    grad: [x, b]\n" if name == "g" else "")
                 + f"    body: '{HINT_BODIES[name]}'\n    matrix:\n"
                 f"      dtype: [{', '.join(dtypes)}]\n      shapes: [{', '.join(shapes)}]\n"
                 f"      strided: {str(strided).lower()}\n")
    return text


def _apply_hint(matrices: dict, hint: str) -> dict:
    """`matrices` with the change a KernelNotFound hint asks for."""
    group = re.search(r"in group '(\w+)' of your spec, ", hint).group(1)
    dtypes, shapes, strided = matrices[group]
    dmap = re.search(r"add `(\{[^`]*\})` under matrix\.dtype", hint)
    pattern = re.search(r"add `(\{[^`]*\})` under matrix\.shapes", hint)
    return {**matrices, group: (dtypes + [dmap.group(1)] if dmap else dtypes,
                                shapes + [pattern.group(1)] if pattern else shapes,
                                strided or "set `strided: true` under matrix" in hint)}


def _f64(*shape):
    return np.random.default_rng(1).standard_normal(shape)


@pytest.mark.parametrize("group,args,wants", [
    ("f", lambda: (_f64(6), _f64(6)), ("dtype",)),
    ("f", lambda: (_f64(4, 8).astype(np.float32), _f64(8).astype(np.float32)), ("shapes",)),
    ("f", lambda: (_f64(4, 16).astype(np.float32)[:, ::2], _f64(8).astype(np.float32)),
     ("shapes", "strided")),
    ("f", lambda: (_f64(4, 8), _f64(8)), ("dtype", "shapes")),
    ("g__grad", lambda: (_f64(6), _f64(6), _f64(6)), ("dtype",)),
], ids=["dtype", "shape", "strided", "both", "backward"])
def test_a_hint_is_the_smallest_change_and_applying_it_serves_the_call(tmp_path, group, args,
                                                                       wants):
    base = {"f": (["float32"], ["{x: [N], b: [N]}"], False),
            "g": (["float32"], ["{x: [N], b: [N]}"], False)}
    specs = tmp_path / "s.yaml"
    specs.write_text(_hint_spec(base))
    out = tmp_path / "out"
    path = build.build(spec.load_plan([str(specs)]), str(out), progress=False).path
    a = args()
    with pytest.raises(KernelNotFound) as e:
        runtime.load(path)[group](*a)
    hint = str(e.value).split("to add it: ", 1)[1]
    assert ("under matrix.dtype" in hint) == ("dtype" in wants), hint
    assert ("under matrix.shapes" in hint) == ("shapes" in wants), hint
    assert ("strided: true" in hint) == ("strided" in wants), hint
    if group == "g__grad":
        assert hint.startswith("g__grad is the backward group of 'g', built from its `grad:`")
        assert "in group 'g' of your spec, add `{x: float64, b: float64}` under matrix.dtype" \
            in hint
    specs.write_text(_hint_spec(_apply_hint(base, hint)))
    got = runtime.load(build.build(spec.load_plan([str(specs)]), str(out),
                                   progress=False).path)[group](*a)
    if group == "f":
        want = a[0] * a[1] + 1
    else:
        x, b, gy = a
        want = (np.cos(x) * b * gy, np.sin(x) * gy)
    np.testing.assert_allclose(got, want, rtol=1e-6)
