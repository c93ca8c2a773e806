"""The C fast path of group calls (fusebuild/runtime/_dispatch.c): it serves repeated calls,
gives the Python path's exact bytes, and leaves every error, odd argument and large call to
the Python path, which raises what it raises on a first call."""
from __future__ import annotations

import sys
import threading

import ml_dtypes
import numpy as np
import pytest

from conftest import check_call
from fusebuild.errors import ArgumentError
from fusebuild.runtime import GroupCaller


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def python_path_fails(monkeypatch):
    """After warm-up calls, make the Python path raise: whatever still works was served in C."""
    def arm():
        def fail(self, *a):
            raise AssertionError("reached the Python path")
        monkeypatch.setattr(GroupCaller, "_call", fail)
    return arm


def test_repeated_calls_are_served_in_c(examples_bundle, python_path_fails):
    k = examples_bundle
    x, b = f32(4, 8), f32(8, seed=1)
    gates, cx = f32(3, 4 * 16), f32(3, 16, seed=1)
    y = np.empty((4, 8), np.float32)
    want = k.bias_gelu(x, b)
    hy, cy = k.lstm_cell(gates, cx)
    k.bias_gelu(x, b, out=y)
    k.bias_dropout_residual(x, b, x, 0.25, seed=7, offset=3)
    assert k.bias_gelu._fast_plans >= 1 and k.lstm_cell._fast_plans >= 1
    python_path_fails()
    np.testing.assert_array_equal(k.bias_gelu(x, b), want)
    assert k.bias_gelu(x, b, out=y) is y and k.bias_gelu(x, b, out=[y]) is y
    np.testing.assert_array_equal(y, want)
    got = k.lstm_cell(gates, cx)
    assert isinstance(got, tuple) and len(got) == 2
    np.testing.assert_array_equal(got[0], hy)
    np.testing.assert_array_equal(got[1], cy)
    outs = (np.empty_like(hy), np.empty_like(cy))
    assert k.lstm_cell(gates, cx, out=list(outs)) == outs      # a tuple of the same arrays
    k.bias_dropout_residual(x, b, x, 0.25, seed=2**64 - 1, offset=2**63)
    np.testing.assert_array_equal(k.bias_dropout_residual(x, b, x, p=0.25, seed=7, offset=3),
                                  k.bias_dropout_residual(x, b, x, 0.25, seed=7, offset=3))
    with pytest.raises(AssertionError, match="Python path"):   # a new shape: not known yet
        k.bias_gelu(f32(5, 8), b)


def test_results_match_the_reference_in_every_layout(examples_bundle):
    """Broadcast, negative strides, read-only, chunked inputs, cat outputs, 0-size, bf16 and
    inline calls big enough to release the GIL, each called cold and then warm."""
    k = examples_bundle
    ro = f32(6, 8)
    ro.flags.writeable = False
    h = f32(5, 2 * 40)
    rot = f32(3, 2 * 8), f32(3, 8, seed=1), f32(3, 8, seed=2)
    cases = [
        ("bias_gelu", [f32(6, 8)[::-1, ::2], f32(4, seed=1)]),
        ("bias_gelu", [ro, f32(8, seed=1)]),
        ("bias_gelu", [f32(0, 8), f32(8, seed=1)]),
        ("swiglu", [h]),
        ("rotary_embedding", list(rot)),
        ("bias_gelu", [f32(6, 8).astype(ml_dtypes.bfloat16), f32(8, seed=1).astype(ml_dtypes.bfloat16)]),
        ("silu_add", [f32(40_000), f32(40_000, seed=1)]),
        ("scale_shift", [f32(2, 3, 8), f32(2, 1, 8, seed=1), f32(2, 1, 8, seed=2)]),
    ]
    for name, args in cases:
        for _ in range(2):
            check_call(k, name, args)


@pytest.mark.parametrize("value", [0.1, -0.0, 1e39, -1e39, float("nan"), 5e-45, 3, -(2**53),
                                   2**60, True, np.float32(0.3), np.float64(0.7)])
