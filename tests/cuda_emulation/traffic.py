"""Global-memory traffic of the example kernels at large shapes, counted by the emulator
(`harness.compile_source(traffic=True)`), for tests/test_cuda_traffic.py and
benchmarks/gpu_model.py: which dtypes and shapes to measure, and one measurement."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from fusebuild import dtypes as dt
from fusebuild.argspec import Dim
from fusebuild.codegen.cuda import HELD, render_module
from conftest import concrete, make_args
from cuda_emulation.harness import (EmulatedGroup, Traffic, compile_source, kernel_sources,
                                    launchers)

INNER = 1024               # inner symbols of an elementwise case
OUTER = 4                  # outer symbols of an elementwise case but the one setting its size
ROW_LENGTHS = (1024, 4096, 16384)      # N of the reduction cases
MIN_ROWS = 4
HALF = (dt.bfloat16, dt.float16)


def traffic_dtypes(gp) -> list[tuple]:
    """The float32 combination of group plan `gp` and one 16-bit one (bfloat16 before float16;
    the first combination for a group that has neither)."""
    combos = list(dict.fromkeys(v.dtypes for v in gp.variants))
    f32 = [c for c in combos if dt.float32 in c and not set(c) & set(HALF)]
    half = [c for h in HALF for c in combos if h in c]
    return list(dict.fromkeys(f32[:1] + half[:1])) or combos[:1]


def case_shapes(pattern: dict, elements: int, row_length: int = 0
                ) -> dict[str, tuple[int, ...]]:
    """Shapes of `pattern` (input name -> symbolic shape) with about `elements` elements in its
    largest input (a reduction: at least MIN_ROWS rows of `row_length`): inner symbols INNER
    (the row length), outer ones OUTER (2 for a reduction) but the first, which is solved for
    the size (the inner one where there is no outer symbol)."""
    syms = list(dict.fromkeys(s for shape in pattern.values() for d in shape
                              for s in Dim.of(d).syms))
    inner = {s for shape in pattern.values() if shape for s in Dim.of(shape[-1]).syms}
    values = {s: (row_length or INNER) if s in inner else (2 if row_length else OUTER)
              for s in syms}
    free = next((s for s in syms if s not in inner), None if row_length else syms[0])
    if free:
        values[free] = 1
        largest = max(math.prod(concrete(shape, values)) for shape in pattern.values())
        target = max(MIN_ROWS * row_length, elements) if row_length else elements
        values[free] = max(1, target // largest)
    return {k: concrete(s, values) for k, s in pattern.items()}


def compile_traffic(gps: list, out_dir: str, name: str) -> dict[str, EmulatedGroup]:
    """The kernels of the `traffic_dtypes` of group plans `gps`, emulated with traffic counting
    (one library, out_dir/name.so), by group name."""
    kernels = {gp.group.name: kernel_sources(gp.group, [v for v in gp.variants
                                                        if v.dtypes in traffic_dtypes(gp)])
               for gp in gps}
    flat = [k for ks in kernels.values() for k in ks]
    text = '#include "emu.h"\n' + render_module(flat) + launchers([k.symbol for k in flat])
    lib = compile_source(text, out_dir, name, traffic=True)
    return {gp.group.name: EmulatedGroup(gp.group, kernels[gp.group.name], lib) for gp in gps}


@dataclass
class Measured:
    """One counted launch."""
    group: str
    key: str                      # the kernel that ran
    dtypes: str                   # "f32/bf16..."
    shapes: dict                  # input name -> shape
    row_length: int               # N of a reduction, 0 elementwise
    flags: int                    # the launch's (a reduction's row mode, HELD)
    traffic: Traffic
    seconds: float                # emulation time

    def row(self) -> dict:
        """The launch as a JSON object (bytes summed over the operands)."""
        t = self.traffic
        return {"group": self.group, "kernel": self.key, "dtypes": self.dtypes,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "kind": "reduction" if self.row_length else "elementwise",
                "N": self.row_length, "held": bool(self.flags & HELD),
                "bytes_loaded": sum(t.loaded),
                "bytes_stored": sum(t.stored), "bytes_measured": t.measured,
                "bytes_ideal": t.ideal, "ratio": round(t.ratio, 4),
                "emulation_s": round(self.seconds, 3)}


def measure(em: EmulatedGroup, gp, dtypes: tuple, pattern: dict, elements: int,
            row_length: int, rng: np.random.Generator) -> Measured:
    """One launch of group `em` over the `case_shapes` of `pattern`, with its traffic."""
    shapes = case_shapes(pattern, elements, row_length)
    args = make_args(gp, dtypes, shapes, rng)
    start = time.perf_counter()
    launch = em(args, 1234 if gp.group.has_random else 0)
    seconds = time.perf_counter() - start
    return Measured(gp.group.name, launch.key, "/".join(d.short for d in dtypes), shapes,
                    row_length, launch.flags, launch.traffic, seconds)


def cases(gp) -> list[tuple[tuple, dict, int]]:
    """(dtypes, pattern, row length) of every measurement of group plan `gp`: each traffic
    dtype combination and shape pattern, for a reduction at each of ROW_LENGTHS (else 0)."""
    lengths = ROW_LENGTHS if gp.group.reduces else (0,)
    return [(d, p, n) for d in traffic_dtypes(gp) for p in gp.shapes for n in lengths]
