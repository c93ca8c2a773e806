"""Training with the example groups that have `grad:` (DESIGN §9), through their torch ops:
torch.autograd.gradcheck on float64 kernels of every one; float32 gradients against torch
autograd of the same expression written in torch (the independent oracle); torch.compile
(fullgraph) over several ops, forward and backward. (The README's training example runs in
tests/test_readme.py.)"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from fusebuild import build, runtime, spec
from fusebuild.runtime.cpu import host_isas
from conftest import SPECS, concrete, make_args

SIZES = {"N": 6, "B": 3, "C": 5, "H": 4, "T": 3, "R": 2, "F": 3, "S": 4}


def _rotary(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return (torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1),)


def _lstm(gates, cx):
    i, f, g, o = gates.chunk(4, 1)
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


def _gru(gi, gh, hx):
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * hx,)


def _add_rms(x, res, w, eps):
    h = x + res
    return h * torch.rsqrt((h * h).mean(-1, keepdim=True) + eps) * w, h


# the example groups with grad:, written in torch from their docs (not from the bodies' IR)
TORCH = {
    "bias_gelu": lambda x, b: (F.gelu(x + b),),
    "swiglu": lambda h: (F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],),
    "rotary_embedding": _rotary,
    "scale_shift": lambda x, s, t: (x * (1 + s) + t,),
    "lstm_cell": _lstm,
    "gru_cell": _gru,
    "softmax": lambda x: (torch.softmax(x, -1),),
    "layer_norm": lambda x, w, b: (F.layer_norm(x, x.shape[-1:], w, b, 1e-5),),
    "rms_norm": lambda x, w: (F.rms_norm(x, x.shape[-1:], w, 1e-6),),
    "add_rms_norm": _add_rms,
}
RANDOM = ("bias_dropout_residual",)


def _grad_groups() -> list[str]:
    return [gp.group.name for gp in spec.load_plan([SPECS]).groups
            if gp.group.name.endswith("__grad")]


def test_the_examples_with_grad_are_the_ones_checked_here():
    assert sorted(g[:-len("__grad")] for g in _grad_groups()) == sorted([*TORCH, *RANDOM])


@pytest.fixture(scope="module")
def f64_ops(tmp_path_factory):
    """The example groups with grad: and their backward groups, as float64 kernels."""
    d = tmp_path_factory.mktemp("f64")
    for path in sorted(os.listdir(SPECS)):
        doc = yaml.safe_load(open(os.path.join(SPECS, path)))
        groups = [g for g in doc["groups"] if "grad" in g]
        for g in groups:
            g["matrix"] = {"dtype": ["float64"], "shapes": g["matrix"]["shapes"]}
        if groups:
            (d / path).write_text(yaml.safe_dump({"fusebuild": 1, "groups": groups}))
    plan = spec.load_plan([str(d)], targets=[f"cpu:{host_isas()[-1]}"])
    return plan, runtime.load(build.build(plan, str(d / "out"), progress=False).path) \
        .torch_library("fbtrain64")


def _listed(plan, name: str) -> list[str]:
    """The inputs `grad:` lists: the outputs grad_<x> of the backward group."""
    bwd = next(g.group for g in plan.groups if g.group.name == name + "__grad")
    return [o.name[len("grad_"):] for o in bwd.outputs]


def _args(gp, dtype: str, rng) -> list:
    shapes = {k: concrete(s, SIZES) for k, s in gp.shapes[-1].items()}
    dts = next(v.dtypes for v in gp.variants if v.dtypes[0].name == dtype)
    return [_tensor(a) if isinstance(a, np.ndarray) else a
            for a in make_args(gp, dts, shapes, rng)]


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":      # ml_dtypes' bfloat16 is foreign to torch: its bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@pytest.mark.parametrize("name", sorted([*TORCH, *RANDOM]))
def test_gradcheck_float64(f64_ops, name):
    plan, ops = f64_ops
    gp = next(g for g in plan.groups if g.group.name == name)
    args = _args(gp, "float64", np.random.default_rng(1))
    kw = {"seed": 7, "offset": 2} if gp.group.has_random else {}
    listed = _listed(plan, name)
    leaves = [i for i, p in enumerate(gp.group.inputs) if p.name in listed]

    def f(*ts):
        full = list(args)
        for i, t in zip(leaves, ts):
            full[i] = t
        return getattr(ops, name)(*full, **kw)
    inputs = tuple(args[i].requires_grad_() for i in leaves)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TORCH))
def test_float32_gradients_match_torch_autograd(examples_bundle, name):
    """Within 1e-5 of the gradient's largest magnitude (float32 kernels against torch's
    autograd in float64 on the same float32 inputs)."""
    ops = examples_bundle.torch_library("fbtrain32")
    plan = spec.load_plan([SPECS])
    gp = next(g for g in plan.groups if g.group.name == name)
    listed = [i for i, p in enumerate(gp.group.inputs) if p.name in _listed(plan, name)]
    args = _args(gp, "float32", np.random.default_rng(2))
    tensors = [a.requires_grad_() if i in listed else a for i, a in enumerate(args)]
    outs = getattr(ops, name)(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    seeds = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [tensors[i] for i in listed], seeds)
    wide = [a.detach().double() if torch.is_tensor(a) else a for a in args]
    wide = [a.requires_grad_() if i in listed else a for i, a in enumerate(wide)]
    want = torch.autograd.grad(TORCH[name](*wide), [wide[i] for i in listed],
                               [s.double() for s in seeds])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        err = float((g.double() - w).abs().max())
        assert err <= 1e-5 * max(1.0, float(w.abs().max())), f"{name}: {err:.3g}"


@pytest.mark.parametrize("name", sorted(TORCH))
def test_bfloat16_gradients_are_written_in_bfloat16(examples_bundle, name):
    """The backward kernel writes each gradient in its input's dtype (rounded once from its
    float32 value, no float32 array cast by torch); within 2^-6 of the largest magnitude of
    torch's autograd in float64 on the same bfloat16 inputs, and no worse than 2x torch's own
    bfloat16 autograd (the independent oracles)."""
    ops = examples_bundle.torch_library("fbtrain32")
    plan = spec.load_plan([SPECS])
    gp = next(g for g in plan.groups if g.group.name == name)
    if not any(v.dtypes[0].name == "bfloat16" for v in gp.variants):
        pytest.skip(f"{name} has no bfloat16 kernels")
    listed = [i for i, p in enumerate(gp.group.inputs) if p.name in _listed(plan, name)]
    args = _args(gp, "bfloat16", np.random.default_rng(3))
    outs = getattr(ops, name)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(o.dtype)
             for o in outs]
    bwd = examples_bundle[name + "__grad"].info
    given = [s for o, s in zip(outs, seeds) if o.dtype.is_floating_point]
    raw = getattr(ops, name + "__grad")(*args, *given[:len(bwd.params) - len(args)])
    raw = raw if isinstance(raw, tuple) else (raw,)
    inputs = {p.name: a for p, a in zip(gp.group.inputs, args)}
    for (o, _), g in zip(bwd.outputs, raw):
        assert g.dtype == inputs[o[len("grad_"):]].dtype == torch.bfloat16, o

    def grads(dtype):
        wide = [a.detach().to(dtype) if torch.is_tensor(a) else a for a in args]
        wide = [a.requires_grad_() if i in listed else a for i, a in enumerate(wide)]
        return torch.autograd.grad(TORCH[name](*wide), [wide[i] for i in listed],
                                   [s.to(dtype) for s in seeds])
    tensors = [a.requires_grad_() if i in listed else a for i, a in enumerate(args)]
    got = torch.autograd.grad(getattr(ops, name)(*tensors), [tensors[i] for i in listed], seeds)
    for g, w, t in zip(got, grads(torch.float64), grads(torch.bfloat16)):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape
        err, eager = (float((a.double() - w).abs().max()) for a in (g, t))
        bound = 2 ** -6 * max(1.0, float(w.abs().max()))
        assert err <= bound and err <= max(2 * eager, 2 ** -8 * bound), f"{name}: {err:.3g}"


def test_compile_fullgraph_over_example_ops_matches_eager(examples_bundle):
    ops = examples_bundle.torch_library("fbtrain32")

    def block(x, bias, w, res):
        h = ops.bias_gelu(x, bias)
        y, s = ops.add_rms_norm(h, res, w, 1e-6)
        return ops.bias_dropout_residual(ops.softmax(y), bias, s, 0.1, seed=5)

    def inputs():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(*shape, generator=g).requires_grad_()
                for shape in ((4, 16), (16,), (16,), (4, 16))]
    torch._dynamo.reset()
    try:
        compiled = torch.compile(block, fullgraph=True)
        eager_in, compiled_in = inputs(), inputs()
        want, got = block(*eager_in), compiled(*compiled_in)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        want.square().sum().backward()
        got.square().sum().backward()
        for e, c in zip(eager_in, compiled_in):
            torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()
