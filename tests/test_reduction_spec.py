"""Row reductions in the spec language (DESIGN §8), without compiling anything: the typed graph
and the schedule of nested and chained reductions, executed pass by pass in numpy and checked
against torch (float64) and the reference; type rules; ArgSpec keys of reduction groups; the plan
of specs/norms.yaml; nearest keys and miss logs of reduction groups."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fusebuild import dtypes as dt, ir, syntax, reference, schedule, spec
from fusebuild.argspec import canonicalize, contiguous_strides, row_strides
from fusebuild.ops import ROW_OPS
from fusebuild.runtime import dispatch
from conftest import SPECS


def group(body: str, inputs: str = "x", outputs=("y",), scalars: str = "") -> syntax.Group:
    ins = [(n, "tensor", None) for n in inputs] + [(n, "scalar", dt.float32) for n in scalars]
    return syntax.parse_group("g", ins, [(o, None) for o in outputs], body, syntax.SourceMap())


def kernel(body: str, dtypes=(dt.float32,), **kw) -> ir.Kernel:
    g = group(body, **kw)
    return ir.instantiate(g, {i.name: d for i, d in zip(g.tensor_inputs, dtypes)})


# ---------------------------------------------------------------- the schedule, executed --------

def run_schedule(k: ir.Kernel, arrays: list[np.ndarray], scalars=()) -> dict[str, np.ndarray]:
    """Execute an expanded kernel in the order of `schedule.schedule`, all rows at once: uniform
    nodes, then per pass its per-element nodes, its reductions and the row values after it, then
    the final sweep. Per-element values live for one sweep only, so a node a sweep uses but does
    not list (or lists after its use) is a KeyError here."""
    s = schedule.schedule(k)
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    lv = schedule.levels(k)
    reds = [r for p in s.passes for r in p.reds]
    assert sorted(reds) == [i for i, n in enumerate(k.nodes) if n.op in ROW_OPS[:3]]
    kept: dict[int, np.ndarray] = {}            # uniform and row values, for the whole call

    def compute(i: int, full: dict) -> np.ndarray:
        n = k.nodes[i]
        args = [full[a] if lv[a] == 2 else kept[a] for a in n.args]
        c = n.dtype.compute.numpy
        if n.op == "load":
            return arrays[n.attr[0]].astype(c)
        if n.op == "const":
            return np.array(n.attr, c)
        if n.op == "scalar":
            return np.array(scalars[n.attr]).astype(n.dtype.numpy).astype(c)
        if n.op == "rowlen":
            return np.array(shape[-1], c)
        if n.op in ("rsum", "rmax", "rmin"):
            assert lv[n.args[0]] == 2            # sums of row values have closed forms
            x = np.broadcast_to(args[0], shape)
            if n.op == "rsum":
                wide = np.float64 if n.dtype.is_float else np.int64
                return np.sum(x.astype(wide), axis=-1, keepdims=True).astype(c)
            return reference._row_max(x, np.max if n.op == "rmax" else np.min).astype(c)
        if n.op == "cast":
            v = reference._cast(args[0], k.nodes[n.args[0]].dtype, n.dtype)
            return v.astype(np.float32) if n.dtype.name in ("float16", "bfloat16") else v
        if n.op == "hold":
            return args[0]
        return np.asarray(reference._eval_op(n, args, [k.nodes[a].dtype for a in n.args]))

    with np.errstate(all="ignore"):
        for i in s.hoisted:
            kept[i] = compute(i, {})
        for p in s.passes:
            full: dict[int, np.ndarray] = {}
            for i in p.elem:
                full[i] = compute(i, full)
            for i in p.reds + p.after:
                kept[i] = compute(i, full)
        full = {}
        for i in s.final:
            full[i] = compute(i, full)
    out = {}
    for o in k.outputs:
        (node,) = o.parts
        v = kept[node] if o.row else full[node] if lv[node] == 2 else kept[node]
        to = shape[:-1] + (1,) if o.row else shape
        out[o.name] = np.broadcast_to(v, to).astype(o.dtype.numpy)
    return out


def special_rows(n: int, rng) -> np.ndarray:
    """Rows of random normals (scaled), one holding a NaN, one +inf, one all -inf, one zeros."""
    x = (rng.standard_normal((7, n)) * 3).astype(np.float32)
    x[1, n // 2] = np.nan
    x[2, n // 3] = np.inf
    x[3] = -np.inf
    x[4] = 0
    return x


T = torch.from_numpy


def t_softmax(x):
    return torch.softmax(x, -1)


def amax(x):
    return x.amax(-1, keepdim=True)


# (body, tensor inputs, outputs, oracle of the outputs on float64 torch tensors): nested, chained,
# composite
CASES = [
    ("y = softmax(x - amax(x))", "x", "y", lambda x: t_softmax(x - amax(x))),
    ("y = sum(softmax(x) * x)", "x", "y", lambda x: (t_softmax(x) * x).sum(-1, keepdim=True)),
    ("y = mean(x) - amin(x)", "x", "y",
     lambda x: x.mean(-1, keepdim=True) - x.amin(-1, keepdim=True)),
    ("y = x - mean(x - mean(x))", "x", "y",
     lambda x: x - (x - x.mean(-1, keepdim=True)).mean(-1, keepdim=True)),
    ("y = var(x, correction=1)", "x", "y", lambda x: x.var(-1, correction=1, keepdim=True)
     if x.shape[-1] > 1 else torch.full_like(x, torch.nan)),     # N - 1 = 0: 0 / 0
    ("y = log_softmax(x)\nz = logsumexp(x)", "x", "yz",
     lambda x: (torch.log_softmax(x, -1), torch.logsumexp(x, -1, keepdim=True))),
    ("y = layer_norm(x, eps=1e-5) * w + b", "xwb", "y",
     lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, 1e-5)),
    ("h = x + w\ny = rms_norm(h, eps=1e-6) * w", "xw", "yh",
     lambda x, w: (torch.nn.functional.rms_norm(x + w, x.shape[-1:], w, 1e-6), x + w)),
]


@pytest.mark.parametrize("body,names,outputs,oracle", CASES,
                         ids=[c[0].split("\n")[0] for c in CASES])
@pytest.mark.parametrize("n", [37, 1])
def test_schedule_computes_nested_reductions_like_torch(body, names, outputs, oracle, n):
    rng = np.random.default_rng(n)
    g = group(body, names, tuple(outputs))
    arrays = [special_rows(n, rng)] + [rng.standard_normal(n).astype(np.float32)
                                       for _ in names[1:]]
    dtypes = {a: dt.float32 for a in names}
    got = run_schedule(ir.instantiate(g, dtypes), arrays)
    ref = reference.evaluate(ir.instantiate(g, dtypes, expand=False), arrays)
    want = oracle(*(T(a.astype(np.float64)) for a in arrays))
    for name, w in zip(outputs, want if isinstance(want, tuple) else (want,)):
        w = w.numpy().astype(np.float32)
        assert got[name].shape == w.shape == ref.outputs[name].shape
        for against in (w, ref.outputs[name]):
            bad = reference.compare(got[name], against, ref.magnitude[name], n_row=n)
            assert bad is None, (name, bad.message)


@pytest.mark.parametrize("n", [37, 300])
def test_softmax_rows_sum_to_one_and_layer_norm_rows_are_standardized(n):
    """Within 4 (1 + log2 N) eps(float32), relative to 1 and to the row's largest |y|."""
    x = (np.random.default_rng(n).standard_normal((5, n)) * 3 + 1).astype(np.float32)
    bound = 4 * (1 + np.log2(n)) * np.finfo(np.float32).eps
    p = run_schedule(kernel("y = softmax(x)"), [x])["y"].astype(np.float64)
    assert np.all(np.abs(p.sum(-1) - 1) <= bound)
    y = run_schedule(kernel("y = layer_norm(x, eps=1e-5)"), [x])["y"].astype(np.float64)
    big = np.abs(y).max(-1)
    assert np.all(np.abs(y.mean(-1)) <= bound * big)
    var = x.astype(np.float64).var(-1)
    assert np.all(np.abs(y.var(-1) - var / (var + np.float32(1e-5))) <= bound * big ** 2)


