"""Calling a group: arguments -> ArgSpec key -> kernel -> launch.

This module holds the backend-independent part (argument checks, chunk views, broadcasting,
canonicalization, output allocation, the kernel's meta words) and the CPU launch.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from .. import dtypes as dt
from ..abi import Abi
from ..argspec import (Canonical, broadcast_shapes, canonicalize, contiguous_strides, format_key,
                       row_strides)
from ..errors import ArgumentError


@dataclass(frozen=True)
class GroupInfo:
    """What the runtime needs of a group, read from the manifest."""
    name: str
    params: tuple[tuple[str, str, str | None], ...]   # (name, 'tensor'|'scalar', dtype) in order
    chunks: tuple                                     # per tensor input: (n, dim) or None
    outputs: tuple[tuple[str, tuple | None], ...]     # (name, cat (n, dim) or None)
    has_random: bool
    signature: str
    reduces: bool = False                             # a reduction group (DESIGN §8)
    row_outputs: tuple[bool, ...] = ()                # per output: one value per row, [..., 1]
    grad_alias: tuple[tuple[str, str], ...] = ()      # backward groups: (input, the output or
                                                      # grad input holding its gradient)

    @staticmethod
    def from_manifest(g: dict) -> "GroupInfo":
        params = tuple((i["name"], i["kind"], i["dtype"]) for i in g["inputs"])
        chunks = tuple(tuple(i["chunk"]) if i["chunk"] else None for i in g["inputs"]
                       if i["kind"] == "tensor")
        outputs = tuple((o["name"], tuple(o["cat"]) if o["cat"] else None) for o in g["outputs"])
        args = [n if k == "tensor" else f"{n}: {d}" for n, k, d in params]
        if g["has_random"]:
            args += ["*", "seed", "offset=0"]
        signature = f"{g['name']}({', '.join(args)}) -> {', '.join(n for n, _ in outputs)}"
        return GroupInfo(g["name"], params, chunks, outputs, g["has_random"], signature,
                         bool(g.get("reduce", False)),
                         tuple(bool(o.get("row", False)) for o in g["outputs"]),
                         tuple(g.get("grad_alias", {}).items()))

    @property
    def tensor_names(self) -> list[str]:
        return [n for n, k, _ in self.params if k == "tensor"]


@dataclass
class Call:
    """One call's arguments, brought to canonical form."""
    arrays: list                   # tensor arguments as given (numpy arrays for CPU)
    dtypes: list[dt.DType]
    views: list[tuple]             # per tensor input: (view shape, element strides, chunk step)
    scalars: list
    shape: tuple                   # iteration shape
    out_shapes: list[tuple]
    out_strides: list[tuple]       # per output: its element strides (row outputs: row_strides)
    canon: Canonical | None = None     # set by `prepare`
    key: str = ""


def _normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def prepare(info: GroupInfo, args: tuple, describe) -> Call:
    """Check arguments and compute the key; `describe(array)` -> (shape, byte strides, dtype)."""
    call = check(info, args, describe)
    call.canon = canonicalize(call.shape, [(v[0], v[1]) for v in call.views], call.out_strides,
                              keep_last=info.reduces)
    call.key = format_key(info.name, list(zip(call.dtypes, call.canon.layouts)))
    return call


