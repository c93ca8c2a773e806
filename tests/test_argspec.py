"""ArgSpec canonicalization and keys: DESIGN §2 examples, key grammar round trip, and property
tests that canonical form preserves every operand's element order and that the kernel chosen
by key computes numpy's result on the original (strided, broadcast, reversed) arrays."""
from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fusebuild import build, dtypes as dt, runtime, spec
from fusebuild.argspec import (Canonical, Dim, broadcast_shapes, canonicalize,
                               contiguous_strides, format_key, parse_key, symbol_name)
from fusebuild.runtime import dispatch

B, C, H = Dim(1, ("B",)), Dim(1, ("C",)), Dim(1, ("H",))


def test_design_examples():
    c = canonicalize((B, C), [((B, C), contiguous_strides((B, C))), ((C,), (1,))])
    assert c.layouts == ("cc", "bc")
    # contiguous gates[B, 4H] chunked on dim 1 -> view [B, H] with strides (4H, 1)
    c = canonicalize((B, H), [((B, H), (4 * H, 1)), ((B, H), contiguous_strides((B, H)))])
    assert c.layouts == ("sc", "cc")
    # any all-contiguous call of any rank is rank 1
    c = canonicalize((2, 3, 4), [((2, 3, 4), (12, 4, 1)), ((2, 3, 4), (12, 4, 1))])
    assert c.sizes == (24,) and c.layouts == ("c", "c")
    # size-1 dims dropped, rank 0 for a single element
    assert canonicalize((1, 1), [((1, 1), (1, 1))]).layouts == ("",)


@pytest.mark.parametrize("kernel, call, dims", [
    (("sc",), ("s",), (0,)),                       # swiglu, F = 1: chunk view [T, 1]
    (("sc", "cc"), ("s", "c"), (0,)),              # lstm_cell, H = 1
    (("cc", "bc"), ("c", "b"), (0,)),              # bias_gelu, C = 1
    (("ccc", "sbc", "sbc"), ("cc", "sb", "sb"), (0, 1)),   # scale_shift, C = 1
    (("cc", "bc"), ("c", "c"), (1,)),              # size-1 dims go outermost first
    (("sc",), ("",), ()),                          # one element
    (("sc",), ("c",), (1,)),
    (("cc", "bc"), ("s", "b"), None),              # no kernel letter takes 's'
    (("c",), ("cc",), None),                       # never a lower-rank kernel
])
def test_placement_of_a_call_on_a_higher_rank_kernel(kernel, call, dims):
    assert dispatch.placement(kernel, call) == dims
    if dims is None:
        return
    rank = len(call[0])
    sizes = tuple(range(2, 2 + rank))
    strides = tuple(tuple(0 if ch == "b" else 7 for ch in lay) for lay in call)
    padded = dispatch.pad(Canonical(sizes, strides, call), kernel)
    assert padded.sizes == tuple(sizes[dims.index(d)] if d in dims else 1
                                 for d in range(len(kernel[0])))
    for st, lay, orig in zip(padded.strides, padded.layouts, strides):
        assert tuple(s for d, s in enumerate(st) if d in dims) == orig
        assert all(s == 0 and ch == "b" for d, (s, ch) in enumerate(zip(st, lay)) if d not in dims)


def test_kernels_that_keep_the_inner_dim_inner_come_first():
    """'sc' runs an 's' call only with its inner dim of size 1 (one element per row): 'ss' of
    the same rank, which keeps the call's dim inner, is preferred."""
    fake = types.SimpleNamespace(_index={}, _callers={}, _by_dtypes={("g", (dt.float32,)): [
        (("c",), "g(f32:c)"), (("sc",), "g(f32:sc)"), (("ss",), "g(f32:ss)")]})
    assert runtime.Bundle.candidates(fake, "g(f32:s)") == ["g(f32:ss)", "g(f32:sc)"]
    assert runtime.Bundle.candidates(fake, "g(f32:c)") == ["g(f32:sc)", "g(f32:ss)"]


