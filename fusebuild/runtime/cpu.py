"""CPU kernels: host ISA detection and ctypes loading of the bundle's shared objects."""
from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings

from ..errors import BundleError

ISA_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
# x86-64 micro-architecture levels (psABI) by the /proc/cpuinfo flags they need
_REQUIRED = {
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


_WARNED: set[str] = set()       # FUSEBUILD_CPU_ISA values above the CPU, warned about once


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_isas() -> tuple[str, ...]:
    """ISA levels this host can run, best last; FUSEBUILD_CPU_ISA caps the choice (a cap above
    what the CPU runs is the CPU's best level, with one RuntimeWarning per value)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    flags, levels = _cpu_flags(), []
    for level in ISA_LEVELS:
        if not _REQUIRED[level] <= flags:
            break
        levels.append(level)
    forced = os.environ.get("FUSEBUILD_CPU_ISA")
    if forced:
        if forced not in ISA_LEVELS:
            raise BundleError(f"FUSEBUILD_CPU_ISA={forced!r} is not one of {', '.join(ISA_LEVELS)}")
        if forced in levels:
            levels = levels[:levels.index(forced) + 1]
        elif forced not in _WARNED:
            _WARNED.add(forced)
            warnings.warn(f"FUSEBUILD_CPU_ISA={forced}, but this CPU runs only "
                          f"{', '.join(levels) or 'none of the levels'}: using "
                          f"{levels[-1] if levels else 'no CPU kernels'}", RuntimeWarning,
                          stacklevel=2)
    return tuple(levels)


class Libraries:
    """Shared objects of one bundle, loaded on first use."""

    def __init__(self, root: str):
        self.root = root
        self._libs: dict[str, ctypes.CDLL] = {}
        self._lock = threading.Lock()

    def function(self, rel: str, symbol: str):
        lib = self._libs.get(rel)
        if lib is None:
            with self._lock:
                lib = self._libs.get(rel)
                if lib is None:
                    try:
                        lib = ctypes.CDLL(os.path.join(self.root, rel))
                    except OSError as e:
                        raise BundleError(f"cannot load {rel}: {e}") from None
                    self._libs[rel] = lib
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise BundleError(f"{rel} does not export {symbol}") from None
        # No argtypes: callers pass ctypes objects only (two c_int64 arrays, two c_int64), which
        # ctypes hands over without per-call conversion, at half the cost of declared argtypes.
        fn.restype = None
        return fn
