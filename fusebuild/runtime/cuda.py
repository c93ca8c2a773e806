"""CUDA kernels: device arrays, target choice per device, lazy module loads, cupy launches.

Imports numpy only; cupy is imported on the first CUDA call. Arrays are seen through their data
pointers (`DeviceArray`): cupy arrays, DLPack CUDA tensors (torch, bfloat16 included) and objects
with `__cuda_array_interface__`. Outputs are allocated with cupy on the inputs' device and
returned as cupy arrays, or through `from_dlpack` of the inputs' framework (torch in, torch out).

The host side of a launch (pointer words, vector-path and index-width flags, grid) is made of pure
functions over numpy, shared with the host-side emulation tests.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from .. import dtypes as dt
from ..abi import Abi
from ..argspec import Canonical, contiguous_strides, parse_key
from ..errors import ArgumentError, BundleError, KernelNotFound
from . import dispatch

BLOCK = 128            # threads per block (fixed by codegen.cuda)
VECTOR, WIDE = 1, 2    # flags bits: vector path, 64-bit indexing
MAX_GRID = (1 << 31) - 1
_DL_CUDA = (2, 13)     # DLPack device types kDLCUDA, kDLCUDAManaged
_CUPY_HINT = "running CUDA kernels needs cupy: pip install cupy-cuda13x (or cupy-cuda12x)"


# ---------------------------------------------------------------- device arrays ----------------

@dataclass(frozen=True)
class DeviceArray:
    """A CUDA array seen through its data pointer; `owner` keeps the memory alive."""
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]     # bytes
    dtype: np.dtype
    device: int
    owner: object = None

    @property
    def extent(self) -> tuple[int, int]:
        """[first byte, last byte + 1) touched by the array (0-size arrays: empty)."""
        lo, hi = dispatch.byte_extent(self.shape, self.strides, self.dtype.itemsize)
        return self.ptr + lo, self.ptr + hi

    @property
    def c_contiguous(self) -> bool:
        return all(s == c * self.dtype.itemsize or n == 1 for n, s, c in
                   zip(self.shape, self.strides, contiguous_strides(self.shape)))


def is_cuda_array(a) -> bool:
    """Whether `a` lives in CUDA memory (cupy, DLPack CUDA tensor, CUDA array interface)."""
    if isinstance(a, np.ndarray):
        return False
    if type(a).__module__.startswith("cupy"):
        return True
    device = getattr(a, "__dlpack_device__", None)
    if device is not None:
        try:
            return device()[0] in _DL_CUDA
        except Exception:  # noqa: BLE001 - a producer that cannot tell is not a CUDA array
            return False
    try:
        return a.__cuda_array_interface__ is not None
    except Exception:  # noqa: BLE001 - e.g. torch raises for CPU tensors
        return False


def device_of(a) -> int:
    """The CUDA device ordinal of a CUDA array (see `is_cuda_array`)."""
    if type(a).__module__.startswith("cupy"):
        return a.device.id
    if hasattr(a, "__dlpack_device__"):
        return int(a.__dlpack_device__()[1])
    return _cupy().cuda.runtime.pointerGetAttributes(a.__cuda_array_interface__["data"][0]).device


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    """The head of DLPack's (unversioned) DLManagedTensor."""
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DL_DTYPES = {(0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64",
              (1, 8): "uint8", (2, 16): "float16", (2, 32): "float32", (2, 64): "float64",
              (4, 16): "bfloat16", (6, 8): "bool"}


def from_dlpack_capsule(capsule, name: str) -> DeviceArray:
    """Read a DLPack 'dltensor' capsule without consuming it (its destructor frees it later)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    t = _DLTensor.from_address(get(capsule, b"dltensor"))
    code = (t.dtype.code, t.dtype.bits)
    if code not in _DL_DTYPES or t.dtype.lanes != 1:
        raise ArgumentError(f"input '{name}' has DLPack dtype (code {code[0]}, {code[1]} bits, "
                            f"{t.dtype.lanes} lanes), which fusebuild does not support")
    dtype = dt.lookup(_DL_DTYPES[code]).numpy
    shape = tuple(t.shape[i] for i in range(t.ndim))
    elems = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else contiguous_strides(shape)
    return DeviceArray((t.data or 0) + t.byte_offset, shape,
                       tuple(s * dtype.itemsize for s in elems), dtype, t.device.device_id, capsule)


def as_device_array(a, name: str, stream: int) -> DeviceArray:
    """Describe a CUDA array; DLPack producers are asked to make it ready on `stream`."""
    if type(a).__module__.startswith("cupy"):
        return DeviceArray(a.data.ptr, a.shape, a.strides, a.dtype, a.device.id, a)
    if hasattr(a, "__dlpack__"):
        return from_dlpack_capsule(a.__dlpack__(stream=stream or 1), name)
    cai = a.__cuda_array_interface__
    try:
        dtype = np.dtype(cai["typestr"])
    except TypeError:
        raise ArgumentError(f"input '{name}' has unsupported typestr {cai['typestr']!r}") from None
    shape = tuple(cai["shape"])
    strides = tuple(cai.get("strides") or (c * dtype.itemsize for c in contiguous_strides(shape)))
    if cai.get("stream") not in (None, stream):
        _wait(cai["stream"], stream)
    return DeviceArray(cai["data"][0], shape, strides, dtype, device_of(a), a)


def _wait(producer: int, stream: int) -> None:
    """Make `stream` wait for the work queued so far on the producer's stream."""
    cp = _cupy()
    event = cp.cuda.Event(disable_timing=True)
    event.record(cp.cuda.ExternalStream(producer))
    cp.cuda.ExternalStream(stream).wait_event(event)


# ---------------------------------------------------------------- launch parameters ------------

def pointers(abi: Abi, call: dispatch.Call, outputs: list[DeviceArray],
             cats: list[tuple | None]) -> np.ndarray:
    """The ptr words: each input's chunks, then each output's cat parts."""
    ptrs = np.empty(abi.n_ptrs, np.int64)
    for i, (a, (_, _, step)) in enumerate(zip(call.arrays, call.views)):
        for k in range(abi.chunks[i]):
            ptrs[abi.in_ptr(i, k)] = a.ptr + k * step * a.dtype.itemsize
    for o, (arr, cat) in enumerate(zip(outputs, cats)):
        step = 0
        if cat:
            axis = cat[1] + len(arr.shape) if cat[1] < 0 else cat[1]
            step = arr.shape[axis] // cat[0] * arr.strides[axis]
        for k in range(abi.parts[o]):
            ptrs[abi.out_ptr(o, k)] = arr.ptr + k * step
    return ptrs


def launch_flags(canon: Canonical, layouts: tuple[str, ...], vector: int,
                 operand_ptrs: list[list[int]], itemsizes: list[int]) -> int:
    """The flags word of a launch.

    WIDE (64-bit indexing) when the element count or any operand's offset span reaches 2^31.
    VECTOR when the kernel has a vector path (vector > 1), the inner extent is a multiple of it,
    and every vector-accessed operand (inputs whose kernel layout is 'c' inside, all outputs) has
    inner stride 1, outer strides that are multiples of `vector` and aligned pointers.
    Operands are the inputs (kernel `layouts`), then the outputs, as in `canon.strides`.
    """
    sizes = canon.sizes
    spans = [sum((n - 1) * abs(s) for n, s in zip(sizes, st)) for st in canon.strides]
    flags = WIDE if math.prod(sizes) >= 1 << 31 or max(spans, default=0) >= 1 << 31 else 0
    if vector == 1 or not sizes or sizes[-1] % vector:
        return flags
    letters = [lay[-1] if lay else "b" for lay in layouts]
    letters += ["c"] * (len(canon.strides) - len(layouts))
    for st, ptrs, size, letter in zip(canon.strides, operand_ptrs, itemsizes, letters):
        if letter == "c" and (st[-1] != 1 or any(s % vector for s in st[:-1])
                              or any(p % (vector * size) for p in ptrs)):
            return flags
    return flags | VECTOR


def param_words(ptrs: np.ndarray, meta: np.ndarray, n: int, flags: int) -> np.ndarray:
    """The kernel's parameter struct as int64 words: ptr, meta, start, stop, flags."""
    return np.concatenate([ptrs, meta, np.array([0, n, flags], np.int64)])


def grid_size(n: int, vector: int, flags: int) -> int:
    per_block = BLOCK * (vector if flags & VECTOR else 1)
    return -(-n // per_block)


def launch_words(abi: Abi, call: dispatch.Call, outputs: list[DeviceArray], cats: list,
                 layouts: tuple[str, ...], vector: int, seed: int, offset: int
                 ) -> tuple[np.ndarray, int]:
    """The parameter words and grid size of a launch of a non-empty call."""
    ptrs = pointers(abi, call, outputs, cats)
    operand_ptrs = [[int(ptrs[abi.in_ptr(i, k)]) for k in range(c)]
                    for i, c in enumerate(abi.chunks)]
    operand_ptrs += [[int(ptrs[abi.out_ptr(o, k)]) for k in range(c)]
                     for o, c in enumerate(abi.parts)]
    itemsizes = [a.dtype.itemsize for a in call.arrays] + [o.dtype.itemsize for o in outputs]
    flags = launch_flags(call.canon, layouts, vector, operand_ptrs, itemsizes)
    n = dispatch.element_count(call)
    words = param_words(ptrs, dispatch.meta_words(call, abi, seed, offset), n, flags)
    return words, grid_size(n, vector, flags)


# ---------------------------------------------------------------- target choice ----------------

def max_ptx_isa(driver_version: int) -> tuple[int, int]:
    """The newest PTX ISA a driver JIT-compiles (cudaDriverGetVersion 13000 -> (9, 0))."""
    major, minor = divmod(driver_version // 10, 100)
    if major == 12:
        return 8, min(minor, 5) if minor <= 6 else minor - 1    # 12.6: 8.5, 12.8: 8.7
    return major - 4, minor                                      # 11.x: 7.x, 13.x: 9.x


def _arch(target: str) -> tuple[str, int, int, bool]:
    """'cuda:sm_90a' -> ('sm', 9, 0, True)."""
    kind, number = target.split(":", 1)[1].split("_")
    variant = number.endswith("a")
    major, minor = divmod(int(number.rstrip("a")), 10)
    return kind, major, minor, variant


def select_target(entries: dict[str, dict], cc: tuple[int, int], max_isa: tuple[int, int]
                  ) -> tuple[str | None, str]:
    """The CUDA target to run on a device of compute capability `cc`, and why none if None.

    Exact SASS (sm_XY, else sm_XYa); else SASS of the same major and a lower minor (not 'a');
    else the newest PTX compute_XY <= cc whose ISA the driver supports (max_isa).
    """
    archs = {t: _arch(t) for t in entries if t.startswith("cuda:")}
    sass = [(m, a, t) for t, (k, M, m, a) in archs.items() if k == "sm" and M == cc[0]]
    for minor, variant, t in sorted(sass, key=lambda s: (s[0] != cc[1], s[1], -s[0])):
        if minor == cc[1] or (minor < cc[1] and not variant):
            return t, ""
    ptx = sorted(((M, m), t) for t, (k, M, m, a) in archs.items()
                 if k == "compute" and (M, m) <= cc and not a)
    too_new = []
    for _, t in reversed(ptx):
        isa = tuple(int(x) for x in entries[t]["ptx_isa"].split("."))
        if isa <= max_isa:
            return t, ""
        too_new.append(f"{t} holds PTX ISA {entries[t]['ptx_isa']}")
    why = f"; {', '.join(too_new)}, newer than the driver's {max_isa[0]}.{max_isa[1]}: update " \
          "the driver or build SASS for this device" if too_new else ""
    return None, why


# ---------------------------------------------------------------- modules and launches ---------

def _cupy():
    try:
        import cupy
    except ImportError:
        raise ArgumentError(f"CUDA arrays were passed; {_CUPY_HINT}") from None
    return cupy


@dataclass(frozen=True)
class _Kernel:
    entry: dict          # the manifest's kernel entry
    function: object     # cupy Function (None for an empty call)
    layouts: tuple[str, ...]


class CudaKernels:
    """The CUDA kernels of one bundle: target per (key, device), modules loaded on first use."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._entries: dict[str, dict[str, dict]] = {}
        for k in bundle.manifest["kernels"]:
            if k["target"].startswith("cuda:"):
                self._entries.setdefault(k["key"], {})[k["target"]] = k
        self._modules: dict[tuple[str, int], object] = {}
        self._kernels: dict[tuple[str, int], _Kernel] = {}
        self._lock = threading.Lock()

    def find(self, key: str, device: int, empty: bool) -> _Kernel:
        cached = self._kernels.get((key, device))
        if cached is not None:
            return cached
        cp = _cupy()
        cc = _capability(cp, device)
        max_isa = max_ptx_isa(cp.cuda.runtime.driverGetVersion())
        reasons = []
        for k in self.bundle.candidates(key, empty):
            target, why = select_target(self._entries.get(k, {}), cc, max_isa)
            reasons.append(why)
            if target:
                entry = self._entries[k][target]
                function = None if empty else self._function(cp, entry, device)
                found = _Kernel(entry, function, tuple(lay for _, lay in parse_key(k)[1]))
                if not empty:
                    self._kernels[(key, device)] = found
                return found
        have = sorted({t for es in self._entries.values() for t in es})
        near = dispatch.nearest_keys(key, [k for k in self.bundle.keys() if k != key])
        name = cp.cuda.runtime.getDeviceProperties(device)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        (major, minor), sm = cc, f"{cc[0]}{cc[1]}"
        older = f" or an older cuda:sm_{major}x" if minor else ""
        raise KernelNotFound(
            f"bundle {self.bundle.name}-{self.bundle.version} has no kernel {key} that runs on "
            f"CUDA device {device} ({name}, sm_{sm}: needs cuda:sm_{sm}{older}, or PTX "
            f"cuda:compute_XY with XY <= {sm}){''.join(dict.fromkeys(reasons))}; bundle CUDA "
            f"targets: {', '.join(have) or 'none'}.\n  nearest keys present: "
            f"{', '.join(near) or 'none'}", key, near)

    def _function(self, cp, entry: dict, device: int):
        with self._lock:
            module = self._modules.get((entry["file"], device))
            if module is None:
                path = os.path.join(self.bundle.root, entry["file"])
                try:
                    with open(path, "rb") as f:
                        image = f.read()
                except OSError as e:
                    raise BundleError(f"cannot read {entry['file']}: {e}") from None
                module = cp.cuda.function.Module()
                try:
                    module.load(image + b"\0" if entry["file"].endswith(".ptx") else image)
                except cp.cuda.driver.CUDADriverError as e:
                    raise BundleError(f"the CUDA driver cannot load {entry['file']} "
                                      f"({entry['target']}) on device {device}: {e}") from None
                self._modules[(entry["file"], device)] = module
        return module.get_function(entry["symbol"])


def _capability(cp, device: int) -> tuple[int, int]:
    cc = cp.cuda.Device(device).compute_capability
    return int(cc[:-1]), int(cc[-1])


def _launch(cp, function, grid: int, words: np.ndarray, stream: int) -> None:
    size = ctypes.c_size_t(words.nbytes)
    extra = (ctypes.c_void_p * 5)(1, words.ctypes.data, 2, ctypes.addressof(size), 0)
    cp.cuda.driver.launchKernel(function.ptr, grid, 1, 1, BLOCK, 1, 1, 0, stream, 0,
                                ctypes.addressof(extra))


# ---------------------------------------------------------------- calls ------------------------

def _describe(a: DeviceArray):
    return a.shape, a.strides, a.dtype


def _tensor_names(info: dispatch.GroupInfo, args: tuple) -> list[tuple[str, object]]:
    return [(name, a) for (name, kind, _), a in zip(info.params, args) if kind == "tensor"]


def call_device(info: dispatch.GroupInfo, args: tuple) -> int:
    """The device of a call whose tensor inputs are all CUDA arrays on one device."""
    if len(args) != len(info.params):
        raise ArgumentError(f"{info.signature} takes {len(info.params)} arguments "
                            f"({len(args)} given)")
    tensors = _tensor_names(info, args)
    cpu = [n for n, a in tensors if not is_cuda_array(a)]
    if cpu:
        gpu = [n for n, a in tensors if n not in cpu]
        raise ArgumentError(f"{info.name}: inputs {', '.join(gpu)} are CUDA arrays but "
                            f"{', '.join(cpu)} {'is' if len(cpu) == 1 else 'are'} not; pass all "
                            "tensor inputs on one device")
    devices = {n: device_of(a) for n, a in tensors}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on cuda:{d}" for n, d in devices.items())
        raise ArgumentError(f"{info.name}: inputs are on different CUDA devices ({where}); "
                            "move them to one device")
    return next(iter(devices.values()))


def prepare(info: dispatch.GroupInfo, args: tuple, stream: int) -> dispatch.Call:
    """`dispatch.prepare` for CUDA arrays (tensor arguments become `DeviceArray`s)."""
    described = tuple(as_device_array(a, name, stream) if kind == "tensor" else a
                      for (name, kind, _), a in zip(info.params, args))
    return dispatch.prepare(info, described, _describe)


def key(info: dispatch.GroupInfo, args: tuple) -> str:
    cp = _cupy()
    with cp.cuda.Device(call_device(info, args)):
        return prepare(info, args, cp.cuda.get_current_stream().ptr).key


def call(caller, args: tuple, out, seed, offset: int):
    """Run group `caller.info` on CUDA arrays; returns the output(s)."""
    info = caller.info
    device = call_device(info, args)
    cp = _cupy()
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream().ptr
        c = prepare(info, args, stream)
        if info.has_random:
            dispatch.check_seed(info.name, seed, offset)
        n = dispatch.element_count(c)
        kernels = caller.bundle._cuda or _attach(caller.bundle)
        kernel = kernels.find(c.key, device, empty=n == 0)
        cats = [cat for _, cat in info.outputs]
        outs, results = _outputs(cp, info, c, kernel.entry, out, args, stream)
        if n:
            rank = len(kernel.layouts[0]) if kernel.layouts else 0
            c.canon = dispatch.pad(c.canon, rank)
            abi = Abi(rank, tuple(ch[0] if ch else 1 for ch in info.chunks),
                      tuple(cat[0] if cat else 1 for cat in cats), info.has_random,
                      len(c.scalars))
            words, grid = launch_words(abi, c, outs, cats, kernel.layouts,
                                       kernel.entry.get("vector", 1), seed or 0, offset)
            if grid > MAX_GRID:
                raise ArgumentError(f"{info.name}: {n} elements need {grid} blocks, over CUDA's "
                                    f"limit of {MAX_GRID}")
            _launch(cp, kernel.function, grid, words, stream)
    return results[0] if len(results) == 1 else tuple(results)


def _attach(bundle) -> CudaKernels:
    bundle._cuda = CudaKernels(bundle)
    return bundle._cuda


def _outputs(cp, info: dispatch.GroupInfo, c: dispatch.Call, entry: dict, out, args: tuple,
             stream: int) -> tuple[list[DeviceArray], list]:
    """Output arrays (`out=` checked, or allocated) and the objects to return."""
    want = [(tuple(shape), dt.lookup(d)) for shape, d in zip(c.out_shapes, entry["outputs"])]
    names = [n for n, _ in info.outputs]
    if out is None:
        framework = _framework(info, args)
        arrays, results = [], []
        for shape, d in want:   # cupy has no bfloat16: its bits, as int16 for from_dlpack
            storage = np.dtype(np.int16 if framework else np.uint16) if d == dt.bfloat16 \
                else d.numpy
            a = cp.empty(shape, storage)
            arrays.append(DeviceArray(a.data.ptr, shape, a.strides, d.numpy, a.device.id, a))
            results.append(a if framework is None else _to_framework(framework, a, d))
        return arrays, results
    given = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(given) != len(want):
        raise ArgumentError(f"{info.name} has {len(want)} outputs ({', '.join(names)}); out= gave "
                            f"{len(given)}")
    device = c.arrays[0].device if c.arrays else None
    arrays = []
    for name, o, (shape, d) in zip(names, given, want):
        if not is_cuda_array(o):
            raise ArgumentError(f"out= for '{name}' must be a CUDA array like the inputs, got "
                                f"{type(o).__name__}")
        a = as_device_array(o, name, stream)
        if a.device != device:
            raise ArgumentError(f"out= for '{name}' is on cuda:{a.device}, the inputs on "
                                f"cuda:{device}")
        if a.shape != shape or a.dtype != d.numpy:
            raise ArgumentError(f"out= for '{name}' must be {d.name}{list(shape)}, got "
                                f"{a.dtype.name}{list(a.shape)}")
        if not a.c_contiguous:
            raise ArgumentError(f"out= for '{name}' must be C-contiguous")
        for x, tname in zip(c.arrays, info.tensor_names):
            if _overlap(a, x) and (a.ptr, a.shape, a.strides) != (x.ptr, x.shape, x.strides):
                raise ArgumentError(f"out= for '{name}' overlaps input '{tname}' without being "
                                    "the same array; only exact in-place updates are allowed")
        arrays.append(a)
    for i, a in enumerate(arrays):
        if any(_overlap(a, b) for b in arrays[i + 1:]):
            raise ArgumentError("out= arrays overlap each other")
    return arrays, given


def _overlap(a: DeviceArray, b: DeviceArray) -> bool:
    (a0, a1), (b0, b1) = a.extent, b.extent
    return a0 < b1 and b0 < a1


def _framework(info: dispatch.GroupInfo, args: tuple):
    """The module (e.g. torch) whose `from_dlpack` returns outputs like the first tensor input;
    None for cupy and `__cuda_array_interface__` inputs."""
    first = next((a for _, a in _tensor_names(info, args)), None)
    if first is None or type(first).__module__.startswith("cupy") \
            or not hasattr(first, "__dlpack__"):
        return None
    module = sys.modules.get(type(first).__module__.split(".")[0])
    return module if hasattr(module, "from_dlpack") else None


def _to_framework(framework, a, d: dt.DType):
    """A cupy output as a tensor of the inputs' framework (bfloat16 from its int16 bits)."""
    t = framework.from_dlpack(a)
    return t.view(framework.bfloat16) if d == dt.bfloat16 else t
