"""Bundles as torch custom ops (DESIGN §9): schemas, fake kernels, opcheck, autograd through
the backward groups `grad:` derives, torch.compile, import hygiene. Oracles: torch's own ops and
autograd of the same expression, torch.autograd.gradcheck on float64."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fusebuild import build, runtime, spec
from fusebuild.errors import ArgumentError, GradientError, UsageError
from fusebuild.runtime.cpu import host_isas
from fusebuild.runtime.torch_ops import _detaching, schema
from conftest import ROOT, SPECS, concrete, make_args

SPEC = """\
fusebuild: 1
bundle: {name: torchops, version: 0.1.0}
groups:
  - name: bias_gelu_scale
    doc: gelu(x + bias) * alpha, a broadcast bias and a scalar
    inputs: {x: tensor, bias: tensor, alpha: scalar(float32)}
    outputs: [y]
    grad: [x, bias]
    body: |
      y = gelu(x + bias) * alpha
    matrix: {dtype: [float32, float64, bfloat16], shapes: [{x: [B, C], bias: [C]}]}

  - name: two_out
    inputs: {a: tensor, b: tensor}
    outputs: [s, p]
    grad: [a, b]
    body: |
      s = a + b
      p = a * tanh(b)
    matrix: {dtype: [float32, float64], shapes: [{a: [N], b: [N]}]}

  - name: rotate
    doc: rotary embedding of the two halves of x
    inputs: {x: tensor, cos: tensor, sin: tensor}
    outputs: [y]
    grad: [x, cos]
    body: |
      x1, x2 = chunk(x, 2, dim=-1)
      y = cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    matrix: {dtype: [float32, float64], shapes: [{x: [T, 2*D], cos: [T, D], sin: [T, D]}]}

  - name: dropout_add
    doc: inverted dropout of x plus a residual
    inputs: {x: tensor, res: tensor, p: scalar(float32)}
    outputs: [y]
    grad: [x, res]
    body: |
      y = where(rand_like(x) >= p, x / (1 - p), 0.0) + res
    matrix: {dtype: [float32, float64], shapes: [{x: [N], res: [N]}]}

  - name: absmax_norm
    doc: x over its row's largest magnitude, and that magnitude (a row output)
    inputs: {x: tensor}
    outputs: [y, s]
    grad: [x]
    body: |
      s = amax(abs(x), dim=-1)
      y = x / s
    matrix: {dtype: [float32, float64], shapes: [{x: [B, N]}]}

  - name: select
    doc: a float input that only selects (no differentiable path); only x in grad
    inputs: {x: tensor, mask: tensor}
    outputs: [y]
    grad: [x]
    body: |
      y = where(mask > 0, x * 2, 0.0)
    matrix: {dtype: [float32], shapes: [{x: [N], mask: [N]}]}

  - name: count_pos
    doc: no backward; int and bool scalars, a bool output
    inputs: {x: tensor, k: scalar(int32), flip: scalar(bool)}
    outputs: [m, z]
    body: |
      m = (x * k > 0) if flip else (x < 0)
      z = x + k
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""
NS = "fbtest"
F64 = dict(dtype=torch.float64)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("torchops")
    (d / "torchops.yaml").write_text(SPEC)
    plan = spec.load_plan([str(d / "torchops.yaml")], targets=[f"cpu:{host_isas()[0]}"])
    return build.build(plan, str(d / "out"), progress=False).path


@pytest.fixture(scope="module")
def ops(bundle_path):
    return runtime.load(bundle_path).torch_library(NS)


