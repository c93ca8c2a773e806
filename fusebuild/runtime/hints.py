"""What to add to a spec so that a rebuild serves a missed key: the smallest matrix change."""
from __future__ import annotations

from ..argspec import parse_key
from ..errors import ArgumentError
from . import dispatch
from ..abi import GRAD_SUFFIX
from .dispatch import GroupInfo

_SIZES = (3, 5, 7, 11, 13, 17, 19, 23)   # sizes of D1, D2, ... when a pattern is checked


def matrix_change(infos: dict[str, GroupInfo], by_dtypes: dict, key: str) -> str:
    """The spec change whose rebuild serves a call of `key` (a miss of a group of `infos`):
    a dtype map where a kernel of other dtypes already serves its layouts, a shape pattern
    (with `strided: true` where no contiguous pattern gives them) where the bundle has its
    dtypes, both otherwise. `by_dtypes`: (group, dtypes) -> [(layouts, key)] of the bundle.
    A backward key (`g__grad`) is told as a change of its forward group `g`."""
    group, descs = parse_key(key)
    intro = ""
    forward = group[:-len(GRAD_SUFFIX)] if group.endswith(GRAD_SUFFIX) else ""
    if forward in infos:
        descs = descs[:len(infos[forward].tensor_names)]
        intro = (f"{group} is the backward group of '{forward}', built from its `grad:` for "
                 f"the same matrix; ")
        group = forward
    info = infos[group]
    dtypes = tuple(d for d, _ in descs)
    layouts = tuple(lay for _, lay in descs)
    served = any(dispatch.placement(lays, layouts, info.reduces) is not None
                 for (g, _), cands in by_dtypes.items() if g == group for lays, _ in cands)
    need_dtype = (group, dtypes) not in by_dtypes
    changes = []
    if need_dtype:
        dmap = ", ".join(f"{n}: {d.name}" for (n, k, fixed), d in
                         zip((p for p in info.params if p[1] == "tensor"), dtypes) if not fixed)
        changes.append(f"add `{{{dmap}}}` under matrix.dtype")
    if not (need_dtype and served):
        changes.append(_shape_change(info, by_dtypes, descs))
    return (f"{intro}in group '{group}' of your spec, {' and '.join(changes)}, then rebuild "
            "(or log misses with FUSEBUILD_MISS_LOG and rebuild with `fusebuild compile "
            "--add-misses LOG`)")


def _shape_change(info: GroupInfo, by_dtypes: dict, descs: tuple) -> str:
    """A shape pattern whose contiguous calls have the layouts of `descs`, or a pattern of
    their rank with `strided: true` (the all-strided kernel serves any layout of its rank)."""
    rank = len(descs[0][1]) if descs else 0
    exact = _pattern(info, descs, [["1" if c == "b" else f"D{k + 1}" for k, c in
                                    enumerate(lay)] for _, lay in descs], check=True)
    if exact:
        return f"add `{exact}` under matrix.shapes"
    any_rank = _pattern(info, descs, [[f"D{k + 1}" for k in range(rank)] for _ in descs])
    pattern = f"`{any_rank}`" if any_rank else f"a shape pattern of rank {rank}"
    strided = any(all(set(lay) == {"s"} for lay in lays) and rank
                  for (g, _), cands in by_dtypes.items() if g == info.name for lays, _ in cands)
    return f"add {pattern} under matrix.shapes" + ("" if strided else
                                                  " and set `strided: true` under matrix")


def _pattern(info: GroupInfo, descs: tuple, dims: list[list[str]], check: bool = False
             ) -> str | None:
    """The text `{x: [D1, D2], b: [D2]}` of symbolic shapes `dims` (one list per tensor input,
    chunked dims multiplied out, leading 1s dropped), if a contiguous call of that shape is
    valid (and, with `check`, canonicalizes to the layouts of `descs`); else None."""
    shapes = []
    for names, chunk in zip(dims, info.chunks):
        names = list(names)
        if chunk:
            axis = chunk[1] + len(names) if chunk[1] < 0 else chunk[1]
            if not 0 <= axis < len(names) or names[axis] == "1":
                return None
            names[axis] = f"{chunk[0]}*{names[axis]}"
        else:
            while names and names[0] == "1":
                names.pop(0)
        shapes.append(names)
    args, tensors = [], iter(zip(shapes, descs))
    for _, kind, _ in info.params:
        if kind == "scalar":
            args.append(0)
            continue
        names, (d, _) = next(tensors)
        shape = tuple(_size(n) for n in names)
        strides = [d.itemsize] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        args.append((shape, tuple(strides), d.numpy))
    try:
        call = dispatch.prepare(info, tuple(args), lambda a: a)
    except ArgumentError:
        return None
    if check and tuple(lay for _, lay in parse_key(call.key)[1]) != \
            tuple(lay for _, lay in descs):
        return None
    return "{" + ", ".join(f"{n}: [{', '.join(s)}]" for n, s in
                           zip(info.tensor_names, shapes)) + "}"


def _size(name: str) -> int:
    """The concrete size of a pattern dim: '1', 'D3' or '4*D3'."""
    factor, _, sym = name.rpartition("*")
    size = 1 if sym == "1" else _SIZES[(int(sym[1:]) - 1) % len(_SIZES)]
    return size * int(factor or 1)
