"""numba/llvmlite toolchain: generated numba source -> plain C-ABI shared objects per x86-64 ISA.

Pipeline (per module): exec the source, compile each entry function with `numba.cfunc`
(error_model="numpy", so no exception paths) at NUMBA_OPT=0, link the libraries into one LLVM
module, drop numba's Python-facing wrappers, add a `void sym(const int64_t *ptrs, const int64_t
*meta, int64_t start, int64_t stop)` entry per kernel, internalize everything else and mark it
`alwaysinline`, then per ISA:
O3 pipeline for an llvmlite target machine of that CPU, emit an object, link with `cc -shared`
into a stripped `.so` whose only undefined symbols are libc/libm.
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

ISAS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
LINK_FLAGS = ("-shared", "-Wl,--build-id=none", "-Wl,-s", "-Wl,-z,noexecstack")


def versions() -> dict[str, str]:
    """numba, llvmlite and the linker's version line (all of them shape the bytes)."""
    from importlib import metadata
    cc = _find_cc()
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        line = proc.stdout.splitlines()[0].strip() if proc.returncode == 0 and proc.stdout else cc
    except subprocess.TimeoutExpired:
        line = cc
    return {"numba": metadata.version("numba"), "llvmlite": metadata.version("llvmlite"),
            "cc": line}


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
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
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
    """Optimize `llvm_ir` for x86-64 ISA level `isa` and emit an ELF object."""
    if isa not in ISAS:
        raise ToolchainError(f"unknown CPU ISA level '{isa}'; known: {', '.join(ISAS)}")
    llvm = _llvm()
    target = llvm.Target.from_triple("x86_64-unknown-linux-gnu")
    features = "-prefer-256-bit" if isa == "x86-64-v4" else ""
    tm = target.create_target_machine(cpu=isa, features=features, opt=3, reloc="pic",
                                      codemodel="default")
    module = llvm.parse_assembly(llvm_ir)
    module.triple = "x86_64-unknown-linux-gnu"
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


_LIBM = re.compile(r"^(exp|exp2|expm1|log|log2|log10|log1p|sqrt|sin|cos|tan|asin|acos|atan|"
                   r"atan2|sinh|cosh|tanh|erf|erfc|lgamma|pow|fmod|floor|ceil|trunc|rint|round|"
                   r"fabs|copysign|memcpy|memset|memmove)f?$")


def _is_libc_or_libm(name: str) -> bool:
    return bool(_LIBM.match(name))


def link_shared(obj: bytes, soname: str) -> bytes:
    """Link one object into a stripped shared object that needs only libc and libm."""
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


def compile_shared_objects(source: str, entries: dict[str, str], isas: tuple[str, ...],
                           soname: str, filename: str = "<fusebuild>") -> dict[str, bytes]:
    """numba source -> {isa: .so bytes}; the numba step runs once for all ISA levels."""
    llvm_ir = source_to_llvm(source, entries, filename)
    return {isa: link_shared(llvm_to_object(llvm_ir, isa), soname) for isa in isas}
