"""NVRTC toolchain: CUDA C++ text -> cubin (`cuda:sm_XY[a]`) or PTX (`cuda:compute_XY`) bytes.

NVRTC comes from the `nvidia-cuda-nvrtc` pip wheel through cupy's binding, which needs no GPU,
driver or system CUDA. Options: NVRTC's defaults (IEEE division and square root, denormals) plus
the architecture, C++17 and --fmad=false: a multiply and an add are rounded separately, as in the
CPU backend and the reference (contracted, `s + v * a * b` turns the reference's NaN into -inf
when the product overflows, and lerp drifts past 4 ULP). Knows nothing of the IR.
"""
from __future__ import annotations

import re
from functools import lru_cache

from ..abi import ARTIFACT_SYMBOL
from ..errors import ToolchainError

_TARGET = re.compile(r"^cuda:(sm|compute)_(\d{2,3})(a?)$")
_INSTALL = ("install the pip packages nvidia-cuda-nvrtc and cupy-cuda13x "
            "(`pip install 'fusebuild[build]'`)")
OPTIONS = ("--std=c++17", "--fmad=false")


@lru_cache(maxsize=None)
def _nvrtc():
    """cupy's NVRTC binding, checked to load libnvrtc; ToolchainError naming the wheel if not."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - ImportError, or the library failing to load
        raise ToolchainError(f"NVRTC is not available ({type(e).__name__}: {e}); the CUDA "
                             f"backend compiles with NVRTC from its pip wheel: "
                             f"{_INSTALL}") from None
    return nvrtc


def versions() -> dict[str, str]:
    major, minor = _nvrtc().getVersion()
    return {"nvrtc": f"{major}.{minor}"}


def supported_archs() -> tuple[str, ...]:
    """The real architectures this NVRTC compiles for, e.g. ('sm_75', 'sm_80', ...)."""
    return tuple(f"sm_{a}" for a in _nvrtc().getSupportedArchs())


def ptx_isa(ptx: bytes) -> str:
    """The PTX ISA version (`.version X.Y`) of a PTX module."""
    m = re.search(rb"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
    if not m:
        raise ToolchainError("PTX text has no .version directive")
    return m.group(1).decode()


def _arch_option(target: str) -> tuple[str, bool]:
    """`--gpu-architecture=...` for a target, and whether it yields PTX; checks the arch."""
    m = _TARGET.match(target)
    if not m:
        raise ToolchainError(f"'{target}' is not a CUDA target; use cuda:sm_XY, cuda:sm_XYa or "
                             "cuda:compute_XY")
    kind, number, variant = m.groups()
    supported = supported_archs()
    if f"sm_{number}" not in supported:
        major, minor = _nvrtc().getVersion()
        raise ToolchainError(f"{target}: NVRTC {major}.{minor} cannot compile for sm_{number}; "
                             f"it supports {', '.join(supported)} (compute_XY and sm_XYa "
                             "variants of those)")
    return f"--gpu-architecture={kind}_{number}{variant}", kind == "compute"


def _data_array(data: bytes) -> str:
    """CUDA C++ defining the device array ARTIFACT_SYMBOL (extern "C": unmangled) holding
    `data`."""
    values = ",".join(str(b) for b in data)
    return (f'\nextern "C" __device__ const unsigned char {ARTIFACT_SYMBOL}[{len(data)}] = '
            f'{{{values}}};\n')


def compile_cuda(source: str, target: str, name: str, embed: bytes = b"") -> bytes:
    """Compile `source` (module of group `name`) for `target`: cubin bytes, or PTX text bytes
    for compute_XY; a non-empty `embed` is defined as the device array ARTIFACT_SYMBOL.
    ToolchainError carries the NVRTC log and the offending source lines."""
    option, ptx = _arch_option(target)
    nvrtc = _nvrtc()
    if embed:
        source += _data_array(embed)
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [option, *OPTIONS])
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(prog)
            if "Command-line error" in log:
                raise ToolchainError(f"{target}: NVRTC rejects {option} "
                                     f"({log.strip().splitlines()[0]}); it supports "
                                     f"{', '.join(supported_archs())}") from None
            raise ToolchainError(_compile_error(name, target, log, source)) from None
        return nvrtc.getPTX(prog).rstrip(b"\0") if ptx else nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _compile_error(name: str, target: str, log: str, source: str) -> str:
    lines = source.splitlines()
    quoted = []
    for number in dict.fromkeys(int(n) for n in re.findall(r"\((\d+)\): (?:catastrophic )?error",
                                                           log)):
        if 0 < number <= len(lines):
            quoted.append(f"  {name}.cu:{number}: {lines[number - 1].strip()}")
    text = f"NVRTC failed to compile group '{name}' for {target}:\n{log.strip()}"
    if quoted:
        text += "\n offending source line(s):\n" + "\n".join(quoted)
    return text
