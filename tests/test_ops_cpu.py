"""Every op of the table, on the CPU, for every dtype it accepts (integer inputs an op converts to
float: the representatives of `opcases.PROMOTED_REPRESENTATIVES`), at every ISA level the host
runs: all pairs of special values (0, -0, +-inf, NaN, extremes, subnormals, integer limits,
shift counts around the bit width) plus random values, against the reference evaluator.

Tolerances (see reference.compare): exact for integers and bools; primitive float ops and the
arithmetic composites (lerp, addcmul, clamp, relu, ...) within 4 ULP of the float64-computed
result for float32/float64 and 1 ULP of storage for float16/bfloat16, purely relative (gelu,
a primitive, included); transcendental composites (silu, mish, softplus, ...) and lgamma (near
its roots) relative to their largest intermediate value, which bounds rounding amplified by
cancellation.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from fusebuild import ir, reference
from fusebuild.ops import OPS
from opcases import op_arrays, op_bodies

pytestmark = pytest.mark.isa

STEPWISE = {"lerp", "addcmul", "clamp", "relu", "relu6", "hardtanh", "threshold"}


def relative_to_magnitude(op: str) -> bool:
    return op == "lgamma" or (op in OPS and OPS[op].composite and op not in STEPWISE)


@pytest.mark.parametrize("name", list(op_bodies()))
def test_op_matches_reference_for_every_dtype(op_bundles, name):
    plan, bundles = op_bundles
    gp = next(g for g in plan.groups if g.group.name == f"op_{name}")
    assert gp.variants, f"op {name} accepts no dtype"
    g = gp.group
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for v in gp.variants:
        arrays = op_arrays(g, v.dtypes, rng)
        dtypes = {i.name: d for i, d in zip(g.tensor_inputs, v.dtypes)}
        want = reference.evaluate(ir.instantiate(g, dtypes, expand=False), arrays, seed=99,
                                  offset=5)
        magnitude = want.magnitude["y"] if relative_to_magnitude(name) else None
        for isa, bundle in bundles.items():
            kw = {"seed": 99, "offset": 5} if g.has_random else {}
            got = bundle[g.name](*arrays, **kw)
            m = reference.compare(got, want.outputs["y"], magnitude)
            assert m is None, f"{v.key} at {isa}: {m.message}; inputs " \
                              f"{[a[m.worst_index] for a in arrays]}"


def test_every_op_and_cast_is_covered():
    names = set(op_bodies())
    assert set(OPS) <= names
    assert {f"cast_{c}" for c in ("float16", "bfloat16", "int8", "uint8", "bool")} <= names


def _ties_and_neighbours(storage: str) -> np.ndarray:
    """float32 values around every midpoint between adjacent float16/bfloat16 values."""
    import ml_dtypes
    t = np.float16 if storage == "float16" else ml_dtypes.bfloat16
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    vals = bits.view(t).astype(np.float32)
    finite = vals[np.isfinite(vals)]
    lo, hi = finite[:-1], finite[1:]
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2
    mid32 = mid.astype(np.float32)
    near = np.concatenate([mid32, np.nextafter(mid32, np.float32(np.inf)),
                           np.nextafter(mid32, np.float32(-np.inf))])
    return np.concatenate([near, -near, vals])


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_conversions_are_exact_round_to_nearest_even(op_bundles, storage):
    """f32 -> f16/bf16 must be bit-identical to numpy/ml_dtypes (RNE) at every tie and its
    neighbours, for every finite value, overflow and NaN; f16/bf16 -> f32 exact for all 2**16."""
    import ml_dtypes
    t = np.dtype(np.float16) if storage == "float16" else np.dtype(ml_dtypes.bfloat16)
    _, bundles = op_bundles
    rng = np.random.default_rng(1)
    x = np.concatenate([_ties_and_neighbours(storage),
                        rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32),
                        np.array([np.inf, -np.inf, 65520.0, 65519.99, 3.4e38], np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(t)
    all_bits = np.arange(0, 1 << 16, dtype=np.uint16).view(t)
    for isa, bundle in bundles.items():
        got = bundle[f"op_cast_{storage}"](x)
        nan = np.isnan(want.astype(np.float32))
        assert np.array_equal(np.isnan(got.astype(np.float32)), nan), isa
        same = got[~nan].view(np.uint16) == want[~nan].view(np.uint16)
        bad = np.flatnonzero(~same)
        assert same.all(), f"{isa}: {x[~nan][bad[:5]]} -> {got[~nan][bad[:5]]}, want " \
                           f"{want[~nan][bad[:5]]}"
        back = bundle["op_cast_float32"](all_bits)
        ref = all_bits.astype(np.float32)
        both_nan = np.isnan(back) & np.isnan(ref)
        assert np.array_equal(back.view(np.uint32)[~both_nan], ref.view(np.uint32)[~both_nan])
        assert np.array_equal(np.isnan(back), np.isnan(ref))
