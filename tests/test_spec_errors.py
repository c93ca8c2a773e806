"""Bad specs: every error is a SpecError naming file:line:column with a hint, and the CLI
reports it with exit code 2 and no traceback."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from fusebuild import spec
from fusebuild.errors import SpecError

BASE = """\
fusebuild: 1
groups:
  - name: g
    inputs: {x: tensor, b: tensor}
    outputs: [y]
    body: |
      t = x + b
      y = exp(t)
    matrix: {dtype: [float32], shapes: [{x: [N], b: [N]}]}
"""


def body(text: str, inputs: str = "{x: tensor, b: tensor}", outputs: str = "[y]",
         matrix: str = "{dtype: [float32], shapes: [{x: [N], b: [N]}]}") -> str:
    lines = textwrap.indent(textwrap.dedent(text).strip("\n"), " " * 6)
    return (f"fusebuild: 1\ngroups:\n  - name: g\n    inputs: {inputs}\n    outputs: {outputs}\n"
            f"    body: |\n{lines}\n    matrix: {matrix}\n")


# (id, spec text, marker whose first occurrence is the expected position, message regex)
CASES = [
    ("malformed-yaml", BASE.replace("outputs: [y]", "outputs: [y"), ": |", r"malformed YAML"),
    ("unknown-top-key", BASE + "extras: 1\n", "extras", r"unknown key 'extras'"),
    ("unknown-group-key", BASE.replace("    outputs:", "    output_dtype: f32\n    outputs:"),
     "output_dtype", r"unknown key 'output_dtype'"),
    ("missing-version", BASE.replace("fusebuild: 1\n", ""), "groups", r"missing `fusebuild: 1`"),
    ("unknown-op", body("y = gelux(x)"), "gelux", r"unknown op 'gelux'.*\n.*did you mean gelu"),
    ("wrong-arity", body("y = exp(x, b)"), "exp(", r"exp\(\) takes at most 1 argument"),
    ("missing-arg", body("y = where(x > 0, b)"), "where(", r"missing argument 'b'"),
    ("bad-keyword", body("y = leaky_relu(x, negative_slope=0.1)"), "0.1",
     r"unexpected keyword 'negative_slope'"),
    ("undefined-name", body("y = exp(z)"), "z)", r"undefined name 'z'"),
    ("reassigned", body("t = x\nt = b\ny = t"), "t = b", r"'t' is already assigned"),
    ("reassign-input", body("x = b\ny = x"), "x = b", r"'x' is an input"),
    ("shift-on-float", body("y = x << b"), "x <<", r"lshift\(\) needs integer operands"),
    ("bool-arith", body("y = (x > 0) + (b > 0)"), "(x > 0) +", r"add\(\) is not defined on bool"),
    ("chunk-non-input", body("t = x + b\na, c = chunk(t, 2, dim=0)\ny = a + c"), "t, 2",
     r"chunk\(\) applies to tensor inputs only"),
    ("chunk-not-dividing", body("a, c = chunk(x, 2, dim=0)\ny = a + c + b",
                                matrix="{dtype: [float32], shapes: [{x: [N], b: [N]}]}"),
     "{x: [N]", r"size N is not known to be divisible by 2"),
    ("chunk-count", body("a, c = chunk(x, 3, dim=0)\ny = a + c"), "a, c", r"gives 3 values"),
    ("cat-inside", body("y = cat([x, b], dim=0)\nz = y + 1", outputs="[y, z]"), "y + 1",
     r"cat output and cannot be used inside"),
    ("cat-not-output", body("t = cat([x, b], dim=0)\ny = t"), "t = cat", r"must be a declared output"),
    ("unknown-dtype", BASE.replace("dtype: [float32]", "dtype: [float33]"), "float33",
     r"unknown dtype 'float33'"),
    ("unknown-input-type", BASE.replace("b: tensor}", "b: vector}"), "vector",
     r"unknown input type 'vector'"),
    ("unknown-target", "targets: [cuda:sm_9x]\n" + BASE, "cuda:sm_9x", r"unknown target 'cuda:sm_9x'"),
    ("no-broadcast", BASE.replace("b: [N]}", "b: [M]}"), "{x: [N]", r"shapes do not broadcast"),
    ("duplicate-group", BASE + BASE.split("groups:\n")[1], (10, 11), r"duplicate group 'g' \(first defined at .*:3\)"),
    ("import-payload", body("y = __import__('os').system('true')"), "__import__",
     r"attribute access is not allowed|only ops of the table"),
    ("attribute", body("y = x.sum()"), "x.sum", r"attribute access is not allowed"),
    ("lambda", body("y = (lambda q: q)(x)"), "(lambda", r"only ops of the table|lambdas"),
    ("subscript", body("y = x[0]"), "x[0]", r"subscripts are not allowed"),
    ("statement", body("import os\ny = x"), "import os", r"Import is not allowed"),
    ("syntax", body("y = exp(x"), "(x\n", r"syntax error.*never closed"),
    ("literal-overflow", body("y = x + 300", inputs="{x: tensor(int8), b: tensor}"), "x + 300",
     r"literal 300 does not fit int8"),
    ("rand-of-int", body("y = rand_like(x)", inputs="{x: tensor(int32), b: tensor}"), "rand_like",
     r"rand_like\(\) needs a float tensor"),
    ("unassigned-output", body("t = x", outputs="[y]"), "t = x", r"output 'y' is never assigned"),
    ("scalar-without-dtype", BASE.replace("b: tensor}", "b: tensor, s: scalar}"), "scalar}",
     r"scalar input 's' needs a dtype"),
]


def position(text: str, marker) -> tuple[int, int]:
    if isinstance(marker, tuple):
        return marker
    i = text.index(marker)
    line = text.count("\n", 0, i) + 1
    return line, i - (text.rfind("\n", 0, i) + 1) + 1


@pytest.mark.parametrize("name,text,marker,pattern", CASES, ids=[c[0] for c in CASES])
def test_spec_error_names_file_line_column_and_hint(tmp_path, name, text, marker, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        spec.load_plan([str(path)])
    err = info.value
    assert re.search(pattern, str(err)), str(err)
    assert err.file == str(path)
    assert (err.line, err.col) == position(text, marker), str(err)
    assert str(err).startswith(f"{path}:{err.line}:{err.col}: error: ")
    assert "\n  hint: " in str(err), str(err)


def test_matrix_over_the_limit(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(BASE.replace("dtype: [float32]", "dtype: [float32, float16, bfloat16, float64]"))
    with pytest.raises(SpecError, match=r"over the limit of 5") as info:
        spec.load_plan([str(path)], max_kernels=5)
    assert (info.value.line, info.value.col) == position(path.read_text(), "{dtype")


def test_cli_reports_spec_errors_with_exit_code_2_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(body("y = gelux(x)"))
    for cmd in ("check", "plan", "compile"):
        proc = subprocess.run([sys.executable, "-m", "fusebuild", cmd, str(path), "-o" if cmd ==
                               "compile" else "--max-kernels", str(tmp_path / "o") if cmd ==
                               "compile" else "100"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"{path}:7:11: error: unknown op 'gelux'" in proc.stderr
        assert "hint: did you mean gelu" in proc.stderr
