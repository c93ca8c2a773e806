"""A loaded bundle: kernels indexed by key, group callers, CPU launches."""
from __future__ import annotations

import os

import numpy as np

from ..abi import Abi
from ..argspec import parse_key
from ..errors import ArgumentError, BundleError, KernelNotFound
from . import cuda, dispatch
from .cpu import Libraries, host_isas
from .manifest import KernelEntry, kernel_entries, read_manifest, verify_artifacts


class Bundle:
    """A fusebuild bundle. Groups are attributes: `bundle.bias_gelu(x, bias)`."""

    def __init__(self, root: str, manifest: dict):
        self.root, self.manifest = root, manifest
        self.name, self.version, self.id = manifest["name"], manifest["version"], manifest["id"]
        self._index: dict[str, dict[str, KernelEntry]] = {}
        self._by_dtypes: dict[tuple, list[tuple[tuple[str, ...], str]]] = {}
        for e in kernel_entries(manifest):
            if e.key not in self._index:
                group, descs = parse_key(e.key)
                sig = (group, tuple(d for d, _ in descs))
                self._by_dtypes.setdefault(sig, []).append((tuple(lay for _, lay in descs), e.key))
            self._index.setdefault(e.key, {})[e.target] = e
        for cands in self._by_dtypes.values():   # prefer low rank, then few 's'
            cands.sort(key=lambda c: (len(c[0][0]) if c[0] else 0, "".join(c[0]).count("s"), c[1]))
        self._resolved: dict[str, KernelEntry] = {}
        self._callers = {name: GroupCaller(self, dispatch.GroupInfo.from_manifest(g, _signature(g)))
                         for name, g in manifest["groups"].items()}
        self._libs = Libraries(root)
        self._cuda: cuda.CudaKernels | None = None     # created by the first CUDA call
        self._cpu_targets = tuple(f"cpu:{isa}" for isa in reversed(host_isas()))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._callers)

    def keys(self) -> tuple[str, ...]:
        return tuple(self._index)

    def __getattr__(self, name: str) -> "GroupCaller":
        callers = self.__dict__.get("_callers", {})
        if name in callers:
            return callers[name]
        raise AttributeError(f"bundle {self.__dict__.get('name')} has no group '{name}'; groups: "
                             f"{', '.join(callers)}")

    def __getitem__(self, name: str) -> "GroupCaller":
        try:
            return self._callers[name]
        except KeyError:
            raise KeyError(f"bundle {self.name} has no group '{name}'") from None

    def __dir__(self):
        return list(super().__dir__()) + list(self._callers)

    def __repr__(self) -> str:
        return f"<fusebuild bundle {self.name}-{self.version} {self.id[:12]} ({len(self._callers)} groups)>"

    def candidates(self, key: str, empty: bool = False) -> list[str]:
        """Keys whose kernels compute a call of `key`: itself, then by `dispatch.serves`
        (for an empty call, any key of the same dtypes: no kernel runs, only output dtypes count)."""
        group, descs = parse_key(key)
        layouts = tuple(lay for _, lay in descs)
        found = [key] if key in self._index else []
        return found + [k for lays, k in self._by_dtypes.get((group, tuple(d for d, _ in descs)), [])
                        if k != key and (empty or dispatch.serves(lays, layouts))]

    def find_cpu(self, key: str, empty: bool = False) -> KernelEntry:
        """The kernel for a call of `key` at the best ISA level this host runs."""
        entry = self._resolved.get(key)
        if entry is not None:
            return entry
        for k in self.candidates(key, empty):
            entries = self._index[k]
            for target in self._cpu_targets:
                if target in entries:
                    if not empty:
                        self._resolved[key] = entries[target]
                    return entries[target]
        have = sorted({t for es in self._index.values() for t in es})
        if not any(t.startswith("cpu:") for t in have):
            raise KernelNotFound(f"bundle {self.name}-{self.version} has only CUDA kernels "
                                 f"({', '.join(have)}) and was called with CPU arrays: pass CUDA "
                                 "arrays (cupy, torch, ...) or rebuild with --target cpu", key)
        near = dispatch.nearest_keys(key, list(self._index))
        where = ", ".join(self._cpu_targets) or "no CPU ISA level (not an x86-64 host)"
        raise KernelNotFound(
            f"bundle {self.name}-{self.version} has no kernel {key} for this CPU ({where}); "
            f"bundle targets: {', '.join(have)}.\n  nearest keys present: "
            f"{', '.join(near) or 'none'}\n  to add it: {self._suggest(key)}", key, near)

    def _suggest(self, key: str) -> str:
        group, descs = parse_key(key)
        caller = self._callers.get(group)
        strided = any("s" in lay for _, lay in descs)
        names = caller.info.tensor_names if caller else []
        dmap = ", ".join(f"{n}: {d.name}" for n, (d, _) in zip(names, descs))
        return (f"in group '{group}' of your spec, add `{{{dmap}}}` under matrix.dtype and a "
                f"shape pattern of this call under matrix.shapes"
                + (" with `strided: true`" if strided else "") + ", then rebuild")


def _signature(g: dict) -> str:
    args = [i["name"] if i["kind"] == "tensor" else f"{i['name']}: {i['dtype']}"
            for i in g["inputs"]]
    if g["has_random"]:
        args += ["*", "seed", "offset=0"]
    return f"{g['name']}({', '.join(args)}) -> {', '.join(o['name'] for o in g['outputs'])}"


