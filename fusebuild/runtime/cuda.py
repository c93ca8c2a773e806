"""CUDA kernels: device arrays, target choice per device, lazy module loads, cupy launches.

Imports numpy only; cupy is imported on the first CUDA call. Arrays are seen through their data
pointers (`DeviceArray`): cupy arrays, DLPack CUDA tensors (torch, bfloat16 included) and objects
with `__cuda_array_interface__`. Outputs are allocated with cupy on the inputs' device and
returned as cupy arrays, or through `from_dlpack` of the inputs' framework (torch in, torch out).

The host side of a launch (pointer words, vector-path and index-width flags, grid) is made of pure
functions over numpy, shared with the host-side emulation tests. A call on cupy arrays with the
device, shapes, strides and dtypes of an earlier one runs by that call's plan (`serve`): its
parameter words with the data pointers, seed and scalars filled in, and the vector path chosen by
the pointers' alignment.

Reduction groups (DESIGN §8) launch over the work count rows * max(N, 1) (`dispatch.work_count`)
with a warp per row (four rows a 128-thread block) for rows of N <= WARP_ROW_MAX and a block per
row beyond (flags bit ROW_BLOCK) of `row_threads(N)` threads: the fewest (a power of two, 64 to
ROW_THREADS) that give a thread at most ROW_ELEMENTS elements. The launch shape depends on N
alone, so a row gives the same bits on every device. Row outputs are `[..., 1]` arrays stored
once per row.

Single-read rows (flags bit HELD): the inputs a kernel loads in several sweeps (the kernel
description's `held`, derived from the group's IR and embedded in the cubin) are read from global
memory once and kept in dynamic shared memory (`shared_bytes` per block). The budget is the
device's, read from its attributes when a kernel is first used (`SharedLimits`: the opt-in
shared memory of a block, cuFuncSetAttribute'd on the function, the SM's shared memory, resident
threads and blocks): `holds` takes a launch when its block fits and the SM still keeps at least
OCCUPANCY_MIN (25%) of its threads resident, so held rows never cost occupancy below the target
(with at most 16 elements a thread, three float32 rows of N = 16384 take 192 KiB: held on
sm_90/sm_100 (227 KiB a block), two on sm_80 (163 KiB), one on sm_86/89/120 (99 KiB)). Other
rows re-read each sweep from global memory (L2).

Calls of N = 0 with rows still launch (their row outputs get written) on any kernel of the
dtypes (`dispatch.hollow`): no element is read, so the inputs' layouts do not matter.
"""
from __future__ import annotations

import ctypes
import math
import sys
import threading
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .. import dtypes as dt
from ..abi import Abi
from ..argspec import Canonical, contiguous_strides, parse_key
from ..artifact import check_description, read_description
from ..text import plural
from ..errors import ArgumentError, BundleError, KernelNotFound
from . import dispatch
from .interop import is_cuda_array
from .manifest import kernel_file, read_artifact

BLOCK = 128            # threads per block of elementwise kernels and of a warp per row
VECTOR, WIDE = 1, 2    # flags bits: vector path, 64-bit indexing
ROW_BLOCK = 4          # flags bit of a reduction kernel: a block per row, else a warp per row
ROW_ELEMENTS = 16      # elements of a row per thread, for rows up to ROW_ELEMENTS * ROW_THREADS
ROW_THREADS = 1024     # the most threads of a block per row (codegen.cuda's launch bound)
WARP_ROW_MAX = 32 * ROW_ELEMENTS    # reduction rows up to this length get a warp
HELD = 8               # flags bit of a reduction kernel: held inputs in dynamic shared memory
OCCUPANCY_MIN = 0.25   # the share of an SM's threads a HELD launch leaves resident, at least
SHARED_UNIT = 128      # shared memory is allocated to blocks in units of this many bytes
MAX_GRID = (1 << 31) - 1
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
        """C order (any strides for an empty array, as numpy's flag says)."""
        return 0 in self.shape or all(s == c * self.dtype.itemsize or n == 1 for n, s, c in
                   zip(self.shape, self.strides, contiguous_strides(self.shape)))


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


