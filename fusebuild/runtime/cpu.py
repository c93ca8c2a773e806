"""CPU kernels: host ISA detection and ctypes loading of the bundle's shared objects."""
from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import threading
import warnings

from ..artifact import check_description, read_description
from ..errors import BundleError
from .manifest import kernel_file, read_artifact

# CPU ISA levels of each architecture family (platform.machine() spelling), lowest first: the
# `cpu:<level>` targets a bundle may hold. `cpu:<family>` means all levels of one family.
LEVELS = {"x86_64": ("x86-64-v2", "x86-64-v3", "x86-64-v4"),
          "aarch64": ("armv8.2-a", "neoverse-v1", "neoverse-v2")}
FAMILY_NAMES = {"x86_64": "x86-64", "aarch64": "aarch64"}     # as written in targets
FAMILY_OF = {level: family for family, levels in LEVELS.items() for level in levels}
# x86-64 micro-architecture levels (psABI) by the /proc/cpuinfo flags they need (each level
# those of the levels below too)
_V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_REQUIRED = {"x86-64-v2": _V2, "x86-64-v3": _V3,
             "x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
# aarch64 features by their bit in the kernel's AT_HWCAP / AT_HWCAP2 words (Linux
# arch/arm64/include/uapi/asm/hwcap.h), named as in /proc/cpuinfo "Features"
AT_HWCAP, AT_HWCAP2 = 16, 26
_HWCAP = {"fp": 0, "asimd": 1, "fphp": 9, "asimdhp": 10, "sha3": 17, "asimddp": 20, "sve": 22}
_HWCAP2 = {"sve2": 1, "svei8mm": 9, "svebf16": 12, "i8mm": 13, "bf16": 14}
# Each aarch64 level needs the features of its LLVM CPU model that LLVM selects from plain IR
# (no intrinsics): fp16 arithmetic and conversions, dot products (the vectorizer's partial
# reductions: sdot/udot, and usdot with i8mm), bfloat16 conversions (bfcvt), NEON eor3 for
# xor chains (sha3: neoverse-v1 only; neoverse-v2 uses SVE2's eor3). Features reachable only
# through intrinsics or atomics (aes, sha1/2, sm4, rdm, fcma, jscvt, lse, rcpc) are not required.
_ARMV82 = {"fp", "asimd", "fphp", "asimdhp", "asimddp"}
_SVE = _ARMV82 | {"sve", "bf16", "svebf16", "i8mm", "svei8mm"}
_REQUIRED |= {"armv8.2-a": _ARMV82, "neoverse-v1": _SVE | {"sha3"}, "neoverse-v2": _SVE | {"sve2"}}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


_WARNED: set[str] = set()       # FUSEBUILD_CPU_ISA values above the CPU, warned about once


def host_family() -> str | None:
    """The host's architecture family (a key of LEVELS), None for others."""
    return _MACHINES.get(platform.machine().lower())


def _cpu_flags() -> set[str]:
    """x86-64: the flags of /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hwcap_words() -> tuple[int, int]:
    """aarch64: the kernel's AT_HWCAP and AT_HWCAP2 words (what qemu-user emulates, where
    /proc/cpuinfo describes the machine running qemu)."""
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return getauxval(AT_HWCAP), getauxval(AT_HWCAP2)


def hwcap_features(hwcap: int, hwcap2: int) -> set[str]:
    """The aarch64 features (of those the levels need) set in HWCAP words."""
    return ({name for name, bit in _HWCAP.items() if hwcap >> bit & 1}
            | {name for name, bit in _HWCAP2.items() if hwcap2 >> bit & 1})


def supported_levels(family: str, flags: set[str]) -> tuple[str, ...]:
    """The levels of `family` a CPU with `flags` runs, lowest first: each needs all its
    features (x86-64 levels include the lower ones; an aarch64 CPU may run neoverse-v2 but not
    neoverse-v1, which needs sha3)."""
    return tuple(level for level in LEVELS[family] if _REQUIRED[level] <= flags)


def missing_features(level: str) -> set[str]:
    """The features `level` needs that this CPU lacks."""
    return _REQUIRED[level] - _host_flags(host_family())


def _host_flags(family: str | None) -> set[str]:
    if family == "x86_64":
        return _cpu_flags()
    if family == "aarch64":
        return hwcap_features(*hwcap_words())
    return set()


def no_level_reason() -> str:
    """Why this host runs no ISA level: its architecture, or what the lowest level needs."""
    family = host_family()
    if family is None:
        return f"no CPU ISA level: {platform.machine() or 'this machine'} is neither x86-64 " \
               "nor aarch64"
    lowest = LEVELS[family][0]
    return (f"none of the {FAMILY_NAMES[family]} levels: {lowest} needs "
            f"{', '.join(sorted(missing_features(lowest)))}, which this CPU lacks")


def host_isas() -> tuple[str, ...]:
    """ISA levels this host can run, best last; FUSEBUILD_CPU_ISA caps the choice (a cap above
    what the CPU runs is the CPU's best level below it, with one RuntimeWarning per value; a
    level of another architecture family is an error)."""
    family = host_family()
    if family is None:
        return ()
    levels = supported_levels(family, _host_flags(family))
    forced = os.environ.get("FUSEBUILD_CPU_ISA")
    if forced:
        order = LEVELS[family]
        if forced not in order:
            other = [f for f, names in LEVELS.items() if forced in names]
            why = (f" ({forced} is an {FAMILY_NAMES[other[0]]} level and this host is "
                   f"{FAMILY_NAMES[family]})" if other else "")
            raise BundleError(f"FUSEBUILD_CPU_ISA={forced!r} is not one of {', '.join(order)}{why}")
        capped = tuple(level for level in levels if order.index(level) <= order.index(forced))
        if forced not in levels and forced not in _WARNED:
            _WARNED.add(forced)
            warnings.warn(f"FUSEBUILD_CPU_ISA={forced}, but this CPU runs only "
                          f"{', '.join(levels) or 'none of the levels'}: using "
                          f"{capped[-1] if capped else 'no CPU kernels'}", RuntimeWarning,
                          stacklevel=2)
        levels = capped
    return levels


class Libraries:
    """Shared objects of one bundle, loaded on first use from the bytes that were hashed (see
    `load_verified`)."""

    def __init__(self, root: str, artifacts: dict[str, dict]):
        self.root, self.artifacts = root, artifacts
        self._libs: dict[str, ctypes.CDLL] = {}

    def function(self, rel: str, sha256: str, symbol: str, expected: bytes):
        """Kernel `symbol` of shared object `rel`, which must describe itself as `expected`
        (its checked description, `Bundle.description`)."""
        lib = self._libs.get(rel)
        if lib is None:
            where, name, size = kernel_file(self.root, self.artifacts, rel)
            lib = load_verified(where, name, sha256, expected, size)
            self._libs[rel] = lib
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise BundleError(f"{rel} does not export {symbol}") from None
        # No argtypes: callers pass ctypes objects only (two c_int64 arrays, two c_int64), which
        # ctypes hands over without per-call conversion, at half the cost of declared argtypes.
        fn.restype = None
        return fn


_LOADED: dict[str, tuple[ctypes.CDLL, bytes]] = {}  # by sha256: the same bytes are loaded once
_LOADED_LOCK = threading.Lock()


def load_verified(root: str, rel: str, sha256: str, expected: bytes,
                  size: int | None = None) -> ctypes.CDLL:
    """dlopen the shared object `root/rel` from the very bytes checked against `sha256` and the
    description `expected` (`artifact.check_description`; checked for every caller, as bytes
    loaded for one manifest may be asked for by another): they are read once, hashed, copied
    into a sealed memfd and loaded from it, so a file replaced after the check (or after
    `load()`) is refused, never run.

    The memfd stays open for the life of the process: the dynamic loader knows the library by
    the name /proc/self/fd/N, and would hand it out again for a later file opened as fd N."""
    with _LOADED_LOCK:
        loaded = _LOADED.get(sha256)
        if loaded is not None:
            check_description(loaded[1], rel, expected)
            return loaded[0]
        data = read_artifact(root, rel, sha256, size)
        found = read_description(data, rel)
        check_description(found, rel, expected)
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
        _LOADED[sha256] = lib, found
    return lib
