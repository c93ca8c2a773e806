"""Backward groups (`grad:`, DESIGN §9): every derivative rule of the op table against torch's
autograd of the same torch op (the independent oracle), float64 and float32; the backward of
random groups reuses the forward's mask; spec errors of `grad:`.

Each rule is checked on its own: a group has one output per op, and its backward kernel is
called with the gradient of one output set (random) and the others zero.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusebuild import autodiff, build, runtime, spec
from fusebuild.errors import SpecError
from fusebuild.runtime.cpu import host_isas

# op: (body expression, torch expression); x in (0.1, 0.9), z in (-8, 8), a and b in +-(0.5, 2)
UNARY = {
    "exp": ("exp(x)", torch.exp), "exp2": ("exp2(x)", torch.exp2),
    "expm1": ("expm1(x)", torch.expm1), "log": ("log(x)", torch.log),
    "log2": ("log2(x)", torch.log2), "log10": ("log10(x)", torch.log10),
    "log1p": ("log1p(x)", torch.log1p), "sqrt": ("sqrt(x)", torch.sqrt),
    "rsqrt": ("rsqrt(x)", torch.rsqrt), "reciprocal": ("reciprocal(x)", torch.reciprocal),
    "sin": ("sin(z)", torch.sin), "cos": ("cos(z)", torch.cos), "tan": ("tan(x)", torch.tan),
    "asin": ("asin(x)", torch.asin), "acos": ("acos(x)", torch.acos),
    "atan": ("atan(z)", torch.atan), "sinh": ("sinh(z)", torch.sinh),
    "cosh": ("cosh(z)", torch.cosh), "tanh": ("tanh(z)", torch.tanh),
    "erf": ("erf(z)", torch.erf), "erfc": ("erfc(z)", torch.erfc),
    "frac": ("frac(z)", torch.frac), "sigmoid": ("sigmoid(z)", torch.sigmoid),
    "gelu": ("gelu(z)", F.gelu), "gelu_tanh": ("gelu_tanh(z)", lambda t: F.gelu(t, approximate="tanh")),
    "silu": ("silu(z)", F.silu), "mish": ("mish(z)", F.mish), "selu": ("selu(z)", F.selu),
    "hardsigmoid": ("hardsigmoid(z)", F.hardsigmoid), "hardswish": ("hardswish(z)", F.hardswish),
    "abs": ("abs(z)", torch.abs), "neg": ("-z", torch.neg),
    "relu": ("relu(z)", F.relu), "relu6": ("relu6(z)", F.relu6),
    "leaky_relu": ("leaky_relu(z, 0.1)", lambda t: F.leaky_relu(t, 0.1)),
    "elu": ("elu(z, 0.7)", lambda t: F.elu(t, 0.7)),
    "softplus": ("softplus(z, 2.0, 3.0)", lambda t: F.softplus(t, 2.0, 3.0)),
    "hardtanh": ("hardtanh(z, -2.0, 3.0)", lambda t: F.hardtanh(t, -2.0, 3.0)),
    "clamp": ("clamp(z, min=-1.0, max=2.0)", lambda t: torch.clamp(t, -1.0, 2.0)),
    "threshold": ("threshold(z, 0.5, -2.0)", lambda t: F.threshold(t, 0.5, -2.0)),
    "logit": ("logit(x)", torch.logit), "logit_eps": ("logit(x, 0.2)", lambda t: torch.logit(t, 0.2)),
    "float32": ("float64(float32(z) * 2.0)", lambda t: t * 2.0),
    "zero": ("floor(z) + sign(z) + where(z > 0, 1.0, 0.0) + round(z)",
             lambda t: torch.floor(t) + torch.sign(t) + (t > 0).double() + torch.round(t)),
}
BINARY = {
    "add": ("a + b", torch.add), "sub": ("a - b", torch.sub), "mul": ("a * b", torch.mul),
    "div": ("a / b", torch.div), "pow": ("abs(a) ** b", lambda p, q: p.abs() ** q),
    "atan2": ("atan2(a, b)", torch.atan2), "fmod": ("fmod(a, b)", torch.fmod),
    "remainder": ("a % b", torch.remainder), "max": ("max(a, b)", torch.maximum),
    "min": ("min(a, b)", torch.minimum),
    "where": ("where(a > b, a * b, a)", lambda p, q: torch.where(p > q, p * q, p)),
    "lerp": ("lerp(a, b, 0.3)", lambda p, q: torch.lerp(p, q, 0.3)),
    "addcmul": ("addcmul(a, a, b, 0.5)", lambda p, q: torch.addcmul(p, p, q, value=0.5)),
    "clamp_t": ("clamp(a, min=b)", lambda p, q: torch.clamp(p, min=q)),
}
ROWS = {
    "sum": ("sum(r)", lambda t: t.sum(-1, keepdim=True)),
    "mean": ("mean(r)", lambda t: t.mean(-1, keepdim=True)),
    "amax": ("amax(r)", lambda t: t.amax(-1, keepdim=True)),
    "amin": ("amin(r)", lambda t: t.amin(-1, keepdim=True)),
    "var": ("var(r, correction=1)", lambda t: t.var(-1, keepdim=True)),
    "softmax": ("softmax(r)", lambda t: torch.softmax(t, -1)),
    "log_softmax": ("log_softmax(r)", lambda t: torch.log_softmax(t, -1)),
    "logsumexp": ("logsumexp(r)", lambda t: torch.logsumexp(t, -1, keepdim=True)),
    "layer_norm": ("layer_norm(r, eps=1e-5)", lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-5)),
    "rms_norm": ("rms_norm(r, eps=1e-6)", lambda t: F.rms_norm(t, t.shape[-1:], eps=1e-6)),
    "chain": ("r * rsqrt(mean(r * r) + 1e-6) + amax(r) * softmax(r)",
              lambda t: t * torch.rsqrt((t * t).mean(-1, keepdim=True) + 1e-6)
              + t.amax(-1, keepdim=True) * torch.softmax(t, -1)),
}
N_ELEM, ROWS_SHAPE = 257, (6, 37)


def _group(name: str, inputs: list[str], cases: dict, shapes: str) -> str:
    body = "\n".join(f"      y_{k} = {expr}" for k, (expr, _) in cases.items())
    return f"""
  - name: {name}
    inputs: {{{', '.join(f'{i}: tensor' for i in inputs)}}}
    outputs: [{', '.join(f'y_{k}' for k in cases)}]
    grad: [{', '.join(inputs)}]
    body: |
{body}
    matrix:
      dtype: [float64, float32]
      shapes: [{shapes}]
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    text = "fusebuild: 1\ngroups:" + \
        _group("unary", ["x", "z"], UNARY, "{x: [N], z: [N]}") + \
        _group("binary", ["a", "b"], BINARY, "{a: [N], b: [N]}") + \
        _group("rows", ["r"], ROWS, "{r: [B, N]}")
    (d / "rules.yaml").write_text(text)
    plan = spec.load_plan([str(d / "rules.yaml")], targets=[f"cpu:{host_isas()[-1]}"])
    return runtime.load(build.build(plan, str(d / "out"), progress=False).path)


