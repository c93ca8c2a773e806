"""The command line: compile/check/plan/list, exit codes, one-line summaries, no tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = """fusebuild: 1
bundle: {name: small, version: 1.2.3}
groups:
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = a * x + y'
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [N], y: [N]}]}
"""


def fusebuild(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fusebuild", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture
def small_spec(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "small.yaml").write_text(SMALL)
    return tmp_path


def test_compile_check_plan_list(small_spec):
    out = small_spec / "out"
    r = fusebuild("check", "specs", cwd=small_spec)
    assert r.returncode == 0 and r.stdout.startswith("ok: 1 group, 6 kernels"), r.stderr
    r = fusebuild("plan", "specs", "--target", "cpu:x86-64-v2", cwd=small_spec)
    assert r.returncode == 0
    assert r.stdout.split() == ["axpy(f32:c,f32:c)", "cpu:x86-64-v2", "axpy(bf16:c,bf16:c)",
                                "cpu:x86-64-v2"]
    r = fusebuild("compile", "specs", "-o", str(out), "-j", "2", cwd=small_spec)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("6 kernels (1 group, 3 targets")
    assert os.path.isfile(out / "small-1.2.3" / "manifest.json")
    r = fusebuild("list", str(out / "small-1.2.3"))
    assert r.returncode == 0
    assert "axpy(x, y, a: float32) -> z    [6 kernels]" in r.stdout


def test_compile_json_and_overrides(small_spec):
    r = fusebuild("compile", "specs", "-o", str(small_spec / "o"), "--json", "--name", "alt",
                  "--version", "9", "--target", "cpu:x86-64-v3", cwd=small_spec)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "alt" and info["version"] == "9" and info["kernels"] == 2
    assert info["bundle"].endswith("alt-9")


@pytest.mark.parametrize("args,code,message", [
    (["compile", "specs", "--target", "tpu"], 2, "unknown target 'tpu'"),
    (["compile", "nowhere"], 2, "no such spec file or directory"),
    (["compile", "specs", "-j", "0"], 2, "Invalid value for '-j'"),
    (["list", "missing-bundle"], 1, "not a directory"),
    (["frobnicate"], 2, "No such command"),
])
def test_usage_errors_have_exit_codes_and_no_traceback(small_spec, args, code, message):
    r = fusebuild(*args, cwd=small_spec)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_directory_is_a_clear_error(small_spec):
    blocker = small_spec / "not-a-dir"
    blocker.write_text("a file where the output directory should go")
    r = fusebuild("compile", "specs", "-o", str(blocker / "out"), cwd=small_spec)
    assert r.returncode == 1
    assert "cannot write to output directory" in r.stderr and "Traceback" not in r.stderr


def test_json_failures_are_printed_as_json(small_spec):
    bad = small_spec / "bad.yaml"
    bad.write_text(SMALL.replace("a * x + y", "a * x + frob(y)"))
    r = fusebuild("compile", str(bad), "-o", str(small_spec / "o"), "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    info = json.loads(r.stdout)
    assert info["ok"] is False and info["error"] == "SpecError" and info["exit_code"] == 2
    assert info["file"] == str(bad) and info["line"] == 7 and "unknown op 'frob'" in info["message"]
    r = fusebuild("plan", "specs", "--target", "cuda:sm_x", "--json", cwd=small_spec)
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "UsageError"
    r = fusebuild("compile", "specs", "-o", str(small_spec / "o"), "--json",
                  "--target", "cpu:x86-64-v2", cwd=small_spec)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


@pytest.mark.parametrize("args,message", [
    (["check", "specs", "--target", "cuda:sm_x"], "fusebuild: --target cuda:sm_x: unknown target"),
    (["check", "specs", "--target", "cpu", "--target", "tpu"], "fusebuild: --target tpu: "),
    (["compile", "specs", "--name", "a b"], "fusebuild: --name a b: bundle name 'a b' may only"),
])
def test_command_line_values_are_named_without_fake_positions(small_spec, args, message):
    r = fusebuild(*args, cwd=small_spec)
    assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
    assert ":0:0" not in r.stderr


def test_target_hints_cite_the_readme(small_spec):
    spec = SMALL.replace("groups:", "targets: [tpu]\ngroups:")
    (small_spec / "specs" / "small.yaml").write_text(spec)
    r = fusebuild("check", "specs", cwd=small_spec)
    assert r.returncode == 2 and "small.yaml:3:" in r.stderr
    assert "README" in r.stderr and "DESIGN" not in r.stderr


@pytest.mark.parametrize("hidden,argv", [("click", ["--help"]), ("yaml", ["check", "specs"])])
def test_a_runtime_only_install_names_the_extra_to_install(small_spec, hidden, argv):
    code = (f"import sys; sys.modules[{hidden!r}] = None; sys.argv = ['fusebuild', *{argv!r}]\n"
            "from fusebuild.__main__ import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=small_spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (f"({hidden} is not installed): pip install 'fusebuild[cpu]' (CPU kernels), "
            "'fusebuild[cuda]' (CUDA kernels) or 'fusebuild[build]' (both)") in r.stderr
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = 'fusebuild = "fusebuild.__main__:main"'      # the console script takes this path
    assert script in open(os.path.join(root, "pyproject.toml")).read()


# What an install of one backend's extra lacks: the other's modules and their distributions.
_WITHOUT = """import sys, importlib.metadata as md
hidden = {hidden!r}
for m in hidden: sys.modules[m] = None
version = md.version
def without(name):
    if name in hidden or name.startswith("cupy") or name.startswith("nvidia"):
        raise md.PackageNotFoundError(name)
    return version(name)
md.version = without
sys.argv = ["fusebuild", "compile", "specs", "-o", "out", "--target", {target!r}, "-q"]
from fusebuild.__main__ import main; main()
"""


@pytest.mark.parametrize("extra,hidden,target", [
    ("cpu", ["cupy", "cupy_backends", "nvidia"], "cpu:x86-64-v2"),
    ("cuda", ["numba", "llvmlite"], "cuda:sm_80")])
def test_one_backend_extra_builds_its_backend(small_spec, extra, hidden, target):
    """`[cpu]` builds CPU kernels without cupy and NVRTC, `[cuda]` CUDA kernels without numba and
    llvmlite; `[build]` is both (pyproject.toml)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11+")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["build"] == ["fusebuild[cpu,cuda]"]
    assert all(not any(d.replace("-", "_").startswith(h) for h in hidden) for d in extras[extra])
    r = subprocess.run([sys.executable, "-c", _WITHOUT.format(hidden=hidden, target=target)],
                       capture_output=True, text=True, cwd=small_spec)
    assert r.returncode == 0, r.stderr
    assert len(list((small_spec / "out").glob(f"*/{target.split(':')[0]}/*/axpy.*"))) == 1


def test_a_cuda_only_install_names_the_cpu_extra(small_spec):
    r = subprocess.run([sys.executable, "-c", _WITHOUT.format(hidden=["numba", "llvmlite"],
                                                              target="cpu:x86-64-v2")],
                       capture_output=True, text=True, cwd=small_spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'fusebuild[cpu]' (CPU kernels; 'fusebuild[build]' for CPU and CUDA)" \
        in r.stderr