"""numba/llvmlite toolchain: generated numba source -> plain C-ABI shared objects per CPU ISA level.

Pipeline (per module): exec the source, compile each entry function with `numba.cfunc`
(error_model="numpy", so no exception paths) at NUMBA_OPT=0, link the libraries into one LLVM
module, drop numba's Python-facing wrappers, add a `void sym(const int64_t *ptrs, const int64_t
*meta, int64_t start, int64_t stop)` entry per kernel, internalize everything else and mark it
`alwaysinline`, then per ISA level: retarget the module to the level's triple and data layout,
O3 pipeline (loop and SLP vectorization) for an llvmlite target machine of that CPU, emit an
object, link it into a stripped `.so` whose only undefined symbols are libc/libm: x86-64 levels
with `cc -shared`, aarch64 levels with ld.lld (`lld.py`), so no aarch64 machine or C library is
needed to build them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache

from ..errors import ToolchainError
from .. import elf
from ..abi import ARTIFACT_SYMBOL
from ..runtime.cpu import FAMILY_OF
from . import lld

ISAS = tuple(FAMILY_OF)
TRIPLES = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
# The llvmlite target machine of each ISA level: (cpu, features). AVX-512 code is kept on
# 512-bit vectors; armv8.2-a is the baseline of Graviton2 / Ampere Altra (Neoverse N1); the
# Neoverse levels take every feature from the CPU (SVE; SVE2 on V2).
MACHINES = {
    "x86-64-v2": ("x86-64-v2", ""),
    "x86-64-v3": ("x86-64-v3", ""),
    "x86-64-v4": ("x86-64-v4", "-prefer-256-bit"),
    "armv8.2-a": ("generic", "+v8.2a,+neon,+fullfp16,+dotprod"),
    "neoverse-v1": ("neoverse-v1", ""),
    "neoverse-v2": ("neoverse-v2", ""),
}
LINK_FLAGS = ("-shared", "-Wl,--build-id=none", "-Wl,-s", "-Wl,-z,noexecstack")


def versions(isas: tuple[str, ...]) -> dict[str, str]:
    """numba, llvmlite and the version lines of the linkers that building `isas` uses (all of
    them shape the bytes): `cc` for x86-64 levels, `ld.lld` for aarch64 levels."""
    from importlib import metadata
    out = {"numba": metadata.version("numba"), "llvmlite": metadata.version("llvmlite")}
    families = {_family(isa) for isa in isas}
    if "x86_64" in families:
        cc = _find_cc()
        try:
            proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
            out["cc"] = (proc.stdout.splitlines()[0].strip() if proc.returncode == 0
                         and proc.stdout else cc)
        except subprocess.TimeoutExpired:
            out["cc"] = cc
    if "aarch64" in families:
        out["ld.lld"] = lld.version()
    return out


def _family(isa: str) -> str:
    if isa not in FAMILY_OF:
        raise ToolchainError(f"unknown CPU ISA level '{isa}'; known: {', '.join(ISAS)}")
    return FAMILY_OF[isa]


def _find_cc() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if not path:
        raise ToolchainError(
            f"no C compiler/linker found ('{cc}'): the CPU backend links its objects with one. "
            "Install gcc or clang (e.g. `apt-get install gcc`) or set CC.")
    return path


@lru_cache(maxsize=None)
def _llvm():
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    return llvm


def source_to_llvm(source: str, entries: dict[str, str], filename: str = "<fusebuild>") -> str:
    """Compile the entry functions of numba `source` into one LLVM module (text).

    `entries` maps function names in the source to the C symbols to export.
    """
    with _numba_unoptimized():
        return _compile_entries(source, entries, filename)


@contextlib.contextmanager
def _numba_unoptimized():
    """numba's own pipeline at O0 while we compile: its O3 would vectorize for the host CPU.
    Our per-ISA pipeline optimizes afterwards. Held under numba's compiler lock."""
    from numba.core import config
    from numba.core.compiler_lock import global_compiler_lock
    with global_compiler_lock:
        saved = config.OPT
        config.OPT = type(saved)(0)
        try:
            yield
        finally:
            config.OPT = saved


def _compile_entries(source: str, entries: dict[str, str], filename: str) -> str:
    from numba import cfunc, types

    namespace: dict = {"__name__": "fusebuild_generated_" + hashlib.sha1(
        source.encode()).hexdigest()[:12]}
    exec(compile(source, filename, "exec"), namespace)
    sig = types.void(types.CPointer(types.int64), types.CPointer(types.int64), types.int64,
                     types.int64)
    llvm = _llvm()
    module = None
    stubs = []
    for fn_name, symbol in entries.items():
        compiled = cfunc(sig, nopython=True, error_model="numpy")(namespace[fn_name])
        lib_module = llvm.parse_assembly(compiled._library.get_llvm_str())
        inner = _inner_function(lib_module, compiled.native_name)
        stubs.append(f'define void @{symbol}(ptr %p, ptr %m, i64 %a, i64 %b) {{\n'
                     f'  %r = alloca ptr\n  %e = alloca ptr\n'
                     f'  %s = call i32 @"{inner}"(ptr %r, ptr %e, ptr %p, ptr %m, i64 %a, i64 %b)\n'
                     f'  ret void\n}}\n'
                     f'declare i32 @"{inner}"(ptr, ptr, ptr, ptr, i64, i64)\n')
        if module is None:
            module = lib_module
        else:
            module.link_in(lib_module)
    for stub in stubs:
        module.link_in(llvm.parse_assembly(f'target triple = "{module.triple}"\n' + stub))
    exported = set(entries.values())
    for fn in module.functions:
        if not fn.is_declaration and fn.name not in exported:
            fn.linkage = "internal"
    for gv in module.global_variables:
        if not gv.is_declaration:
            gv.linkage = "internal"
    return _always_inline(str(module))   # the internal wrappers die in llvm_to_object's O3


