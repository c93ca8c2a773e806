"""Compile generated CUDA source for the host (g++ with emu.h) and launch its kernels on numpy
arrays through the runtime's own host-side launch code (`fusebuild.runtime.cuda`)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from fusebuild import dtypes as dt, ir, syntax
from fusebuild.abi import Abi
from fusebuild.argspec import parse_key
from fusebuild.codegen.common import KernelSource
from fusebuild import sass
from fusebuild.codegen.cuda import held_itemsizes, vector_width
from fusebuild.runtime import cuda, dispatch

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = os.environ.get("CXX", "g++")
SM = 90                    # the device whose shared-memory budget the emulated launches get
CXXFLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-w")
# compiled emulation libraries, by content, beside the compile cache (tests/conftest.py)
CACHE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "test-cache", "emulation")


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


def compile_source(text: str, out_dir: str, name: str, flags: tuple[str, ...] = (),
                   traffic: bool = False) -> ctypes.CDLL:
    """g++ `text` (which includes emu.h) into out_dir/name.so (extra g++ `flags`) and load it;
    with `traffic`, the library counts each launch's global-memory bytes (`Launch.traffic`):
    compiled with ThreadSanitizer's instrumentation, whose hooks emu.h defines, and linked
    without its runtime. Libraries are cached by content (source, emu.h, compiler and flags) in
    the checkout's test cache, so a source several tests emulate is compiled once; each call
    loads its own copy (no state shared between loaded libraries)."""
    src, so = os.path.join(out_dir, f"{name}.cc"), os.path.join(out_dir, f"{name}.so")
    with open(src, "w") as f:
        f.write(text)
    obj = so[:-3] + ".o"
    steps = [[CXX, *CXXFLAGS, *flags, "-fsanitize=thread", "-DFB_EMU_TRAFFIC", "-c", f"-I{HERE}",
              "-o", obj, src], [CXX, *CXXFLAGS, "-o", so, obj]] if traffic else \
        [[CXX, *CXXFLAGS, *flags, f"-I{HERE}", "-o", so, src]]
    cached = os.path.join(CACHE, _library_key(text, flags, traffic) + ".so")
    if os.path.isfile(cached):
        shutil.copyfile(cached, so)
        return ctypes.CDLL(so)
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"g++ failed on {src}:\n{proc.stderr[-4000:]}")
    os.makedirs(CACHE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE, prefix=".tmp-")
    os.close(fd)
    shutil.copyfile(so, tmp)
    os.replace(tmp, cached)      # atomic: concurrent sessions never load half a library
    return ctypes.CDLL(so)


def device_limits(sm: int, static: int = 0) -> cuda.SharedLimits:
    """The `runtime.cuda.SharedLimits` of an SM of `fusebuild.sass.SM_LIMITS` (the documented
    per-architecture values) for a kernel of `static` bytes of static shared memory."""
    lim = sass.SM_LIMITS[sm]
    return cuda.SharedLimits(lim.optin, lim.shared, lim.threads, lim.blocks,
                             sass.SHARED_RESERVED, static)


@functools.lru_cache(maxsize=None)
def _compiler_identity() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout


def _library_key(text: str, flags: tuple[str, ...], traffic: bool) -> str:
    """sha256 of what a compiled library depends on: its source, emu.h, the compiler, its
    flags and whether it counts traffic."""
    h = hashlib.sha256(_compiler_identity().encode())
    with open(os.path.join(HERE, "emu.h"), "rb") as f:
        h.update(f.read())
    h.update(repr((CXX, CXXFLAGS, flags, traffic)).encode())
    h.update(text.encode())
    return h.hexdigest()


def launchers(symbols: list[str]) -> str:
    """One host launcher per kernel symbol (with its threads per block and dynamic shared memory
    bytes), and the size of its parameter struct."""
    return "\n".join(
        f'extern "C" int emu_{s}(const long long *w, unsigned grid, unsigned block, '
        f"unsigned long long shared) {{\n"
        f"  return fb_emulate_dynamic({s}, w, grid, block, shared); }}\n"
        f'extern "C" unsigned long long emu_bytes_{s}(void) {{ return fb_param_bytes({s}); }}'
        for s in symbols)


class EmulationError(RuntimeError):
    """A launch the emulator stopped: a deadlock, or a CUDA feature used outside what it
    emulates."""


def run_kernel(lib: ctypes.CDLL, symbol: str, words: int, grid: int, block: int = cuda.BLOCK,
               shared: int = 0) -> None:
    """Launch kernel `symbol` of an emulation library on `grid` blocks of `block` threads with
    `shared` bytes of dynamic shared memory, its parameter words at address `words`; raises
    EmulationError with the emulator's reason when it stops."""
    launch = getattr(lib, f"emu_{symbol}")
    launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong]
    launch.restype = ctypes.c_int
    if launch(words, grid, block, shared):
        lib.fb_emu_error.restype = ctypes.c_char_p
        raise EmulationError(f"{symbol}: {lib.fb_emu_error().decode()}")