def vector_alignment(canon: Canonical, layouts: tuple[str, ...], vector: int,
                     itemsizes: list[int], row_outputs: tuple[bool, ...] = ()
                     ) -> list[int] | None:
    """Byte alignment each operand's pointers need for the vector path (1: any), or None when
    the kernel, the inner extent or the strides rule it out.

    The vector path needs a kernel with one (vector > 1), an inner extent that is a multiple of
    it, and every vector-accessed operand (inputs whose kernel layout is 'c' inside, all outputs)
    with inner stride 1, outer strides that are multiples of `vector` and aligned pointers.
    Operands are the inputs (kernel `layouts`), then the outputs, as in `canon.strides`; row
    outputs of a reduction kernel (`row_outputs`) are stored one element per row, unaligned.
    """
    sizes = canon.sizes
    if vector == 1 or not sizes or sizes[-1] % vector:
        return None
    letters = [lay[-1] if lay else "b" for lay in layouts]
    rows = row_outputs or (False,) * (len(canon.strides) - len(layouts))
    letters += ["b" if row else "c" for row in rows]
    aligns = []
    for st, size, letter in zip(canon.strides, itemsizes, letters):
        if letter != "c":
            aligns.append(1)
        elif st[-1] != 1 or any(s % vector for s in st[:-1]):
            return None
        else:
            aligns.append(vector * size)
    return aligns


def launch_flags(canon: Canonical, layouts: tuple[str, ...], vector: int,
                 operand_ptrs: list[list[int]], itemsizes: list[int],
                 row_outputs: tuple[bool, ...] | None = None, held: tuple[int, ...] = (),
                 limits: SharedLimits | None = None) -> int:
    """The flags word of a launch: WIDE (64-bit indexing) when the element count (the work
    count of a reduction) or any operand's offset span reaches 2^31; VECTOR when
    `vector_alignment` allows it and every operand's pointers are aligned. A reduction kernel
    (`row_outputs` given, per output) gets ROW_BLOCK for rows longer than WARP_ROW_MAX, and
    HELD when the device's `limits` take its `held` inputs (bytes per element of each: see
    `holds`)."""
    sizes = canon.sizes
    spans = [sum((n - 1) * abs(s) for n, s in zip(sizes, st)) for st in canon.strides]
    count = math.prod(sizes)
    if row_outputs is not None:
        count = math.prod(sizes[:-1]) * max(sizes[-1], 1)
    flags = WIDE if count >= 1 << 31 or max(spans, default=0) >= 1 << 31 else 0
    if row_outputs is not None and sizes[-1] > WARP_ROW_MAX:
        flags |= ROW_BLOCK
    if row_outputs is not None and limits and holds(sizes[-1], held, flags, limits):
        flags |= HELD
    aligns = vector_alignment(canon, layouts, vector, itemsizes, row_outputs or ())
    if aligns is None or any(p % a for ptrs, a in zip(operand_ptrs, aligns) for p in ptrs):
        return flags
    return flags | VECTOR


@dataclass(frozen=True)
class SharedLimits:
    """What a device offers a kernel's HELD launches (CUDA device attributes, bytes)."""
    optin: int           # shared memory a block may have (MaxSharedMemoryPerBlockOptin)
    sm: int              # shared memory of an SM (MaxSharedMemoryPerMultiprocessor)
    threads: int         # resident threads of an SM (MaxThreadsPerMultiProcessor)
    blocks: int          # resident blocks of an SM (MaxBlocksPerMultiprocessor)
    reserved: int = 1024  # shared memory the system takes per block (ReservedSharedMemoryPerBlock)
    static: int = 0      # the kernel's static shared memory per block