def test_nested_and_chained_reductions_sweep_the_row_in_dependency_order():
    def ops(k, ids):
        return [k.nodes[i].op for i in ids]
    k = kernel("y = softmax(x - amax(x))")
    s = schedule.schedule(k)
    assert [ops(k, p.reds) for p in s.passes] == [["rmax"], ["rmax"], ["rsum"]]
    assert not k.outputs[0].row and ops(k, s.final)[-1] == "mul"   # e * (1 / sum)
    k = kernel("y = sum(softmax(x) * x)")
    s = schedule.schedule(k)
    assert [ops(k, p.reds) for p in s.passes] == [["rmax"], ["rsum"], ["rsum"]]
    assert k.outputs[0].row and s.final == ()
    k = kernel("y = mean(x) - amin(x)")        # independent reductions share one sweep
    s = schedule.schedule(k)
    assert [sorted(ops(k, p.reds)) for p in s.passes] == [["rmin", "rsum"]]
    assert ops(k, s.hoisted) == ["rowlen"] and ops(k, s.passes[0].after) == ["div", "sub"]
    assert k.outputs[0].row and s.final == ()
    k = kernel("h = x + r\ny = h * rsqrt(mean(h * h, dim=-1) + eps) * w", (dt.bfloat16,) * 3,
               inputs="xrw", outputs=("y", "h"), scalars=["eps"])
    s = schedule.schedule(k)                   # add + rms_norm: one sweep, then the stores
    assert len(s.passes) == 1 and [o.row for o in k.outputs] == [False, False]
    assert {k.outputs[0].parts[0], k.outputs[1].parts[0]} <= set(s.final)
    assert len(schedule.schedule(kernel("y = layer_norm(x)")).passes) == 2   # mean, then var