@dataclass
class Traffic:
    """Global-memory bytes of one launch, per operand (the tensor inputs, then the outputs)."""
    loaded: list[int]
    stored: list[int]
    distinct: list[int]       # bytes loaded at least once
    needed: list[int]         # the operand's bytes; 0 for an input the kernel never loads
    broadcast: list[bool]     # an input the kernel broadcasts (a 'b' in its layout)

    @property
    def ideal(self) -> int:
        """Each byte of every input the kernel needs read once (a broadcast input at its own
        size), each output byte written once."""
        return sum(self.needed)

    @property
    def measured(self) -> int:
        """Every byte loaded and stored, but a broadcast input counted by its distinct bytes:
        its re-reads by the threads of other rows hit the caches on a GPU (the emulator has
        none), while a thread reading the same bytes again (a reduction's next pass) counts."""
        return sum((d if b else ld) + st for ld, st, d, b in
                   zip(self.loaded, self.stored, self.distinct, self.broadcast))

    @property
    def ratio(self) -> float:
        return self.measured / self.ideal


@dataclass
class Launch:
    key: str              # the kernel that ran
    flags: int
    outputs: list[np.ndarray]
    shared: int = 0                   # dynamic shared memory bytes
    traffic: Traffic | None = None    # from a library compiled with traffic=True
    block: int = cuda.BLOCK           # threads per block


class EmulatedGroup:
    """One group's kernels compiled for the host, called like the CUDA runtime calls them."""

    def __init__(self, group: syntax.Group, kernels: list[KernelSource], lib: ctypes.CDLL,
                 sm: int = SM):
        self.group, self.lib, self.limits = group, lib, device_limits(sm)
        self.kernels = {ks.key: ks for ks in kernels}
        self.info = dispatch.GroupInfo.from_manifest(group.to_json())
        for ks in kernels:
            getattr(lib, f"emu_bytes_{ks.symbol}").restype = ctypes.c_ulonglong
        self.counts_traffic = hasattr(lib, "fb_emu_traffic_start")
        if self.counts_traffic:
            lib.fb_emu_traffic_start.argtypes = [ctypes.c_uint, ctypes.c_void_p]
            lib.fb_emu_traffic_counts.argtypes = [ctypes.c_void_p]

    def resolve(self, key: str, empty_rows: int = 0) -> str:
        """The kernel the runtime picks for a call of `key` (same rules as Bundle.candidates;
        for `empty_rows` rows of N = 0 any of the dtypes, of rank >= 2 for several rows)."""
        if key in self.kernels and not empty_rows:
            return key
        group, descs = parse_key(key)
        layouts = tuple(lay for _, lay in descs)
        fits = [k for k, ks in self.kernels.items()
                if [d for d, _ in parse_key(k)[1]] == [d for d, _ in descs]
                and (dispatch.serves(ks.layouts, layouts, self.info.reduces) if not empty_rows
                     else empty_rows == 1 or ks.rank >= 2)]
        fits.sort(key=lambda k: (not _keeps_inner(self.kernels[k].layouts, layouts),
                                 self.kernels[k].rank,
                                 "".join(self.kernels[k].layouts).count("s"), k))
        if not fits:
            raise LookupError(f"no kernel serves {key}")
        return fits[0]

    def __call__(self, args: list, seed: int = 0, offset: int = 0, flags=None,
                 start: int = 0) -> Launch:
        """Run on numpy arrays; `flags(host_flags) -> flags` may override the host's choice.

        A `start` (a multiple of the element count, or of the work count rows * max(N, 1) of a
        reduction) runs elements [start, start + n) with every pointer moved back by the offset
        of element (row) `start`: the same results, computed from element indices, row indices
        and offsets beyond 32 bits.
        """
        described = tuple(_host(a) if kind == "tensor" else a
                          for (_, kind, _), a in zip(self.info.params, args))
        call = dispatch.prepare(self.info, described, lambda a: (a.shape, a.strides, a.dtype))
        reduces = self.info.reduces
        n = dispatch.work_count(call, reduces)
        empty_rows = n if reduces and not call.shape[-1] else 0
        key = self.resolve(call.key, empty_rows)
        ks = self.kernels[key]
        outs = [np.empty(shape, o.dtype.numpy)
                for shape, o in zip(call.out_shapes, ks.kernel.outputs)]
        if not n:
            return Launch(key, 0, outs)
        call.canon = dispatch.hollow(call.canon, ks.layouts, cuda.row_outputs(self.info)) \
            if empty_rows else dispatch.pad(call.canon, ks.layouts, reduces)
        abi: Abi = ks.abi
        vector = vector_width(ks)
        held = tuple(held_itemsizes(ks))
        words, _, _, _ = cuda.launch_words(abi, call, [_host(o) for o in outs],
                                           [cat for _, cat in self.info.outputs], ks.layouts,
                                           vector, seed, offset, cuda.row_outputs(self.info),
                                           held, self.limits)
        if flags is not None:
            words[-1] = flags(int(words[-1]))
        shared = cuda.shared_bytes(call.shape[-1] if reduces else 0, held, int(words[-1]))
        block = cuda.block_threads(call.shape[-1], int(words[-1])) if reduces else cuda.BLOCK
        if start:
            _shift(words, ks, call, outs, [cat for _, cat in self.info.outputs], start, n,
                   reduces)
        grid = cuda.grid_size(n, vector, int(words[-1]), cuda.row_length(call) if reduces else 0)
        assert getattr(self.lib, f"emu_bytes_{ks.symbol}")() == words.nbytes
        if self.counts_traffic:
            return Launch(key, int(words[-1]), outs, shared,
                          self._counted(ks, call, outs, words, grid, block, shared), block)
        run_kernel(self.lib, ks.symbol, words.ctypes.data, grid, block, shared)
        return Launch(key, int(words[-1]), outs, shared, block=block)

    def _counted(self, ks: KernelSource, call: dispatch.Call, outs: list[np.ndarray],
                 words: np.ndarray, grid: int, block: int, shared: int) -> Traffic:
        """Run the launch counting its traffic per operand (each array's byte extent)."""
        operands, n_in = [*call.arrays, *map(_host, outs)], len(call.arrays)
        read = {node.attr[0] for node in ks.kernel.nodes if node.op == "load"}
        touched = [np.zeros(a.extent[1] - a.extent[0], np.uint8) for a in operands]
        ranges = np.array([(*a.extent, t.ctypes.data) for a, t in zip(operands, touched)],
                          np.uint64)
        counts = np.zeros((len(operands), 2), np.uint64)
        self.lib.fb_emu_traffic_start(len(operands), ranges.ctypes.data)
        try:
            run_kernel(self.lib, ks.symbol, words.ctypes.data, grid, block, shared)
        finally:
            self.lib.fb_emu_traffic_counts(counts.ctypes.data)
            self.lib.fb_emu_traffic_start(0, None)
        return Traffic([int(c) for c in counts[:, 0]], [int(c) for c in counts[:, 1]],
                       [int(np.count_nonzero(t)) for t in touched],
                       [math.prod(a.shape) * a.dtype.itemsize * (i in read or i >= n_in)
                        for i, a in enumerate(operands)],
                       ["b" in lay for lay in ks.layouts] + [False] * len(outs))