def randn(*shape, dtype=torch.float32, grad=False, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 97 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def cases(dtype=torch.float32, grad=False) -> dict[str, tuple[tuple, dict]]:
    """(args, kwargs) of one call of every forward op of the spec."""
    t = dict(dtype=dtype, grad=grad)
    return {
        "bias_gelu_scale": ((randn(5, 6, **t), randn(6, **t, seed=1), 0.75), {}),
        "two_out": ((randn(7, **t), randn(7, **t, seed=1)), {}),
        "rotate": ((randn(3, 8, **t), randn(3, 4, **t, seed=1), randn(3, 4, dtype=dtype,
                                                                       seed=2)), {}),
        "dropout_add": ((randn(40, **t), randn(40, **t, seed=1), 0.25),
                        {"seed": 1234, "offset": 7}),
        "absmax_norm": ((randn(4, 9, **t),), {}),
    }


def grad_case(ops, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of the backward op of `name`: the forward inputs, then random output
    gradients for the differentiable outputs it takes (by the autodiff contract's names)."""
    bundle = ops._bundle
    grad = bundle[name + "__grad"].info
    outs = getattr(ops, name)(*(a.detach() if torch.is_tensor(a) else a for a in args), **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = [n for n, _ in bundle[name].info.outputs]
    grads = [torch.randn_like(outs[names.index(n[len("grad_"):])])
             for n, _, _ in grad.params[len(args):]]
    return (*(a.detach() if torch.is_tensor(a) else a for a in args), *grads), kwargs


def test_schemas_and_the_ops_object(ops, bundle_path):
    b = ops._bundle
    assert schema(b.dropout_add.info) == \
        "dropout_add(Tensor x, Tensor res, float p, *, SymInt seed, SymInt offset=0) -> Tensor"
    assert schema(b.count_pos.info) == "count_pos(Tensor x, int k, bool flip) -> (Tensor, Tensor)"
    assert schema(b.rotate__grad.info) == \
        "rotate__grad(Tensor x, Tensor cos, Tensor sin, Tensor grad_y) -> (Tensor, Tensor)"
    for name in b.groups:
        assert getattr(ops, name) is getattr(torch.ops.fbtest, name)
        assert str(getattr(ops, name).default._schema) == f"{NS}::{schema(b[name].info)}"
    assert set(dir(ops)) >= set(b.groups)
    assert repr(ops).startswith(f"<fusebuild torch ops torch.ops.{NS}: 13 ops of bundle "
                                "torchops-0.1.0 ")
    assert "autograd for absmax_norm, bias_gelu_scale, dropout_add, rotate, select, two_out>" in repr(ops)
    assert b.torch_library(NS) is ops
    assert runtime.load(bundle_path).torch_library(NS) is ops      # the same bundle id
    with pytest.raises(AttributeError, match="no op 'nope' of this bundle; ops: absmax_norm"):
        ops.nope


def test_cuda_kernel_detaches_its_inputs():
    """Below autograd, inputs still require grad, which DLPack (the CUDA path) refuses."""
    seen = []
    _detaching(lambda *args, seed: seen.extend((*args, seed)))(randn(3, grad=True), 0.5, seed=2)
    assert not seen[0].requires_grad and seen[1:] == [0.5, 2]


def test_namespace_conflicts(ops, examples_bundle):
    with pytest.raises(UsageError, match=f"'{NS}' already holds the ops of bundle torchops-0.1.0"):
        examples_bundle.torch_library(NS)
    with pytest.raises(UsageError, match="'aten' already holds .* not of a fusebuild bundle"):
        ops._bundle.torch_library("aten")
    with pytest.raises(UsageError, match="not an identifier"):
        ops._bundle.torch_library("a.b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward_and_backward_ops(ops, dtype):
    for name, (args, kwargs) in cases(dtype, grad=True).items():
        torch.library.opcheck(getattr(ops, name), args, kwargs)
        g_args, g_kwargs = grad_case(ops, name, args, kwargs)
        torch.library.opcheck(getattr(ops, name + "__grad"), g_args, g_kwargs)
    torch.library.opcheck(ops.count_pos, (randn(6), 3, True))
    torch.library.opcheck(ops.count_pos, (randn(6), -2, False))


def test_opcheck_bfloat16(ops):
    args = (randn(5, 6, dtype=torch.bfloat16, grad=True),
            randn(6, dtype=torch.bfloat16, grad=True, seed=1), 0.75)
    torch.library.opcheck(ops.bias_gelu_scale, args)
    torch.library.opcheck(ops.bias_gelu_scale__grad, grad_case(ops, "bias_gelu_scale", args, {})[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_real_outputs_match_fake_outputs(ops, dtype):
    all_cases = cases(dtype) if dtype != torch.bfloat16 else \
        {"bias_gelu_scale": cases(dtype)["bias_gelu_scale"]}
    all_cases["count_pos"] = ((randn(6), 3, True), {})
    for name, (args, kwargs) in list(all_cases.items()):
        if name + "__grad" in ops._bundle.groups:
            all_cases[name + "__grad"] = grad_case(ops, name, args, kwargs)
    for name, (args, kwargs) in all_cases.items():
        real = getattr(ops, name)(*args, **kwargs)
        with FakeTensorMode() as mode:
            fake = getattr(ops, name)(*(mode.from_tensor(a) if torch.is_tensor(a) else a
                                        for a in args), **kwargs)
        real, fake = (r if isinstance(r, tuple) else (r,) for r in (real, fake))
        assert [(r.shape, r.dtype, r.stride()) for r in real] == \
            [(f.shape, f.dtype, f.stride()) for f in fake], name
        assert all(r.is_contiguous() for r in real)


def torch_forward(name: str, args: tuple) -> tuple:
    """torch's own expression of each op (the oracle)."""
    if name == "bias_gelu_scale":
        x, bias, alpha = args
        return (F.gelu(x + bias) * alpha,)
    if name == "two_out":
        a, b = args
        return a + b, a * torch.tanh(b)
    if name == "rotate":
        x, cos, sin = args
        x1, x2 = x.chunk(2, dim=-1)
        return (torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1),)
    x, = args
    s = x.abs().amax(-1, keepdim=True)
    return x / s, s


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_torch_autograd(ops, dtype):
    for name, (args, kwargs) in cases(dtype, grad=True).items():
        if name == "dropout_add":
            continue
        got = getattr(ops, name)(*args, **kwargs)
        got = got if isinstance(got, tuple) else (got,)
        want = torch_forward(name, args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[dtype])
        leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        weights = [torch.randn_like(w) for w in want]
        loss = sum((g * w).sum() for g, w in zip(got, weights))
        expected = sum((g * w).sum() for g, w in zip(want, weights))
        for g, w in zip(torch.autograd.grad(loss, leaves, allow_unused=True),
                        torch.autograd.grad(expected, leaves, allow_unused=True)):
            if w is None:             # rotate's sin is not in its grad list
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, w, **TOL[dtype])


def test_bfloat16_values_and_gradients(ops):
    x = randn(5, 6, dtype=torch.bfloat16, grad=True)
    bias = randn(6, dtype=torch.bfloat16, grad=True, seed=1)
    y = ops.bias_gelu_scale(x, bias, 0.75)
    want = F.gelu(x.float() + bias.float()) * 0.75
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=2 ** -7, atol=1e-3)    # one bf16 rounding
    y.sum().backward()
    xf, bf = x.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
    (F.gelu(xf + bf) * 0.75).sum().backward()
    assert x.grad.dtype == bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xf.grad, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(bias.grad.float(), bf.grad, rtol=2 ** -6, atol=5e-2)


def test_gradcheck_float64(ops):
    for name, (args, kwargs) in cases(torch.float64, grad=True).items():
        leaves = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]

        def f(*ts, name=name, args=args, kwargs=kwargs, leaves=leaves):
            full = list(args)
            for i, t in zip(leaves, ts):
                full[i] = t
            return getattr(ops, name)(*full, **kwargs)
        assert torch.autograd.gradcheck(f, tuple(args[i] for i in leaves)), name


def test_broadcast_bias_gradient_is_summed_to_its_shape(ops):
    x, bias = randn(5, 6, **F64, grad=True), randn(6, **F64, grad=True, seed=1)
    ops.bias_gelu_scale(x, bias, 0.5).sum().backward()       # a stride-0 expanded grad
    assert bias.grad.shape == (6,) and x.grad.shape == (5, 6)
    torch.testing.assert_close(bias.grad, x.grad.sum(0), rtol=1e-12, atol=1e-14)


def _python_calls(fn) -> list[str]:
    """The Python functions `fn()` runs (C functions and builtins not counted)."""
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_name)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[1:]        # past fn itself


def test_autograd_path_runs_no_python_a_plain_call_does_not_need(ops):
    x, bias = randn(4, 6), randn(6, seed=1)
    xg, bg = randn(4, 6, grad=True), randn(6, grad=True, seed=1)
    op = torch.ops.fbtest.bias_gelu_scale.default
    for _ in range(2):      # warm: the kernel's fast path is remembered on the first call
        op(x, bias, 0.5), op(xg, bg, 0.5)
    # the Autograd kernel goes straight to the bundle's kernel: no redispatch to a CPU kernel
    # in Python, no context manager, no dataclass, no fill_defaults
    assert _python_calls(lambda: op(x, bias, 0.5)) == ["__call__", "kernel"]
    recorded = _python_calls(lambda: op(xg, bg, 0.5))
    assert recorded == ["__call__", "kernel", "forward", "save", "save_for_backward",
                        "<lambda>"], recorded      # the lambda picks the one scalar


def test_dropout_backward_uses_the_forward_mask(ops):
    x, res = randn(1000, **F64, grad=True), torch.zeros(1000, **F64, requires_grad=True)
    y = ops.dropout_add(x, res, 0.25, seed=99, offset=3)
    keep = y != 0
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0), rtol=1e-15, atol=0)
    assert 650 < int(keep.sum()) < 850
    w = randn(1000, **F64, seed=5)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(keep, w / 0.75, 0.0), rtol=1e-15, atol=0)
    assert torch.equal(res.grad, w)
    assert torch.equal(ops.dropout_add(x, res, 0.25, seed=99, offset=3), y)
    assert not torch.equal(ops.dropout_add(x, res, 0.25, seed=99, offset=4) != 0, keep)


