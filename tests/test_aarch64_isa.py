"""Each aarch64 ISA level's shared object runs vector code of that level in its hot loop
(issue 13), checked on the x86-64 build machine by disassembly (binutils' aarch64 objdump).

A few example groups are cross-built for `cpu:aarch64`. The hot loop of a kernel is its innermost
loop (conditional backward branch) holding the most float instructions on 4 x float32 NEON
registers (`v<n>.4s`) or SVE registers (`z<n>.s`). armv8.2-a must use NEON and no SVE register
anywhere; neoverse-v1 must use SVE with predicates (LLVM folds the loop's tail into a
`whilelo` predicate). At neoverse-v2 (Grace: 128-bit SVE2) LLVM 22 chooses per loop by its cost
model; measured: SVE for the float16 kernels of silu_add and bias_gelu_tanh, NEON for the others
of these groups (over every example kernel with contiguous or broadcast inner loops: 79 NEON,
41 SVE; at neoverse-v1 all SVE), so vector code of either kind is required there.
float16/bfloat16 values must be loaded and stored as vectors (NEON `ushll`/`uxtl`/`shll` and
`xtn`; SVE extending `ld1h` / truncating `st1h` into 32-bit lanes, or `uunpk`/`uzp1`), never one
element at a time, and no kernel without float64 operands may call any function (libm, a math
helper left out of line, Philox). Every `.so` is an aarch64 ELF exporting exactly its kernels,
needing libm.so.6 and libc.so.6 and nothing outside them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess

import pytest

from fusebuild import build, elf, spec
from fusebuild.runtime.cpu import LEVELS
from fusebuild.toolchain.numba import _is_libc_or_libm

from conftest import SPECS, no_lld
from disassembly import Insn, branch_target, disassemble, innermost_loops, unstrided

OBJDUMP = "aarch64-linux-gnu-objdump"
pytestmark = [
    pytest.mark.skipif(shutil.which(OBJDUMP) is None, reason=f"{OBJDUMP} is not installed "
                       "(apt-get install binutils-aarch64-linux-gnu)"),
    pytest.mark.skipif(bool(no_lld()), reason=no_lld())]

ISAS = LEVELS["aarch64"]
GROUPS = ("silu_add", "bias_gelu_tanh", "lstm_cell", "bias_gelu")
BUILT = GROUPS + ("bias_dropout_residual", "softmax")    # + Philox, a row reduction
DTYPES = ("f32", "bf16", "f16")
NEON, SVE = re.compile(r"\bv\d+\.4s\b"), re.compile(r"\bz\d+\.s\b")
SVE_ANY = re.compile(r"\b[zp]\d+\b")                     # any SVE vector or predicate register
WIDEN = re.compile(r"^([us]shll|[us]xtl|shll|[us]unpk(lo|hi))2?$|^ld1s?h$")
NARROW = re.compile(r"^(xtn|uzp1|uqxtn|shrn)2?$|^st1h$")
SCALAR16 = re.compile(r"^(ldrh|ldrsh|strh|ldurh|sturh)$")
FLOAT64 = re.compile(r"\bv\d+\.2d\b|\bz\d+\.d\b|\bd\d+\b")   # float64 lanes or registers
LANE16 = re.compile(r"\bv\d+\.h\[\d+\]|\{v\d+\.h\}\[\d+\]|^[hH]\d+,")   # one 16-bit lane, h<n>

@pytest.fixture(scope="module")
def a64(tmp_path_factory):
    """(bundle root, manifest) of the example groups BUILT for every aarch64 level."""
    plan = spec.load_plan([SPECS], targets=["cpu:aarch64"])
    plan = dataclasses.replace(plan, groups=tuple(g for g in plan.groups
                                                  if g.group.name in BUILT))
    root = build.build(plan, str(tmp_path_factory.mktemp("a64")), progress=False).path
    with open(os.path.join(root, "manifest.json")) as f:
        return root, json.load(f)


def objdump(path: str, *flags: str) -> str:
    return subprocess.run([OBJDUMP, *flags, path], capture_output=True, text=True,
                          check=True).stdout


def a64_conditional(op: str) -> bool:
    """b.<cond>, cbz/cbnz, tbz/tbnz."""
    return op.startswith("b.") or op in ("cbz", "cbnz", "tbz", "tbnz")


def vector_float(body: list[Insn], register: re.Pattern) -> list[Insn]:
    """Float instructions (f...) on 4 x float32 NEON or SVE single-precision registers."""
    return [i for i in body if i[1].startswith("f") and register.search(i[2])]


def hot_loop(function: list[Insn]) -> list[Insn]:
    innermost = innermost_loops(function, a64_conditional)
    assert innermost, "kernel has no loop"
    return max(innermost, key=lambda b: len(vector_float(b, NEON)) + len(vector_float(b, SVE)))


def kernels(manifest: dict, group: str, dtype: str, isa: str) -> list[dict]:
    """A group's kernels at one level for one dtype whose inner dims are contiguous or
    broadcast (strided inner loops are not expected to vectorize)."""
    return [k for k in manifest["kernels"] if k["group"] == group and k["target"] == f"cpu:{isa}"
            and k["key"].startswith(f"{group}({dtype}:")
            and unstrided(k["key"], group)]


def test_every_aarch64_level_is_built_into_its_folder(a64):
    root, manifest = a64
    assert {k["target"] for k in manifest["kernels"]} == {f"cpu:{isa}" for isa in ISAS}
    assert {k["file"] for k in manifest["kernels"]} == \
        {f"cpu/{isa}/{g}.so" for isa in ISAS for g in BUILT}
    assert set(manifest["toolchain"]) == {"fusebuild", "numba", "llvmlite", "ld.lld"}


@pytest.mark.parametrize("isa", ISAS)
def test_shared_objects_are_aarch64_and_need_only_libc_and_libm(a64, isa):
    """e_machine EM_AARCH64, exported functions = the kernels' symbols, DT_NEEDED libm.so.6 and
    libc.so.6, SONAME <group>.so, undefined symbols libc/libm functions only, stack not
    executable; objdump and fusebuild.elf agree."""
    root, manifest = a64
    for g in BUILT:
        rel = f"cpu/{isa}/{g}.so"
        path = os.path.join(root, rel)
        with open(path, "rb") as f:
            data = f.read()
        symbols = {k["symbol"] for k in manifest["kernels"] if k["file"] == rel}
        assert elf.header(data)[0] == elf.EM_AARCH64
        headers = objdump(path, "-p")
        assert "file format elf64-littleaarch64" in headers
        assert re.findall(r"NEEDED\s+(\S+)", headers) == ["libm.so.6", "libc.so.6"]
        assert re.findall(r"SONAME\s+(\S+)", headers) == [f"{g}.so"]
        stack = re.search(r"STACK off.*\n\s+filesz.*flags (\S+)", headers)
        assert stack and stack.group(1) == "rw-", f"{rel}: stack is not rw- only"
        dynamic = objdump(path, "-T").splitlines()
        exported = {ln.split()[-1] for ln in dynamic if re.search(r"\bg\s+DF\s+\.text\b", ln)}
        undefined = {ln.split()[-1] for ln in dynamic if "*UND*" in ln}
        assert exported == symbols == elf.functions(data)
        assert undefined == set(elf.undefined(data))
        assert all(_is_libc_or_libm(n) for n in undefined), f"{rel} needs {sorted(undefined)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("isa", ISAS)
def test_hot_loop_uses_vectors_of_the_level(a64, isa, group, dtype):
    root, manifest = a64
    entries = kernels(manifest, group, dtype, isa)
    if dtype == "f16" and not entries:
        pytest.skip(f"{group} has no float16 variant")
    assert entries, f"{group} {dtype} not built for {isa}"
    path = os.path.join(root, entries[0]["file"])
    functions = disassemble(path, OBJDUMP)
    if isa == "armv8.2-a":
        sve = [f"{op} {args}" for body in functions.values() for _, op, args in body
               if SVE_ANY.search(args)]
        assert not sve, f"{path} uses SVE registers: {sve[:5]}"
    for entry in entries:
        loop = hot_loop(functions[entry["symbol"]])
        listing = "\n".join(f"  {op} {args}" for _, op, args in loop)
        neon, sve = vector_float(loop, NEON), vector_float(loop, SVE)
        want = {"armv8.2-a": neon, "neoverse-v1": sve, "neoverse-v2": neon + sve}[isa]
        assert len(want) >= 8, f"{entry['key']} at {isa}: hot loop has {len(neon)} NEON and " \
                               f"{len(sve)} SVE float ops:\n{listing}"
        if isa == "neoverse-v1":
            assert any(re.search(r"\bp\d+(/[zm])?\b", args) for _, _, args in loop), \
                f"{entry['key']} at {isa}: SVE loop without predicates:\n{listing}"
        if dtype in ("bf16", "f16"):
            ops = [op for _, op, _ in loop]
            assert any(WIDEN.match(op) for op in ops), \
                f"{entry['key']} at {isa}: 16-bit loads are not widened as vectors:\n{listing}"
            assert any(NARROW.match(op) for op in ops), \
                f"{entry['key']} at {isa}: 16-bit stores are not narrowed as vectors:\n{listing}"
            scalar = [f"{op} {args}" for _, op, args in loop
                      if SCALAR16.match(op) or LANE16.search(args)]
            assert not scalar, f"{entry['key']} at {isa}: scalar 16-bit access {scalar}"


def test_kernels_call_no_function(a64):
    """No kernel without float64 operands calls anything (bl, blr, br, or a tail call: a `b`
    out of the function), at any level."""
    root, manifest = a64
    files = {k["file"] for k in manifest["kernels"]}
    for rel in sorted(files):
        functions = disassemble(os.path.join(root, rel), OBJDUMP)
        for k in manifest["kernels"]:
            if k["file"] != rel or "f64:" in k["key"]:
                continue
            body = functions[k["symbol"]]
            first, last = body[0][0], body[-1][0]
            calls = [f"{op} {args}" for _, op, args in body
                     if op in ("bl", "blr", "br") or op == "b" and
                     not first <= (branch_target(args) or first) <= last]
            assert not calls, f"{k['key']} in {rel} calls {calls}"


def test_float32_gelu_computes_in_float32(a64):
    """bias_gelu's float32/bfloat16/float16 kernels hold no float64 arithmetic or conversion at
    any level (erf/erfc/gelu evaluate in float32 lanes)."""
    root, manifest = a64
    entries = [k for k in manifest["kernels"] if k["group"] == "bias_gelu"]
    assert entries
    for rel in {k["file"] for k in entries}:
        functions = disassemble(os.path.join(root, rel), OBJDUMP)
        for k in (k for k in entries if k["file"] == rel):
            wide = [f"{op} {args}" for _, op, args in functions[k["symbol"]]
                    if op.startswith("f") and op != "fmov" and FLOAT64.search(args)]
            assert not wide, f"{k['key']} at {k['target']} computes in float64: {wide[:5]}"
