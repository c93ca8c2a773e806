"""CPU kernels: host ISA detection and ctypes loading of the bundle's shared objects."""
from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import threading
import warnings

from ..errors import BundleError
from .manifest import kernel_file, read_artifact

# CPU ISA levels of each architecture family (platform.machine() spelling), lowest first: the
# `cpu:<level>` targets a bundle may hold. `cpu:<family>` means all levels of one family.
LEVELS = {"x86_64": ("x86-64-v2", "x86-64-v3", "x86-64-v4"),
          "aarch64": ("armv8.2-a", "neoverse-v1", "neoverse-v2")}
FAMILY_NAMES = {"x86_64": "x86-64", "aarch64": "aarch64"}     # as written in targets
ISA_LEVELS = LEVELS["x86_64"]
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
    """Shared objects of one bundle, loaded on first use from the bytes that were hashed (see
    `load_verified`)."""

    def __init__(self, root: str, artifacts: dict[str, dict]):
        self.root, self.artifacts = root, artifacts
        self._libs: dict[str, ctypes.CDLL] = {}

    def function(self, rel: str, sha256: str, symbol: str):
        lib = self._libs.get(rel)
        if lib is None:
            where, name, size = kernel_file(self.root, self.artifacts, rel)
            lib = load_verified(where, name, sha256, size)
            self._libs[rel] = lib
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise BundleError(f"{rel} does not export {symbol}") from None
        # No argtypes: callers pass ctypes objects only (two c_int64 arrays, two c_int64), which
        # ctypes hands over without per-call conversion, at half the cost of declared argtypes.
        fn.restype = None
        return fn


_LOADED: dict[str, ctypes.CDLL] = {}      # by sha256: the same bytes are loaded once
_LOADED_LOCK = threading.Lock()


def load_verified(root: str, rel: str, sha256: str, size: int | None = None) -> ctypes.CDLL:
    """dlopen the shared object `root/rel` from the very bytes checked against `sha256`: they
    are read once, hashed, copied into a sealed memfd and loaded from it, so a file replaced
    after the check (or after `load()`) is refused, never run.

    The memfd stays open for the life of the process: the dynamic loader knows the library by
    the name /proc/self/fd/N, and would hand it out again for a later file opened as fd N."""
    with _LOADED_LOCK:
        lib = _LOADED.get(sha256)
        if lib is None:
            data = read_artifact(root, rel, sha256, size)
            fd = os.memfd_create(f"fusebuild:{os.path.basename(rel)}",
                                 os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                with open(fd, "wb", closefd=False) as f:
                    f.write(data)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
                lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            except OSError as e:
                os.close(fd)
                raise BundleError(f"cannot load {rel}: {e}") from None
            _LOADED[sha256] = lib
    return lib
