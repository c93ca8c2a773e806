"""Spec groups exercising every op of the table, and the input values used to test them."""
from __future__ import annotations

import itertools

import numpy as np

from fusebuild import dtypes as dt, ir, syntax
from fusebuild.errors import SpecError
from fusebuild.ops import CASTS, OPS

# (group name, tensor inputs, body) for every op; inputs named a, b, c; `cond` is a bool input
BODIES = {
    "where": (("cond", "a", "b"), "y = where(cond, a, b)"),
    "lerp": (("a", "b", "c"), "y = lerp(a, b, c)"),
    "clamp": (("a", "b", "c"), "y = clamp(a, min=b, max=c)"),
    "threshold": (("a", "b", "c"), "y = threshold(a, b, c)"),
    "addcmul": (("a", "b", "c"), "y = addcmul(a, b, c, value=3)"),
    "leaky_relu": (("a",), "y = leaky_relu(a, 0.2)"),
    "elu": (("a",), "y = elu(a, 0.7)"),
    "softplus": (("a",), "y = softplus(a, 2.0, 5.0)"),
    "hardtanh": (("a",), "y = hardtanh(a, -0.5, 2.0)"),
    "logit": (("a",), "y = logit(a, 0.01)"),
}
EXTRA = {
    "clamp_min": (("a", "b"), "y = clamp(a, min=b)"),
    "logit_noeps": (("a",), "y = logit(a)"),
    "rand_like": (("a",), "y = rand_like(a)"),
    "pow_literal": (("a",), "y = a ** 3"),
}


def op_bodies() -> dict[str, tuple[tuple[str, ...], str]]:
    out = {}
    for name, op in OPS.items():
        if name in BODIES:
            out[name] = BODIES[name]
        else:
            args = ("a", "b", "c")[:op.min_args]
            out[name] = (args, f"y = {name}({', '.join(args)})")
    for name in CASTS:
        out[f"cast_{name}"] = (("a",), f"y = {name}(a)")
    out.update(EXTRA)
    return out


# Integer inputs that an op converts to float before computing take the same conversion in every
# op (tested per dtype by the cast ops): such ops are tested with these representatives only
# (bool, the widest signed and an unsigned integer), every other dtype they accept in full.
PROMOTED_REPRESENTATIVES = (dt.bool_, dt.int64, dt.uint8)


def accepted_dtypes(name: str, inputs: tuple[str, ...], body: str) -> list[dt.DType]:
    """The dtypes (all tensor inputs alike, `cond` bool) the op type-checks with, integer inputs
    it promotes to float reduced to `PROMOTED_REPRESENTATIVES`."""
    decl = [(i, "tensor", dt.bool_ if i == "cond" else None) for i in inputs]
    g = syntax.parse_group(name, decl, [("y", None)], body, syntax.SourceMap())
    ok = []
    for d in dt.ALL:
        try:
            k = ir.instantiate(g, {i: d for i in inputs if i != "cond"} | {"cond": dt.bool_})
        except SpecError:
            continue
        promoted = not d.is_float and k.outputs[0].dtype.is_float
        if not promoted or name.startswith("cast_") or d in PROMOTED_REPRESENTATIVES:
            ok.append(d)
    return ok


def spec_text() -> str:
    lines = ["fusebuild: 1", "bundle: {name: optest, version: 0.0.0}", "groups:"]
    for name, (inputs, body) in op_bodies().items():
        dts = accepted_dtypes(name, inputs, body)
        decl = ", ".join(f"{i}: tensor(bool)" if i == "cond" else f"{i}: tensor" for i in inputs)
        shape = ", ".join(f"{i}: [N]" for i in inputs)
        lines += [f"  - name: op_{name}", f"    inputs: {{{decl}}}", "    outputs: [y]",
                  f"    body: '{body}'",
                  f"    matrix: {{dtype: [{', '.join(d.name for d in dts)}], shapes: [{{{shape}}}]}}"]
    return "\n".join(lines) + "\n"


FLOAT_SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, 1e-3, -1e-3, 0.999, 1.001,
                  10.0, -10.0, 50.0, -50.0, 88.5, -88.5, 100.0, -100.0, 1e4, 1e30, -1e30,
                  1e-40, -1e-40, np.inf, -np.inf, np.nan]


def int_specials(d: dt.DType) -> list[int]:
    info = np.iinfo(d.numpy)
    vals = [0, 1, 2, 3, 7, d.bits - 1, d.bits, info.max, info.max - 1, 100]
    if d.kind == "i":
        vals += [-1, -2, -3, -7, info.min, info.min + 1, -100]
    return [v for v in vals if info.min <= v <= info.max]


def operand_values(d: dt.DType, n_inputs: int, rng: np.random.Generator, n_random: int = 2000):
    """Arrays for each input: every combination of special values, then random values."""
    if d.is_bool:
        specials = [False, True]
    elif d.is_float:
        specials = FLOAT_SPECIALS
    else:
        specials = int_specials(d)
    combos = list(itertools.product(specials, repeat=min(n_inputs, 2)))
    cols = [np.array([c[min(i, len(c) - 1)] for c in combos]) for i in range(n_inputs)]
    out = []
    for i, col in enumerate(cols):
        if d.is_float:
            rnd = rng.standard_normal(n_random) * np.exp(rng.uniform(-6, 6, n_random))
            rnd[: n_random // 2] = rng.standard_normal(n_random // 2) * 3
        elif d.is_bool:
            rnd = rng.random(n_random) < 0.5
        else:
            info = np.iinfo(d.numpy)
            rnd = rng.integers(info.min, info.max, n_random, endpoint=True)
            rnd[: n_random // 4] = rng.integers(-3 if d.kind == "i" else 0, d.bits + 3,
                                                n_random // 4)
        with np.errstate(over="ignore", invalid="ignore"):
            out.append(np.concatenate([col.astype(np.float64) if d.is_float else col,
                                       rnd]).astype(d.numpy))
    return out


def op_arrays(group, dtypes: tuple, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs for one variant of an op group: `operand_values`, and a random bool `cond`."""
    arrays = operand_values(dtypes[-1], len(dtypes), rng)
    if group.tensor_inputs[0].name == "cond":
        arrays[0] = rng.random(arrays[1].shape) < 0.5
    return arrays
