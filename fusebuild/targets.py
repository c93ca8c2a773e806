"""Target names: `cpu` (every ISA level of the host's architecture family), `cpu:x86-64` and
`cpu:aarch64` (every level of that family), `cpu:<level>`, `cuda:sm_XY[a]`, `cuda:compute_XY`."""
from __future__ import annotations

import re
from functools import lru_cache

from .runtime.cpu import FAMILY_NAMES, FAMILY_OF, LEVELS, host_family as _machine_family

CPU_ISAS = tuple(FAMILY_OF)   # every family's levels
_FAMILIES = {f"cpu:{name}": family for family, name in FAMILY_NAMES.items()}
_CUDA = re.compile(r"^cuda:(sm|compute)_(\d{2,3})(a?)$")
# The sm_XY numbers of the CUDA architectures NVIDIA has released: the archs a spec may name
# when NVRTC is not installed (with NVRTC, its own list decides).
KNOWN_CUDA_ARCHS = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 88, 89, 90, 100, 101, 103,
                    107, 110, 120, 121)
FIRST_ARCH_SPECIFIC = 90   # sm_XYa / compute_XYa exist from sm_90a on


def host_family() -> str:
    """The architecture family (a key of LEVELS) whose levels `cpu` means on this machine:
    aarch64 on Arm hosts, x86_64 everywhere else."""
    return _machine_family() or "x86_64"


def family(level: str) -> str:
    """The architecture family of a CPU ISA level (a key of LEVELS)."""
    return FAMILY_OF[level]


def expand(names: list[str]) -> tuple[str, ...]:
    """Validate and expand target names, keeping order and dropping repeats; ValueError if bad."""
    out: list[str] = []
    for name in names:
        if name == "cpu":
            items = [f"cpu:{isa}" for isa in LEVELS[host_family()]]
        elif name in _FAMILIES:
            items = [f"cpu:{isa}" for isa in LEVELS[_FAMILIES[name]]]
        elif name.startswith("cpu:") and name[4:] in CPU_ISAS:
            items = [name]
        elif _CUDA.match(name):
            items = [name]
        else:
            cpu = ", ".join(["cpu", *_FAMILIES, *(f"cpu:{isa}" for isa in CPU_ISAS)])
            raise ValueError(f"unknown target '{name}'; use {cpu}, cuda:sm_XY, cuda:sm_XYa or "
                             "cuda:compute_XY")
        out += [t for t in items if t not in out]
    return tuple(out)


def buildable(names: list[str]) -> tuple[str, ...]:
    """`expand`, also refusing CUDA architectures this build cannot compile for (ValueError)."""
    out = expand(names)
    for target in out:
        m = _CUDA.match(target)
        if not m:
            continue
        number, variant = int(m.group(2)), m.group(3)
        archs, nvrtc = cuda_archs()
        if number not in archs:
            names = ", ".join(f"sm_{a}" for a in archs)
            raise ValueError(f"{target}: {nvrtc} cannot compile for sm_{number}; it supports "
                             f"{names}" if nvrtc else f"{target}: sm_{number} is not a known "
                             f"CUDA architecture; known: {names}")
        if variant and number < FIRST_ARCH_SPECIFIC:
            raise ValueError(f"'{target}' does not exist: arch-specific variants (sm_XYa) "
                             f"start at sm_{FIRST_ARCH_SPECIFIC}a; use cuda:sm_{number}")
    return out


@lru_cache(maxsize=None)
def cuda_archs() -> tuple[tuple[int, ...], str | None]:
    """The sm_XY numbers CUDA targets may use, and the NVRTC that said so (None: not installed,
    the known table)."""
    from .errors import ToolchainError
    from .toolchain import nvrtc
    try:
        archs = nvrtc.supported_archs()
    except ToolchainError:
        return KNOWN_CUDA_ARCHS, None
    return tuple(int(a[3:]) for a in archs), f"NVRTC {nvrtc.versions()['nvrtc']}"


def backend(target: str) -> str:
    return target.split(":", 1)[0]


def arch(target: str) -> str:
    return target.split(":", 1)[1]
