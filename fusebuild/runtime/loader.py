"""A loaded bundle: kernels indexed by key, group callers, CPU launches, the miss loop."""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import dtypes as dt
from ..abi import Abi
from ..artifact import check_description, implied, output_dtypes, read_description
from ..argspec import contiguous_strides, parse_key
from ..errors import ArgumentError, BundleError, KernelNotFound
from ..text import plural
from . import dispatch, hints, interop, threads
from . import _dispatch
from ._dispatch import Caller
from .cpu import FAMILY_NAMES, Libraries, host_family, host_isas, no_level_reason
from .interop import is_cuda_array
from .manifest import (KernelEntry, group_ir, kernel_entries, kernel_file, NotRegularFile,
                       open_regular_file, read_artifact, read_manifest, verify_artifacts)

if TYPE_CHECKING:
    from . import cuda      # imported when the first CUDA array is seen (`_on_cuda`)

ON_MISS = ("error", "jit")
ID_ENV = "FUSEBUILD_BUNDLE_ID"     # pins the id of the bundles runtime.load accepts
_MAX_PLANS = 4096          # memoized call plans per group; cleared beyond this


class Bundle:
    """A fusebuild bundle. Groups are attributes: `bundle.bias_gelu(x, bias)`."""

    def __init__(self, root: str, manifest: dict, on_miss: str = "error"):
        if on_miss not in ON_MISS:
            raise ArgumentError(f"on_miss must be one of {', '.join(ON_MISS)}, got {on_miss!r}")
        self.root, self.manifest, self.on_miss = root, manifest, on_miss
        self.name, self.version, self.id = manifest["name"], manifest["version"], manifest["id"]
        self._index: dict[str, dict[str, KernelEntry]] = {}
        self._files: dict[str, list[KernelEntry]] = {}       # the kernels of each artifact
        self._descriptions: dict[str, bytes] = {}
        self._by_dtypes: dict[tuple, list[tuple[tuple[str, ...], str]]] = {}
        for e in kernel_entries(manifest):
            self._add(e, sort=False)
        for cands in self._by_dtypes.values():
            cands.sort(key=_preference)
        self._resolved: dict[str, KernelEntry] = {}
        self._missed: dict[tuple[str, bool], KernelNotFound] = {}   # (key, empty) -> error
        self._callers = {name: GroupCaller(self, dispatch.GroupInfo.from_manifest(g))
                         for name, g in manifest["groups"].items()}
        self._libs = Libraries(root, manifest["artifacts"])
        self._groups_ir: dict[str, object] = {}
        self._outputs: dict[tuple[str, str], tuple[dt.DType, ...]] = {}    # by (file, key)
        self._cuda: cuda.CudaKernels | None = None     # created by the first CUDA call
        self._cpu_targets = tuple(f"cpu:{isa}" for isa in reversed(host_isas()))
        self.threads = threads.configured_threads()
        self._jit_lock = threading.Lock()
        for name, caller in self._callers.items():     # plain attributes: no __getattr__ per call
            if name not in self.__dict__ and not hasattr(type(self), name):
                setattr(self, name, caller)

    def _add(self, e: KernelEntry, sort: bool = True) -> None:
        self._files.setdefault(e.file, []).append(e)
        if e.key not in self._index:
            group, descs = parse_key(e.key)
            cands = self._by_dtypes.setdefault((group, tuple(d for d, _ in descs)), [])
            cands.append((tuple(lay for _, lay in descs), e.key))
            if sort:
                cands.sort(key=_preference)
        self._index.setdefault(e.key, {})[e.target] = e

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
        return sorted(set(super().__dir__()) | set(self._callers))

    def __repr__(self) -> str:
        return (f"<fusebuild bundle {self.name}-{self.version} {self.id[:12]} "
                f"({plural(len(self._callers), 'group')})>")

    def group_ir(self, group: str):
        """The IR (`syntax.Group`) of a group of the manifest, checked against its JSON once
        (for the torch adapter; calls need no IR)."""
        if group not in self._groups_ir:
            self._groups_ir[group] = group_ir(self.manifest["groups"][group])
        return self._groups_ir[group]

    def description(self, rel: str) -> bytes:
        """The description artifact `rel` embeds (DESIGN §14), read from its sha256-checked
        bytes and checked against the one its manifest entries and their group's JSON imply
        (`artifact.implied`), once: the output dtypes and held sizes of its kernels come from
        it, and the bytes a kernel is later loaded from must carry it too."""
        found = self._descriptions.get(rel)
        if found is None:
            kernels = self._files[rel]
            where, name, size = kernel_file(self.root, self.manifest["artifacts"], rel)
            found = read_description(read_artifact(where, name, kernels[0].sha256, size), rel)
            check_description(found, rel, implied(self.manifest["groups"][kernels[0].group],
                                                  [(e.key, e.outputs) for e in kernels],
                                                  kernels[0].target, found))
            self._descriptions[rel] = found
        return found

    def held(self, rel: str, key: str) -> tuple[int, ...]:
        """Bytes per element of each input CUDA kernel `key` of file `rel` holds in dynamic shared
        memory (HELD launches are sized by them): from the checked description of `rel`. Not a
        manifest field: an edit could shrink a launch's shared memory below what the kernel
        writes."""
        kernels = json.loads(self.description(rel))["kernels"]
        return tuple(next(k["held"] for k in kernels if k["key"] == key))

    def torch_library(self, namespace: str):
        """Register every group as the torch custom op `torch.ops.<namespace>.<group>`, with a
        fake implementation and, where the bundle holds `<group>__grad`, autograd (DESIGN §9);
        returns an object whose attributes are the ops. Imports torch."""
        from .torch_ops import torch_library
        return torch_library(self, namespace)

    def output_dtypes(self, file: str, key: str) -> tuple[dt.DType, ...]:
        """The output dtypes of kernel `key` of artifact `file` (outputs are allocated from
        these), from the artifact's checked description."""
        found = self._outputs.get((file, key))
        if found is None:
            found = self._outputs[(file, key)] = tuple(
                dt.BY_NAME[d] for d in output_dtypes(self.description(file), key))
        return found

    def typed_outputs(self, group: str,
                      inputs: tuple[dt.DType, ...]) -> tuple[dt.DType, ...] | None:
        """The output dtypes of `group` for input dtypes `inputs`, from the checked description
        of a kernel of those dtypes; None when the bundle has none."""
        found = self._by_dtypes.get((group, inputs))
        if not found:
            return None
        key = found[0][1]
        return self.output_dtypes(next(iter(self._index[key].values())).file, key)

    def candidates(self, key: str, empty: bool = False, hollow: bool = False) -> list[str]:
        """Keys whose kernels compute a call of `key`: itself, then by `dispatch.placement`,
        those that keep the call's inner dim inner first (for an empty call, any key of the same
        dtypes: no kernel runs, only output dtypes count). A reduction group's call keeps its
        reduced (last) dim on the kernel's last dim; a `hollow` one (rows of N = 0: the kernel
        reads no input, only writes row outputs) runs on any key of its dtypes and at least its
        rank."""
        group, descs = parse_key(key)
        layouts = tuple(lay for _, lay in descs)
        caller = self._callers.get(group)
        keep_last = caller is not None and caller.info.reduces
        found = [key] if key in self._index else []
        fits = []
        for lays, k in self._by_dtypes.get((group, tuple(d for d, _ in descs)), []):
            if empty or hollow:
                dims = () if not hollow or len(lays[0]) >= len(layouts[0]) else None
            else:
                dims = dispatch.placement(lays, layouts, keep_last)
            if k != key and dims is not None:
                fits.append((bool(dims) and dims[-1] != len(lays[0]) - 1, k))
        return found + [k for _, k in sorted(fits, key=lambda fit: fit[0])]

    def find_cpu(self, key: str, empty: bool = False, hollow: bool = False) -> KernelEntry:
        """The kernel for a call of `key` at the best ISA level this host runs; on a miss,
        logs it (FUSEBUILD_MISS_LOG) and compiles it when on_miss="jit". A miss is looked up,
        logged and compiled (or refused) once: later calls of the key get the same answer.
        `empty` and `hollow` as in `candidates`."""
        entry = self._resolved.get(key)
        if entry is not None:
            return entry
        missed = self._missed.get((key, empty or hollow))
        if missed is not None:
            raise _again(missed)
        for k in self.candidates(key, empty, hollow):
            entries = self._index[k]
            for target in self._cpu_targets:
                if target in entries:
                    if not (empty or hollow):
                        self._resolved[key] = entries[target]
                    return entries[target]
        error = self.fixed_dtype_error(key)
        if error is None:
            self.log_miss(key, self._cpu_targets[0] if self._cpu_targets else None)
            if self.on_miss == "jit" and self._cpu_targets:
                try:
                    return self._jit(key)
                except KernelNotFound as e:
                    error = e
            else:
                error = self._not_found(key, empty)
        self._missed[(key, empty or hollow)] = error
        raise _again(error)

    def fixed_dtype_error(self, key: str) -> KernelNotFound | None:
        """The error for a call passing a fixed-dtype input (`tensor(bool)`) another dtype: no
        rebuild adds such a kernel, so it is neither logged nor compiled."""
        group, descs = parse_key(key)
        caller = self._callers.get(group)
        tensors = [(n, d) for n, k, d in caller.info.params if k == "tensor"] if caller else []
        wrong = [f"'{n}' is declared tensor({d}) and was passed {got.name}"
                 for (n, d), (got, _) in zip(tensors, descs) if d and got.name != d]
        if not wrong:
            return None
        fix = ", ".join(f"{n}.astype({d})" for (n, d), (got, _) in zip(tensors, descs)
                        if d and got.name != d)
        return KernelNotFound(f"{group}: input {'; input '.join(wrong)}; the spec fixes that "
                              f"dtype, so no rebuild adds {key}: pass {fix}", key)

    def _not_found(self, key: str, empty: bool = False,
                   converted: tuple[tuple[str, str, str], ...] = ()) -> KernelNotFound:
        """The error for a CPU call of `key` that no kernel serves; `converted` names inputs
        numpy made arrays of (Python lists or numbers): (input, Python type, dtype numpy gave)."""
        have = sorted({t for es in self._index.values() for t in es})
        if not any(t.startswith("cpu:") for t in have):
            return KernelNotFound(f"bundle {self.name}-{self.version} has only CUDA kernels "
                                  f"({', '.join(have)}) and was called with CPU arrays: pass CUDA "
                                  "arrays (cupy, torch, ...) or rebuild with --target cpu", key)
        where = ", ".join(self._cpu_targets) or no_level_reason()
        levels = sorted({t for k in self.candidates(key, empty) for t in self._index[k]
                         if t.startswith("cpu:")})
        if levels:
            forced = os.environ.get("FUSEBUILD_CPU_ISA")
            cap = f", capped by FUSEBUILD_CPU_ISA={forced}" if forced else ""
            if self._cpu_targets:
                family = FAMILY_NAMES[host_family()]
                fix = (f"the key and dtypes are fine: rebuild with `--target cpu:{family}` "
                       f"(every {family} level) or `--target {self._cpu_targets[0]}`")
            else:
                fix = "no CPU kernel of fusebuild runs here: call it with CUDA arrays instead"
            return KernelNotFound(
                f"bundle {self.name}-{self.version} has {key} only for {', '.join(levels)}, "
                f"which this CPU cannot run (it runs {where}{cap}); {fix}", key)
        near = dispatch.nearest_keys(key, list(self._index))
        fix = f"to fix it: {self._convert_hint(key, converted)}" if converted else \
            f"to add it: {self._suggest(key)}"
        return KernelNotFound(
            f"bundle {self.name}-{self.version} has no kernel {key} for this CPU ({where}); "
            f"bundle targets: {', '.join(have)}.\n  nearest keys present: "
            f"{', '.join(near) or 'none'}\n  {fix}", key, near)

    def _suggest(self, key: str) -> str:
        return hints.matrix_change({n: c.info for n, c in self._callers.items()},
                                   self._by_dtypes, key)

    def _convert_hint(self, key: str, converted: tuple[tuple[str, str, str], ...]) -> str:
        """What to pass instead of Python lists or numbers: arrays of the bundle's dtypes."""
        group, _ = parse_key(key)
        names = self._callers[group].info.tensor_names
        have = [dtypes for g, dtypes in self._by_dtypes if g == group]
        hints = []
        for name, kind, made in converted:
            i = names.index(name)
            options = sorted({ds[i].name for ds in have}, key=lambda n: dt.lookup(n).bits)
            pick = "float32" if "float32" in options else (options or [made])[0]
            hints.append(f"input '{name}' is a Python {kind}, which numpy made {made}; pass "
                         f"np.asarray({name}, np.{pick})"
                         + (f" (the bundle has {', '.join(options)})" if options else ""))
        return "; ".join(hints)

    def log_miss(self, key: str, target: str | None) -> None:
        """Append a miss to FUSEBUILD_MISS_LOG, if set: once per log, bundle, key and target
        in a process."""
        path = os.environ.get("FUSEBUILD_MISS_LOG")
        if not path:
            return
        record = {"bundle": self.name, "version": self.version, "id": self.id,
                  "group": parse_key(key)[0], "key": key, "target": target,
                  "on_miss": self.on_miss}
        seen = (os.path.abspath(path), self.id, key, target)
        with _LOGGED_LOCK:
            if seen in _LOGGED or seen[0] in _REFUSED:
                return
            try:
                fd = open_regular_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                with os.fdopen(fd, "a", encoding="utf-8") as f:    # one short append: atomic
                    f.write(json.dumps(record) + "\n")
            except NotRegularFile as e:
                warnings.warn(f"FUSEBUILD_MISS_LOG={path} is {e.strerror}: misses are not "
                              "logged there", RuntimeWarning)
                _REFUSED.add(seen[0])
            except OSError as e:
                raise BundleError(f"cannot append to FUSEBUILD_MISS_LOG={path}: "
                                  f"{e.strerror}") from None
            _LOGGED.add(seen)

    def compile_missing(self, key: str, target: str) -> dict:
        """Compile a missing kernel for `target` in a child process (build extras needed): its
        manifest-style entry, with an absolute file. Raises KernelNotFound saying why not."""
        import subprocess
        from .archive import cache_home
        group = parse_key(key)[0]
        request = {"group": self.manifest["groups"][group], "key": key, "target": target,
                   "out_dir": os.path.join(cache_home(), "jit", self.id)}
        proc = subprocess.run([sys.executable, "-m", "fusebuild.jit"], text=True,
                              input=json.dumps(request), capture_output=True)
        try:
            reply = json.loads(proc.stdout)
        except ValueError:
            reply = {"error": proc.stderr.strip()[-2000:] or f"exit code {proc.returncode}"}
        if "entry" in reply:
            return reply["entry"]
        missing = f"{key} is not in bundle {self.name}-{self.version}"
        if reply.get("kind") == "type":
            raise KernelNotFound(f"{missing}, and group '{group}' does not type-check for "
                                 f"these dtypes, so no kernel can be compiled for it: "
                                 f"{reply['error']}", key)
        if reply.get("kind") == "extras":
            raise KernelNotFound(f"{missing}; on_miss='jit' compiles it on the fly, which needs "
                                 f"the build extras (`pip install 'fusebuild[build]'`): "
                                 f"{reply['error']}", key)
        raise KernelNotFound(f"{missing}, and compiling it on the fly failed (target {target}):"
                             f"\n{reply['error']}", key)

    def _jit(self, key: str) -> KernelEntry:
        """Compile a missing CPU kernel at the host's best ISA level and index it."""
        with self._jit_lock:
            if key in self._resolved:
                return self._resolved[key]
            entry = self.add_compiled(self.compile_missing(key, self._cpu_targets[0]))
            self._resolved[key] = entry
            return entry

    def add_compiled(self, e: dict) -> KernelEntry:
        """Index the entry of a kernel compiled on the fly (`compile_missing`)."""
        entry = KernelEntry(e["key"], e["group"], e["target"], e["file"], e["symbol"],
                            e["sha256"], tuple(e["outputs"]))
        self._add(entry)
        return entry