def test_float_scalars_give_the_python_paths_bits(examples_bundle, value):
    k, x = examples_bundle, f32(4, 8)
    slow = k.masked_scores._call((x, x > 0, value), None, None, 0)
    for _ in range(2):
        fast = k.masked_scores(x, x > 0, value)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(fast, slow))


@pytest.mark.parametrize("value", [0, -7, 2**31 - 1, -(2**31), 3.0, np.int32(5), False])
def test_int_scalars_give_the_python_paths_bits(examples_bundle, value):
    k = examples_bundle
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    slow = k.leaky_clip_u8._call((img, value), None, None, 0)
    for _ in range(2):
        fast = k.leaky_clip_u8(img, value)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(fast, slow))


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**64 - 1, 2**64 - 1), (np.uint64(9), 4),
                                         (123, np.int64(77))])
def test_seeds_give_the_python_paths_bits(examples_bundle, seed, offset):
    k, x = examples_bundle, f32(1000)
    slow = k.bias_dropout_residual._call((x, x, x, 0.5), None, seed, offset)
    for _ in range(2):
        fast = k.bias_dropout_residual(x, x, x, 0.5, seed=seed, offset=offset)
        assert fast.tobytes() == slow.tobytes()
    assert k.bias_dropout_residual(x, x, x, 0.5, seed=int(seed) ^ 1, offset=offset).tobytes() \
        != slow.tobytes()