def test_unused_output_gradients(ops):
    a, b = randn(7, **F64, grad=True), randn(7, **F64, grad=True, seed=1)
    s, p = ops.two_out(a, b)
    p.sum().backward()                  # s unused
    torch.testing.assert_close(a.grad, torch.tanh(b.detach()), rtol=1e-12, atol=1e-14)
    x = randn(4, 9, **F64, grad=True)
    y, _ = ops.absmax_norm(x)
    y.sum().backward()
    xd = x.detach().requires_grad_()
    torch_forward("absmax_norm", (xd,))[0].sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-12, atol=1e-14)


def test_double_backward_is_refused(ops):
    x, bias = randn(5, 6, **F64, grad=True), randn(6, **F64, grad=True, seed=1)
    gx, = torch.autograd.grad(ops.bias_gelu_scale(x, bias, 0.5).sum(), x, create_graph=True)
    with pytest.raises(UsageError, match=rf"torch\.ops\.{NS}\.bias_gelu_scale__grad .*first "
                                         "derivatives only"):
        gx.sum().backward()


def test_backward_of_a_group_without_grad_names_the_spec_line_to_add(ops):
    x = randn(6, grad=True)
    m, z = ops.count_pos(x, 3, True)
    assert not m.requires_grad and z.requires_grad
    with pytest.raises(GradientError, match=r"input 'x' of count_pos requires grad, but group "
                                            r"'count_pos' has no `grad:`.*add `grad: \[x\]` to "
                                            r"group 'count_pos'"):
        z.sum().backward()
    ops.count_pos(randn(6), 3, True)[1].sum()        # no input requires grad: nothing to refuse


