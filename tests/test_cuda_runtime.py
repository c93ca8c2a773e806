"""The host side of the CUDA runtime, without a GPU: target choice per device and driver, launch
flags, DLPack descriptors, routing of CUDA arrays and its errors. (Kernel numerics are covered by
test_cuda_emulation.py, the device itself by test_cuda_gpu.py.)"""
from __future__ import annotations

import ctypes
import dataclasses
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fusebuild import build, dtypes as dt, reference, runtime, spec
from fusebuild.argspec import Canonical
from fusebuild.codegen.cuda import render_module
from fusebuild.errors import ArgumentError, KernelNotFound
from fusebuild.runtime import cuda, dispatch
from fusebuild.runtime.cuda import (HELD, ROW_BLOCK, VECTOR, WARP_ROW_MAX, WIDE, launch_flags,
                                    max_ptx_isa, select_target)
from conftest import SPECS, adam_case
from cuda_emulation.cases import Case, check_outputs, example_cases
from cuda_emulation.fake_cupy import FakeArray, fake_cupy as emulated_cupy
from cuda_emulation.harness import (EmulatedGroup, compile_source, device_limits, have_compiler,
                                    kernel_sources, launchers)


def entries(*targets: str, isa: str = "9.5") -> dict[str, dict]:
    return {t: {"ptx_isa": isa} if "compute" in t else {} for t in targets}


@pytest.mark.parametrize("targets, cc, want", [
    (("cuda:sm_80", "cuda:sm_90"), (9, 0), "cuda:sm_90"),           # exact
    (("cuda:sm_90a", "cuda:sm_80"), (9, 0), "cuda:sm_90a"),         # exact arch-specific
    (("cuda:sm_90", "cuda:sm_90a"), (9, 0), "cuda:sm_90"),          # plain preferred
    (("cuda:sm_80", "cuda:sm_86"), (8, 9), "cuda:sm_86"),           # same major, newest below
    (("cuda:sm_86a", "cuda:sm_80"), (8, 9), "cuda:sm_80"),          # never another minor's 'a'
    (("cuda:sm_89",), (8, 6), None),                                # never a newer minor
    (("cuda:sm_80",), (9, 0), None),                                # never another major
    (("cuda:sm_80", "cuda:compute_80"), (9, 0), "cuda:compute_80"),  # PTX JIT
    (("cuda:compute_80", "cuda:compute_90"), (9, 0), "cuda:compute_90"),
    (("cuda:compute_100",), (9, 0), None),                          # PTX for a newer arch
    (("cpu:x86-64-v2",), (9, 0), None),
])
def test_target_choice(targets, cc, want):
    assert select_target(entries(*targets), cc, (9, 5))[0] == want


def test_ptx_newer_than_the_driver_is_refused_with_the_reason():
    target, why = select_target(entries("cuda:compute_90", isa="9.5"), (9, 0), (9, 0))
    assert target is None
    assert "cuda:compute_90 holds PTX ISA 9.5, newer than the driver's 9.0" in why
    assert select_target(entries("cuda:compute_80", isa="9.0"), (9, 0), (9, 0))[0] == \
        "cuda:compute_80"


@pytest.mark.parametrize("driver, isa", [(11080, (7, 8)), (12000, (8, 0)), (12040, (8, 4)),
                                         (12060, (8, 5)), (12080, (8, 7)), (12090, (8, 8)),
                                         (13000, (9, 0)), (13010, (9, 1))])
def test_driver_version_to_ptx_isa(driver, isa):
    assert max_ptx_isa(driver) == isa


def canon(sizes, *strides) -> Canonical:
    return Canonical(tuple(sizes), tuple(tuple(s) for s in strides), ())