def check(info: GroupInfo, args: tuple, describe) -> Call:
    """`prepare` but for the canonical form and key: every check of the arguments (scalars,
    dtypes, chunks, broadcasting, ranks) and the output shapes. Shapes may be torch SymInts
    (the fake kernels of torch_ops run it: the same errors as a real call)."""
    arrays, dtypes_, views, scalars = [], [], [], []
    chunk_iter = iter(info.chunks)
    for (name, kind, sdtype), a in zip(info.params, args):
        if kind == "scalar":
            scalars.append(_scalar_bits(name, a, dt.lookup(sdtype)))
            continue
        shape, byte_strides, npdtype = describe(a)
        try:
            d = dt.from_numpy(npdtype)
        except (KeyError, TypeError):
            swapped = isinstance(npdtype, np.dtype) and not npdtype.isnative
            raise ArgumentError(f"input '{name}' of {info.name} has unsupported dtype {npdtype}"
                                + (" (byte-swapped; convert with "
                                   "a.astype(a.dtype.newbyteorder('=')))" if swapped else "")
                                + f"; supported: {', '.join(x.name for x in dt.ALL)}") from None
        if any(s % d.itemsize for s in byte_strides):
            raise ArgumentError(f"input '{name}' has strides {byte_strides} that are not a "
                                f"multiple of its itemsize {d.itemsize}")
        strides = tuple(s // d.itemsize for s in byte_strides)
        chunk = next(chunk_iter)
        step = 0
        if chunk:
            n, dim = chunk
            axis = _normalize_dim(dim, len(shape))
            if not 0 <= axis < len(shape) or shape[axis] % n:
                raise ArgumentError(f"input '{name}' of {info.name} is chunked {n} ways along dim "
                                    f"{dim}, which its shape {tuple(shape)} does not allow")
            step = shape[axis] // n * strides[axis]
            shape = shape[:axis] + (shape[axis] // n,) + shape[axis + 1:]
        arrays.append(a)
        dtypes_.append(d)
        views.append((tuple(shape), strides, step))
    try:
        shape = broadcast_shapes([v[0] for v in views])
    except ValueError as e:
        shapes = ", ".join(f"{n}{list(v[0])}" for n, v in zip(info.tensor_names, views))
        raise ArgumentError(f"inputs of {info.name} do not broadcast ({shapes}): {e}") from None
    if info.reduces and not shape:
        raise ArgumentError(f"{info.name} reduces over the last dim: its inputs need rank >= 1 "
                            "(got only 0-d tensors)")
    out_shapes, extra = [], []
    for (_, cat), row in zip(info.outputs, info.row_outputs or (False,) * len(info.outputs)):
        if row:
            out_shapes.append(shape[:-1] + (1,))
            extra.append(row_strides(shape))
            continue
        full = shape
        if cat:
            n, dim = cat
            axis = _normalize_dim(dim, len(shape))
            if not 0 <= axis < len(shape):
                raise ArgumentError(f"{info.name} concatenates along dim {dim}, out of range for "
                                    f"inputs of rank {len(shape)}")
            full = shape[:axis] + (shape[axis] * n,) + shape[axis + 1:]
        out_shapes.append(full)
        extra.append(contiguous_strides(full))
    return Call(arrays, dtypes_, views, scalars, shape, out_shapes, extra)


_F32, _F64 = struct.Struct("<f"), struct.Struct("<d")


def _scalar_bits(name: str, value, d: dt.DType) -> int:
    """The meta word of a scalar argument: its bits in its declared dtype."""
    if type(value) is float and d.is_float and value == value:    # the usual case, sans numpy
        try:        # C's double -> float cast, as numpy's
            if d == dt.float64:
                return int.from_bytes(_F64.pack(value), "little", signed=True)
            return int.from_bytes(_F32.pack(value), "little")
        except OverflowError:     # a finite double beyond float32: numpy gives inf
            pass
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (complex, np.complexfloating)):
        raise ArgumentError(f"scalar input '{name}' is {d.name}; got the complex number {value!r}"
                            " (pass its .real if that is what you mean)")
    if not isinstance(value, (int, float, bool, np.generic)):
        raise ArgumentError(f"scalar input '{name}' needs a Python number, got "
                            f"{type(value).__name__}")
    if d.is_float:
        with np.errstate(over="ignore"):
            if d == dt.float64:
                return int(np.array(value, np.float64).view(np.int64))
            return int(np.array(value, np.float32).view(np.uint32))
    if d.is_bool:
        return int(bool(value))
    if isinstance(value, float) and not value.is_integer():
        raise ArgumentError(f"scalar input '{name}' is {d.name}; got {value!r}")
    lo, hi = int_range(d)
    if not lo <= int(value) <= hi:
        raise ArgumentError(f"scalar input '{name}' ({d.name}) cannot hold {value!r}")
    return int(value)


def int_range(d: dt.DType) -> tuple[int, int]:
    """The values an integer dtype holds, [lo, hi]."""
    signed = d.kind == "i"
    return (-(1 << (d.bits - 1)) if signed else 0), (1 << (d.bits - signed)) - 1


def int64_word(value: int) -> int:
    """A uint64 value as the int64 word with the same bits."""
    return value - (value >> 63 << 64)


def nearest_keys(key: str, keys: list[str], n: int = 3) -> tuple[str, ...]:
    """Keys of the same group ordered by closeness: same dtypes, same rank, then text."""
    from difflib import SequenceMatcher
    from ..argspec import parse_key
    group, descs = parse_key(key)
    cands = []
    for k in keys:
        g, d = parse_key(k)
        if g != group:
            continue
        same_dtypes = [x for x, _ in d] == [x for x, _ in descs]
        same_rank = {len(lay) for _, lay in d} == {len(lay) for _, lay in descs}
        cands.append((not same_dtypes, not same_rank, -SequenceMatcher(None, k, key).ratio(), k))
    return tuple(c[-1] for c in sorted(cands)[:n])


def placement(kernel_layouts: tuple[str, ...], call_layouts: tuple[str, ...],
              keep_last: bool = False) -> tuple[int, ...] | None:
    """The kernel dims a call's dims run on when a kernel compiled for `kernel_layouts`
    computes a call of `call_layouts`; None if it cannot.

    A kernel of higher rank runs a lower-rank call with size-1 dims inserted (canonical form
    drops a call's size-1 dims, so a symbol of size 1 makes a lower-rank key than the build's).
    On the dims the call runs on each letter must match, or be 's' (any stride, 0 and dense
    included); a size-1 dim fits any letter. Size-1 dims go outermost where that works, so the
    inner dim stays the call's. With `keep_last` (reduction groups) the call's last dim, the
    reduced one, runs only on the kernel's last dim.
    """
    rank = len(kernel_layouts[0]) if kernel_layouts else 0
    call_rank = len(call_layouts[0]) if call_layouts else 0
    for dims in reversed(list(combinations(range(rank), call_rank))):
        if keep_last and call_rank and dims[-1] != rank - 1:
            continue
        if all(k[d] == c[i] or k[d] == "s" for k, c in zip(kernel_layouts, call_layouts)
               for i, d in enumerate(dims)):
            return dims
    return None


def serves(kernel_layouts: tuple[str, ...], call_layouts: tuple[str, ...],
           keep_last: bool = False) -> bool:
    """Whether a kernel compiled for `kernel_layouts` computes a call of `call_layouts`."""
    return placement(kernel_layouts, call_layouts, keep_last) is not None


def pad(canon: Canonical, kernel_layouts: tuple[str, ...], keep_last: bool = False) -> Canonical:
    """`canon` brought to the rank of a kernel that serves it: size-1 dims (stride 0) inserted
    where `placement` puts none of the call's dims."""
    rank = len(kernel_layouts[0]) if kernel_layouts else 0
    if rank <= len(canon.sizes):
        return canon
    dims = placement(kernel_layouts, canon.layouts, keep_last)
    if dims is None:
        raise ValueError(f"layouts {canon.layouts} do not run on a kernel of {kernel_layouts}")
    where = dict(zip(dims, range(len(dims))))

    def spread(values: tuple, fill) -> tuple:
        return tuple(values[where[d]] if d in where else fill for d in range(rank))

    return Canonical(spread(canon.sizes, 1), tuple(spread(st, 0) for st in canon.strides),
                     tuple("".join(spread(tuple(lay), "b")) for lay in canon.layouts))


def hollow(canon: Canonical, kernel_layouts: tuple[str, ...], row_outputs: tuple[bool, ...]
           ) -> Canonical:
    """A call of rows of N = 0 (a reduction kernel then reads no input and writes only its
    row outputs) in the form of a kernel of `kernel_layouts` (rank at least the call's): all
    rows on the kernel's second-to-last dim (row outputs are C-contiguous [..., 1], so row r is
    at element r), size-1 dims elsewhere, every other stride 0."""
    rank = len(kernel_layouts[0])
    rows = math.prod(canon.sizes[:-1])
    sizes = (1,) * (rank - 2) + (rows, 0) if rank > 1 else (0,)
    row_dim = (0,) * (rank - 2) + (1, 0) if rank > 1 else (0,)
    rows_of = (False,) * len(canon.layouts) + tuple(row_outputs)
    strides = tuple(row_dim if row else (0,) * rank for row in rows_of)
    return Canonical(sizes, strides, kernel_layouts)


def check_seed(group: str, seed, offset) -> None:
    """Random groups need seed=; seed and offset are uint64 values."""
    if seed is None:
        raise ArgumentError(f"{group} draws random numbers: pass seed= (and offset=)")
    check_seed_word(seed, "seed")
    check_seed_word(offset, "offset")


def check_no_seed(group: str, seed, offset) -> None:
    """Groups without random numbers take neither seed= nor offset=."""
    if seed is not None or isinstance(offset, bool) or \
            not (isinstance(offset, (int, np.integer)) and offset == 0):
        raise ArgumentError(f"{group} draws no random numbers: it takes no seed= or offset=")


def check_seed_word(value, what: str) -> None:
    """seed= and offset= are integers in [0, 2**64); bools are refused, as numpy and torch
    refuse them as seeds."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < 1 << 64:
        raise ArgumentError(f"{what} must be an integer in [0, 2**64), got {value!r}")


def byte_extent(shape, strides, itemsize: int) -> tuple[int, int]:
    """Bytes [lo, hi) an array touches relative to its data pointer ((0, 0) when empty)."""
    if 0 in shape:
        return 0, 0
    lo = sum(s * (n - 1) for n, s in zip(shape, strides) if s < 0)
    hi = sum(s * (n - 1) for n, s in zip(shape, strides) if s > 0)
    return lo, hi + itemsize


def meta_words(call: Call, abi: Abi, seed: int, offset: int) -> np.ndarray:
    meta = np.zeros(abi.n_meta, np.int64)
    rank = abi.rank
    meta[:rank] = call.canon.sizes
    for op, strides in enumerate(call.canon.strides):
        meta[abi.stride(op, 0):abi.stride(op, 0) + rank] = strides
    if abi.random:
        for slot, value, what in ((abi.seed, seed, "seed"), (abi.offset, offset, "offset")):
            check_seed_word(value, what)
            meta[slot] = np.array(value, np.uint64).view(np.int64)
    for k, bits in enumerate(call.scalars):
        meta[abi.scalar(k)] = bits
    return meta


def element_count(call: Call) -> int:
    return math.prod(call.shape)


def work_count(call: Call, reduces: bool) -> int:
    """The range [0, n) a kernel is called over: the elements, or for a reduction group
    rows * max(N, 1), so rows of N = 0 still run (abi.py: a reduction kernel computes the rows
    whose first element index, row * max(N, 1), lies in [start, stop))."""
    if not reduces:
        return element_count(call)
    return math.prod(call.shape[:-1]) * max(call.shape[-1], 1)
