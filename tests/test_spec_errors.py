"""Bad specs: every error is a SpecError naming file:line:column with a hint, and the CLI
reports it with exit code 2 and no traceback."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusebuild import spec
from fusebuild.errors import SpecError, UsageError

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


ROWS = "{dtype: [float32], shapes: [{x: [B, N], b: [B, N]}]}"
NESTED = r"expression nested more than 1000 levels deep"
UNKNOWN_ARCH = r"cannot compile for sm_|is not a known CUDA architecture"

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
    ("no-shape-pattern", BASE.replace("shapes: [{x: [N], b: [N]}]", "shapes: []"), "shapes",
     r"matrix.shapes lists no shape pattern"),
    ("no-dtype", BASE.replace("dtype: [float32]", "dtype: []"), "dtype",
     r"matrix.dtype lists no dtype"),
    ("rank-over-64", BASE.replace("x: [N]", "x: [" + ", ".join(["1"] * 65) + "]"), "[1, 1",
     r"the shape of 'x' has 65 dims; arrays have at most 64"),
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
    # nesting past syntax.MAX_NESTING (1000) is refused at the operator where it is crossed
    ("deep-minus", body("y = " + "-" * 1100 + "x"), (7, 11 + 1000), NESTED),
    ("deep-not", body("y = " + "not " * 1100 + "x"), (7, 11 + 4 * 1000), NESTED),
    ("deep-invert", body("y = " + "~" * 1100 + "x"), (7, 11 + 1000), NESTED),
    ("deep-if-else", body("y = " + "x if b else " * 1100 + "x"), (7, 11 + 12 * 1000), NESTED),
    ("deep-power", body("y = " + "x ** " * 1100 + "x"), (7, 11 + 5 * 1000), NESTED),
    ("flat-sum-over-limit", body("y = " + " + ".join(["x"] * 1200)), (7, 11), NESTED),
    ("huge-int-literal", body("y = x + 1" + "0" * 400), "10000", r"integer literal is too large"),
    ("syntax-warning", body("y = 1if x else b"), "1if", r"syntax error in body: invalid decimal"),
    ("nul-in-body", BASE.replace("body: |\n      t = x + b\n      y = exp(t)",
                                 'body: "y = exp(x)\\0 + b"'), (6, 22), r"body contains a NUL"),
    # YAML: only plain values; no tags, merge keys or runaway nesting
    ("yaml-python-tag", BASE.replace("fusebuild: 1", "fusebuild: !!python/object/apply:os.system "
                                     "['true']"), "!!python",
     r"YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("yaml-custom-tag", BASE.replace("outputs: [y]", "outputs: !out [y]"), "!out",
     r"YAML tag '!out' is not allowed"),
    ("yaml-merge-key",
     "base: &b {doc: d}\n" + BASE.replace("    outputs:", "    <<: *b\n    outputs:"),
     "<<", r"merge keys \(`<<`\) are not supported"),
    ("yaml-unreadable-value", BASE.replace("b: tensor}", "b: !!int tensor}"), "!!int",
     r"cannot read 'tensor' as a YAML int"),
    ("yaml-deep-flow", "fusebuild: 1\ngroups: " + "[" * 5000 + "]" * 5000 + "\n", (2, 41),
     r"YAML nested more than 32 levels deep"),
    ("yaml-deep-block", "fusebuild: 1\ngroups:\n" + "".join(" " * i + "- \n" for i in range(40)),
     (34, 32), r"YAML nested more than 32 levels deep"),
    # targets, group and bundle names that compile could not build
    ("cuda-arch-999", "targets: [cuda:sm_999]\n" + BASE, "cuda:sm_999", UNKNOWN_ARCH),
    ("cuda-arch-12", "targets: [cpu, cuda:sm_12]\n" + BASE, "cuda:sm_12", UNKNOWN_ARCH),
    ("cuda-arch-variant", "targets: [cuda:sm_80a]\n" + BASE, "cuda:sm_80a", r"start at sm_90a"),
    ("group-name-too-long", BASE.replace("name: g", "name: " + "g" * 250), "g" * 250,
     r"group name is 250 characters long; at most 249 fit a file name"),
    ("bundle-name-too-long", "bundle: {name: " + "n" * 200 + "}\n" + BASE, "{name",
     r"bundle name and version are 206 characters long; at most 200"),
    ("bad-bundle-version", "bundle: {name: demo, version: 'a b'}\n" + BASE, "'a b'",
     r"bundle version 'a b' may only hold"),
    # row reductions (DESIGN §8): the last dim only, float types, uniform parameters, row values
    ("reduce-dim-0", body("y = sum(x, dim=0)", matrix=ROWS), "0)",
     r"dim=0 is not the last dim of the shape pattern at line 8 \(rank 2\)"),
    ("reduce-dim-not-last-in-one-pattern", body("y = amax(x, dim=1)", matrix=ROWS.replace(
        "]}]", "]}, {x: [N], b: [N]}]")), "1)", r"dim=1 is not the last dim .*\(rank 1\)"),
    ("reduce-dim-minus-2", body("y = mean(x, dim=-2)", matrix=ROWS), "-2",
     r"mean\(\) reduces the last dim only: dim=-2 is not supported"),
    ("reduce-chunk-dim-0", body("a, c = chunk(x, 2, dim=1)\ny = sum(a, dim=0) + c",
                                matrix=ROWS.replace("x: [B, N]", "x: [B, 2*N]")), "0)",
     r"dim=0 is not the last dim"),
    ("reduce-dim-name", body("y = sum(x, dim=b)", matrix=ROWS), "b)",
     r"dim= of sum\(\) must be an integer literal, got b"),
    ("reduce-dim-float", body("y = sum(x, dim=-1.0)", matrix=ROWS), "-1.0",
     r"must be an integer literal, got -1.0"),
    ("mean-of-int", body("y = mean(x)", inputs="{x: tensor(int32), b: tensor}", matrix=ROWS),
     "mean(", r"mean\(\) needs a float operand, got int32"),
    ("var-of-bool", body("y = var(x > b)", matrix=ROWS), "var(",
     r"var\(\) needs a float operand, got bool"),
    ("softmax-of-int", body("y = softmax(x)", inputs="{x: tensor(int8), b: tensor}",
                            matrix=ROWS), "softmax(",
     r"softmax\(\) needs a float operand, got int8"),
    ("amax-of-bool", body("y = amax(x > b)", matrix=ROWS), "amax(",
     r"amax\(\) needs an int or float operand, got bool\n.*amax\(uint8\(c\)\) is 1 where any"),
    ("row-value-in-cat", body("y = cat([sum(x), b], dim=-1)", matrix=ROWS), "sum(x)",
     r"cat\(\) part of 'y' is a row value"),
    ("eps-tensor", body("y = layer_norm(x, eps=b)", matrix=ROWS), "b)",
     r"eps= of layer_norm\(\) must be a number or a scalar input, got b"),
    ("reduce-rank-0-pattern", body("y = softmax(x) + b", matrix=ROWS.replace(
        "]}]", "]}, {x: [], b: []}]")), "{x: []", r"reduces over the last dim, but this shape "
     r"pattern has rank 0"),
    ("reduce-arity", body("y = softmax(x, -1, 2)", matrix=ROWS), "softmax(",
     r"softmax\(\) takes at most 2 arguments \(3 given\)"),
    ("reduce-axis", body("y = sum(x, axis=-1)", matrix=ROWS), "-1)",
     r"unexpected keyword 'axis'\n.*did you mean sum\(x, dim=-1\)"),
    ("reduce-keepdim", body("y = amax(x, keepdim=True) + b", matrix=ROWS), "True",
     r"unexpected keyword 'keepdim'\n.*always keep the reduced dim"),
    ("norm-dim", body("y = layer_norm(x, dim=-1)", matrix=ROWS), "-1)",
     r"layer_norm\(\) always normalizes the last dim"),
    ("var-unbiased", body("y = var(x, unbiased=True)", matrix=ROWS), "True",
     r"unexpected keyword 'unbiased'\n.*correction=1"),
    ("hand-written-backward", body("y = x * b").replace("name: g", "name: g__grad"), "g__grad",
     r"'g__grad' ends with '__grad', which is reserved for the backward groups fusebuild "
     r"derives\n.*`grad:` in group 'g'"),
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


def test_cli_check_refuses_an_empty_shapes_list_at_its_key(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(BASE.replace("shapes: [{x: [N], b: [N]}]", "shapes: []"))
    line, col = position(path.read_text(), "shapes")
    proc = subprocess.run([sys.executable, "-m", "fusebuild", "check", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"fusebuild: {path}:{line}:{col}: error: matrix.shapes lists "
                                  "no shape pattern"), proc.stderr


def test_cli_check_locates_a_reduction_error_in_the_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(body("y = x - mean(x, axis=-1)", matrix=ROWS))
    proc = subprocess.run([sys.executable, "-m", "fusebuild", "check", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:7:28: error: mean() got an unexpected keyword 'axis'" in proc.stderr
    assert "hint: reductions take dim=, not axis=" in proc.stderr


# (id, spec bytes, expected (line, column), message regex): files YAML cannot even read as text
BINARY = [
    ("nul-byte", BASE.encode().replace(b"groups", b"gro\0ups"), (2, 4),
     r"contains a NUL character"),
    ("utf16-bom", BASE.encode("utf-16"), (1, 1), r"is UTF-16 text"),
    ("utf16-no-bom", BASE.encode("utf-16-le"), (1, 2), r"NUL character.*\n.*UTF-16"),
    ("invalid-utf8", BASE.encode().replace(b"name: g", b"name: g\xff"), (3, 12),
     r"not valid UTF-8 \(byte 0xff\)"),
    ("control-char", BASE.encode().replace(b"[y]", b"[y\x1b]"), (5, 16),
     r"control character U\+001B"),
]


@pytest.mark.parametrize("name,data,where,pattern", BINARY, ids=[c[0] for c in BINARY])
def test_unreadable_spec_file_is_a_located_spec_error(tmp_path, name, data, where, pattern):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError) as info:
        spec.load_plan([str(path)])
    assert re.search(pattern, str(info.value)), str(info.value)
    assert (info.value.file, info.value.line, info.value.col) == (str(path), *where)


def test_unknown_cuda_arch_on_the_command_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    with pytest.raises(UsageError, match=UNKNOWN_ARCH) as info:
        spec.load_plan([str(path)], targets=["cpu", "cuda:sm_999"])
    assert str(info.value).startswith("--target cuda:sm_999: ")   # no fake file:line:column
    assert "sm_90" in str(info.value)      # the supported archs are listed


def test_cuda_archs_without_nvrtc_come_from_the_known_table(tmp_path, monkeypatch):
    from fusebuild import targets
    from fusebuild.errors import ToolchainError
    from fusebuild.toolchain import nvrtc

    def missing():
        raise ToolchainError("NVRTC is not available")
    monkeypatch.setattr(nvrtc, "supported_archs", missing)
    targets.cuda_archs.cache_clear()
    try:
        assert targets.buildable(["cuda:sm_80", "cuda:sm_90a", "cuda:compute_120"])
        with pytest.raises(ValueError, match=r"sm_999 is not a known CUDA architecture; known: "
                                             r"sm_50, .*sm_90, .*sm_121"):
            targets.buildable(["cuda:sm_999"])
        with pytest.raises(ValueError, match=r"sm_12 is not a known"):
            targets.buildable(["cuda:compute_12"])
    finally:
        targets.cuda_archs.cache_clear()


def test_limits_are_inclusive(tmp_path):
    """A group name of 249 characters and 1000 nested operators are accepted."""
    path = tmp_path / "s.yaml"
    path.write_text(BASE.replace("name: g", "name: " + "g" * 249)
                    .replace("y = exp(t)", "y = exp(t)" + " + t" * 999))
    (gp,) = spec.load_plan([str(path)]).groups
    assert len(gp.group.name) == 249


def test_yaml_timestamps_and_equals_signs_read_as_strings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("bundle: {name: d, version: 2024-02-30}\n" +
                    BASE.replace("    matrix:", "    doc: =\n    matrix:"))
    plan = spec.load_plan([str(path)])
    assert plan.version == "2024-02-30" and plan.groups[0].group.doc == "="


DEEP_BODIES = [   # (body, numpy float64 oracle of y from x >= 1): each used to raise RecursionError
    ("y = " + " + ".join(["x"] * 1000), lambda x: sum_left(x, 1000)),
    ("y = " + "-" * 1000 + "x", lambda x: x),
    ("y = x" + " ** 1.0" * 400, lambda x: x),                            # x ** (1.0 ** ...)
    ("y = " + "x if x > 2 else " * 400 + "-x", lambda x: np.where(x > 2, x, -x)),
    ("y = float32(" + "not " * 401 + "x > 2)", lambda x: (x <= 2).astype(np.float64)),
]


def sum_left(x, n):
    acc = np.zeros_like(x, dtype=np.float32)
    for _ in range(n):
        acc = acc + x.astype(np.float32)      # left to right, rounded to float32 each step
    return acc


@pytest.mark.parametrize("text,oracle", DEEP_BODIES, ids=["sum1000", "neg1000", "pow400",
                                                          "ifelse400", "not401"])
def test_deep_bodies_work(tmp_path, text, oracle):
    import pickle

    from fusebuild import dtypes as dt, ir, reference
    path = tmp_path / "s.yaml"
    path.write_text(body(text, inputs="{x: tensor}",
                         matrix="{dtype: [float32], shapes: [{x: [N]}]}"))
    (gp,) = spec.load_plan([str(path)]).groups
    assert gp.group.body == text                       # canonical text of any depth
    assert pickle.loads(pickle.dumps(gp.group)) == gp.group     # as sent to compile workers
    x = np.linspace(1, 4, 13, dtype=np.float32)
    got = reference.evaluate(ir.instantiate(gp.group, {"x": dt.float32}, expand=False), [x])
    np.testing.assert_array_equal(got.outputs["y"], np.asarray(oracle(x), np.float32))


def test_a_flat_sum_of_1000_terms_compiles_and_runs(tmp_path):
    from fusebuild import build, runtime
    text = " + ".join(["x", "b"] * 500)
    path = tmp_path / "s.yaml"
    path.write_text(body(f"y = {text}"))
    plan = spec.load_plan([str(path)], targets=["cpu:x86-64-v2"])   # every x86-64 host runs v2
    bundle = runtime.load(build.build(plan, str(tmp_path / "out"), progress=False).path)
    x, b = np.float32([1.5, -2.25, 3e5]), np.float32([1e-3, 7.0, -1.0])
    want = np.zeros(3, np.float32)
    for _ in range(500):
        want = want + x + b
    np.testing.assert_array_equal(bundle.g(x, b), want)
