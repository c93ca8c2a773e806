"""Fuzzing the spec parser (seeded, so every run checks the same inputs).

Every input, however broken, is either accepted or refused with a SpecError that names
file:line:column and gives a hint; the CLI turns that into exit code 2 without a traceback.
Any other exception fails the test with the input that caused it. Valid inputs are accepted.
"""
from __future__ import annotations

import ast
import os
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fusebuild import syntax, spec
from fusebuild.cli import main
from fusebuild.errors import SpecError
from fusebuild.ops import CASTS, OPS
from fusebuild.unparse import unparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(os.path.join(ROOT, "specs", f) for f in os.listdir(os.path.join(ROOT, "specs"))
                  if f.endswith(".yaml"))

# ------------------------------------------------------------------ inputs ----------------------

YAML_TOKENS = [b":", b": ", b"- ", b"[", b"]", b"{", b"}", b",", b"&a ", b"*a", b"<<: ", b"? ",
               b"!!python/object/apply:os.system ", b"!foo ", b"!!binary ", b"!!set ", b"!!int ",
               b"!!float ", b'"', b"'", b"|", b">", b"#", b"\t", b"\n", b"\r", b"\0", b"\xff",
               b"\xc3", b"\xef\xbb\xbf", b"\x1b", b"%YAML 1.1\n", b"---\n", b"...\n", b"=", b"~",
               b"null", b"true", b"2024-02-30", b"0x1F", b"1e999", b".inf", b"-1", b"0",
               b"9" * 30, b"\\", b"@", b"`", b"    "]
BODY_TOKENS = [b"+", b"-", b"**", b"//", b"(", b")", b" if ", b" else ", b"lambda ", b"not ",
               b"1e400", b"9" * 400, b"chunk(", b"cat(", b"dim=", b",", b"x", b"nan", b" = ",
               b"==", b"<", b"&", b"~", b"<<", b"True", b"exp(", b"where(", b"clamp(", b"min=",
               b"float16(", b"int8(", b"rand_like(", b".", b";", b"yield ", b"**k", b"'s'",
               b"0j", b"1if", b"__import__", b"\n      ", b":="]
WORD_TOKENS = [b"dtype", b"shapes", b"strided", b"inputs", b"outputs", b"body", b"matrix",
               b"targets", b"name", b"groups", b"bundle", b"fusebuild", b"tensor", b"scalar",
               b"tensor(float32)", b"scalar(float64)", b"bfloat16", b"int8", b"bool",
               b"cuda:sm_90", b"cuda:sm_999", b"cuda:sm_12", b"cuda:sm_80a", b"cpu:x86-64-v4",
               b"N", b"4*H", b"-3", b"1.5", b"N*M", b"g" * 300, b"version"]
TOKENS = YAML_TOKENS + BODY_TOKENS + WORD_TOKENS