_LOGGED: set[tuple] = set()      # (log, bundle id, key, target) appended by this process
_REFUSED: set[str] = set()       # logs that are not regular files (warned about once)
_LOGGED_LOCK = threading.Lock()


def _again(error: KernelNotFound) -> KernelNotFound:
    """A fresh copy of a remembered miss (raising one instance twice chains tracebacks)."""
    return KernelNotFound(str(error), error.key, error.nearest)


def _preference(candidate: tuple) -> tuple:
    """Among kernels that serve a call: low rank first, then few 's' letters."""
    layouts, key = candidate
    return len(layouts[0]) if layouts else 0, "".join(layouts).count("s"), key


def _numpy_describe(a):
    return a.shape, a.strides, a.dtype


def _address(a: np.ndarray) -> int:
    """Data pointer of a numpy array (the buffer protocol is ~4x faster than ctypes/interface)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):    # read-only or non-contiguous views
        return a.__array_interface__["data"][0]


@dataclass
class _Plan:
    """What a CPU call with given shapes, strides and dtypes needs, computed once."""
    entry: KernelEntry
    fn: object                     # ctypes function
    n: int                         # work range [0, n): elements, rows * max(N, 1) if reducing
    in_ptrs: tuple                 # (tensor argument index, byte offset) per input pointer
    outs: tuple                    # (shape, numpy dtype, nbytes) per output
    out_ptrs: tuple                # (output index, byte offset) per output pointer
    ptr_type: type                 # ctypes array type of the pointer words
    meta: object                   # ctypes array of the meta words (seed/scalars zero)
    seed_slot: int | None
    scalar_slots: tuple[int, ...]
    lo: tuple[int, ...]            # per tensor input: byte extent around its data pointer
    hi: tuple[int, ...]
    same: tuple                    # same[i][o]: input i laid out exactly like output o

    def __post_init__(self):
        self.parallel = self.n >= 2 * threads.MIN_PER_THREAD
        self.start, self.stop = ctypes.c_int64(0), ctypes.c_int64(self.n)

    def fast(self, scalars: tuple, outs: tuple | None = None) -> tuple | None:
        """The arguments of `Caller._remember` (after the arrays) that let the C fast path
        serve this plan; None for calls split over threads, which stay in Python. `outs`
        replaces `self.outs` (torch dtypes for calls on torch tensors)."""
        if self.parallel:
            return None
        n_in = len(self.same)
        src = [i for i, _ in self.in_ptrs] + [n_in + o for o, _ in self.out_ptrs]
        words = []
        for slot, (_, _, d) in zip(self.scalar_slots, scalars):
            kind = ((_F64 if d == dt.float64 else _F32) if d.is_float
                    else _BOOL if d.is_bool else _INT)
            lo, hi = dispatch.int_range(d) if kind == _INT else (0, 0)
            words += [slot, kind, lo, min(hi, (1 << 63) - 1)]
        return (ctypes.cast(self.fn, ctypes.c_void_p).value if self.n else 0, self.n, src,
                [off for _, off in self.in_ptrs + self.out_ptrs], list(self.meta), words,
                -1 if self.seed_slot is None else self.seed_slot, outs or self.outs, self.lo,
                self.hi,
                [int(x) for row in self.same for x in row], self.fn)


_F32, _F64, _INT, _BOOL = range(4)      # scalar kinds of _dispatch.c


def _plan_key(tensors: list) -> tuple:
    """What a plan depends on (in Python; _dispatch.c keys its table the same way)."""
    return tuple(v for a in tensors for v in (a.shape, a.strides, a.dtype))


class GroupCaller(Caller):
    """Calls one group's kernels: `caller(*inputs, out=None, seed=None, offset=0)`.

    A call whose numpy arrays have shapes, strides and dtypes seen before is served in C by the
    base class (`_dispatch.Caller`); every other call comes to `_call`.
    """

    def __init__(self, bundle: Bundle, info: dispatch.GroupInfo):
        self.bundle, self.info = bundle, info
        self.__doc__ = info.signature
        self._tensor_pos = tuple(i for i, (_, k, _) in enumerate(info.params) if k == "tensor")
        self._scalars = tuple((i, n, dt.lookup(d)) for i, (n, k, d) in enumerate(info.params)
                              if k == "scalar")
        self._plans: dict[tuple, _Plan] = {}
        # row outputs are stored after a row's passes, before its last sweep re-reads the
        # inputs: never in place of an input
        self._row_outs = info.row_outputs or (False,) * len(info.outputs)
        super().__init__(info.name, len(info.params), self._tensor_pos,
                         tuple(i for i, _, _ in self._scalars), len(info.outputs), info.has_random)

    def __repr__(self) -> str:
        return f"<fusebuild group {self.info.signature}>"

    def _call_named(self, args: tuple, kwargs: dict):
        """A call passing inputs by name (`eps=1e-6`); _dispatch.c sends every call with a
        keyword other than out=, seed= and offset= here."""
        extra = {k: kwargs.pop(k) for k in ("out", "seed", "offset") if k in kwargs}
        return self(*self._bind(args, kwargs), **extra)

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        """The positional arguments of a call passing some by name, bound as Python binds a
        function's parameters (ArgumentError, a TypeError, for unknown, repeated or missing)."""
        names = [n for n, _, _ in self.info.params]
        if len(args) > len(names):
            self._check_count(args)
        bound = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise ArgumentError(f"{self.info.name}() got an unexpected keyword argument "
                                    f"'{name}'; it takes {self.info.signature}")
            if name in bound:
                raise ArgumentError(f"{self.info.name}() got multiple values for argument "
                                    f"'{name}'")
            bound[name] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise ArgumentError(f"{self.info.name}() missing argument"
                                f"{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(n) for n in missing)}; it takes "
                                f"{self.info.signature}")
        return tuple(bound[n] for n in names)

    def _check_count(self, args: tuple) -> None:
        if len(args) != len(self.info.params):
            raise ArgumentError(f"{self.info.signature} takes "
                                f"{plural(len(self.info.params), 'argument')} "
                                f"({len(args)} given)")

    def _host_args(self, args: tuple) -> tuple:
        names = self.info.params
        return tuple(interop.as_numpy(a, names[i][0]) if i in self._tensor_pos else a
                     for i, a in enumerate(args))

    def key(self, *args, **kwargs) -> str:
        """The ArgSpec key these arguments select (inputs by position or name)."""
        args = self._bind(args, kwargs) if kwargs else args
        self._check_count(args)
        if _on_cuda(self.info, args):
            from . import cuda
            return cuda.key(self.info, args)
        return dispatch.prepare(self.info, self._host_args(args), _numpy_describe).key

    def _call(self, args: tuple, out, seed, offset):
        """The generic path: any arguments, first calls, errors (_dispatch.c for the rest)."""
        if not self.info.has_random:
            dispatch.check_no_seed(self.info.name, seed, offset)
        if self.bundle._cuda is not None:       # a cupy call like an earlier one
            from . import cuda
            result = cuda.serve(self, args, out, seed, offset)
            if result is not None:
                return result
        self._check_count(args)
        tensors = [args[i] for i in self._tensor_pos]
        if not all(type(a) is np.ndarray for a in tensors):
            return self._call_foreign(args, out, seed, offset)
        key = _plan_key(tensors)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(args, tensors, key)
        if plan.fast_args is not None:     # no-op when known; a dtype numpy spells two ways
            self._remember(tuple(tensors), *plan.fast_args)
        if self.info.has_random:
            dispatch.check_seed(self.info.name, seed, offset)
        if out is None:
            # numpy advises transparent huge pages from 4 MiB (torch.empty does not, unless
            # THP_MEM_ALLOC_ENABLE=1): large outputs, torch ones too, are made here, as the C
            # fast path (torch.empty outputs) serves no call split over threads (>= 2^17)
            outs = [np.empty(shape, d) for shape, d, _ in plan.outs]
        else:
            outs = self._check_out(out, plan, tensors)
        if plan.n:
            ptrs = plan.ptr_type(*[_address(tensors[i]) + off for i, off in plan.in_ptrs],
                                 *[_address(outs[o]) + off for o, off in plan.out_ptrs])
            meta = plan.meta
            if plan.seed_slot is not None or plan.scalar_slots:
                meta = type(meta).from_buffer_copy(meta)
                for slot, (i, name, d) in zip(plan.scalar_slots, self._scalars):
                    meta[slot] = dispatch._scalar_bits(name, args[i], d)
                if plan.seed_slot is not None:     # uint64 bits in int64 words
                    meta[plan.seed_slot] = dispatch.int64_word(seed)
                    meta[plan.seed_slot + 1] = dispatch.int64_word(offset)
            if plan.parallel and self.bundle.threads > 1:
                threads.run(plan.fn, ptrs, meta, plan.n, self.bundle.threads)
            else:
                plan.fn(ptrs, meta, plan.start, plan.stop)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _call_foreign(self, args: tuple, out, seed, offset):
        """CUDA arrays go to the CUDA kernels; other host arrays are viewed as numpy and the
        outputs returned in their framework (torch in, torch out). torch tensors that require
        grad are refused while autograd records (interop.refuse_untracked_grad)."""
        tensors = [args[i] for i in self._tensor_pos]
        framework = interop.framework_of(tensors)
        if framework is not None:
            interop.refuse_untracked_grad(framework, self.info.name, self.info.tensor_names,
                                          tensors)
        if _on_cuda(self.info, args):
            from . import cuda
            return cuda.call(self, args, out, seed, offset)
        if isinstance(out, (tuple, list)):
            out = [interop.as_numpy(o, "out") for o in out]
        elif out is not None:
            out = interop.as_numpy(out, "out")
        host = self._host_args(args)
        try:
            result = self(*host, out=out, seed=seed, offset=offset)
        except KernelNotFound as e:
            lists = tuple((n, type(args[i]).__name__, host[i].dtype.name)
                          for i, n in zip(self._tensor_pos, self.info.tensor_names)
                          if isinstance(args[i], (list, tuple, int, float)))
            if not lists or self.bundle.on_miss != "error" or self.bundle.fixed_dtype_error(e.key):
                raise
            raise self.bundle._not_found(e.key, converted=lists) from None
        if framework is None:
            return result
        self._remember_torch(framework, args, host)
        if isinstance(result, tuple):
            return tuple(interop.to_framework(framework, r) for r in result)
        return interop.to_framework(framework, result)

    def _remember_torch(self, torch, args: tuple, host: tuple) -> None:
        """Let the C fast path serve later calls on torch CPU tensors laid out like `args`
        (viewed as `host`), with outputs made by torch.empty; a no-op once it does."""
        plan = self._plans.get(_plan_key([host[i] for i in self._tensor_pos]))
        if plan is None or plan.fast_args is None:
            return
        _dispatch.use_torch(torch.Tensor, torch.empty, torch.is_grad_enabled)
        outs = tuple((shape, getattr(torch, np.dtype(d).name), nbytes)
                     for shape, d, nbytes in plan.outs)
        self._remember(tuple(args[i] for i in self._tensor_pos), *plan.fast(self._scalars, outs))

    def _plan(self, args: tuple, tensors: list, key: tuple) -> _Plan:
        info = self.info
        call = dispatch.prepare(info, args, _numpy_describe)
        n = dispatch.work_count(call, info.reduces)      # rows * max(N, 1) for reductions
        hollow = bool(n) and info.reduces and call.shape[-1] == 0
        entry = self.bundle.find_cpu(call.key, empty=n == 0, hollow=hollow)
        layouts = tuple(lay for _, lay in parse_key(entry.key)[1])
        if hollow:
            call.canon = dispatch.hollow(call.canon, layouts, self._row_outs)
        elif n:
            call.canon = dispatch.pad(call.canon, layouts, info.reduces)
        rank = len(call.canon.sizes)
        abi = Abi(rank, tuple(c[0] if c else 1 for c in info.chunks),
                  tuple(cat[0] if cat else 1 for _, cat in info.outputs), info.has_random,
                  len(call.scalars))
        in_ptrs = tuple((i, k * step * a.itemsize)
                        for i, (a, (_, _, step)) in enumerate(zip(tensors, call.views))
                        for k in range(abi.chunks[i]))
        outs = tuple((tuple(shape), d.numpy, int(np.prod(shape, dtype=np.int64)) * d.itemsize)
                     for shape, d in zip(call.out_shapes,
                                         self.bundle.output_dtypes(entry.file, entry.key)))
        out_ptrs = []
        for o, ((shape, d, _), (_, cat)) in enumerate(zip(outs, info.outputs)):
            step = 0
            if cat:
                axis = cat[1] + len(shape) if cat[1] < 0 else cat[1]
                step = shape[axis] // cat[0] * contiguous_strides(shape)[axis] * d.itemsize
            out_ptrs += [(o, k * step) for k in range(abi.parts[o])]
        meta = dispatch.meta_words(call, abi, 0, 0)     # (an empty call never launches)
        fn = n and self.bundle._libs.function(entry.file, entry.sha256, entry.symbol,
                                              self.bundle.description(entry.file))
        plan = _Plan(entry, fn, n, in_ptrs, outs, tuple(out_ptrs),
                     ctypes.c_int64 * max(1, abi.n_ptrs),
                     (ctypes.c_int64 * max(1, abi.n_meta))(*meta.tolist()),
                     abi.seed if info.has_random else None,
                     tuple(abi.scalar(k) for k in range(abi.n_scalars)),
                     *zip(*(dispatch.byte_extent(a.shape, a.strides, a.itemsize) for a in tensors)),
                     tuple(tuple(a.shape == shape and a.dtype == d and a.strides ==
                                 tuple(st * d.itemsize for st in contiguous_strides(shape))
                                 and not row for (shape, d, _), row in zip(outs, self._row_outs))
                           for a in tensors))
        plan.fast_args = plan.fast(self._scalars)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
            self._forget()
        self._plans[key] = plan
        return plan

    def _check_out(self, out, plan: _Plan, tensors: list) -> list[np.ndarray]:
        names = [n for n, _ in self.info.outputs]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(outs) != len(plan.outs):
            raise ArgumentError(f"{self.info.name} has {plural(len(plan.outs), 'output')} "
                                f"({', '.join(names)}); out= gave {len(outs)}")
        for name, o, (shape, d, _), row in zip(names, outs, plan.outs, self._row_outs):
            if not isinstance(o, np.ndarray):
                raise ArgumentError(f"out= for '{name}' must be a numpy array, got {type(o).__name__}")
            if o.shape != shape or o.dtype != d:
                raise ArgumentError(f"out= for '{name}' must be {np.dtype(d).name}{list(shape)}, got "
                                    f"{o.dtype.name}{list(o.shape)}")
            if not o.flags.c_contiguous or not o.flags.writeable:
                raise ArgumentError(f"out= for '{name}' must be a writeable C-contiguous array")
            for a, tname in zip(tensors, self.info.tensor_names):
                if row and np.may_share_memory(o, a):
                    raise ArgumentError(f"out= for '{name}' overlaps input '{tname}': a row "
                                        "output is written before the inputs are read again, so "
                                        "it cannot update one in place")
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


