"""Target names: `cpu` (all x86-64 ISA levels), `cpu:x86-64-vN`, `cuda:sm_XY[a]`, `cuda:compute_XY`."""
from __future__ import annotations

import re

CPU_ISAS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
_CUDA = re.compile(r"^cuda:(sm_\d{2,3}a?|compute_\d{2,3}a?)$")


def expand(names: list[str]) -> tuple[str, ...]:
    """Validate and expand target names, keeping order and dropping repeats; ValueError if bad."""
    out: list[str] = []
    for name in names:
        if name == "cpu":
            items = [f"cpu:{isa}" for isa in CPU_ISAS]
        elif name.startswith("cpu:") and name[4:] in CPU_ISAS:
            items = [name]
        elif _CUDA.match(name):
            items = [name]
        else:
            raise ValueError(f"unknown target '{name}'; use cpu, cpu:{'|cpu:'.join(CPU_ISAS)}, "
                             "cuda:sm_XY, cuda:sm_XYa or cuda:compute_XY")
        out += [t for t in items if t not in out]
    return tuple(out)


def backend(target: str) -> str:
    return target.split(":", 1)[0]


def arch(target: str) -> str:
    return target.split(":", 1)[1]