def _inputs(kind: str, rng) -> dict[str, np.ndarray]:
    if kind == "unary":
        return {"x": rng.uniform(0.1, 0.9, N_ELEM), "z": rng.uniform(-8, 8, N_ELEM)}
    if kind == "binary":
        a = rng.uniform(0.5, 2, N_ELEM) * rng.choice([-1, 1], N_ELEM)
        b = rng.uniform(0.5, 2, N_ELEM) * rng.choice([-1, 1], N_ELEM)
        b[::7] = a[::7]                   # ties: max/min share the gradient like torch
        return {"a": a, "b": b}
    r = rng.standard_normal(ROWS_SHAPE)
    r[0, 5] = r[0, 9] = r[0].max() + 1    # a tied maximum
    return {"r": r}


def _torch_grads(fn, inputs: dict, g: np.ndarray, uses: str) -> list[np.ndarray]:
    """torch's gradients of fn applied to the inputs `uses` names (the unary ops take one)."""
    ts = {n: torch.tensor(v, requires_grad=True) for n, v in inputs.items()}
    out = fn(ts[uses]) if uses in ts else fn(*ts.values())
    ts = list(ts.values())
    grads = torch.autograd.grad(out, ts, torch.tensor(g), allow_unused=True)
    return [np.zeros_like(v) if gr is None else gr.numpy() for v, gr in zip(inputs.values(), grads)]


