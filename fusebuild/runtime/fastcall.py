"""Per-group call functions generated at load time for the CPU hot path.

A repeated call with numpy arrays of already-seen shapes, strides and dtypes does no
canonicalization and no loops: the generated function unpacks the arguments, looks up the
memoized plan, takes data pointers through the buffer protocol, checks `out=` against address
ranges and calls the kernel. Everything else (first calls, foreign arrays, CUDA, errors) goes to
the generic path, `GroupCaller._call`, which raises the proper errors.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from . import threads


def _source(n_args: int, tensors: tuple[int, ...], scalars: tuple[int, ...], chunks: tuple,
            parts: tuple, random: bool) -> str:
    a = [f"a{i}" for i in range(n_args)]
    t = [a[i] for i in tensors]
    n_out = len(parts)
    sig = ", ".join(f"{x}.shape, {x}.strides, {x}.dtype" for x in t)
    lines = [
        "def __call__(self, *args, out=None, seed=None, offset=0):",
        f"    if len(args) != {n_args}:",
        "        return self._call(args, out, seed, offset)",
        f"    {', '.join(a)}{',' if n_args == 1 else ''} = args",
        f"    if {' or '.join(f'type({x}) is not ndarray' for x in t)}:",
        "        return self._call(args, out, seed, offset)",
        f"    plan = self._plans.get(({sig}))",
        "    if plan is None:",
        "        return self._call(args, out, seed, offset)",
    ]
    if random:
        lines += ["    if type(seed) is not int or type(offset) is not int or not (0 <= seed < "
                  "18446744073709551616 and 0 <= offset < 18446744073709551616):",
                  "        return self._call(args, out, seed, offset)"]
    outs = [f"o{k}" for k in range(n_out)]
    lines.append("    if out is None:")
    lines += [f"        {o} = empty(plan.outs[{k}][0], plan.outs[{k}][1])" for k, o in enumerate(outs)]
    lines.append("    else:")
    if n_out == 1:
        lines.append("        o0 = out[0] if type(out) in (tuple, list) and len(out) == 1 else out")
    else:
        lines += [f"        if type(out) not in (tuple, list) or len(out) != {n_out}:",
                  "            return self._call(args, out, seed, offset)",
                  f"        {', '.join(outs)} = out"]
    checks = " or ".join(f"type({o}) is not ndarray or {o}.shape != plan.outs[{k}][0] or "
                         f"{o}.dtype != plan.outs[{k}][1] or not {o}.flags.c_contiguous or "
                         f"not {o}.flags.writeable" for k, o in enumerate(outs))
    lines += [f"        if {checks}:", "            return self._call(args, out, seed, offset)"]
    lines.append("    if plan.n:")
    lines.append("        try:")
    lines += [f"            p{j} = addressof(from_buffer({x}))" for j, x in enumerate(t)]
    lines += [f"            q{k} = addressof(from_buffer({o}))" for k, o in enumerate(outs)]
    lines.append("        except (TypeError, ValueError, BufferError):   # read-only, strided, bf16")
    lines += [f"            p{j} = {x}.__array_interface__['data'][0]" for j, x in enumerate(t)]
    lines += [f"            q{k} = {o}.__array_interface__['data'][0]" for k, o in enumerate(outs)]
    overlap = []     # out= overlapping an input (other than exactly in place) or another out=
    for k in range(n_out):
        overlap += [f"(q{k} < p{j} + plan.hi[{j}] and p{j} + plan.lo[{j}] < q{k} + "
                    f"plan.outs[{k}][2] and not (p{j} == q{k} and plan.same[{j}][{k}]))"
                    for j in range(len(t))]
        overlap += [f"(q{k} < q{m} + plan.outs[{m}][2] and q{m} < q{k} + plan.outs[{k}][2])"
                    for m in range(k + 1, n_out)]
    if overlap:
        lines += ["        if out is not None and (" + " or ".join(overlap) + "):",
                  "            return self._call(args, out, seed, offset)"]
    words, slot = [], 0
    for j, c in enumerate(chunks):
        for _ in range(c):
            words.append(f"p{j} + plan.offs[{slot}]")
            slot += 1
    for k, c in enumerate(parts):
        for _ in range(c):
            words.append(f"q{k} + plan.offs[{slot}]")
            slot += 1
    lines += ["        try:",
              "            ptrs = plan.local.ptrs",
              "        except AttributeError:",
              "            ptrs = plan.local.ptrs = plan.ptr_type()"]
    lines += [f"        ptrs[{i}] = {w}" for i, w in enumerate(words)]
    lines.append("        meta = plan.meta")
    if scalars or random:
        lines.append("        meta = plan.meta_type.from_buffer_copy(meta)")
        for k, pos in enumerate(scalars):
            lines.append(f"        meta[plan.scalar_slots[{k}]] = self._scalar_word({k}, {a[pos]})")
        if random:
            lines += ["        meta[plan.seed_slot] = seed - (seed >> 63 << 64)",
                      "        meta[plan.seed_slot + 1] = offset - (offset >> 63 << 64)"]
    lines += ["        if plan.parallel and self.bundle.threads > 1:",
              "            run_threads(plan.fn, ptrs, meta, plan.n, self.bundle.threads)",
              "        else:",
              "            plan.fn(ptrs, meta, plan.start, plan.stop)",
              f"    return {outs[0] if n_out == 1 else '(' + ', '.join(outs) + ')'}"]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def make_call(n_args: int, tensors: tuple[int, ...], scalars: tuple[int, ...], chunks: tuple,
              parts: tuple, random: bool):
    """The specialized `__call__` for a group of this shape of signature."""
    namespace = {"ndarray": np.ndarray, "empty": np.empty, "addressof": ctypes.addressof,
                 "from_buffer": ctypes.c_char.from_buffer, "run_threads": threads.run}
    exec(_source(n_args, tensors, scalars, chunks, parts, random), namespace)
    return namespace["__call__"]