def test_row_outputs_and_reduction_types():
    g = group("s = amax(abs(x)) / 127.0\nq = int8(round(x / s))\nn = sum(x > 0)",
              outputs=("q", "s", "n"))
    assert g.reduces and [o.row for o in g.outputs] == [False, True, True]
    assert g.to_json()["reduce"] and [o.get("row", False) for o in g.to_json()["outputs"]] == \
        [False, True, True]
    k = ir.instantiate(g, {"x": dt.bfloat16})
    assert [(o.name, o.dtype.name) for o in k.outputs] == [("q", "int8"), ("s", "bfloat16"),
                                                           ("n", "int64")]
    assert {n.dtype.name for n in k.nodes if n.op == "rmax"} == {"float32"}   # bf16 held in f32
    for d, red, want in [(dt.float16, "sum", "float16"), (dt.float64, "mean", "float64"),
                         (dt.int8, "sum", "int64"), (dt.bool_, "sum", "int64"),
                         (dt.int16, "amax", "int16"), (dt.uint8, "amin", "uint8")]:
        k = kernel(f"y = {red}(x)", (d,))
        acc = {n.dtype.name for n in k.nodes if n.op in ROW_OPS[:3]}
        assert k.outputs[0].dtype.name == want and k.outputs[0].row, (d, red)
        assert acc == {"float32" if d == dt.float16 else want}, (d, red, acc)
    assert not group("y = exp(x)").reduces
    assert not group("y = x * sum(2.0)").outputs[0].row     # full: it depends on x
    assert group("y = sum(s)", scalars=["s"], inputs="x").outputs[0].row   # N * s, per row