def _by_input(backward, got, seeds: dict) -> dict[str, np.ndarray]:
    """The gradient of each listed input from a backward group's outputs and its aliases."""
    got = got if isinstance(got, tuple) else (got,)
    named = {o: g for (o, _), g in zip(backward.info.outputs, got)} | seeds
    out = {o[len("grad_"):]: g for (o, _), g in zip(backward.info.outputs, got)}
    return out | {inp: named[src] for inp, src in backward.info.grad_alias}


def _cases():
    for kind, table in (("unary", UNARY), ("binary", BINARY), ("rows", ROWS)):
        for op in table:
            yield kind, op


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind,op", list(_cases()))
def test_derivative_rule_matches_torch_autograd(rules, kind, op, dtype):
    """float64: within 1e-12 relative; float32 kernels against torch in float64: 2e-5 of the
    gradient's scale (float32 forward values, float32 rounding of every term)."""
    table = {"unary": UNARY, "binary": BINARY, "rows": ROWS}[kind]
    rng = np.random.default_rng(abs(hash(op)) % 2**32)
    inputs = _inputs(kind, rng)
    names = list(table)
    k = names.index(op)
    fwd = getattr(rules, kind)(*[v.astype(dtype) for v in inputs.values()])
    outs = fwd if isinstance(fwd, tuple) else (fwd,)
    seed = rng.standard_normal(outs[k].shape).astype(outs[k].dtype)
    backward = rules[kind + "__grad"]
    takes = [n for n, _, _ in backward.info.params[len(inputs):]]
    if op == "zero":      # comparisons, rounding and sign: no gradient flows, as in torch
        assert f"grad_y_{op}" not in takes
        return
    seeds = [seed.astype(outs[k].dtype) if n == f"grad_y_{op}" else
             np.zeros_like(outs[names.index(n[7:])]) for n in takes]
    got = _by_input(backward, backward(*[v.astype(dtype) for v in inputs.values()], *seeds),
                    dict(zip(takes, seeds)))
    got = [got[n] for n in inputs]
    want = _torch_grads(table[op][1], {n: v.astype(dtype).astype(np.float64)
                                       for n, v in inputs.items()}, seed.astype(np.float64),
                        re.search(r"\b[xz]\b", table[op][0]).group() if kind == "unary" else "")
    tol = 1e-12 if dtype == "float64" else 2e-5
    if op == "hardsigmoid" and dtype == "float64":
        tol = 1e-7     # torch's CPU kernel multiplies by 1.0f / 6.0f, a float32 constant
    for name, gv, wv in zip(inputs, got, want):
        scale = max(1.0, float(np.abs(wv).max()))
        err = float(np.abs(gv.astype(np.float64) - wv).max())
        assert err <= tol * scale, f"d {op} / d {name}: max error {err:.3g} > {tol * scale:.3g}"