def _bad_calls():
    """(group, good arguments to warm the plan with, what to change, error, message)."""
    x, b = f32(4, 8), f32(8, seed=1)
    ro = np.empty((4, 8), np.float32)
    ro.flags.writeable = False
    buf = np.zeros(40, np.float32)
    img = np.zeros((3, 3), np.uint8)
    gelu, drop, clip = ("bias_gelu", (x, b), {}), ("bias_dropout_residual", (x, x, x, 0.1),
                                                   {"seed": 1}), ("leaky_clip_u8", (img, 1), {})
    return [
        (*gelu, {"out": np.empty((4, 7), np.float32)}, ArgumentError, r"float32\[4, 8\]"),
        (*gelu, {"out": np.empty((4, 8), np.float64)}, ArgumentError, r"float32\[4, 8\]"),
        (*gelu, {"out": np.empty((8, 4), np.float32).T}, ArgumentError, "C-contiguous"),
        (*gelu, {"out": ro}, ArgumentError, "writeable"),
        (*gelu, {"out": [x, x]}, ArgumentError, "has 1 output "),
        (*gelu, {"out": 1.0}, ArgumentError, "must be a numpy array"),
        (*gelu, {"args": (x, b, b)}, ArgumentError, r"takes 2 arguments \(3 given\)"),
        (*gelu, {"beta": b}, TypeError, "unexpected keyword argument 'beta'"),
        (*gelu, {"bias": b}, TypeError, "multiple values for argument 'bias'"),
        (*gelu, {"args": (x,), "bias": b, "x": x}, TypeError, "multiple values for argument 'x'"),
        (*drop, {"args": (x, x, x), "q": 0.1}, TypeError, "unexpected keyword argument 'q'"),
        (*drop, {"args": (x, x, x)}, TypeError, r"takes 4 arguments \(3 given\)"),
        (*drop, {"args": (x, x), "p": 0.1}, TypeError, r"missing argument 'residual'"),
        ("silu_add", (buf[:32], buf[:32]), {}, {"out": buf[8:40]}, ArgumentError,
         "overlaps input 'x'"),
        ("lstm_cell", (f32(3, 64), f32(3, 16)), {}, {"out": (np.empty((3, 16), np.float32),) * 2},
         ArgumentError, "overlap each other"),
        (*clip, {"args": (img, 2**40)}, ArgumentError, r"\(int32\) cannot hold"),
        (*clip, {"args": (img, "3")}, ArgumentError, "needs a Python number"),
        (*clip, {"args": (img, 2.5)}, ArgumentError, "is int32"),
        (*drop, {"seed": None}, ArgumentError, "pass seed="),
        (*drop, {"seed": -1}, ArgumentError, "seed must be"),
        (*drop, {"seed": 2**64}, ArgumentError, "seed must be"),
        (*drop, {"seed": 1.0}, ArgumentError, "seed must be"),
        (*drop, {"offset": -1}, ArgumentError, "offset must be"),
        (*gelu, {"seed": 1}, ArgumentError, "draws no random numbers"),
        (*gelu, {"offset": 5}, ArgumentError, "draws no random numbers"),
        (*clip, {"args": (img, np.complex64(1 + 2j))}, ArgumentError, "complex number"),
        (*drop, {"args": (x, x, x, np.complex128(0.1 + 1j))}, ArgumentError, "complex number"),
        (*drop, {"args": (x, x, x, 0.1 + 0j)}, ArgumentError, "complex number"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors_after_warm_up_are_those_of_a_first_call(examples_bundle, case):
    name, args, kw, change, error, pattern = _bad_calls()[case]
    caller = examples_bundle[name]
    caller(*args, **kw)
    caller(*args, **kw)
    bad = {**kw, **change}
    with pytest.raises(error, match=pattern):
        caller(*bad.pop("args", args), **bad)


def test_byte_swapped_and_subclassed_arrays_go_to_the_python_path(examples_bundle):
    k, x, b = examples_bundle, f32(4, 8), f32(8, seed=1)
    want = k.bias_gelu(x, b)
    with pytest.raises(ArgumentError, match=r"unsupported dtype >f4 \(byte-swapped; convert with"):
        k.bias_gelu(x.astype(">f4"), b)

    class Sub(np.ndarray):
        pass
    np.testing.assert_array_equal(k.bias_gelu(x.view(Sub), b), want)


def test_plan_table_is_bounded_and_stays_correct(examples_bundle):
    caller = examples_bundle.softplus_act
    base = f32(4200)
    for n in range(1, 4200, 1):
        caller(base[:n])
    assert caller._fast_plans <= 4096 and len(caller._plans) <= 4096
    for n in (1, 17, 4100, 4199):
        check_call(examples_bundle, "softplus_act", [base[:n]])


def test_no_reference_leaks(examples_bundle):
    k, x, b = examples_bundle, f32(64), f32(64, seed=1)
    y = np.empty(64, np.float32)
    outs = (np.empty((3, 16), np.float32), np.empty((3, 16), np.float32))
    g, cx = f32(3, 64), f32(3, 16)
    for _ in range(3):       # warm up
        k.silu_add(x, b, out=y), k.lstm_cell(g, cx, out=outs), k.silu_add(x, b)
    before = [sys.getrefcount(a) for a in (x, b, y, *outs, g, cx)]
    for _ in range(1000):
        k.silu_add(x, b, out=y)
        k.lstm_cell(g, cx, out=outs)
        k.silu_add(x, b)
        k.lstm_cell(g, cx)
    assert [sys.getrefcount(a) for a in (x, b, y, *outs, g, cx)] == before


def test_calls_that_release_the_gil_while_plans_are_dropped(examples_bundle):
    """Four threads make calls that run without the GIL while a fifth keeps dropping the plans
    they use (a plan in use is freed by its last call)."""
    k = examples_bundle
    xs = [f32(50_000, seed=s) for s in range(4)]
    want = [k.silu_add(x, x) for x in xs]
    errors, done = [], threading.Event()

    def work(i):
        try:
            for _ in range(50):
                np.testing.assert_array_equal(k.silu_add(xs[i], xs[i]), want[i])
        except AssertionError as e:
            errors.append(e)

    def drop():
        while not done.is_set():
            k.silu_add._forget()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    dropper = threading.Thread(target=drop)
    dropper.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    dropper.join()
    assert not errors


def test_groups_bigger_than_the_fast_path_use_the_python_path(tmp_path):
    """More tensor inputs (18 > 16) or outputs (9 > 8) than _dispatch.c holds: still correct."""
    from fusebuild import build, runtime, spec
    from fusebuild.runtime.cpu import host_isas
    names = [f"a{i}" for i in range(18)]
    (tmp_path / "big.yaml").write_text(f"""fusebuild: 1
bundle: {{name: big, version: 0.1.0}}
targets: [cpu]
groups:
  - name: sum18
    inputs: {{{', '.join(f'{n}: tensor' for n in names)}}}
    outputs: [y]
    body: |
      y = {' + '.join(names)}
    matrix: {{dtype: [float32], shapes: [{{{', '.join(f'{n}: [N]' for n in names)}}}]}}
  - name: outs9
    inputs: {{x: tensor}}
    outputs: [{', '.join(f'y{i}' for i in range(9))}]
    body: |
{''.join(f'      y{i} = x + {i}{chr(10)}' for i in range(9))}    matrix: {{dtype: [float32], shapes: [{{x: [N]}}]}}
""")
    plan = spec.load_plan([str(tmp_path / "big.yaml")], targets=[f"cpu:{host_isas()[-1]}"])
    k = runtime.load(build.build(plan, str(tmp_path / "out"), progress=False).path)
    xs = [f32(100, seed=i) for i in range(18)]
    for _ in range(2):
        check_call(k, "sum18", xs)
        check_call(k, "outs9", xs[:1])
    assert k.sum18._fast_plans == 0 and k.outs9._fast_plans == 0


def test_torch_cpu_tensors_are_served_in_c(examples_bundle, python_path_fails):
    torch = pytest.importorskip("torch")
    k = examples_bundle
    x, b = torch.randn(4, 8), torch.randn(8)
    xw = torch.randn(8, 4).t()                                   # a transposed view
    xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
    gates, cx = torch.randn(3, 64), torch.randn(3, 16)
    y = torch.empty(4, 8)
    xg = x.clone().requires_grad_()

    def no_grad():          # tensors that require grad: only with grad mode off (torch ops)
        with torch.no_grad():
            return k.bias_gelu(xg, b)
    calls = [lambda: k.bias_gelu(x, b), lambda: k.bias_gelu(xw, b), lambda: k.bias_gelu(xb, bb),
             lambda: k.lstm_cell(gates, cx), lambda: k.bias_gelu(x, b, out=y),
             lambda: k.bias_dropout_residual(x, b, x, 0.5, seed=3), no_grad]
    first = [c() for c in calls]
    python_path_fails()
    for call, want in zip(calls, first):
        got = call()
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            assert type(g) is torch.Tensor and g.dtype == w.dtype and not g.requires_grad
            assert torch.equal(g, w)
    assert k.bias_gelu(x, b, out=y) is y
    np.testing.assert_array_equal(first[0].numpy(), k.bias_gelu(x.numpy(), b.numpy()))
    before = [sys.getrefcount(t) for t in (x, b, y, gates, cx)]
    for _ in range(1000):
        k.bias_gelu(x, b, out=y), k.bias_gelu(x, b), k.lstm_cell(gates, cx)
    assert [sys.getrefcount(t) for t in (x, b, y, gates, cx)] == before


def test_torch_errors_and_odd_tensors_after_warm_up(examples_bundle):
    torch = pytest.importorskip("torch")
    k = examples_bundle
    buf = torch.randn(40)
    x, b = buf[:32].view(4, 8), torch.randn(8)
    k.bias_gelu(x, b)
    k.bias_gelu(x, b, out=torch.empty(4, 8))
    with pytest.raises(ArgumentError, match=r"must be float32\[4, 8\]"):
        k.bias_gelu(x, b, out=torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(ArgumentError, match="overlaps input 'x'"):
        k.bias_gelu(x, b, out=buf[1:33].view(4, 8))           # x shifted by one element
    z = torch.randn(4, 8, dtype=torch.complex64)
    with pytest.raises(ArgumentError, match="negative-bit view"):
        k.bias_gelu(z.conj().imag, b)
    with pytest.raises(ArgumentError, match="'x' of bias_gelu requires grad.*torch_library"):
        k.bias_gelu(x.clone().requires_grad_(), b)           # the plan of x is known
    np.testing.assert_array_equal(k.bias_gelu(x, b.numpy()).numpy(), k.bias_gelu(x, b).numpy())