def row_threads(n: int) -> int:
    """Threads of a block per row over rows of n (ROW_BLOCK): the fewest, a power of two from 64
    to ROW_THREADS, that give each thread at most ROW_ELEMENTS elements of the row."""
    return min(ROW_THREADS, max(64, 1 << (-(-n // ROW_ELEMENTS) - 1).bit_length()))


def block_threads(n: int, flags: int) -> int:
    """Threads per block of a reduction launch over rows of n."""
    return row_threads(n) if flags & ROW_BLOCK else BLOCK


def holds(n: int, held: tuple[int, ...], flags: int, limits: SharedLimits) -> bool:
    """Whether a reduction launch over rows of n (`flags`: its ROW_BLOCK) holds its `held`
    inputs: when there are some and the row is not empty, the block's dynamic shared memory
    (`shared_bytes`) with the kernel's static shared memory fits `limits.optin`, and the SM's
    shared memory (each block also takes `reserved` bytes, all in SHARED_UNIT units) keeps
    blocks of at least OCCUPANCY_MIN of its resident threads."""
    if not held or n <= 0:
        return False
    used = shared_bytes(n, held, flags | HELD) + limits.static
    threads = block_threads(n, flags)
    per_block = -(-(used + limits.reserved) // SHARED_UNIT) * SHARED_UNIT
    blocks = min(limits.blocks, limits.threads // threads, limits.sm // per_block)
    return used <= limits.optin and blocks * threads >= OCCUPANCY_MIN * limits.threads


def shared_bytes(n: int, held: tuple[int, ...], flags: int) -> int:
    """Dynamic shared memory of a reduction launch over rows of n (0 unless HELD): per held
    input, one slot per row of the block of n * itemsize bytes rounded up to 16 (the layout
    of `codegen.cuda`)."""
    if not flags & HELD:
        return 0
    rows = 1 if flags & ROW_BLOCK else BLOCK // 32
    return rows * sum(-(-n * size // 16) * 16 for size in held)


def param_words(ptrs: np.ndarray, meta: np.ndarray, n: int, flags: int) -> np.ndarray:
    """The kernel's parameter struct as int64 words: ptr, meta, start, stop, flags."""
    return np.concatenate([ptrs, meta, np.array([0, n, flags], np.int64)])


def grid_size(n: int, vector: int, flags: int, row: int = 0) -> int:
    """Blocks of a launch over [0, n): V elements per thread on the vector path; for a
    reduction kernel (`row` = max(N, 1)) a block per row (ROW_BLOCK) or per BLOCK // 32 rows."""
    if row:
        rows = n // row
        return rows if flags & ROW_BLOCK else -(-rows // (BLOCK // 32))
    per_block = BLOCK * (vector if flags & VECTOR else 1)
    return -(-n // per_block)


def operand_slots(abi: Abi) -> list[list[int]]:
    """The ptr words of each operand: the inputs' chunks, then the outputs' cat parts."""
    return [[abi.in_ptr(i, k) for k in range(c)] for i, c in enumerate(abi.chunks)] + \
        [[abi.out_ptr(o, k) for k in range(c)] for o, c in enumerate(abi.parts)]


def launch_words(abi: Abi, call: dispatch.Call, outputs: list[DeviceArray], cats: list,
                 layouts: tuple[str, ...], vector: int, seed: int, offset: int,
                 row_outputs: tuple[bool, ...] | None = None, held: tuple[int, ...] = (),
                 limits: SharedLimits | None = None) -> tuple[np.ndarray, int, int, int]:
    """The parameter words, grid size, threads per block and dynamic shared memory bytes of a
    launch of a non-empty call (a reduction kernel's when `row_outputs` says which outputs are
    row outputs; `held` and `limits` as for `launch_flags`)."""
    ptrs = pointers(abi, call, outputs, cats)
    operand_ptrs = [[int(ptrs[s]) for s in slots] for slots in operand_slots(abi)]
    itemsizes = [a.dtype.itemsize for a in call.arrays] + [o.dtype.itemsize for o in outputs]
    flags = launch_flags(call.canon, layouts, vector, operand_ptrs, itemsizes, row_outputs,
                         held, limits)
    reduces = row_outputs is not None
    n = dispatch.work_count(call, reduces)
    words = param_words(ptrs, dispatch.meta_words(call, abi, seed, offset), n, flags)
    return (words, grid_size(n, vector, flags, row_length(call) if reduces else 0),
            block_threads(call.shape[-1], flags) if reduces else BLOCK,
            shared_bytes(call.shape[-1] if reduces else 0, held, flags))


def row_outputs(info: dispatch.GroupInfo) -> tuple[bool, ...] | None:
    """Per output, whether it is a row output, for a reduction group; None otherwise."""
    if not info.reduces:
        return None
    return info.row_outputs or (False,) * len(info.outputs)


def row_length(call: dispatch.Call) -> int:
    """max(N, 1) of a reduction call: the work units per row."""
    return max(call.shape[-1], 1)


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
    held: tuple[int, ...] = ()   # bytes per element of each input a HELD launch holds
    limits: SharedLimits | None = None   # the device's, for a kernel with held inputs


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
        self._missed: dict[tuple[str, int, bool], KernelNotFound] = {}
        self._lock = threading.Lock()
        self.memos: dict[str, _Memo] = {}     # per group name

    def memo(self, info: dispatch.GroupInfo) -> "_Memo":
        """The remembered plans of a group's cupy calls."""
        return self.memos.get(info.name) or self.memos.setdefault(info.name, _Memo(info))

    def find(self, key: str, device: int, empty: bool, empty_rows: int = 0) -> _Kernel:
        """The kernel for a call of `key` on `device`; on a miss, logs it (FUSEBUILD_MISS_LOG,
        target cuda:sm_XY of the device) and compiles it with NVRTC when on_miss="jit". A miss
        is handled once per (key, device): later calls get the same answer. `empty_rows` > 0:
        a reduction call of that many rows of N = 0, which any kernel of the key's dtypes runs
        (of at least the call's rank; see `dispatch.hollow`)."""
        if empty_rows:
            return self._any_kernel(key, device)
        cached = self._kernels.get((key, device))
        if cached is not None:
            return cached
        missed = self._missed.get((key, device, empty))
        if missed is not None:
            raise KernelNotFound(str(missed), missed.key, missed.nearest)
        cp = _cupy()
        cc = _capability(cp, device)
        max_isa = max_ptx_isa(cp.cuda.runtime.driverGetVersion())
        reasons = []
        for k in self.bundle.candidates(key, empty):
            target, why = select_target(self._entries.get(k, {}), cc, max_isa)
            reasons.append(why)
            if target:
                return self._kernel(cp, k, self._entries[k][target], device, key, empty)
        error = self.bundle.fixed_dtype_error(key)
        if error is None:
            target = f"cuda:sm_{cc[0]}{cc[1]}"
            self.bundle.log_miss(key, target)
            if self.bundle.on_miss == "jit":
                try:
                    return self._jit(cp, key, target, device, empty)
                except KernelNotFound as e:
                    error = e
            else:
                error = self._not_found(cp, key, device, cc, reasons)
        self._missed[(key, device, empty)] = error
        raise KernelNotFound(str(error), error.key, error.nearest)

    def _any_kernel(self, key: str, device: int) -> _Kernel:
        """A kernel of `key`'s dtypes for rows of N = 0 (not remembered for `key`)."""
        cp = _cupy()
        cc = _capability(cp, device)
        max_isa = max_ptx_isa(cp.cuda.runtime.driverGetVersion())
        for k in self.bundle.candidates(key, hollow=True):
            target, _ = select_target(self._entries.get(k, {}), cc, max_isa)
            if target:
                entry = self._entries[k][target]
                return _Kernel(entry, self._function(cp, entry, device),
                               tuple(lay for _, lay in parse_key(k)[1]))
        return self.find(key, device, False)     # none: the miss of the key itself

    def _kernel(self, cp, k: str, entry: dict, device: int, key: str, empty: bool) -> _Kernel:
        """Kernel `k` (entry `entry`) for calls of `key` on `device`, remembered if not empty."""
        function = None if empty else self._function(cp, entry, device)
        held = self.bundle.held(entry["file"], k)     # checks entry["outputs"] (its description)
        found = _Kernel(entry, function, tuple(lay for _, lay in parse_key(k)[1]), held,
                        _allow_shared(cp, function, device) if held and function else None)
        if not empty:
            self._kernels[(key, device)] = found
        return found

    def _jit(self, cp, key: str, target: str, device: int, empty: bool) -> _Kernel:
        """Compile `key` for the device's SASS target with NVRTC (in a child process, as the
        CPU JIT) and index it."""
        with self.bundle._jit_lock:
            entry = self._entries.get(key, {}).get(target)
            if entry is None:
                entry = self.bundle.compile_missing(key, target)
                self.bundle.add_compiled(entry)
                self._entries.setdefault(key, {})[target] = entry
        return self._kernel(cp, key, entry, device, key, empty)

    def _not_found(self, cp, key: str, device: int, cc: tuple[int, int],
                   reasons: list[str]) -> KernelNotFound:
        have = sorted({t for es in self._entries.values() for t in es})
        near = dispatch.nearest_keys(key, [k for k in self.bundle.keys() if k != key])
        name = cp.cuda.runtime.getDeviceProperties(device)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        (major, minor), sm = cc, f"{cc[0]}{cc[1]}"
        older = f" or an older cuda:sm_{major}x" if minor else ""
        return KernelNotFound(
            f"bundle {self.bundle.name}-{self.bundle.version} has no kernel {key} that runs on "
            f"CUDA device {device} ({name}, sm_{sm}: needs cuda:sm_{sm}{older}, or PTX "
            f"cuda:compute_XY with XY <= {sm}){''.join(dict.fromkeys(reasons))}; bundle CUDA "
            f"targets: {', '.join(have) or 'none'}.\n  nearest keys present: "
            f"{', '.join(near) or 'none'}", key, near)

    def _function(self, cp, entry: dict, device: int):
        with self._lock:
            module = self._modules.get((entry["file"], device))
            if module is None:
                where, name, size = kernel_file(self.bundle.root,
                                                self.bundle.manifest["artifacts"], entry["file"])
                image = read_artifact(where, name, entry["sha256"], size)
                check_description(read_description(image, entry["file"]), entry["file"],
                                  self.bundle.description(entry["file"]))
                module = cp.cuda.function.Module()
                try:
                    module.load(image + b"\0" if entry["file"].endswith(".ptx") else image)
                except cp.cuda.driver.CUDADriverError as e:
                    raise BundleError(f"the CUDA driver cannot load {entry['file']} "
                                      f"({entry['target']}) on device {device}: {e}") from None
                self._modules[(entry["file"], device)] = module
        return module.get_function(entry["symbol"])


# cudaDeviceAttr values: MaxSharedMemoryPerBlockOptin, MaxSharedMemoryPerMultiprocessor,
# MaxThreadsPerMultiProcessor, MaxBlocksPerMultiprocessor, ReservedSharedMemoryPerBlock
_LIMIT_ATTRIBUTES = (97, 81, 39, 106, 111)


def _allow_shared(cp, function, device: int) -> SharedLimits:
    """Let `function` launch with all the dynamic shared memory a block of the device may have
    beside the function's static shared memory (over 48 KiB needs this opt-in); the device's
    limits for its HELD launches."""
    driver, runtime = cp.cuda.driver, cp.cuda.runtime
    optin, sm, threads, blocks, reserved = (runtime.deviceGetAttribute(a, device)
                                            for a in _LIMIT_ATTRIBUTES)
    static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function.ptr)
    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            optin - static)
    return SharedLimits(optin, sm, threads, blocks, reserved, static)


def _capability(cp, device: int) -> tuple[int, int]:
    cc = cp.cuda.Device(device).compute_capability
    return int(cc[:-1]), int(cc[-1])


class _Params(threading.local):
    """This thread's parameter buffer, and launchKernel's `extra` array that points to it (the
    driver copies the parameters during the launch, so one buffer per thread serves all)."""

    def __init__(self):
        self.reserve(64)

    def reserve(self, words: int) -> None:
        buffer, size = (ctypes.c_int64 * words)(), ctypes.c_size_t()
        # CU_LAUNCH_PARAM_BUFFER_POINTER, buffer, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, END
        extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(buffer), 2, ctypes.addressof(size), 0)
        self.state = buffer, size, extra, ctypes.addressof(extra)


_PARAMS = _Params()


def _launch(cp, function: int, grid: int, block: int, words: list[int], stream: int,
            shared: int) -> None:
    n = len(words)
    if n > len(_PARAMS.state[0]):
        _PARAMS.reserve(n)
    buffer, size, _, extra = _PARAMS.state
    buffer[:n] = words
    size.value = 8 * n
    cp.cuda.driver.launchKernel(function, grid, 1, 1, block, 1, 1, shared, stream, 0, extra)


# ---------------------------------------------------------------- launch plans -----------------

_MAX_PLANS = 4096          # remembered plans per group; cleared beyond this
_CUPY_TYPES: set[type] = set()     # array types of remembered plans (module 'cupy...')
_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class _Plan:
    """A launch for one call signature with the data pointers, seed and scalars left out.

    Pointer words are filled from `bases`: the inputs' data pointers, then the outputs'.
    """
    cp: object
    device: int
    function: int                             # CUfunction handle
    words: tuple[int, ...]                    # parameter words; pointer words hold byte offsets
    ptr_slots: tuple[tuple[int, int], ...]    # (word, base) per pointer word
    aligns: tuple[tuple[int, int], ...]       # (word, bytes) the vector path needs
    grid: int                                 # blocks (on the vector path if `words` say so)
    scalar_grid: int                          # blocks on the scalar path
    block: int                                # threads per block
    shared: int                               # dynamic shared memory bytes
    random: bool
    fill_at: int                              # word of the seed (random groups) or first scalar
    scalars: tuple[tuple[int, str, dt.DType], ...]  # (argument, name, dtype)
    alloc: tuple[tuple[tuple, np.dtype], ...]  # per output: shape, storage dtype
    outs: tuple[tuple[tuple, np.dtype, tuple, int], ...]  # per output, what out= must be:
    #                                           shape, dtype, strides, bytes
    extents: tuple[tuple[int, int], ...]      # per input: bytes touched around its pointer
    same: tuple[tuple[bool, ...], ...]        # same[i][o]: input i laid out like output o

    def fill(self, bases: list[int], fills: list[int]) -> tuple[list[int], int]:
        """The parameter words and grid of a launch; `fills` are the words from `fill_at` on
        (seed and offset, then scalars)."""
        words = list(self.words)
        for slot, base in self.ptr_slots:
            words[slot] += bases[base]
        if fills:
            words[self.fill_at:self.fill_at + len(fills)] = fills
        for slot, align in self.aligns:
            if words[slot] % align:
                words[-1] &= ~VECTOR
                return words, self.scalar_grid
        return words, self.grid


def _plan(cp, info: dispatch.GroupInfo, c: dispatch.Call, abi: Abi, kernel: _Kernel,
          device: int) -> _Plan:
    """The plan of a non-empty call (`c.canon` padded to the kernel's rank)."""
    cats = [cat for _, cat in info.outputs]
    dtypes = [dt.lookup(d) for d in kernel.entry["outputs"]]
    outs = [DeviceArray(0, tuple(shape), tuple(s * d.itemsize for s in contiguous_strides(shape)),
                        d.numpy, device) for shape, d in zip(c.out_shapes, dtypes)]
    at_zero = replace(c, arrays=[replace(a, ptr=0) for a in c.arrays])
    vector, rows = kernel.entry.get("vector", 1), row_outputs(info)
    words, grid, block, shared = launch_words(abi, at_zero, outs, cats, kernel.layouts, vector,
                                              0, 0, rows, kernel.held, kernel.limits)
    slots = operand_slots(abi)
    aligns = vector_alignment(c.canon, kernel.layouts, vector,
                              [a.dtype.itemsize for a in c.arrays + outs], rows or ()) \
        if words[-1] & VECTOR else [1] * len(slots)
    scalars = [(i, name, dt.lookup(d)) for i, (name, kind, d) in enumerate(info.params)
               if kind == "scalar"]
    return _Plan(
        cp=cp, device=device, function=kernel.function.ptr, words=tuple(words.tolist()),
        ptr_slots=tuple((s, op) for op, ss in enumerate(slots) for s in ss),
        aligns=tuple((s, a) for ss, a in zip(slots, aligns) for s in ss if a > 1), grid=grid,
        scalar_grid=grid_size(dispatch.work_count(c, info.reduces), vector,
                              int(words[-1]) & ~VECTOR, row_length(c) if info.reduces else 0),
        block=block, shared=shared,
        random=info.has_random, fill_at=abi.n_ptrs + abi.seed,
        scalars=tuple(scalars),
        alloc=tuple((o.shape, np.dtype(np.uint16) if d == dt.bfloat16 else o.dtype)   # as _outputs
                    for o, d in zip(outs, dtypes)),
        outs=tuple((o.shape, o.dtype, o.strides, o.extent[1]) for o in outs),
        extents=tuple(dispatch.byte_extent(a.shape, a.strides, a.dtype.itemsize)
                      for a in c.arrays),
        same=tuple(tuple(a.shape == o.shape and a.strides == o.strides for o in outs)
                   for a in c.arrays))


class _Memo:
    """The plans of one group's calls on cupy arrays, by device and tensor layouts."""

    def __init__(self, info: dispatch.GroupInfo):
        self.n_args = len(info.params)
        self.tensor_pos = tuple(i for i, (_, kind, _) in enumerate(info.params) if kind == "tensor")
        self.plans: dict[tuple, _Plan] = {}

    def signature(self, args: tuple) -> tuple[tuple, list[int]] | None:
        """The plan key of a call whose tensors are arrays of `_CUPY_TYPES`, and their data
        pointers; None for any other call."""
        key, ptrs = [], []
        for i in self.tensor_pos:
            a = args[i]
            if type(a) not in _CUPY_TYPES:
                return None
            m = a.data
            ptrs.append(m.ptr)
            key.append((m.device_id, a.shape, a.strides, a.dtype))
        return tuple(key), ptrs

    def remember(self, args: tuple, make: Callable[[], _Plan]) -> None:
        """Keep the plan of a call whose tensors are all cupy arrays (made once per signature;
        not kept when a misaligned call would need too many blocks)."""
        types = [type(args[i]) for i in self.tensor_pos]
        if not all(t.__module__.startswith("cupy") for t in types):
            return
        _CUPY_TYPES.update(types)
        key = self.signature(args)[0]
        if key not in self.plans:
            plan = make()
            if plan.scalar_grid <= MAX_GRID:
                if len(self.plans) >= _MAX_PLANS:
                    self.plans.clear()
                self.plans[key] = plan

    def serve(self, args: tuple, out, seed, offset):
        """The result of a call run by its remembered plan; None when the plan might not run it
        as `call` would (which then runs it, or raises its error)."""
        found = self.signature(args) if len(args) == self.n_args else None
        plan = found and self.plans.get(found[0])
        if plan is None:
            return None
        devices = plan.cp.cuda
        if devices.runtime.getDevice() == plan.device:
            return _run(plan, found[1], args, out, seed, offset)
        with devices.Device(plan.device):
            return _run(plan, found[1], args, out, seed, offset)


def _run(plan: _Plan, bases: list[int], args: tuple, out, seed, offset):
    """`_Memo.serve` on the plan's device, `bases` holding the inputs' data pointers."""
    fills = []
    if plan.random:
        if type(seed) is not int or type(offset) is not int \
                or not (0 <= seed < _U64 and 0 <= offset < _U64):
            return None
        fills += (dispatch.int64_word(seed), dispatch.int64_word(offset))
    for i, name, d in plan.scalars:
        try:
            fills.append(dispatch._scalar_bits(name, args[i], d))
        except ArgumentError:
            return None
    cp = plan.cp
    if out is None:
        results = []
        for shape, storage in plan.alloc:
            a = cp.empty(shape, storage)
            results.append(a)
            bases.append(a.data.ptr)
    else:
        results = list(out) if isinstance(out, (tuple, list)) else [out]
        if not _fits(plan, bases, results):
            return None
    words, grid = plan.fill(bases, fills)
    _launch(cp, plan.function, grid, plan.block, words, cp.cuda.get_current_stream().ptr,
            plan.shared)
    return results[0] if len(results) == 1 else tuple(results)


def _fits(plan: _Plan, bases: list[int], given: list) -> bool:
    """Whether `out=` arrays surely pass `_outputs`' checks (their pointers go to `bases`):
    cupy arrays on the device, of the shapes and dtypes, C-contiguous with the usual strides,
    each overlapping no input (unless it is exactly that input) and no other output."""
    if len(given) != len(plan.outs):
        return False
    n_in = len(plan.extents)
    for o, (a, (shape, dtype, strides, nbytes)) in enumerate(zip(given, plan.outs)):
        if type(a) not in _CUPY_TYPES:
            return False
        m = a.data
        p = m.ptr
        if m.device_id != plan.device or a.shape != shape or a.strides != strides \
                or a.dtype != dtype:
            return False
        for i, (lo, hi) in enumerate(plan.extents):
            if bases[i] + lo < p + nbytes and p < bases[i] + hi \
                    and not (plan.same[i][o] and p == bases[i]):
                return False
        for k in range(o):
            if bases[n_in + k] < p + nbytes and p < bases[n_in + k] + plan.outs[k][3]:
                return False
        bases.append(p)
    return True


# ---------------------------------------------------------------- calls ------------------------

def _describe(a: DeviceArray):
    return a.shape, a.strides, a.dtype


def _tensor_names(info: dispatch.GroupInfo, args: tuple) -> list[tuple[str, object]]:
    return [(name, a) for (name, kind, _), a in zip(info.params, args) if kind == "tensor"]


def call_device(info: dispatch.GroupInfo, args: tuple) -> int:
    """The device of a call whose tensor inputs are all CUDA arrays on one device."""
    if len(args) != len(info.params):
        raise ArgumentError(f"{info.signature} takes {plural(len(info.params), 'argument')} "
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


def serve(caller, args: tuple, out, seed, offset: int):
    """The result of a call on cupy arrays like an earlier call, run by that call's plan; None
    for any other call, which `call` then runs."""
    kernels = caller.bundle._cuda
    memo = None if kernels is None else kernels.memos.get(caller.info.name)
    return None if memo is None else memo.serve(args, out, seed, offset)


def call(caller, args: tuple, out, seed, offset: int):
    """Run group `caller.info` on CUDA arrays (any, and every error); returns the output(s).
    Remembers the plans of calls on cupy arrays for `serve`."""
    info = caller.info
    device = call_device(info, args)
    cp = _cupy()
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream().ptr
        c = prepare(info, args, stream)
        if info.has_random:
            dispatch.check_seed(info.name, seed, offset)
        n = dispatch.work_count(c, info.reduces)
        empty_rows = n if info.reduces and not c.shape[-1] else 0
        kernels = caller.bundle._cuda or _attach(caller.bundle)
        kernel = kernels.find(c.key, device, empty=n == 0, empty_rows=empty_rows)
        cats = [cat for _, cat in info.outputs]
        outs, results = _outputs(cp, info, c, kernel.entry, out, args, stream)
        if n:
            c.canon = dispatch.hollow(c.canon, kernel.layouts, row_outputs(info)) if empty_rows \
                else dispatch.pad(c.canon, kernel.layouts, info.reduces)
            rank = len(c.canon.sizes)
            abi = Abi(rank, tuple(ch[0] if ch else 1 for ch in info.chunks),
                      tuple(cat[0] if cat else 1 for cat in cats), info.has_random,
                      len(c.scalars))
            words, grid, block, shared = launch_words(
                abi, c, outs, cats, kernel.layouts, kernel.entry.get("vector", 1), seed or 0,
                offset, row_outputs(info), kernel.held, kernel.limits)
            if grid > MAX_GRID:
                what = f"{n // row_length(c)} rows" if info.reduces else f"{n} elements"
                raise ArgumentError(f"{info.name}: {what} need {grid} blocks, over CUDA's "
                                    f"limit of {MAX_GRID}")
            _launch(cp, kernel.function.ptr, grid, block, words.tolist(), stream, shared)
            if not empty_rows:
                kernels.memo(info).remember(args, lambda: _plan(cp, info, c, abi, kernel, device))
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
        raise ArgumentError(f"{info.name} has {plural(len(want), 'output')} ({', '.join(names)}); "
                            f"out= gave {len(given)}")
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