def test_dropout_backward_uses_the_forward_mask_without_storing_it(tmp_path):
    (tmp_path / "d.yaml").write_text("""fusebuild: 1
groups:
  - name: bdr
    inputs: {x: tensor, bias: tensor, residual: tensor, p: scalar(float32)}
    outputs: [y]
    grad: [x, bias, residual]
    body: |
      keep = rand_like(x) >= p
      y = residual + where(keep, (x + bias) / (1 - p), 0.0)
    matrix: {dtype: [float32], shapes: [{x: [B, C], bias: [C], residual: [B, C]}]}
""")
    plan = spec.load_plan([str(tmp_path / "d.yaml")], targets=[f"cpu:{host_isas()[-1]}"])
    bwd = next(g.group for g in plan.groups if g.group.name == "bdr__grad")
    assert [i.name for i in bwd.inputs] == ["x", "bias", "residual", "p", "grad_y"]
    # one array: bias's gradient is x's, residual's the output gradient itself
    assert [o.name for o in bwd.outputs] == ["grad_x"]
    assert bwd.grad_alias == (("bias", "grad_x"), ("residual", "grad_y"))
    k = runtime.load(build.build(plan, str(tmp_path / "out"), progress=False).path)
    rng = np.random.default_rng(3)
    x, bias = rng.standard_normal((64, 300), np.float32) + 3, rng.standard_normal(300, np.float32)
    res, g = rng.standard_normal((64, 300), np.float32), rng.standard_normal((64, 300), np.float32)
    p = 0.3
    y = k.bdr(x, bias, res, p, seed=11, offset=5)
    gx = k.bdr__grad(x, bias, res, p, g, seed=11, offset=5)
    kept = y != res                      # x + bias > 0 everywhere: dropped exactly where y == res
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_array_equal(gx, np.where(kept, g / np.float32(1 - p), 0))
    other = k.bdr__grad(x, bias, res, p, g, seed=12, offset=5)
    assert (other != gx).any()           # another seed, another mask


def _check(tmp_path, body: str, grad: str, inputs: str = "{x: tensor, n: tensor, s: scalar(float32)}",
           dtype: str = "[{x: float32, n: int32}]", outputs: str = "[y]"):
    (tmp_path / "e.yaml").write_text(f"""fusebuild: 1
groups:
  - name: g
    inputs: {inputs}
    outputs: {outputs}
    grad: {grad}
    body: |
      {body}
    matrix: {{dtype: {dtype}, shapes: [{{x: [N], n: [N]}}]}}
""")
    with pytest.raises(SpecError) as e:
        spec.load_plan([str(tmp_path / "e.yaml")])
    return e.value


@pytest.mark.parametrize("grad,line,col,message", [
    ("[w]", 6, 12, "'w' is not an input of group 'g'"),
    ("[s]", 6, 12, "'s' is a scalar input"),
    ("[n]", 6, 12, "'n' is int32 in the matrix: only float inputs have gradients"),
    ("[x, x]", 6, 15, "'x' is listed twice"),
    ("[]", 6, 11, "grad: lists no input"),
])
def test_grad_spec_errors_are_located(tmp_path, grad, line, col, message):
    e = _check(tmp_path, "y = x * n + s", grad)
    assert (e.line, e.col) == (line, col) and message in e.message, str(e)


def test_grad_of_an_op_without_derivative_points_at_the_op(tmp_path):
    e = _check(tmp_path, "y = n + lgamma(x * 2)", "[x]")
    assert (e.line, e.col) == (8, 15) and "lgamma() has no derivative" in e.message, str(e)


def test_grad_that_reaches_no_float_output_is_an_error(tmp_path):
    e = _check(tmp_path, "y = int32(x > 0) + n", "[x]")
    assert e.line == 6 and "no output of group 'g' depends on x" in e.message, str(e)


def test_backward_names_clash_is_an_error(tmp_path):
    e = _check(tmp_path, "grad_x = x * 2", "[x]", outputs="[grad_x]")
    assert "grad_x" in e.message and "taken" in e.message, str(e)


def test_backward_group_of_a_deep_body_is_built_without_recursion():
    """A 1,000-term sum (the deepest body the spec allows) differentiates iteratively."""
    from fusebuild.syntax import SourceMap, parse_group
    body = "y = " + " + ".join(f"x * {k}.0" for k in range(1000))
    g = parse_group("deep", [("x", "tensor", None)], [("y", None)], body, SourceMap())
    bwd = autodiff.derive(g, ("x",), SourceMap())
    assert bwd.name == "deep__grad" and [o.name for o in bwd.outputs] == ["grad_x"]
    from fusebuild import dtypes as dt, reference
    from fusebuild.ir import instantiate
    k = instantiate(bwd, {"x": dt.float64, "grad_y": dt.float64}, expand=False)
    gy = np.linspace(-1, 1, 5)
    got = reference.evaluate(k, [np.ones(5), gy]).outputs["grad_x"]
    np.testing.assert_allclose(got, gy * sum(range(1000)), rtol=1e-12)
    assert math.isfinite(float(got[0]))