def _always_inline(llvm_ir: str) -> str:
    """Mark every internal function `alwaysinline`: the generated source's helpers (compiled
    once per module by numba, which is much faster than numba's own inlining) must end up inside
    the kernels' loops, and LLVM's inliner would leave a big helper called by several kernels out
    of line, keeping those loops scalar."""
    return _INTERNAL_DEFINE.sub(lambda m: m.group(1) + " alwaysinline {", llvm_ir)


_INTERNAL_DEFINE = re.compile(r"^(define internal [^\n]*?)\s*\{$", re.M)


def _inner_function(module, wrapper_name: str) -> str:
    """Name of the nopython function that numba's cfunc wrapper calls."""
    wrapper = module.get_function(wrapper_name)
    for block in wrapper.blocks:
        for inst in block.instructions:
            if inst.opcode == "call":
                callee = list(inst.operands)[-1].name
                if callee.startswith("_ZN"):
                    return callee
    raise ToolchainError(f"could not find the function behind numba wrapper {wrapper_name}")


def llvm_to_object(llvm_ir: str, isa: str) -> bytes:
    """Optimize `llvm_ir` (target-independent numba IR) for ISA level `isa` and emit an ELF
    object of the level's architecture."""
    triple, (cpu, features) = TRIPLES[_family(isa)], MACHINES[isa]
    llvm = _llvm()
    tm = llvm.Target.from_triple(triple).create_target_machine(
        cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")
    module = llvm.parse_assembly(llvm_ir)
    module.triple = triple
    module.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)
    undefined = sorted(f.name for f in module.functions
                       if f.is_declaration and not f.name.startswith("llvm."))
    bad = [n for n in undefined if not _is_libc_or_libm(n)]
    if bad:
        raise ToolchainError(f"generated CPU code references non-libc symbols: {', '.join(bad)}")
    return tm.emit_object(module)


_LIBM = re.compile(r"^(exp|exp2|expm1|log|log2|log10|log1p|sqrt|sin|cos|sincos|tan|asin|acos|atan|"
                   r"atan2|sinh|cosh|tanh|erf|erfc|lgamma|pow|fmod|floor|ceil|trunc|rint|round|"
                   r"fabs|copysign|memcpy|memset|memmove)f?$")


# weak references of the C runtime's start files that `cc -shared` links in
_CRT_HOOKS = {"__cxa_finalize", "__gmon_start__", "_ITM_deregisterTMCloneTable",
              "_ITM_registerTMCloneTable"}


def _is_libc_or_libm(name: str) -> bool:
    return bool(_LIBM.match(name))


def check_imports(so: bytes, soname: str) -> None:
    """Refuse a shared object that needs symbols other than libc/libm functions, such as a
    backend's runtime calls (`__truncsfhf2`) that the IR check of `llvm_to_object` cannot see."""
    bad = sorted(n for n, weak in elf.undefined(so).items()
                 if not _is_libc_or_libm(n) and not (weak and n in _CRT_HOOKS))
    if bad:
        raise ToolchainError(f"{soname} needs symbols outside libc and libm: {', '.join(bad)}")


def link_shared(obj: bytes, soname: str, isa: str) -> bytes:
    """Link the object of ISA level `isa` into a stripped shared object that needs only libc
    and libm, and check that it does."""
    so = lld.link_shared(obj, soname) if _family(isa) == "aarch64" else _link_cc(obj, soname)
    check_imports(so, soname)
    return so


def _link_cc(obj: bytes, soname: str) -> bytes:
    cc = _find_cc()
    with tempfile.TemporaryDirectory(prefix="fusebuild-ld-") as tmp:
        o_path, so_path = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
        with open(o_path, "wb") as f:
            f.write(obj)
        cmd = [cc, *LINK_FLAGS, f"-Wl,-soname,{soname}", "-o", so_path, o_path, "-lm", "-lc"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolchainError(f"linking {soname} failed ({' '.join(cmd)}):\n{proc.stderr}")
        with open(so_path, "rb") as f:
            return f.read()


def _data_global(data: bytes) -> str:
    """LLVM IR defining ARTIFACT_SYMBOL as an exported constant holding `data`."""
    text = "".join(f"\\{b:02X}" for b in data)
    return f'@{ARTIFACT_SYMBOL} = constant [{len(data)} x i8] c"{text}", align 1\n'


def compile_shared_objects(source: str, entries: dict[str, str], embeds: dict[str, bytes],
                           soname: str, filename: str = "<fusebuild>") -> dict[str, bytes]:
    """numba source -> {isa: .so bytes} for the ISA levels of `embeds`, each .so exporting its
    level's bytes there as the data object ARTIFACT_SYMBOL; the numba step runs once for all
    ISA levels, of every architecture family."""
    llvm_ir = source_to_llvm(source, entries, filename)
    return {isa: link_shared(llvm_to_object(llvm_ir + _data_global(data), isa),
                             soname, isa) for isa, data in embeds.items()}
