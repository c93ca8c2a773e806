"""A stand-in for the part of cupy the CUDA runtime uses, over host memory: `launchKernel` reads
the parameter buffer from its `extra` argument and runs the emulated kernel, so the runtime's
whole call path (routing, target choice, outputs, parameter words, launch) runs without a GPU."""
from __future__ import annotations

import ctypes
import threading
import types

import numpy as np

from .harness import device_limits, run_kernel


class FakeArray:
    """A 'cupy' array: a numpy array (view) whose memory the emulated kernels use."""

    def __init__(self, host: np.ndarray, device: int = 0):
        self.host = host
        self.data = types.SimpleNamespace(ptr=host.ctypes.data, device_id=device)  # MemoryPointer
        self.shape, self.strides, self.dtype = host.shape, host.strides, host.dtype
        self.device = types.SimpleNamespace(id=device)

    def get(self) -> np.ndarray:
        return self.host.copy()


FakeArray.__module__ = "cupy_fake"      # the runtime recognizes cupy arrays by their module


STATIC_SHARED, MAX_DYNAMIC_SHARED = 1, 8    # the CUDA enums' values
LIMITS = device_limits(90)  # the device's shared memory and residency (sm_90)
ATTRIBUTES = dict(zip((97, 81, 39, 106, 111), (LIMITS.optin, LIMITS.sm, LIMITS.threads,
                                               LIMITS.blocks, LIMITS.reserved)))


class CUDADriverError(RuntimeError):
    pass


def fake_cupy(libs: dict[str, ctypes.CDLL], capability: str = "90", driver: int = 13000):
    """A cupy namespace for one imaginary device; `libs` maps kernel symbols to emulation libs."""
    launched: list[str] = []
    shared_bytes: list[int] = []        # per launch, its dynamic shared memory
    blocks: list[int] = []              # per launch, its threads per block
    allowed: dict[int, int] = {}        # per function, the dynamic shared memory it may have
    functions: dict[int, str] = {}

    current = threading.local()     # each thread's current device (0 unless `with Device(i)`)

    class Device:
        def __init__(self, index: int = 0):
            self.id, self.compute_capability = index, capability

        def __enter__(self):
            self.previous, current.id = getattr(current, "id", 0), self.id
            return self

        def __exit__(self, *exc):
            current.id = self.previous
            return False

    class Module:
        def load(self, image: bytes) -> None:
            assert image[:4] == b"\x7fELF"

        def get_function(self, symbol: str):
            functions[id(symbol)] = symbol
            return types.SimpleNamespace(ptr=id(symbol))

    def launch(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        assert (gy, gz, by, bz, params) == (1, 1, 1, 1, 0) and bx in (64, 128, 256, 512, 1024)
        assert shared <= allowed.get(f, 48 << 10), "dynamic shared memory over the opt-in"
        tags = (ctypes.c_void_p * 5).from_address(extra)
        assert (tags[0], tags[2], tags[4]) == (1, 2, None)
        size = ctypes.c_size_t.from_address(tags[3]).value
        words = np.frombuffer((ctypes.c_char * size).from_address(tags[1]), np.int64).copy()
        symbol = functions[f]
        lib = libs[symbol]
        assert getattr(lib, f"emu_bytes_{symbol}")() == size
        run_kernel(lib, symbol, words.ctypes.data, gx, bx, shared)
        launched.append(symbol)
        shared_bytes.append(shared)
        blocks.append(bx)

    def set_attribute(f, attribute, value):
        assert attribute == MAX_DYNAMIC_SHARED and value <= LIMITS.optin
        allowed[f] = value

    runtime = types.SimpleNamespace(driverGetVersion=lambda: driver,
                                    deviceGetAttribute=lambda a, i: ATTRIBUTES[a],
                                    getDevice=lambda: getattr(current, "id", 0),
                                    getDeviceProperties=lambda i: {"name": b"Emulated GPU"})
    cuda = types.SimpleNamespace(
        Device=Device, runtime=runtime, get_current_stream=lambda: types.SimpleNamespace(ptr=0),
        function=types.SimpleNamespace(Module=Module),
        driver=types.SimpleNamespace(
            launchKernel=launch, CUDADriverError=CUDADriverError,
            CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES=STATIC_SHARED,
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=MAX_DYNAMIC_SHARED,
            funcGetAttribute=lambda a, f: {STATIC_SHARED: 64}[a], funcSetAttribute=set_attribute))
    return types.SimpleNamespace(cuda=cuda, launched=launched, shared_bytes=shared_bytes,
                                 blocks=blocks,
                                 empty=lambda shape, dtype: FakeArray(np.empty(shape, dtype),
                                                                      runtime.getDevice()))