def test_empty_rows_give_the_documented_values():
    """N = 0: sum 0, mean / var / amax / amin NaN (torch raises for amax/amin), logsumexp -inf
    (log of an empty sum, as torch); full outputs are empty."""
    x = np.zeros((3, 0), np.float32)
    want = {"sum": 0.0, "mean": np.nan, "var": np.nan, "amax": np.nan, "amin": np.nan,
            "logsumexp": -np.inf}
    torch_fn = {"sum": torch.sum, "mean": torch.mean, "logsumexp": torch.logsumexp}
    for red, value in want.items():
        g = group(f"y = {red}(x)\nz = softmax(x)", outputs=("y", "z"))
        got = run_schedule(ir.instantiate(g, {"x": dt.float32}), [x])
        ref = reference.evaluate(ir.instantiate(g, {"x": dt.float32}, expand=False), [x])
        for r in (got, ref.outputs):
            assert r["y"].shape == (3, 1) and r["z"].shape == (3, 0)
            np.testing.assert_array_equal(r["y"], np.full((3, 1), value, np.float32), red)
        if red in torch_fn:
            np.testing.assert_array_equal(torch_fn[red](T(x), -1, keepdim=True).numpy(), got["y"])
    g = group("y = sum(x)\nz = amax(x)", outputs=("y", "z"))
    got = run_schedule(ir.instantiate(g, {"x": dt.int32}), [np.zeros((2, 0), np.int32)])
    assert got["y"].tolist() == [[0], [0]] and got["z"].tolist() == [[0], [0]]


def test_integer_sums_are_exact_int64_and_quantization_is_float32_exact():
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (5, 300)).astype(np.int8)
    got = run_schedule(kernel("y = sum(x)\nz = amax(x)", (dt.int8,), outputs=("y", "z")), [x])
    np.testing.assert_array_equal(got["y"], T(x).sum(-1, keepdim=True, dtype=torch.int64).numpy())
    np.testing.assert_array_equal(got["z"], T(x).amax(-1, keepdim=True).numpy())
    x = special_rows(300, rng)
    x[5] = x[5] * 1e-30                      # subnormal-sized row: the clamp keeps scale > 0
    body = ("s = max(amax(abs(x)), 1e-8) / 127.0\n"
            "q = int8(clamp(round(x / s), min=-127, max=127))")
    got = run_schedule(kernel(body, outputs=("q", "s")), [x])
    xt = T(x)
    scale = torch.clamp(xt.abs().amax(-1, keepdim=True), min=1e-8) / 127.0   # float32 ops
    q = torch.nan_to_num(torch.round(xt / scale), nan=0.0).clamp(-127, 127).to(torch.int8)
    np.testing.assert_array_equal(got["s"], scale.numpy())
    np.testing.assert_array_equal(got["q"], q.numpy())
    assert got["s"][4, 0] > 0 and not got["q"][4].any()       # a row of zeros: q = 0


# ---------------------------------------------------------------- ArgSpec -----------------------

def canon(shape, *operands, extra=(), keep_last=True):
    ops = [(s, contiguous_strides(s)) if st is None else (s, st) for s, st in operands]
    return canonicalize(shape, ops, extra, keep_last=keep_last)


def test_canonicalization_keeps_the_reduced_dim_innermost_and_merges_outer_dims():
    c = canon((4, 3, 37), ((4, 3, 37), None), ((37,), None))
    assert c.sizes == (12, 37) and c.layouts == ("cc", "bc")       # x[B,T,N] + w[N]
    assert canon((37,), ((37,), None)).layouts == ("c",)
    assert canon((6, 5), ((6, 5), None)).sizes == (6, 5)           # elementwise would give (30,)
    assert canon((6, 5), ((6, 5), None), keep_last=False).sizes == (30,)
    for shape, sizes in [((4, 1), (4, 1)), ((1, 1), (1,)), ((1, 37), (37,)), ((2, 3, 1), (6, 1))]:
        c = canon(shape, (shape, None))                            # N = 1 stays, as a dim
        assert c.sizes == sizes and c.layouts == ("c" * len(sizes),), shape
    assert canon((4, 1), ((4, 1), None), keep_last=False).sizes == (4,)
    # a row output [A, B, 1] (strides (B, 1, 0)) lets the outer dims merge
    c = canon((2, 3, 8), ((2, 3, 8), None), extra=[row_strides((2, 3, 8))])
    assert c.sizes == (6, 8) and c.strides[-1] == (1, 0)


