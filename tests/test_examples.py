"""Every kernel of every example spec against the reference evaluator, on random inputs of
several shapes: random sizes, 1-element, 0-size, broadcast operands (from the patterns),
non-contiguous views (groups built with `strided: true`) and in-place outputs."""
from __future__ import annotations

import numpy as np
import pytest

from fusebuild import dtypes as dt, spec
from fusebuild.errors import KernelNotFound
from conftest import SPECS, check_call, example_calls, random_array

PLAN = spec.load_plan([SPECS])


pytestmark = pytest.mark.isa


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_example_group_matches_reference(examples_bundle, gp):
    for args, seed, served in example_calls(gp):
        if served:
            check_call(examples_bundle, gp.group.name, args, **seed)
        else:
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
    from fusebuild.runtime.cpu import host_isas, load_verified
    root, manifest = examples_bundle.root, examples_bundle.manifest
    level = f"cpu:{host_isas()[-1]}"
    entries = [k for k in manifest["kernels"] if k["target"] == level
               and manifest["groups"][k["group"]].get("reduce")]
    assert {k["group"] for k in entries} == {gp.group.name for gp in PLAN.groups
                                            if gp.group.reduces}
    rng = np.random.default_rng(3)
    lib = lambda k: load_verified(root, k["file"], k["sha256"],  # noqa: E731
                                  examples_bundle.description(k["file"]))
    for k in entries:
        verify.check_numerics(lib(k), syntax.group_from_json(manifest["groups"][k["group"]]), k,
                              rng)
    (entry,) = [k for k in entries if k["key"] == "rms_norm(f32:cc,f32:bc)"]
    wrong = syntax.group_from_json({**manifest["groups"]["rms_norm"],
                                "body": "y = rms_norm(x, eps=0.5) * w"})
    with pytest.raises(BundleError, match=r"rms_norm\(f32:cc,f32:bc\) .* output y \(rows of N = "):
        verify.check_numerics(lib(entry), wrong, entry, rng)
