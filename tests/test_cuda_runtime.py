"""The host side of the CUDA runtime, without a GPU: target choice per device and driver, launch
flags, DLPack descriptors, routing of CUDA arrays and its errors. (Kernel numerics are covered by
test_cuda_emulation.py, the device itself by test_cuda_gpu.py.)"""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from fusebuild import build, runtime, spec
from fusebuild.argspec import Canonical
from fusebuild.errors import ArgumentError, KernelNotFound
from fusebuild.runtime import cuda
from fusebuild.runtime.cuda import VECTOR, WIDE, launch_flags, max_ptx_isa, select_target
from conftest import SPECS


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
