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
