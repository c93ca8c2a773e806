"""The example CI workflow is valid YAML and every fusebuild command in it parses."""
from __future__ import annotations

import os
import re
import shlex

import yaml

from fusebuild.cli import main
from conftest import ROOT

WORKFLOW = os.path.join(ROOT, "examples", "ci", "github-actions.yml")


def test_example_workflow_commands_parse():
    flow = yaml.safe_load(open(WORKFLOW))
    commands = []
    for job in flow["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).replace(">\n", " ").splitlines():
                line = re.sub(r"\$\{\{[^}]*\}\}", "1", line).strip()
                if line.startswith("fusebuild "):
                    commands.append(shlex.split(line)[1:])
    assert {c[0] for c in commands} >= {"compile", "merge", "verify", "pack"}
    for argv in commands:
        cmd = main.get_command(None, argv[0])
        cmd.make_context(argv[0], argv[1:])       # raises click.UsageError on a bad option