def test_mask_and_strided_rows():
    b, h, t, s = 2, 4, 3, 37
    c = canon((b, h, t, s), ((b, h, t, s), None), ((b, 1, t, s), None))
    assert c.layouts == ("cccc", "sbcc")            # the mask is broadcast over heads
    one_head = canon((b, 1, t, s), ((b, 1, t, s), None), ((b, 1, t, s), None))
    assert one_head.sizes == (b * t, s) and one_head.layouts == ("cc", "cc")
    assert dispatch.placement(c.layouts, one_head.layouts, keep_last=True) == (2, 3)
    x = np.zeros((5, 64), np.float32)
    for view, want in [(x[:, :37], ("sc",)), (x[:, ::2], ("ss",)), (x.T[:37], ("ss",))]:
        st = tuple(v // 4 for v in view.strides)
        got = canon(view.shape, (view.shape, st)).layouts
        assert got == want and dispatch.placement(("ss",), got, keep_last=True) == (0, 1)
    # the call's last dim runs on the kernel's last dim only
    assert dispatch.placement(("cb", "bc"), ("c", "b")) == (0,)
    assert dispatch.placement(("cb", "bc"), ("c", "b"), keep_last=True) is None


def test_runtime_keys_and_output_shapes_of_a_reduction_group():
    g = group("y = rms_norm(x) * w\ns = sum(x)", "xw", ("y", "s"))
    info = dispatch.GroupInfo.from_manifest(g.to_json())
    assert info.reduces and info.row_outputs == (False, True)

    def call(*arrays):
        return dispatch.prepare(info, arrays, lambda a: (a.shape, a.strides, a.dtype))
    c = call(np.zeros((4, 3, 37), np.float32), np.zeros(37, np.float32))
    assert c.key == "g(f32:cc,f32:bc)" and c.out_shapes == [(4, 3, 37), (4, 3, 1)]
    assert dispatch.work_count(c, True) == 12 * 37
    c = call(np.zeros(37, np.float32), np.zeros(37, np.float32))
    assert c.key == "g(f32:c,f32:c)" and c.out_shapes == [(37,), (1,)]
    c = call(np.zeros((4, 1), np.float32), np.zeros(1, np.float32))
    assert c.key == "g(f32:cc,f32:bc)" and c.out_shapes == [(4, 1), (4, 1)]
    assert dispatch.work_count(call(np.zeros((4, 0), np.float32), np.zeros(0, np.float32)),
                               True) == 4
    with pytest.raises(Exception, match="rank >= 1"):
        call(np.zeros((), np.float32), np.zeros((), np.float32))


# ---------------------------------------------------------------- plan, keys, misses -----------

NORMS = os.path.join(SPECS, "norms.yaml")
NORM_KEYS = {
    "softmax": ["softmax(f32:cc)", "softmax(f32:ss)", "softmax(bf16:cc)", "softmax(bf16:ss)"],
    "masked_softmax": ["masked_softmax(f32:cccc,f32:sbcc)", "masked_softmax(bf16:cccc,bf16:sbcc)"],
    "log_softmax": ["log_softmax(f32:cc)", "log_softmax(bf16:cc)"],
    "layer_norm": [f"layer_norm({d}:cc,{d}:bc,{d}:bc)" for d in ("f32", "f16", "bf16")],
    "rms_norm": ["rms_norm(f32:cc,f32:bc)", "rms_norm(bf16:cc,bf16:bc)"],
    "add_rms_norm": [f"add_rms_norm({d}:cc,{d}:cc,{d}:bc)" for d in ("f32", "f16", "bf16")],
    "quant_per_token": ["quant_per_token(f32:cc)", "quant_per_token(bf16:cc)"],
}
# the backward groups of the norms with grad: (inputs, then the output gradients)
NORM_GRAD_KEYS = {
    "softmax__grad": [f"softmax__grad({d}:{lay},{d}:{lay})" for d in ("f32", "bf16")
                      for lay in ("cc", "ss")],
    "layer_norm__grad": [f"layer_norm__grad({d}:cc,{d}:bc,{d}:bc,{d}:cc)"
                         for d in ("f32", "f16", "bf16")],
    "rms_norm__grad": [f"rms_norm__grad({d}:cc,{d}:bc,{d}:cc)" for d in ("f32", "bf16")],
    "add_rms_norm__grad": [f"add_rms_norm__grad({d}:cc,{d}:cc,{d}:bc,{d}:cc,{d}:cc)"
                           for d in ("f32", "f16", "bf16")],
}


def test_plan_of_the_norm_examples_lists_their_keys():
    r = subprocess.run([sys.executable, "-m", "fusebuild", "plan", NORMS, "--target",
                        "cpu:x86-64-v2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {row["target"] for row in rows} == {"cpu:x86-64-v2"}
    got: dict[str, list[str]] = {}
    for row in rows:
        got.setdefault(row["group"], []).append(row["key"])
    assert got == NORM_KEYS | NORM_GRAD_KEYS
    plan = spec.load_plan([NORMS])
    rows_out = {gp.group.name: [o.name for o in gp.group.outputs if o.row] for gp in plan.groups}
    assert rows_out == {"softmax": [], "masked_softmax": [], "log_softmax": ["lse"],
                        "layer_norm": [], "rms_norm": [], "add_rms_norm": [],
                        "quant_per_token": ["scale"]} | dict.fromkeys(NORM_GRAD_KEYS, [])
    assert all(gp.group.reduces for gp in plan.groups)


def test_nearest_keys_and_miss_logs_of_reduction_groups(tmp_path):
    keys = [k for ks in NORM_KEYS.values() for k in ks]
    assert dispatch.nearest_keys("rms_norm(f16:cc,f16:bc)", keys, 2) == (
        "rms_norm(bf16:cc,bf16:bc)", "rms_norm(f32:cc,f32:bc)")
    assert dispatch.nearest_keys("rms_norm(f32:cs,f32:bc)", keys, 1) == ("rms_norm(f32:cc,f32:bc)",)
    log = tmp_path / "misses.jsonl"
    log.write_text("\n".join(json.dumps({"key": k, "target": "cpu:x86-64-v3"}) for k in [
        "rms_norm(f16:cc,f16:bc)",          # new dtype: added
        "rms_norm(f32:sc,f32:bc)",          # strided rows: added
        "rms_norm(f32:cc,f32:bc)",          # already built
        "rms_norm(f32:,f32:)",              # rank 0: a reduction needs the reduced dim
        "log_softmax(i32:cc)",              # does not type-check: softmax needs floats
    ]) + "\n")
    fold = spec.add_misses(spec.load_plan([NORMS]), str(log))
    assert (fold.added, fold.backward) == (2, 2), fold
    assert [b.split(": ", 2)[1] for b in fold.bad] == ["rms_norm(f32:,f32:)",
                                                       "log_softmax(i32:cc)"]
    assert "rank >= 1" in fold.bad[0] and "needs a float operand" in fold.bad[1]
    gp = {gp.group.name: gp for gp in fold.plan.groups}["rms_norm"]
    assert [v.key for v in gp.variants][-2:] == ["rms_norm(f16:cc,f16:bc)",
                                                 "rms_norm(f32:sc,f32:bc)"]
