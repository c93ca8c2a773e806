"""NVRTC toolchain: CUDA C++ text -> cubin (`cuda:sm_XY[a]`) or PTX (`cuda:compute_XY`) bytes.

NVRTC is the library of the `nvidia-cuda-nvrtc` pip wheel, found by cuda-pathfinder and called
through its C API with ctypes; it needs no GPU, driver or system CUDA. Every cubin is taken whole
(`nvrtcGetCUBINSize` bytes: an ELF file has no terminator) and checked to be a well-formed ELF.
Options: NVRTC's defaults (IEEE division and square root, denormals) plus the architecture, C++17
and --fmad=false: a multiply and an add are rounded separately, as in the CPU backend and the
reference (contracted, `s + v * a * b` turns the reference's NaN into -inf when the product
overflows, and lerp drifts past 4 ULP). Knows nothing of the IR.
"""
from __future__ import annotations

import ctypes
import re
from functools import lru_cache

from .. import elf
from ..abi import ARTIFACT_SYMBOL
from ..errors import ToolchainError

_TARGET = re.compile(r"^cuda:(sm|compute)_(\d{2,3})(a?)$")
_INSTALL = ("install the pip package nvidia-cuda-nvrtc (`pip install 'fusebuild[cuda]'`, or "
            "'fusebuild[build]' for CPU and CUDA)")
OPTIONS = ("--std=c++17", "--fmad=false")


@lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    """libnvrtc of the pip wheel (located by cuda-pathfinder); ToolchainError naming the wheel
    if it does not load."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        lib = ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception as e:  # noqa: BLE001 - ImportError, or the library failing to be found/load
        raise ToolchainError(f"NVRTC is not available ({type(e).__name__}: {e}); the CUDA "
                             f"backend compiles with NVRTC from its pip wheel: "
                             f"{_INSTALL}") from None
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _call(function: str, *args) -> None:
    """Call NVRTC's `function`; ToolchainError with NVRTC's text for a result other than
    NVRTC_SUCCESS."""
    result = getattr(_nvrtc(), function)(*args)
    if result:
        raise ToolchainError(f"NVRTC {function} failed: "
                             f"{_nvrtc().nvrtcGetErrorString(result).decode()}")


def _version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _call("nvrtcVersion", ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def versions() -> dict[str, str]:
    major, minor = _version()
    return {"nvrtc": f"{major}.{minor}"}


def supported_archs() -> tuple[str, ...]:
    """The real architectures this NVRTC compiles for, e.g. ('sm_75', 'sm_80', ...)."""
    n = ctypes.c_int()
    _call("nvrtcGetNumSupportedArchs", ctypes.byref(n))
    archs = (ctypes.c_int * n.value)()
    _call("nvrtcGetSupportedArchs", archs)
    return tuple(f"sm_{a}" for a in archs)


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
        major, minor = _version()
        raise ToolchainError(f"{target}: NVRTC {major}.{minor} cannot compile for sm_{number}; "
                             f"it supports {', '.join(supported)} (compute_XY and sm_XYa "
                             "variants of those)")
    return f"--gpu-architecture={kind}_{number}{variant}", kind == "compute"


def _output(prog: ctypes.c_void_p, what: str) -> bytes:
    """All `nvrtcGet{what}Size` bytes of a program's ProgramLog, PTX or CUBIN."""
    size = ctypes.c_size_t()
    _call(f"nvrtcGet{what}Size", prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    _call(f"nvrtcGet{what}", prog, buf)
    return buf.raw


def _data_array(data: bytes) -> str:
    """CUDA C++ defining the device array ARTIFACT_SYMBOL (extern "C": unmangled) holding
    `data`."""
    values = ",".join(str(b) for b in data)
    return (f'\nextern "C" __device__ const unsigned char {ARTIFACT_SYMBOL}[{len(data)}] = '
            f'{{{values}}};\n')


def compile_cuda(source: str, target: str, name: str, embed: bytes = b"") -> bytes:
    """Compile `source` (module of group `name`) for `target`: cubin bytes, or PTX text bytes
    for compute_XY; a non-empty `embed` is defined as the device array ARTIFACT_SYMBOL.
    ToolchainError carries the NVRTC log and the offending source lines, or what is wrong with a
    malformed cubin."""
    option, ptx = _arch_option(target)
    if embed:
        source += _data_array(embed)
    prog = ctypes.c_void_p()
    _call("nvrtcCreateProgram", ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0,
          None, None)
    try:
        options = [o.encode() for o in (option, *OPTIONS)]
        if _nvrtc().nvrtcCompileProgram(prog, len(options),
                                        (ctypes.c_char_p * len(options))(*options)):
            log = _output(prog, "ProgramLog").rstrip(b"\0").decode(errors="replace")
            if "Command-line error" in log:
                raise ToolchainError(f"{target}: NVRTC rejects {option} "
                                     f"({log.strip().splitlines()[0]}); it supports "
                                     f"{', '.join(supported_archs())}")
            raise ToolchainError(_compile_error(name, target, log, source))
        if ptx:
            return _output(prog, "PTX").rstrip(b"\0")
        cubin = _output(prog, "CUBIN")
    finally:
        _nvrtc().nvrtcDestroyProgram(ctypes.byref(prog))
    try:
        elf.check_bounds(cubin)
    except ValueError as e:
        raise ToolchainError(f"NVRTC gave a malformed cubin for group '{name}' ({target}): "
                             f"{e}") from None
    return cubin


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