def mutate(rng: random.Random, base: bytes) -> bytes:
    """One random mutation of a valid spec file."""
    data = bytearray(base)
    kind = rng.randrange(7)
    if kind == 0:                                             # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:                                             # truncation
        return bytes(data[:rng.randrange(len(data))])
    if kind == 2:                                             # token insertions
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice(TOKENS)
    elif kind == 3:                                           # token replacements
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i:i + rng.randrange(1, 20)] = rng.choice(TOKENS)
    elif kind == 4:                                           # deletion
        i = rng.randrange(len(data))
        del data[i:i + rng.randrange(1, 200)]
    elif kind == 5:                                           # swapped or repeated lines
        lines = bytes(data).split(b"\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
        return b"\n".join(lines)
    else:                                                     # flipped bytes
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


NAMES = ["x", "x", "b", "s", "undefined", "inf", "nan", "pi"]
LITERALS = ["0", "2", "-1", "0.5", "-0.0", "1e400", "True", "300", str(2 ** 64), "9" * 320,
            "0x10", "1_000", "'s'", "None", "1j", "..."]
BINOPS = ["+", "-", "*", "/", "//", "%", "**", "<<", ">>", "&", "|", "^", "@"]
CMPOPS = ["==", "!=", "<", "<=", ">", ">=", "is", "in"]
ODD = ["x and b", "x.y", "x[0]", "lambda q: q", "[x, b]", "*x", "(x, b)", "{x: 1}", "f'{x}'",
       "(yield x)", "(z := x)"]
KEYWORDS = ["min", "max", "value", "slope", "dim", "alpha", "beta", "threshold", "q"]


def expression(rng: random.Random, depth: int) -> str:
    """A random body expression: mostly well-formed, often ill-typed, sometimes forbidden."""
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice(NAMES) if rng.random() < 0.7 else rng.choice(LITERALS)
    sub = lambda: expression(rng, depth - 1)   # noqa: E731
    kind = rng.randrange(10)
    if kind < 3:
        return f"{sub()} {rng.choice(BINOPS)} {sub()}"
    if kind == 3:
        return rng.choice(["-", "~", "not ", "+"]) + sub()
    if kind == 4:
        return f"({sub()})"
    if kind == 5:
        return f"{sub()} {rng.choice(CMPOPS)} {sub()}"
    if kind == 6:
        return f"{sub()} if {sub()} else {sub()}"
    if kind == 7:
        return rng.choice(ODD)
    name = rng.choice(list(OPS) + list(CASTS) + ["rand_like", "chunk", "cat", "gelux"])
    args = [sub() for _ in range(rng.choice([0, 1, 1, 2, 2, 3]))]
    if rng.random() < 0.2:
        args.append(f"{rng.choice(KEYWORDS)}={sub()}")
    return f"{name}({', '.join(args)})"


def body_spec(body: str, dtypes: str) -> str:
    lines = "\n".join("      " + line for line in body.split("\n"))
    return ("fusebuild: 1\ngroups:\n  - name: g\n"
            "    inputs: {x: tensor, b: tensor(int32), s: scalar(float32)}\n"
            f"    outputs: [y]\n    body: |\n{lines}\n"
            f"    matrix: {{dtype: [{dtypes}], "
            "shapes: [{x: [N], b: [N]}, {x: [B, C], b: [C]}]}\n")


def random_body(rng: random.Random) -> str:
    lines = [f"t = {expression(rng, 3)}"] if rng.random() < 0.3 else []
    if rng.random() < 0.1:
        lines.append(rng.choice(["a, c = chunk(x, 2, dim=0)", "y = cat([x, x], dim=0)",
                                 "import os", "x = 1", "y += 1"]))
    return "\n".join(lines + [f"y = {expression(rng, rng.randint(1, 6))}"])


DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int32", "uint8", "bool"]

# ------------------------------------------------------------------ checks ----------------------


def outcome(path, data: bytes) -> str:
    """'ok', or 'error' for a well-formed SpecError; fails the test on anything else."""
    path.write_bytes(data)
    try:
        spec.load_plan([str(path)])
    except SpecError as e:
        where = f"{path}:{e.line}:{e.col}: error: "
        assert e.file == str(path) and e.line >= 1 and e.col >= 1, (str(e), data[:300])
        assert str(e).startswith(where) and "\n  hint: " in str(e), (str(e), data[:300])
        return "error"
    except Exception as e:  # noqa: BLE001 - what the fuzzer hunts
        pytest.fail(f"{type(e).__name__}: {e} on input {data[:300]!r}")
    return "ok"


def test_example_specs_are_accepted(tmp_path):
    for path in EXAMPLES:
        assert outcome(tmp_path / "s.yaml", open(path, "rb").read()) == "ok", path
    result = CliRunner().invoke(main, ["check", os.path.join(ROOT, "specs")])
    assert result.exit_code == 0, result.output


def test_mutated_example_specs(tmp_path):
    rng = random.Random(18)
    bases = [open(p, "rb").read() for p in EXAMPLES]
    seen = [outcome(tmp_path / "s.yaml", mutate(rng, rng.choice(bases))) for _ in range(400)]
    assert seen.count("error") > 200 and seen.count("ok") > 5   # both paths are exercised


def test_random_bodies(tmp_path):
    rng = random.Random(7)
    seen = []
    for _ in range(300):
        body = random_body(rng)
        seen.append(outcome(tmp_path / "s.yaml",
                            body_spec(body, ", ".join(rng.sample(DTYPES, 2))).encode()))
        if seen[-1] == "ok":   # the canonical body is ast.unparse's and survives the manifest
            (gp,) = spec.load_plan([str(tmp_path / "s.yaml")]).groups
            assert gp.group.body == "\n".join(ast.unparse(st) for st in ast.parse(body).body)
            assert syntax.group_from_json(gp.group.to_json()).body == gp.group.body
    assert seen.count("error") > 100 and seen.count("ok") > 50


def test_unparse_matches_ast_unparse():
    """On every statement the body parser accepts (its whitelist), untyped."""
    rng, inputs, compared = random.Random(3), [("x", "tensor", None), ("b", "tensor", None)], 0
    for _ in range(1000):
        text = f"y = {expression(rng, 6)}"
        try:
            syntax.parse_group("g", inputs, [("y", None)], text, syntax.SourceMap())
        except SpecError:
            continue
        st = ast.parse(text).body[0]
        assert unparse(st) == ast.unparse(st), text
        compared += 1
    assert compared > 200


DEEP = {   # construct -> (text at depth n, deepest accepted n, first refused n)
    "yaml-flow": (lambda n: "fusebuild: 1\ngroups: " + "[" * n + "]" * n, 20, 40),
    "yaml-block": (lambda n: "fusebuild: 1\ngroups:\n" + "".join(" " * i + "-\n" for i in range(n)),
                   20, 40),
    "yaml-map": (lambda n: "fusebuild: 1\nbundle: " + "{a: " * n + "1" + "}" * n, 20, 40),
}
for _op, _fmt in {"sum": "y = x{}", "minus": "y = {}x", "power": "y = x{}", "not": "y = {}x",
                  "ifelse": "y = {}x", "calls": "y = {}x"}.items():
    _unit = {"sum": " + x", "minus": "-", "power": " ** 1.0", "not": "not ",
             "ifelse": "x if b else ", "calls": "exp("}[_op]
    DEEP[f"body-{_op}"] = (lambda n, f=_fmt, u=_unit, op=_op: body_spec(
        f.format(u * n) + (")" * n if op == "calls" else ""), "float32"),
        150 if _op == "calls" else 1000, 250 if _op == "calls" else 1001)


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_nesting(tmp_path, name):
    text, ok, bad = DEEP[name]
    for n in (ok, bad, 20 * bad):
        got = outcome(tmp_path / "s.yaml", text(n).encode())
        if name.startswith("body") or n > ok:    # YAML below the limit is just other errors
            assert got == ("ok" if n == ok else "error"), (name, n)


def test_cli_reports_fuzzed_errors_with_exit_code_2(tmp_path):
    rng = random.Random(21)
    bases = [open(p, "rb").read() for p in EXAMPLES]
    runner, path, checked = CliRunner(), tmp_path / "s.yaml", 0
    while checked < 25:
        if outcome(path, mutate(rng, rng.choice(bases))) == "error":
            result = runner.invoke(main, ["check", str(path)])
            assert result.exit_code == 2 and isinstance(result.exception, SystemExit), \
                result.output
            assert f"{path}:" in result.output and ": error: " in result.output, result.output
            checked += 1


SUBPROCESS = {
    "nul": b"fusebuild: 1\0\n",
    "python-tag": b"fusebuild: !!python/object/apply:os.system ['true']\n",
    "deep-flow": b"fusebuild: 1\ngroups: " + b"[" * 100000,
    "deep-sum": body_spec("y = x" + " + x" * 1500, "float32").encode(),
}


@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_cli_subprocess_exit_code_2_without_traceback(tmp_path, name):
    data = SUBPROCESS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "fusebuild", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"fusebuild: {path}:") and "\n  hint: " in proc.stderr