def test_gradient_of_an_input_grad_does_not_list_is_refused(ops):
    x, cos = randn(3, 8, grad=True), randn(3, 4, grad=True, seed=1)
    sin = randn(3, 4, grad=True, seed=2)
    with pytest.raises(GradientError, match=r"input 'sin' of rotate requires grad, but its "
                                            r"spec's `grad: \[x, cos\]` does not list 'sin': "
                                            r"make it `grad: \[x, cos, sin\]`"):
        ops.rotate(x, cos, sin).sum().backward()
    ops.rotate(x, cos, sin.detach()).sum().backward()       # the listed inputs alone: fine
    assert x.grad is not None and cos.grad is not None
    x, mask = randn(6, grad=True), randn(6, grad=True, seed=1)
    ops.select(x, mask).sum().backward()     # mask has no gradient path: None, as in torch
    assert mask.grad is None and torch.equal(x.grad, torch.where(mask > 0, 2.0, 0.0))


def test_direct_call_on_tensors_requiring_grad_is_refused_with_a_hint(ops):
    b = ops._bundle
    x, bias = randn(5, 6, grad=True), randn(6, seed=1)
    for _ in range(2):       # a first call, then one the C fast path knows the layout of
        b.bias_gelu_scale(x.detach(), bias, 0.5)
        with pytest.raises(ArgumentError, match=r"input 'x' of bias_gelu_scale requires grad, "
                                                r"but a direct bundle call is invisible to "
                                                r"autograd.*torch_library"):
            b.bias_gelu_scale(x, bias, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(b.bias_gelu_scale(x, bias, 0.5),
                                   F.gelu(x + bias) * 0.5, rtol=1e-5, atol=1e-6)


def test_inputs_on_different_devices_are_refused(ops):
    with pytest.raises(ArgumentError, match=r"bias_gelu_scale: tensor inputs are on different "
                                            r"devices \(x on cpu, bias on meta\)"):
        ops.bias_gelu_scale(randn(5, 6), torch.empty(6, device="meta"), 0.5)


@pytest.mark.parametrize("name,args", [
    ("rotate", (randn(3, 7), randn(3, 3), randn(3, 3))),                     # chunk of 7
    ("bias_gelu_scale", (randn(5, 6), randn(5), 0.5)),                        # no broadcast
    ("bias_gelu_scale", (randn(5, 6).to(torch.complex64), randn(6), 0.5)),   # dtype
    ("count_pos", (randn(5), 2 ** 40, True)),                                 # int32 scalar
], ids=["chunk", "broadcast", "dtype", "scalar"])
def test_fake_kernels_refuse_what_the_real_ones_refuse(ops, name, args):
    with pytest.raises(ArgumentError) as real:
        getattr(ops, name)(*args)
    with FakeTensorMode() as mode, pytest.raises(ArgumentError) as fake:
        getattr(ops, name)(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
    assert str(fake.value) == str(real.value)


def test_seeds_of_the_upper_half_reach_the_kernels_as_twos_complement(ops):
    x, res = randn(64), randn(64, seed=1)
    want = ops._bundle.dropout_add(x.numpy(), res.numpy(), 0.5, seed=2 ** 64 - 1,
                                   offset=2 ** 63 + 3)
    got = ops.dropout_add(x, res, 0.5, seed=-1, offset=2 ** 63 + 3 - 2 ** 64)
    assert np.array_equal(got.numpy(), want)
    assert not np.array_equal(ops.dropout_add(x, res, 0.5, seed=2 ** 63 - 1).numpy(), want)


def test_scalars_by_name_on_the_torch_op_and_the_direct_call(ops):
    b = ops._bundle
    x, bias = randn(5, 6), randn(6, seed=1)
    want = b.bias_gelu_scale(x, bias, 0.75)
    for got in (ops.bias_gelu_scale(x, bias, alpha=0.75), b.bias_gelu_scale(x, bias, alpha=0.75),
                b.bias_gelu_scale(alpha=0.75, bias=bias, x=x)):
        assert torch.equal(got, want)
    assert b.bias_gelu_scale.key(x, bias=bias, alpha=1.0) == "bias_gelu_scale(f32:cc,f32:bc)"


def test_compile_fullgraph_matches_eager(ops):
    def f(x, bias, cos, sin, res):
        h = ops.bias_gelu_scale(x, bias, 0.5)
        r = ops.rotate(h, cos, sin)
        s, p = ops.two_out(r, res)
        return ops.dropout_add(p, res, 0.2, seed=11, offset=0)

    def inputs():
        return (randn(4, 8, grad=True), randn(8, grad=True, seed=1), randn(4, 4, grad=True, seed=2),
                randn(4, 4, seed=3), randn(4, 8, grad=True, seed=4))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, dynamic=False)
        eager_in, compiled_in = inputs(), inputs()
        want, got = f(*eager_in), compiled(*compiled_in)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        want.sum().backward()
        got.sum().backward()
        for e, c in zip(eager_in, compiled_in):
            if e.requires_grad:
                torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_export_with_a_dynamic_batch_dim(ops):
    class Block(torch.nn.Module):
        def forward(self, x, bias, res):
            return ops.dropout_add(ops.bias_gelu_scale(x, bias, 0.5), res, 0.1, seed=3)

    batch = torch.export.Dim("batch")
    program = torch.export.export(Block(), (randn(4, 8), randn(8), randn(4, 8, seed=1)),
                                  dynamic_shapes={"x": {0: batch}, "bias": None,
                                                  "res": {0: batch}})
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets == [ops.bias_gelu_scale.default, ops.dropout_add.default]
    args = (randn(6, 8, seed=2), randn(8, seed=3), randn(6, 8, seed=4))
    assert torch.equal(program.module()(*args), Block()(*args))


def test_import_hygiene(bundle_path):
    code = f"""
import sys
import numpy as np
from fusebuild import runtime
b = runtime.load({bundle_path!r})
b.two_out(np.ones(3, np.float32), np.ones(3, np.float32))
assert "torch" not in sys.modules, "runtime.load and a numpy call imported torch"
ops = b.torch_library("hygiene")
assert "torch" in sys.modules
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
ops.two_out(torch.ones(3), torch.ones(3))
with FakeTensorMode():
    ops.two_out(torch.empty(3), torch.empty(3))
bad = [m for m in ("fusebuild.ir", "fusebuild.syntax") if m in sys.modules]
assert not bad, f"registering, calling and tracing torch ops imported {{bad}}"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def example_args(gp) -> tuple[tuple, dict]:
    """torch arguments of one float32 (else first) kernel of an example group, small shapes;
    float tensors positive (Adam's exp_avg_sq; a NaN output would differ from itself)."""
    dtypes = next((v.dtypes for v in gp.variants if any(d.name == "float32" for d in v.dtypes)),
                  gp.variants[0].dtypes)
    syms = {s for shape in gp.shapes[0].values() for d in shape for s in _syms(d)}
    shapes = {k: concrete(s, dict.fromkeys(syms, 3)) for k, s in gp.shapes[0].items()}
    args = make_args(gp, dtypes, shapes, np.random.default_rng(5))
    args = tuple(torch.from_numpy(np.abs(a) if a.dtype.kind == "f" else a)
                 if isinstance(a, np.ndarray) else a for a in args)
    return args, ({"seed": 3, "offset": 1} if gp.group.has_random else {})


def _syms(d) -> tuple[str, ...]:
    from fusebuild.argspec import Dim
    return Dim.of(d).syms


def test_examples_register_and_pass_opcheck(examples_bundle):
    ops = examples_bundle.torch_library("fbex")
    assert set(dir(ops)) >= set(examples_bundle.groups)
    plan = {gp.group.name: gp for gp in spec.load_plan([SPECS]).groups}
    for name in examples_bundle.groups:
        if name.endswith("__grad"):       # a backward group: checked with its forward group
            continue
        args, kwargs = example_args(plan[name])
        has_grad = name + "__grad" in examples_bundle.groups
        if has_grad:
            bwd = examples_bundle[name + "__grad"].info      # the inputs grad: lists
            listed = {o[len("grad_"):] for o, _ in bwd.outputs} | {i for i, _ in bwd.grad_alias}
            args = tuple(a.requires_grad_() if n in listed else a
                         for (n, _, _), a in zip(examples_bundle[name].info.params, args))
        torch.library.opcheck(getattr(ops, name), args, kwargs)
        if has_grad:
            torch.library.opcheck(getattr(ops, name + "__grad"), *grad_case(ops, name, args, kwargs))
