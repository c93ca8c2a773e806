"""The example CI workflow: valid YAML, every fusebuild command parses, fusebuild is installed
from the checked-out repository, and its run steps work end to end on a small spec."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import yaml

from fusebuild import runtime
from fusebuild.cli import main
from conftest import ROOT

WORKFLOW = os.path.join(ROOT, "examples", "ci", "github-actions.yml")
INSTALL = 'python -m pip install ".[build]"'
SMALL_TARGETS = "--target cpu:x86-64-v2 --target cuda:sm_80 "     # instead of the workflow's
SPEC = """fusebuild: 1
bundle: {name: ci, version: "1"}
groups:
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = a * x + erf(y)'
    matrix: {dtype: [float32], shapes: [{x: [N], y: [N]}]}
"""


def _flow() -> dict:
    return yaml.safe_load(open(WORKFLOW))


def _expand(text: str, values: dict) -> str:
    """The workflow's ${{ ... }} expressions, with `values` for the ones the test stands in for."""
    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: str(values[m.group(1)]), text)


def test_example_workflow_commands_parse():
    commands = []
    for job in _flow()["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                line = re.sub(r"\$\{\{[^}]*\}\}", "1", line).strip()
                if line.startswith("fusebuild "):
                    commands.append(shlex.split(line)[1:])
    assert {c[0] for c in commands} >= {"compile", "merge", "verify", "pack"}
    for argv in commands:
        cmd = main.get_command(None, argv[0])
        cmd.make_context(argv[0], argv[1:])       # raises click.UsageError on a bad option


def test_example_workflow_runs(tmp_path):
    """Each job's steps in order, in a workspace holding specs/ (with fewer targets): fusebuild
    is installed from the checkout (not an index where it is not published), then every run step
    works; the shards of all matrix jobs meet in one directory, as download-artifact's
    merge-multiple gives."""
    flow = _flow()
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "ci.yaml").write_text(SPEC)
    shim = tmp_path / "bin" / "fusebuild"      # the console script of the checkout under test
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fusebuild \"$@\"\n")
    shim.chmod(0o755)
    values = {"github.workspace": tmp_path, "env.SHARDS": flow["env"]["SHARDS"]}
    env = {**os.environ, **{k: _expand(str(v), values) for k, v in flow["env"].items()},
           "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    ran, printed = [], ""
    for name, job in flow["jobs"].items():
        for shard in job.get("strategy", {}).get("matrix", {}).get("shard", [None]):
            checked_out = installed = False
            for step in job["steps"]:
                checked_out |= step.get("uses", "").startswith("actions/checkout@")
                if "run" not in step:
                    continue
                script = _expand(step["run"], {**values, "matrix.shard": shard}).strip()
                script = re.sub(r"(--target \S+\s+)+", SMALL_TARGETS, script)
                if script.startswith("python -m pip install"):
                    assert script == INSTALL and checked_out, f"{name}: {script}"
                    installed = True
                    continue
                assert installed, f"{name} runs fusebuild before installing it"
                r = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                                   capture_output=True, text=True)
                assert r.returncode == 0, f"{name}: {script}\n{r.stdout}\n{r.stderr}"
                if "--json" in script:
                    assert json.loads(r.stdout)["ok"] is True
                ran.append(script.split()[1])
                printed += r.stdout
                assert ran[-1] != "compile" or SMALL_TARGETS in script
    assert ran.count("compile") == int(flow["env"]["SHARDS"]) and "merge" in ran
    assert os.path.isfile(tmp_path / "kernels.tar.gz")
    bundle_id = runtime.load(str(tmp_path / "kernels.tar.gz")).id
    assert f"(id {bundle_id})" in printed          # the full id to pin, printed by verify
    assert runtime.load(str(tmp_path / "kernels.tar.gz"), expect_id=bundle_id).id == bundle_id