@pytest.mark.parametrize("key", ["bias_gelu(f32:cc,f32:bc)", "g(bf16:,b8:)", "x1(i64:s)",
                                 "lstm_cell(f16:sc,f16:cc)", "q(u8:bsc,i8:ccc,f64:sss)"])
def test_key_round_trip(key):
    group, descs = parse_key(key)
    assert format_key(group, descs) == key
    assert symbol_name(key).startswith("fb_" + group)


@pytest.mark.parametrize("bad", ["", "g", "g(f33:c)", "g(f32:x)", "g(f32:cc,f32:c)", "1g(f32:c)"])
def test_malformed_keys_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_key(bad)


@st.composite
def strided_arrays(draw, max_rank=4):
    """Operand arrays as views: random shapes, size-1 dims, steps, reversal, transposes,
    stride-0 broadcasts and missing leading dims."""
    rank = draw(st.integers(0, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    n_ops = draw(st.integers(1, 3))
    arrays = []
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(n_ops):
        drop = draw(st.integers(0, rank))
        sub = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else s
                    for s in shape[drop:])
        steps = [draw(st.sampled_from([1, 1, 2, -1])) for _ in sub]
        base = rng.standard_normal(tuple(s * abs(k) for s, k in zip(sub, steps))).astype(np.float32)
        view = base[tuple(slice(None, None, k) for k in steps)]
        if view.ndim >= 2 and draw(st.booleans()):
            view = np.ascontiguousarray(np.swapaxes(view, 0, 1)).swapaxes(0, 1)
        if draw(st.booleans()):
            view = np.broadcast_to(view, shape[drop:])
        arrays.append(view)
    return shape, arrays


def offsets(shape, strides):
    return [sum(i * s for i, s in zip(idx, strides))
            for idx in itertools.product(*(range(n) for n in shape))]


@settings(max_examples=300, deadline=None)
@given(strided_arrays())
def test_canonical_form_preserves_element_order(case):
    shape, arrays = case
    full = broadcast_shapes([a.shape for a in arrays])
    ops = [(a.shape, tuple(s // a.itemsize for s in a.strides)) for a in arrays]
    canon = canonicalize(full, ops)
    for a, strides in zip(arrays, canon.strides):
        b = np.broadcast_to(a, full)
        want = offsets(full, tuple(s // a.itemsize for s in b.strides))
        assert offsets(canon.sizes, strides) == want
        dense = contiguous_strides(canon.sizes)
    for layout, strides in zip(canon.layouts, canon.strides):
        for letter, s, d in zip(layout, strides, dense):
            assert letter == ("b" if s == 0 else "c" if s == d else "s")


STRIDED_SPEC = """fusebuild: 1
groups:
  - name: fma_like
    inputs: {a: tensor, b: tensor}
    outputs: [y]
    body: 'y = a * b + a'
    matrix:
      dtype: [float32]
      shapes: [{a: [A], b: [A]}, {a: [A, B], b: [A, B]}, {a: [A, B, C], b: [A, B, C]},
               {a: [A, B, C, D], b: [A, B, C, D]}]
      strided: true
"""


@pytest.fixture(scope="module")
def strided_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("strided")
    (d / "s.yaml").write_text(STRIDED_SPEC)
    from fusebuild.runtime.cpu import host_isas
    plan = spec.load_plan([str(d / "s.yaml")], targets=[f"cpu:{host_isas()[-1]}"])
    return runtime.load(build.build(plan, str(d), progress=False).path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strided_arrays(max_rank=4))
def test_kernel_chosen_by_key_matches_numpy_on_original_arrays(strided_bundle, case):
    _, arrays = case
    a = arrays[0]
    b = arrays[1] if len(arrays) > 1 else arrays[0]
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return
    got = strided_bundle.fma_like(a, b)
    want = a * b + a
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)   # mul and add are exact IEEE ops on both sides