def _numpy_describe(a):
    return a.shape, a.strides, a.dtype


class GroupCaller:
    """Calls one group's kernels; `caller(*inputs, out=None, seed=None, offset=0)`."""

    def __init__(self, bundle: Bundle, info: dispatch.GroupInfo):
        self.bundle, self.info = bundle, info
        self.__doc__ = info.signature

    def __repr__(self) -> str:
        return f"<fusebuild group {self.info.signature}>"

    def _prepare(self, args: tuple) -> dispatch.Call:
        if len(args) != len(self.info.params):
            raise ArgumentError(f"{self.info.signature} takes {len(self.info.params)} arguments "
                                f"({len(args)} given)")
        arrays = tuple(_as_array(a, p) for a, p in zip(args, self.info.params))
        return dispatch.prepare(self.info, arrays, _numpy_describe)

    def key(self, *args) -> str:
        """The ArgSpec key these arguments select."""
        if _on_cuda(self.info, args):
            return cuda.key(self.info, args)
        return self._prepare(args).key

    def __call__(self, *args, out=None, seed=None, offset=0):
        info = self.info
        if _on_cuda(info, args):
            return cuda.call(self, args, out, seed, offset)
        call = self._prepare(args)
        if info.has_random and seed is None:
            raise ArgumentError(f"{info.name} draws random numbers: pass seed= (and offset=)")
        n = dispatch.element_count(call)
        entry = self.bundle.find_cpu(call.key, empty=n == 0)
        outs = self._outputs(call, entry, out)
        if n:
            rank = len(parse_key(entry.key)[1][0][1])
            call.canon = dispatch.pad(call.canon, rank)
            abi = Abi(rank, tuple(c[0] if c else 1 for c in info.chunks),
                      tuple(cat[0] if cat else 1 for _, cat in info.outputs), info.has_random,
                      len(call.scalars))
            ptrs = np.empty(abi.n_ptrs, np.int64)
            for i, (a, (_, _, step)) in enumerate(zip(call.arrays, call.views)):
                base = a.__array_interface__["data"][0]
                for k in range(abi.chunks[i]):
                    ptrs[abi.in_ptr(i, k)] = base + k * step * a.itemsize
            for o, (arr, (_, cat)) in enumerate(zip(outs, info.outputs)):
                base = arr.__array_interface__["data"][0]
                step = 0
                if cat:
                    axis = cat[1] + arr.ndim if cat[1] < 0 else cat[1]
                    step = arr.shape[axis] // cat[0] * arr.strides[axis]
                for k in range(abi.parts[o]):
                    ptrs[abi.out_ptr(o, k)] = base + k * step
            meta = dispatch.meta_words(call, abi, seed or 0, offset)
            fn = self.bundle._libs.function(entry.file, entry.symbol)
            fn(ptrs.ctypes.data, meta.ctypes.data, 0, n)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _outputs(self, call: dispatch.Call, entry: KernelEntry, out) -> list[np.ndarray]:
        from .. import dtypes as dt
        want = [(shape, dt.lookup(d).numpy) for shape, d in zip(call.out_shapes, entry.outputs)]
        names = [n for n, _ in self.info.outputs]
        if out is None:
            return [np.empty(s, d) for s, d in want]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(outs) != len(want):
            raise ArgumentError(f"{self.info.name} has {len(want)} outputs ({', '.join(names)}); "
                                f"out= gave {len(outs)}")
        for name, o, (shape, d) in zip(names, outs, want):
            if not isinstance(o, np.ndarray):
                raise ArgumentError(f"out= for '{name}' must be a numpy array, got {type(o).__name__}")
            if o.shape != tuple(shape) or o.dtype != d:
                raise ArgumentError(f"out= for '{name}' must be {np.dtype(d).name}{list(shape)}, got "
                                    f"{o.dtype.name}{list(o.shape)}")
            if not o.flags.c_contiguous or not o.flags.writeable:
                raise ArgumentError(f"out= for '{name}' must be a writeable C-contiguous array")
            for a, tname in zip(call.arrays, self.info.tensor_names):
                if np.may_share_memory(o, a) and not _same_memory(o, a):
                    raise ArgumentError(f"out= for '{name}' overlaps input '{tname}' without being "
                                        "the same array; only exact in-place updates are allowed")
        for i, o in enumerate(outs):
            for o2 in outs[i + 1:]:
                if np.may_share_memory(o, o2):
                    raise ArgumentError("out= arrays overlap each other")
        return outs


def _same_memory(out: np.ndarray, a: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and a.shape == out.shape and a.strides == out.strides)


def _as_array(a, param):
    if param[1] == "scalar" or isinstance(a, np.ndarray):
        return a
    return np.asarray(a)


def _on_cuda(info: dispatch.GroupInfo, args: tuple) -> bool:
    """Whether a call goes to the CUDA kernels: some tensor argument is a CUDA array."""
    return any(kind == "tensor" and cuda.is_cuda_array(a)
               for (_, kind, _), a in zip(info.params, args))


def load(path: str) -> Bundle:
    """Open a bundle directory: check its format and every artifact's hash, index its kernels."""
    root = os.path.abspath(path)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest)
    return Bundle(root, manifest)


__all__ = ["Bundle", "GroupCaller", "load", "BundleError", "KernelNotFound"]
