"""Inputs for every example kernel: small shapes from each group's matrix patterns (1 element,
a size-1 inner symbol, odd sizes, sizes that allow the vector path, a misaligned view, strided
views), scalar values and seeds. Shared by the emulation and the GPU tests."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fusebuild import ir, reference
from fusebuild.argspec import Dim
from conftest import concrete, make_args, strided_view


@dataclass
class Case:
    label: str
    dtypes: tuple
    args: list                  # numpy tensors and Python scalars, in declared order
    seed: int = 0
    offset: int = 0


def misaligned(a: np.ndarray) -> np.ndarray:
    """A contiguous copy of `a` starting one element past an aligned address."""
    flat = np.zeros(a.size + 16, a.dtype)
    start = (-flat.ctypes.data) % 16 // a.itemsize + 1
    view = flat[start:start + a.size].reshape(a.shape)
    view[...] = a
    return view


def _assignments(gp, pattern: dict, rng) -> dict[str, dict[str, int]]:
    syms = sorted({s for shape in pattern.values() for d in shape for s in Dim.of(d).syms})
    inner = {s for shape in pattern.values() if shape for s in Dim.of(shape[-1]).syms}
    return {"one": {s: 1 for s in syms},
            "inner-one": {s: 1 if s in inner else 3 for s in syms},   # a size-1 inner symbol
            "odd": {s: int(rng.choice([3, 5, 7])) for s in syms},
            "vector": {s: 16 if s in inner else 2 for s in syms}}


def example_cases(gp, rng: np.random.Generator, has_strided: bool) -> list[Case]:
    """Cases for every dtype combination and shape pattern of group plan `gp`."""
    cases = []
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for p, pattern in enumerate(gp.shapes):
            for name, values in _assignments(gp, pattern, rng).items():
                shapes = {k: concrete(s, values) for k, s in pattern.items()}
                views = {"": None}
                if name == "vector":
                    views["misaligned"] = misaligned
                if name == "odd" and has_strided:
                    views["strided"] = strided_view
                for vname, view in views.items():
                    args = make_args(gp, dtypes, shapes, rng, view)
                    seed = int(rng.integers(1 << 32, 1 << 63)) if gp.group.has_random else 0
                    offset = int(rng.integers(1 << 32, 1 << 40)) if gp.group.has_random else 0
                    label = f"{'/'.join(d.short for d in dtypes)} pattern {p} {name} {vname}"
                    cases.append(Case(label.strip(), dtypes, args, seed, offset))
    return cases


def check_outputs(gp, case: Case, got: tuple) -> None:
    """Compare the device outputs `got` (arrays with `.get()`) of group plan `gp` on `case` with
    the reference evaluator."""
    tensors = [a for a, p in zip(case.args, gp.group.inputs) if p.kind == "tensor"]
    scalars = [a for a, p in zip(case.args, gp.group.inputs) if p.kind == "scalar"]
    dtypes = {i.name: d for i, d in zip(gp.group.tensor_inputs, case.dtypes)}
    want = reference.evaluate(ir.instantiate(gp.group, dtypes, expand=False), tensors, scalars,
                              case.seed, case.offset)
    for o, value in zip(gp.group.outputs, got):
        w = want.outputs[o.name]
        host = value.get()
        host = host.view(w.dtype) if w.dtype == np.dtype(ml_dtypes.bfloat16) else host
        bad = reference.compare(host, w, want.magnitude[o.name])
        assert bad is None, f"{case.label} output {o.name}: {bad.message}"