def _on_cuda(info: dispatch.GroupInfo, args: tuple) -> bool:
    """Whether a call goes to the CUDA kernels: some tensor argument is a CUDA array."""
    return any(kind == "tensor" and is_cuda_array(a)
               for (_, kind, _), a in zip(info.params, args))


def load(path: str, on_miss: str = "error", expect_id: str | None = None) -> Bundle:
    """Open a bundle directory or packed .tar.gz: check its manifest (`check_manifest`) and every
    artifact's size and sha256, index its kernels. Archives are extracted once per bundle id
    into the cache directory. Shared objects and cubins are hashed again from the bytes that are
    then loaded (at a kernel's first call), so a file changed after this check is refused, and
    their embedded descriptions are checked against the manifest (`artifact.implied`).

    expect_id (else a non-empty FUSEBUILD_BUNDLE_ID) pins the bundle: any other id is refused.
    on_miss="jit" compiles kernels missing from the bundle on first use (needs the build
    extras); every miss is appended to the JSON-lines file FUSEBUILD_MISS_LOG names, if set.
    """
    pinned, source = (expect_id, "expect_id") if expect_id else (os.environ.get(ID_ENV), ID_ENV)
    root = path
    if os.path.isfile(path) and path.endswith((".tar.gz", ".tgz")):
        from .archive import extract
        root = extract(path)
    root = os.path.abspath(root)
    manifest = read_manifest(root)
    if pinned and manifest["id"] != pinned:
        raise BundleError(f"{path} is bundle {manifest['id']}, but {source} pins bundle {pinned}: "
                          "refused")
    verify_artifacts(root, manifest)
    return Bundle(root, manifest, on_miss)


__all__ = ["Bundle", "GroupCaller", "load", "BundleError", "KernelNotFound"]