def _shift(words: np.ndarray, ks: KernelSource, call: dispatch.Call, outs: list, cats: list,
           start: int, n: int, reduces: bool) -> None:
    """Make a launch over [0, n) compute [start, start + n) of a grid `start // n` times taller:
    move each pointer back by `start // n * size[0]` times the stride the kernel applies to the
    outermost dim (its layout letter decides: 'b' 0, inner 'c' of rank 1 1, plain outputs
    dense; the outer dim of a reduction kernel, whose rank is >= 2, is never the inner one)."""
    abi, sizes = ks.abi, call.canon.sizes
    assert abi.rank > reduces and start % n == 0
    rows = start // n * sizes[0]
    letters = [lay[0] for lay in ks.layouts] + ["s" if cat or reduces else "d" for cat in cats]
    itemsizes = [a.dtype.itemsize for a in call.arrays] + [o.itemsize for o in outs]
    slots = [[abi.in_ptr(i, k) for k in range(c)] for i, c in enumerate(abi.chunks)]
    slots += [[abi.out_ptr(o, k) for k in range(c)] for o, c in enumerate(abi.parts)]
    for op, (letter, size, op_slots) in enumerate(zip(letters, itemsizes, slots)):
        stride = {"b": 0, "d": math.prod(sizes[1:]),
                  "c": 1 if abi.rank == 1 else call.canon.strides[op][0]}.get(
                      letter, call.canon.strides[op][0])
        for slot in op_slots:
            words[slot] -= rows * stride * size
    words[abi.n_ptrs + abi.n_meta:abi.n_ptrs + abi.n_meta + 2] = (start, start + n)


def _keeps_inner(kernel_layouts: tuple[str, ...], call_layouts: tuple[str, ...]) -> bool:
    dims = dispatch.placement(kernel_layouts, call_layouts)
    return not dims or dims[-1] == len(kernel_layouts[0]) - 1


def _host(a: np.ndarray) -> cuda.DeviceArray:
    """A numpy array seen as 'device' memory by the emulated kernels."""
    return cuda.DeviceArray(a.ctypes.data, a.shape, a.strides, a.dtype, 0, a)


def kernel_sources(group: syntax.Group, variants) -> list[KernelSource]:
    names = [i.name for i in group.tensor_inputs]
    return [KernelSource(ir.instantiate(group, dict(zip(names, v.dtypes))), v.key)
            for v in variants]


def dtype_map(group: syntax.Group, dtypes) -> dict[str, dt.DType]:
    return {i.name: d for i, d in zip(group.tensor_inputs, dtypes)}