def test_launch_flags_vector_path_conditions():
    c = canon((4, 16), (16, 1), (0, 1), (16, 1))            # x 'cc', bias 'bc', output
    layouts, ptrs, sizes = ("cc", "bc"), [[4096], [8192], [12288]], [4, 4, 4]
    assert launch_flags(c, layouts, 4, ptrs, sizes) == VECTOR
    assert launch_flags(c, layouts, 1, ptrs, sizes) == 0                     # no vector path
    assert launch_flags(canon((4, 18), (18, 1), (0, 1), (18, 1)), layouts, 4, ptrs, sizes) == 0
    assert launch_flags(c, layouts, 4, [[4100], [8192], [12288]], sizes) == 0  # misaligned input
    assert launch_flags(c, layouts, 4, [[4096], [8196], [12288]], sizes) == 0  # 'bc' is vectorized
    inner_b = canon((4, 16), (16, 1), (1, 0), (16, 1))       # s[4, 1] broadcast along the rows
    assert launch_flags(inner_b, ("cc", "sb"), 4, [[4096], [8196], [12288]], sizes) == VECTOR
    assert launch_flags(c, layouts, 4, [[4096], [8192], [12292]], sizes) == 0  # misaligned output
    odd_rows = canon((4, 16), (17, 1), (0, 1), (16, 1))      # x[:, :16] of a [4, 17] array
    assert launch_flags(odd_rows, ("sc", "bc"), 4, ptrs, sizes) == 0
    cat_part = canon((4, 16), (16, 1), (0, 1), (32, 2))      # output part with inner stride 2
    assert launch_flags(cat_part, layouts, 4, ptrs, sizes) == 0
    chunks = [[4096, 4096 + 64], [8192], [12288, 12288 + 64]]
    assert launch_flags(c, layouts, 4, chunks, sizes) == VECTOR
    assert launch_flags(c, layouts, 4, [[4096, 4096 + 68], [8192], [12288]], sizes) == 0


def test_launch_flags_index_width():
    assert launch_flags(canon(((1 << 31) - 1,), (1,), (1,)), ("c",), 1, [[0], [0]], [1, 1]) == 0
    assert launch_flags(canon((1 << 31,), (1,), (1,)), ("c",), 1, [[0], [0]], [1, 1]) == WIDE
    big_stride = canon((2, 8), (1 << 31, 1), (8, 1))         # small call, huge offset span
    assert launch_flags(big_stride, ("sc",), 1, [[0], [0]], [1, 1]) == WIDE
    negative = canon((3, 8), (-(1 << 30), 1), (8, 1))
    assert launch_flags(negative, ("sc",), 1, [[0], [0]], [1, 1]) == WIDE


def test_reduction_launch_flags_modes_and_grid():
    """A warp per row up to WARP_ROW_MAX elements, a block beyond; row outputs (inner stride 0)
    never block the vector path; 64-bit indexing from the work count rows * max(N, 1)."""
    def call(n, rows=6):      # x 'cc', w 'bc', full output y, row output s
        return canon((rows, n), (n, 1), (0, 1), (n, 1), (1, 0))

    layouts, ptrs, sizes, row = ("cc", "bc"), [[4096], [8192], [12288], [16388]], [4] * 4, \
        (False, True)
    assert WARP_ROW_MAX == 512
    assert launch_flags(call(512), layouts, 4, ptrs, sizes, row) == VECTOR
    assert launch_flags(call(516), layouts, 4, ptrs, sizes, row) == VECTOR | ROW_BLOCK
    assert launch_flags(call(513), layouts, 4, ptrs, sizes, row) == ROW_BLOCK
    assert launch_flags(call(512), layouts, 4, [[4096], [8192], [12290], [16388]], sizes,
                        row) == 0                                    # misaligned full output
    assert launch_flags(call(0, 1 << 31), layouts, 1, ptrs, sizes, row) & WIDE
    assert not launch_flags(call(0, (1 << 31) - 1), layouts, 1, ptrs, sizes, row) & WIDE
    assert cuda.grid_size(6 * 512, 4, VECTOR, 512) == 2               # four rows a block
    assert cuda.grid_size(6 * 516, 4, VECTOR | ROW_BLOCK, 516) == 6
    assert cuda.grid_size(9, 4, 0, 1) == 3                          # 9 rows of N = 0


