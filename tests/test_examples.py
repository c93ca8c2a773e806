"""Every kernel of every example spec against the reference evaluator, on random inputs of
several shapes: random sizes, 1-element, 0-size, broadcast operands (from the patterns),
non-contiguous views (groups built with `strided: true`) and in-place outputs."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from fusebuild import dtypes as dt, spec
from fusebuild.argspec import Dim
from fusebuild.errors import KernelNotFound
from conftest import SPECS, check_call, concrete, make_args, random_array, strided_view

PLAN = spec.load_plan([SPECS])


def symbols(gp) -> list[str]:
    return sorted({s for pattern in gp.shapes for shape in pattern.values() for d in shape
                   for s in Dim.of(d).syms})


pytestmark = pytest.mark.isa


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_example_group_matches_reference(examples_bundle, gp):
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    seed = dict(seed=int(rng.integers(0, 2**63)), offset=int(rng.integers(0, 2**40))) \
        if gp.group.has_random else {}
    syms = symbols(gp)
    assignments = [{s: int(rng.integers(2, 9)) for s in syms} for _ in range(3)]
    assignments += [{s: 1 for s in syms}]                       # one element
    assignments += [{**assignments[0], s: 1} for s in syms]     # one symbol of size 1
    if syms:
        assignments += [{**{s: 3 for s in syms}, syms[0]: 0}]    # empty
    strided = any("s" * len(lay) == lay and lay for v in gp.variants
                  for lay in [v.key.split(":")[-1].rstrip(")")])
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for pattern in gp.shapes:
            for values in assignments:
                shapes = {k: concrete(s, values) for k, s in pattern.items()}
                check_call(examples_bundle, gp.group.name, make_args(gp, dtypes, shapes, rng), **seed)
            shapes = {k: concrete(s, assignments[0]) for k, s in pattern.items()}
            args = make_args(gp, dtypes, shapes, rng, view=strided_view)
            if strided:
                check_call(examples_bundle, gp.group.name, args, **seed)
            elif not any(p.chunk for p in gp.group.inputs):
                with pytest.raises(KernelNotFound, match=gp.group.name):
                    examples_bundle[gp.group.name](*args, **seed)


def test_inplace_adam_update_matches_reference(examples_bundle):
    rng = np.random.default_rng(7)
    n = 1000
    p, g, m, v = (random_array(dt.float32, (n,), rng) for _ in range(4))
    v = np.abs(v)
    scalars = [1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001]
    expected = check_call(examples_bundle, "adam", [p.copy(), g, m.copy(), v.copy(), *scalars])
    examples_bundle.adam(p, g, m, v, *scalars, out=(p, m, v))
    for got, want in zip((p, m, v), expected):
        np.testing.assert_array_equal(got, want)


def test_random_values_depend_only_on_seed_offset_and_index(examples_bundle):
    x = np.zeros((8, 16), np.float32)
    bias = np.zeros(16, np.float32)
    k = examples_bundle.bias_dropout_residual
    a = k(x + 1, bias, x, 0.5, seed=42, offset=3)
    flat = k((x + 1).ravel(), np.zeros(128, np.float32), x.ravel(), 0.5, seed=42, offset=3)
    np.testing.assert_array_equal(a.ravel(), flat)       # different key/rank, same values
    assert not np.array_equal(a, k(x + 1, bias, x, 0.5, seed=43, offset=3))
    assert not np.array_equal(a, k(x + 1, bias, x, 0.5, seed=42, offset=4))
    kept = (a != 0).mean()
    assert 0.35 < kept < 0.65


def test_verify_numerics_checks_reduction_kernels(examples_bundle):
    """`verify --numerics` runs each reduction kernel at N = 37, 300 and 0 against the reference,
    and refuses a kernel whose group computes something else (eps 0.5 instead of 1e-6)."""
    from fusebuild import syntax, verify
    from fusebuild.errors import BundleError
    from fusebuild.runtime.cpu import host_isas
    root, manifest = examples_bundle.root, examples_bundle.manifest
    level = f"cpu:{host_isas()[-1]}"
    entries = [k for k in manifest["kernels"] if k["target"] == level
               and manifest["groups"][k["group"]].get("reduce")]
    assert {k["group"] for k in entries} == {gp.group.name for gp in PLAN.groups
                                            if gp.group.reduces}
    rng = np.random.default_rng(3)
    for k in entries:
        verify.check_numerics(root, syntax.group_from_json(manifest["groups"][k["group"]]), k, rng)
    (entry,) = [k for k in entries if k["key"] == "rms_norm(f32:cc,f32:bc)"]
    wrong = syntax.group_from_json({**manifest["groups"]["rms_norm"],
                                "body": "y = rms_norm(x, eps=0.5) * w"})
    with pytest.raises(BundleError, match=r"rms_norm\(f32:cc,f32:bc\) .* output y \(rows of N = "):
        verify.check_numerics(root, wrong, entry, rng)
