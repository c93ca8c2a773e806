"""The oracle itself: Philox known-answer vectors, integer and cast semantics, promotion."""
from __future__ import annotations

import numpy as np
import pytest

from fusebuild import dtypes as dt, ir, syntax, reference
from fusebuild.errors import SpecError

# Random123 kat_vectors (Salmon et al., SC'11): philox4x32 10 rounds: counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    assert tuple(int(w) for w in reference.philox4x32_10(counter, key)) == want


def test_uniform_is_on_the_dtype_grid_and_in_unit_interval():
    words = reference.philox_words(np.arange(100_000, dtype=np.uint64), seed=3, offset=0)
    for d, bits in ((dt.float32, 24), (dt.float16, 11), (dt.bfloat16, 8), (dt.float64, 53)):
        u = reference.uniform_from_words(words, 0, d).astype(np.float64)
        assert u.min() >= 0 and u.max() < 1
        assert np.all(u * 2.0 ** bits == np.floor(u * 2.0 ** bits))
        assert abs(u.mean() - 0.5) < 0.01


def kernel(body, inputs, dtypes):
    g = syntax.parse_group("t", [(n, "tensor", None) for n in inputs], [("y", None)], body,
                       syntax.SourceMap())
    return ir.instantiate(g, dict(zip(inputs, dtypes)), expand=False)


@pytest.mark.parametrize("d", [dt.int8, dt.int32, dt.int64, dt.uint8])
def test_integer_division_semantics(d):
    info = np.iinfo(d.numpy)
    a = np.array([7, -7, 7, -7, info.min, info.min, 5, 0], np.int64)
    b = np.array([2, 2, -2, -2, -1, 0, 0, 3], np.int64)
    keep = (a >= info.min) & (a <= info.max) & (b >= info.min) & (b <= info.max)
    a, b = a[keep].astype(d.numpy), b[keep].astype(d.numpy)
    for op, py in (("floor_divide", lambda x, y: x // y), ("remainder", lambda x, y: x % y)):
        got = reference.evaluate(kernel(f"y = {op}(a, b)", "ab", [d, d]), [a, b]).outputs["y"]
        for x, y, g in zip(a.tolist(), b.tolist(), got.tolist()):
            want = 0 if y == 0 else ir.wrap_int(py(x, y), d)
            assert g == want, (op, x, y, g, want)


def test_shifts_and_int_pow():
    a = np.array([1, -8, 3, 5, 2, -1], np.int8)
    b = np.array([7, 9, -1, 8, 3, 3], np.int8)
    r = reference.evaluate(kernel("y = a << b", "ab", [dt.int8] * 2), [a, b]).outputs["y"]
    assert r.tolist() == [-128, 0, 0, 0, 16, -8]
    r = reference.evaluate(kernel("y = a >> b", "ab", [dt.int8] * 2), [a, b]).outputs["y"]
    assert r.tolist() == [0, -1, 0, 0, 0, -1]
    a = np.array([2, 2, 1, -1, -1, 3, -2], np.int32)
    b = np.array([10, -1, -5, -3, -4, 40, 31], np.int32)
    r = reference.evaluate(kernel("y = a ** b", "ab", [dt.int32] * 2), [a, b]).outputs["y"]
    assert r.tolist() == [1024, 0, 1, -1, 1, ir.wrap_int(3 ** 40, dt.int32), -2 ** 31]


def test_float_to_int_casts_saturate_and_nan_is_zero():
    x = np.array([np.nan, np.inf, -np.inf, 1e20, -1e20, 127.9, -128.9, -0.7, 2.5], np.float32)
    for name, want in (("int8", [0, 127, -128, 127, -128, 127, -128, 0, 2]),
                       ("uint8", [0, 255, 0, 255, 0, 127, 0, 0, 2]),
                       ("int64", [0, 2**63 - 1, -2**63, 2**63 - 1, -2**63, 127, -128, 0, 2])):
        r = reference.evaluate(kernel(f"y = {name}(a)", "a", [dt.float32]), [x]).outputs["y"]
        assert r.tolist() == want, name


@pytest.mark.parametrize("a,b,want", [
    (dt.int8, dt.uint8, dt.int16), (dt.int32, dt.float16, dt.float16), (dt.float16,
     dt.bfloat16, dt.float32), (dt.bool_, dt.int8, dt.int8), (dt.uint8, dt.int64, dt.int64),
    (dt.float32, dt.float64, dt.float64), (dt.int64, dt.bool_, dt.int64),
])
def test_tensor_promotion(a, b, want):
    assert dt.promote_pair(a, b) == want == dt.promote_pair(b, a)


def test_weak_operands():
    k = kernel("y = a * 0.5 + 1", "a", [dt.float16])
    assert k.outputs[0].dtype == dt.float16          # literals do not widen
    k = kernel("y = a * 0.5", "a", [dt.int32])
    assert k.outputs[0].dtype == dt.float32          # a float literal over ints: default float
    k = kernel("y = a / a", "a", [dt.int64])
    assert k.outputs[0].dtype == dt.float32          # int true division
    k = kernel("y = a > 1", "a", [dt.float64])
    assert k.outputs[0].dtype == dt.bool_
    g = syntax.parse_group("t", [("a", "tensor", None), ("s", "scalar", dt.float64)], [("y", None)],
                       "y = a * s", syntax.SourceMap())
    assert ir.instantiate(g, {"a": dt.float16}).outputs[0].dtype == dt.float16
    assert ir.instantiate(g, {"a": dt.int8}).outputs[0].dtype == dt.float64
    with pytest.raises(SpecError, match="does not fit uint8"):
        kernel("y = a + 256", "a", [dt.uint8])


def test_float16_is_held_in_float32_and_rounded_once():
    a = np.array([1.0, 1e-4], np.float16)
    k = kernel("y = (a + 0.0001) - 0.0001", "a", [dt.float16])
    r = reference.evaluate(k, [a]).outputs["y"]
    # in float16 steps 1 + 1e-4 would round to 1 first; held in float32 it survives
    assert r.dtype == np.float16 and r[1] == np.float16(1e-4)
    k = kernel("y = float32(float16(a * 3))", "a", [dt.float32])
    r = reference.evaluate(k, [np.array([0.1], np.float32)]).outputs["y"]
    assert r[0] == np.float32(np.float16(0.1 * 3))


def test_magnitude_covers_a_cancellation_scaled_by_a_large_factor():
    """r * (g - y * m) with g ~ y * m: the difference's rounding error (ulp of g) is scaled by
    r, so the output's magnitude (its error scale) is at least r * |g|, not max(|r|, |g|)."""
    from fusebuild.syntax import SourceMap, parse_group
    g = parse_group("t", [("g", "tensor", None), ("y", "tensor", None), ("r", "tensor", None)],
                    [("o", None)], "o = r * (g - y * 2.0)", SourceMap())
    k = ir.instantiate(g, {"g": dt.float32, "y": dt.float32, "r": dt.float32}, expand=False)
    res = reference.evaluate(k, [np.float32([6.0]), np.float32([3.0]), np.float32([13.0])])
    assert res.outputs["o"][0] == 0 and res.magnitude["o"][0] >= 13 * 6