def test_threads_per_row_give_each_thread_at_most_16_elements():
    """A block per row of the fewest threads (a power of two, 64 to 1024) that give a thread at
    most 16 elements; a warp per row (in 128-thread blocks) up to N = 512."""
    assert [cuda.row_threads(n) for n in (513, 1024, 1025, 2048, 2049, 4096, 8192, 8193, 16384,
                                          16385, 1 << 20)] == \
        [64, 64, 128, 128, 256, 256, 512, 1024, 1024, 1024, 1024]
    assert cuda.block_threads(512, 0) == cuda.BLOCK == 128
    assert cuda.block_threads(16384, ROW_BLOCK) == 1024


# Held bytes per element of the example reductions' float32 kernels: one input (softmax,
# log_softmax, layer_norm, rms_norm, quant_per_token), two (softmax__grad, masked_softmax,
# add_rms_norm, layer_norm__grad, rms_norm__grad), three (add_rms_norm__grad); their 16-bit
# kernels hold half as many bytes per element, at twice the N
HELD_SIZES = ((4,), (4, 4), (4, 4, 4))


@pytest.mark.parametrize("sm,held_at_16384", [
    (80, ((4,), (4, 4))), (86, ((4,),)), (89, ((4,),)), (90, HELD_SIZES), (100, HELD_SIZES),
    (120, ((4,),))])
def test_held_rows_per_architecture(sm, held_at_16384):
    """`holds` on the documented limits of each SM: at N = 16384 float32 (and 32768 16-bit)
    the rows that fit the opt-in shared memory of a block (sm_80 163 KiB, sm_86/89/120 99 KiB,
    sm_90/100 227 KiB: one to three held inputs of 64 KiB); at every N up to 16384 every launch
    it holds keeps >= 25% of the SM's threads resident, and two or fewer float32 inputs are
    held at every N <= 8192 on every SM."""
    limits = device_limits(sm, static=512)
    flags = lambda n: ROW_BLOCK if n > WARP_ROW_MAX else 0      # noqa: E731
    assert tuple(h for h in HELD_SIZES if cuda.holds(16384, h, ROW_BLOCK, limits)) == \
        held_at_16384
    assert tuple(h for h in HELD_SIZES if cuda.holds(32768, tuple(s // 2 for s in h),
                                                     ROW_BLOCK, limits)) == held_at_16384
    for n in range(1, 16385, 37):
        for h in HELD_SIZES:
            if cuda.holds(n, h, flags(n), limits):
                threads = cuda.block_threads(n, flags(n))
                used = cuda.shared_bytes(n, h, flags(n) | HELD) + limits.static
                blocks = min(limits.blocks, limits.sm // (-(-(used + 1024) // 128) * 128))
                assert blocks * threads >= limits.threads / 4, (n, h)
            else:
                assert len(h) == 3 or n > 8192, (sm, n, h)
    assert not cuda.holds(0, (4,), 0, limits) and not cuda.holds(37, (), 0, limits)


def test_held_launches_fit_the_block_and_keep_a_quarter_of_the_sm():
    """HELD when the block's shared memory (dynamic and static) fits the opt-in limit and the
    SM keeps >= 25% of its threads resident; per held input a 16-byte aligned slot per row of
    the block."""
    def call(n):             # x 'cc', w 'bc', full output y
        return canon((6, n), (n, 1), (0, 1), (n, 1))

    args = (("cc", "bc"), 1, [[0], [0], [0]], [4] * 3, (False,))
    sm90 = cuda.SharedLimits(optin=227 << 10, sm=228 << 10, threads=2048, blocks=32)
    assert launch_flags(call(16384), *args, (4, 4, 4), sm90) == ROW_BLOCK | HELD
    assert launch_flags(call(16384), *args, (4,), sm90) == ROW_BLOCK | HELD
    assert launch_flags(call(58112), *args, (4,), sm90) == ROW_BLOCK | HELD      # 227 KiB
    assert launch_flags(call(58113), *args, (4,), sm90) == ROW_BLOCK            # over the block
    static = dataclasses.replace(sm90, static=16)
    assert launch_flags(call(58112), *args, (4,), static) == ROW_BLOCK
    # one block of 512 threads an SM is a quarter of sm_90's 2048: held; of 256 threads, not
    assert launch_flags(call(8192), *args, (4, 4, 4, 4, 4), sm90) == ROW_BLOCK | HELD
    assert launch_flags(call(4096), *args, (4,) * 10, sm90) == ROW_BLOCK
    # four blocks of a warp per row (4 rows) an SM: 16 of 64 warps
    assert launch_flags(call(512), *args, (4,) * 6, sm90) == HELD                # 4 x 49 KiB
    assert launch_flags(call(512), *args, (4,) * 8, sm90) == 0                   # 3 x 65 KiB
    assert launch_flags(call(37), *args, (), sm90) == 0                  # nothing held
    assert launch_flags(call(0), *args, (4,), sm90) == 0                 # nothing to hold
    assert launch_flags(call(16384), *args, (4,)) == ROW_BLOCK           # no limits: never
    assert launch_flags(call(37), ("cc", "bc"), 1, [[0], [0], [0]], [4] * 3, None, (4,),
                        sm90) == 0                                       # not a reduction
    assert cuda.shared_bytes(37, (4, 2), HELD) == 4 * (160 + 80)         # 4 rows a block
    assert cuda.shared_bytes(1025, (4, 2), HELD | ROW_BLOCK) == 4112 + 2064
    assert cuda.shared_bytes(1025, (4, 2), ROW_BLOCK) == 0


def test_empty_rows_run_in_the_outer_dims_of_any_kernel():
    got = dispatch.hollow(Canonical((6, 0), ((0, 0),), ("bb",)), ("ccc",), (True, False))
    assert got.sizes == (1, 6, 0) and got.layouts == ("ccc",)
    assert got.strides == ((0, 0, 0), (0, 1, 0), (0, 0, 0))
    one = dispatch.hollow(Canonical((0,), ((0,),), ("b",)), ("c",), (True, False))
    assert one.sizes == (0,) and one.strides == ((0,), (0,), (0,))


def test_dlpack_descriptor_of_numpy_arrays():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    view = base[1:5:2, 2:9:3]
    a = cuda.from_dlpack_capsule(view.__dlpack__(), "x")
    assert (a.ptr, a.shape, a.strides, a.dtype) == (view.ctypes.data, view.shape, view.strides,
                                                    view.dtype)
    assert a.device == 0 and not a.c_contiguous
    for x in (np.zeros(3, bool), np.zeros((2, 3), np.int8), np.zeros((), np.float64)):
        d = cuda.from_dlpack_capsule(x.__dlpack__(), "x")
        assert (d.shape, d.strides, d.dtype) == (x.shape, x.strides, x.dtype) and d.c_contiguous
    with pytest.raises(ArgumentError, match="input 'u' has DLPack dtype .code 1, 16 bits"):
        cuda.from_dlpack_capsule(np.zeros(2, np.uint16).__dlpack__(), "u")


class FakeCuda:
    """Just enough of a CUDA array for routing: DLPack device (kDLCUDA, ordinal)."""

    def __init__(self, device: int = 0):
        self.device = device

    def __dlpack_device__(self):
        return 2, self.device


class Interface:
    def __init__(self, raises: bool = False):
        self.raises = raises

    @property
    def __cuda_array_interface__(self):
        if self.raises:
            raise AttributeError("not on the GPU")
        return {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_cuda_arrays_are_recognized():
    assert cuda.is_cuda_array(FakeCuda()) and cuda.is_cuda_array(Interface())
    assert not cuda.is_cuda_array(Interface(raises=True))
    assert not cuda.is_cuda_array(np.zeros(2))
    assert not cuda.is_cuda_array([1.0, 2.0])


@pytest.fixture(scope="module")
def cuda_only(tmp_path_factory):
    plan = spec.load_plan([SPECS])
    gp = next(g for g in plan.groups if g.group.name == "silu_add")
    gp = dataclasses.replace(gp, targets=("cuda:sm_80", "cuda:compute_90"))
    plan = dataclasses.replace(plan, groups=(gp,))
    return runtime.load(build.build(plan, str(tmp_path_factory.mktemp("cuda_only")),
                                    progress=False).path)


def test_mixed_and_multi_device_calls_are_refused(cuda_only):
    with pytest.raises(ArgumentError, match="inputs x are CUDA arrays but b is not"):
        cuda_only.silu_add(FakeCuda(), np.zeros(4, np.float32))
    with pytest.raises(ArgumentError, match=r"different CUDA devices \(x on cuda:0, b on cuda:1\)"):
        cuda_only.silu_add(FakeCuda(0), FakeCuda(1))
    with pytest.raises(ArgumentError, match="inputs x are CUDA arrays but b is not"):
        cuda_only.silu_add.key(FakeCuda(), np.zeros(4, np.float32))


def test_cpu_arrays_on_a_cuda_only_bundle_are_refused(cuda_only):
    with pytest.raises(KernelNotFound, match="has only CUDA kernels .cuda:compute_90, cuda:sm_80. "
                                             "and was called with CPU arrays"):
        cuda_only.silu_add(np.zeros(4, np.float32), np.zeros(4, np.float32))


def fake_cupy(capability: str, driver: int):
    """The device queries `CudaKernels.find` makes, answered for an imaginary GPU."""
    device = lambda i: types.SimpleNamespace(compute_capability=capability)  # noqa: E731
    rt = types.SimpleNamespace(driverGetVersion=lambda: driver,
                               getDeviceProperties=lambda i: {"name": b"Imaginary GPU"})
    return types.SimpleNamespace(cuda=types.SimpleNamespace(Device=device, runtime=rt))


@pytest.mark.parametrize("capability, driver, target", [
    ("86", 13000, "cuda:sm_80"), ("90", 13050, "cuda:compute_90"),
    ("100", 13050, "cuda:compute_90"), ("100", 13000, None), ("90", 13000, None),
    ("75", 13050, None)])
def test_kernel_choice_per_device_and_driver(monkeypatch, cuda_only, capability, driver, target):
    monkeypatch.setattr(cuda, "_cupy", lambda: fake_cupy(capability, driver))
    kernels = cuda.CudaKernels(cuda_only)
    key = "silu_add(f32:c,f32:c)"
    if target:
        assert kernels.find(key, 0, empty=True).entry["target"] == target
        return
    with pytest.raises(KernelNotFound) as e:
        kernels.find(key, 0, empty=True)
    text = str(e.value)
    assert f"device 0 (Imaginary GPU, sm_{capability}: needs cuda:sm_{capability}" in text
    assert "bundle CUDA targets: cuda:compute_90, cuda:sm_80" in text
    if capability != "75":
        assert "cuda:compute_90 holds PTX ISA" in text and "newer than the driver's 9.0" in text


def test_argument_count_is_checked_on_the_cuda_path(cuda_only):
    with pytest.raises(ArgumentError, match=r"takes 2 arguments \(3 given\)"):
        cuda_only.silu_add.key(FakeCuda(), FakeCuda(), FakeCuda())
    with pytest.raises(ArgumentError, match=r"takes 2 arguments \(1 given\)"):
        cuda_only.silu_add(FakeCuda())


# ---------------------------------------------------------------- remembered launch plans ------
# Calls on (fake) cupy arrays like an earlier call run by that call's plan; the fake cupy runs the
# generated CUDA source on the host, so results are checked against the reference.

PLANNED = ("silu_add", "lstm_cell", "gru_cell", "rotary_embedding", "bias_dropout_residual",
           "masked_scores", "leaky_clip_u8", "adam")


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """Some example groups built for sm_90, a fake cupy over their emulation, their plans."""
    if not have_compiler():
        pytest.skip("needs g++ for the host emulation")
    plan = spec.load_plan([SPECS], targets=["cuda:sm_90"])
    plan = dataclasses.replace(plan, groups=tuple(g for g in plan.groups
                                                  if g.group.name in PLANNED))
    out = tmp_path_factory.mktemp("planned")

    def emulate(gp) -> EmulatedGroup:
        ks = kernel_sources(gp.group, gp.variants)
        text = '#include "emu.h"\n' + render_module(ks) + launchers([k.symbol for k in ks])
        return EmulatedGroup(gp.group, ks, compile_source(text, str(out), gp.group.name))

    with ThreadPoolExecutor(len(plan.groups)) as pool:
        emulated = list(pool.map(emulate, plan.groups))
    bundle = runtime.load(build.build(plan, str(out / "bundle"), progress=False).path)
    libs = {k.symbol: em.lib for em in emulated for k in em.kernels.values()}
    return bundle, emulated_cupy(libs), {gp.group.name: gp for gp in plan.groups}


@pytest.fixture
def fake(device, monkeypatch):
    bundle, cp, plans = device
    monkeypatch.setattr(cuda, "_cupy", lambda: cp)
    return bundle, cp, plans


def refuse(*args):
    raise AssertionError("the generic path ran")


def spy(cp, monkeypatch) -> list[tuple[np.ndarray, int, int]]:
    """Record each launch: parameter words, grid, current device."""
    seen, launch = [], cp.cuda.driver.launchKernel

    def record(f, grid, *rest):
        tags = (ctypes.c_void_p * 5).from_address(rest[-1])
        size = ctypes.c_size_t.from_address(tags[3]).value
        words = np.frombuffer((ctypes.c_char * size).from_address(tags[1]), np.int64).copy()
        seen.append((words, grid, cp.cuda.runtime.getDevice()))
        launch(f, grid, *rest)

    monkeypatch.setattr(cp.cuda.driver, "launchKernel", record)
    return seen


def vector_cases(gp, seed: int) -> dict[str, Case]:
    """Cases of the group's first dtypes on vector-path shapes (and misaligned), by label."""
    found = example_cases(gp, np.random.default_rng(seed), has_strided=False)
    return {c.label: c for c in found if c.dtypes == found[0].dtypes and " vector" in c.label}


def run(bundle, gp, case: Case, out=None) -> tuple[list, tuple]:
    args = [FakeArray(a) if isinstance(a, np.ndarray) else a for a in case.args]
    kw = {"seed": case.seed, "offset": case.offset} if gp.group.has_random else {}
    got = bundle[gp.group.name](*args, out=out, **kw)
    return args, got if isinstance(got, tuple) else (got,)


@pytest.mark.parametrize("name", [n for n in PLANNED if n not in ("silu_add", "adam")])
def test_repeated_calls_run_by_their_plan_match_the_reference(fake, monkeypatch, name):
    """Chunked inputs, cat outputs, several outputs, seeds and scalars: after one call, calls of
    the same layouts with other data, seeds, scalars and alignment never reach the generic path;
    with out= their parameter words are the generic path's."""
    bundle, cp, plans = fake
    gp = plans[name]
    cases, others = vector_cases(gp, 1), vector_cases(gp, 2)
    warm = [c for label, c in cases.items() if not label.endswith("misaligned")]
    generic = []                # (arguments, outputs, the generic path's words with out=)
    for case in warm:
        args, got = run(bundle, gp, case)
        check_outputs(gp, case, got)
        with monkeypatch.context() as mp:
            seen = spy(cp, mp)
            cuda.call(bundle[name], tuple(args), got, case.seed, case.offset)
        generic.append((args, got, seen[-1][0]))
    assert bundle._cuda.memos[name].plans
    monkeypatch.setattr(dispatch, "prepare", refuse)
    seen = spy(cp, monkeypatch)
    for case, (args, got, words) in zip(warm, generic):
        kw = {"seed": case.seed, "offset": case.offset} if gp.group.has_random else {}
        result = bundle[name](*args, out=got if len(got) > 1 else got[0], **kw)
        assert all(r is g for r, g in zip(result if len(got) > 1 else (result,), got))
        np.testing.assert_array_equal(seen[-1][0], words)
        check_outputs(gp, case, got)
    for case in [*others.values(), *cases.values()]:
        check_outputs(gp, case, run(bundle, gp, case)[1])
    flags = [int(words[-1]) for words, _, _ in seen]
    assert any(f & VECTOR for f in flags) and not all(f & VECTOR for f in flags)


def aligned(a: np.ndarray, shift: int = 0) -> np.ndarray:
    """A copy of `a` starting `shift` elements past a 16-byte boundary."""
    flat = np.zeros(a.size + 16, a.dtype)
    start = (-flat.ctypes.data) % 16 // a.itemsize + shift
    view = flat[start:start + a.size].reshape(a.shape)
    view[...] = a
    return view


def test_alignment_decides_the_vector_path_of_each_call(fake, monkeypatch):
    bundle, cp, plans = fake
    rng = np.random.default_rng(3)
    x, b = (rng.standard_normal(1024).astype(np.float32) for _ in range(2))
    case = Case("silu_add", (dt.float32, dt.float32), [x, b])
    y = bundle.silu_add(FakeArray(aligned(x)), FakeArray(aligned(b)))
    check_outputs(plans["silu_add"], case, (y,))
    monkeypatch.setattr(dispatch, "prepare", refuse)
    seen = spy(cp, monkeypatch)
    for xs, bs, ys, vector in ((0, 0, 0, True), (1, 0, 0, False), (0, 3, 0, False),
                               (0, 0, 1, False), (4, 4, 4, True)):
        y = FakeArray(aligned(np.zeros(1024, np.float32), ys))
        got = bundle.silu_add(FakeArray(aligned(x, xs)), FakeArray(aligned(b, bs)), out=y)
        assert got is y
        check_outputs(plans["silu_add"], case, (y,))
        words, grid, _ = seen[-1]
        assert bool(words[-1] & VECTOR) == vector and grid == (2 if vector else 8)


def first_error(call) -> str:
    with pytest.raises(ArgumentError) as e:
        call()
    return str(e.value)


def test_out_and_argument_errors_after_warm_up_are_the_cold_ones(fake, monkeypatch):
    bundle, cp, plans = fake
    (p, g, m, v), scalars, want = adam_case(bundle, 1001)
    dp, dg, dm, dv = (FakeArray(a.copy()) for a in (p, g, m, v))
    buffer = np.zeros(1002, np.float32)
    f32 = lambda n: np.empty(n, np.float32)    # noqa: E731
    bad_outs = [(FakeArray(buffer[1:]), dm, dv), (dp, FakeArray(dp.host), dv), (dp, dm),
                (FakeArray(np.empty(1001)), dm, dv), (FakeArray(f32(1002)), dm, dv),
                (FakeArray(f32(2002)[::2]), dm, dv), (f32(1001), dm, dv),
                (dp, FakeArray(f32(1001), device=1), dv)]
    adam = [lambda out=out: bundle.adam(dp, FakeArray(buffer[:1001]), dm, dv, *scalars, out=out)
            for out in bad_outs]
    x = FakeArray(np.ones(16, np.float32))
    calls = adam + [
        lambda: bundle.bias_dropout_residual(x, x, x, 0.5),
        lambda: bundle.bias_dropout_residual(x, x, x, 0.5, seed=-1),
        lambda: bundle.bias_dropout_residual(x, x, x, 0.5, seed=1, offset=1 << 64),
        lambda: bundle.bias_dropout_residual(x, x, x, "0.5", seed=1),
        lambda: bundle.leaky_clip_u8(FakeArray(np.ones((4, 16), np.uint8)), 1 << 40),
        lambda: bundle.leaky_clip_u8(FakeArray(np.ones((4, 16), np.uint8)), 1.5),
        lambda: bundle.leaky_clip_u8(FakeArray(np.ones((4, 16), np.uint8)), 3, seed=1),
        lambda: bundle.bias_dropout_residual(x, x, x, np.complex64(0.5 + 1j), seed=1)]
    assert "adam" not in (bundle._cuda.memos if bundle._cuda else {})
    cold = [first_error(c) for c in calls]
    bundle.adam(dp, dg, dm, dv, *scalars)
    bundle.bias_dropout_residual(x, x, x, 0.5, seed=1)
    bundle.leaky_clip_u8(FakeArray(np.ones((4, 16), np.uint8)), 3)
    assert [first_error(c) for c in calls] == cold
    dp, dg, dm, dv = (FakeArray(a.copy()) for a in (p, g, m, v))
    with monkeypatch.context() as mp:           # in place, by the plan
        mp.setattr(dispatch, "prepare", refuse)
        result = bundle.adam(dp, dg, dm, dv, *scalars, out=(dp, dm, dv))
    assert result[0] is dp and result[1] is dm and result[2] is dv
    for got, name in zip((dp, dm, dv), ("param_out", "exp_avg_out", "exp_avg_sq_out")):
        assert reference.compare(got.get(), want.outputs[name], want.magnitude[name]) is None


def test_other_layouts_dtypes_and_devices_are_not_run_by_an_old_plan(fake, monkeypatch):
    bundle, cp, plans = fake
    if bundle._cuda:
        bundle._cuda.memos.pop("silu_add", None)
    generic, prepare = [], dispatch.prepare
    monkeypatch.setattr(dispatch, "prepare", lambda *a: generic.append(a) or prepare(*a))
    monkeypatch.setattr(cuda, "_MAX_PLANS", 5)
    seen = spy(cp, monkeypatch)
    rng = np.random.default_rng(4)
    x, b = (rng.standard_normal(n).astype(np.float32) for n in (2000, 1000))
    calls = [(x[:1000], b, 0), (x[:1000], b, 0), (x[:999], b[:999], 0), (x[::2], b, 0),
             (x[:1000].astype(np.float16), b.astype(np.float16), 0), (x[:1000], b, 1),
             (x[:1000], b, 1), (x[:1000], b, 0), (x[:998], b[:998], 0)]
    for i, (xs, bs, device) in enumerate(calls):
        cold = len(generic)
        y = bundle.silu_add(FakeArray(xs, device), FakeArray(bs, device))
        d = dt.from_numpy(xs.dtype)
        check_outputs(plans["silu_add"], Case(f"call {i}", (d, d), [xs, bs]), (y,))
        assert (len(generic) > cold) == (i not in (1, 6, 7)), f"call {i}"
        assert seen[-1][2] == device == y.device.id and cp.cuda.runtime.getDevice() == 0
        assert len(bundle._cuda.memos["silu_add"].plans) <= 5
    assert len(bundle._cuda.memos["silu_add"].plans) == 1       # cleared at the bound


def test_threads_calling_one_group_get_their_own_results(fake, monkeypatch):
    bundle, cp, plans = fake
    rng = np.random.default_rng(5)
    gp = plans["bias_dropout_residual"]
    inputs = [[FakeArray(rng.standard_normal(4096).astype(np.float32)) for _ in range(3)]
              for _ in range(6)]
    seeds = [int(s) for s in rng.integers(1 << 62, size=len(inputs))]
    want = [bundle.bias_dropout_residual(*a, 0.25 + k / 16, seed=s, offset=k).get()
            for k, (a, s) in enumerate(zip(inputs, seeds))]
    check_outputs(gp, Case("k=0", (dt.float32,) * 3, [a.host for a in inputs[0]] + [0.25],
                           seeds[0], 0), (FakeArray(want[0]),))
    monkeypatch.setattr(dispatch, "prepare", refuse)
    launch = cp.cuda.driver.launchKernel        # other threads run between filling and launching
    monkeypatch.setattr(cp.cuda.driver, "launchKernel", lambda *a: time.sleep(0) or launch(*a))

    def work(t: int) -> None:
        for i in range(50):
            k = (t + i) % len(inputs)
            got = bundle.bias_dropout_residual(*inputs[k], 0.25 + k / 16, seed=seeds[k], offset=k)
            np.testing.assert_array_equal(got.get(), want[k])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
