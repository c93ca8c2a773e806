"""Each ISA level's shared object runs vector code of that level in its hot loop (issue 6).

objdump (binutils, which comes with the C toolchain the CPU backend links with) disassembles the
`.so` of a few example groups; the hot loop of a kernel is its innermost loop (conditional
backward branch) holding the most packed single-precision instructions on the level's widest
registers. x86-64-v2 must use packed SSE on xmm
registers and no AVX encoding anywhere, v3 packed AVX on ymm and no zmm anywhere, v4 zmm.
float16/bfloat16 kernels must load and store their 16-bit values with packed widening and
narrowing instructions, not one element at a time, and no kernel without float64 operands may
call any function (libm, a math helper left out of line, Philox).
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from fusebuild.runtime.cpu import LEVELS, host_isas
from disassembly import Insn, disassemble, innermost_loops, unstrided

ISAS = LEVELS["x86_64"]   # the x86-64 levels (aarch64: test_aarch64_isa.py)

pytestmark = [pytest.mark.isa, pytest.mark.skipif(shutil.which("objdump") is None,
                                                  reason="objdump (binutils) is not installed")]

GROUPS = ("silu_add", "bias_gelu_tanh", "lstm_cell", "bias_gelu")
DTYPES = ("f32", "bf16", "f16")
REGISTER = {"x86-64-v2": "xmm", "x86-64-v3": "ymm", "x86-64-v4": "zmm"}
WIDEN = re.compile(r"^v?(pmovzxwd|punpck[lh]wd)$")            # u16 lanes -> u32 lanes
NARROW = re.compile(r"^v?(packusdw|packssdw|pmovdw|pshufb)$")  # u32 lanes -> u16 lanes
REG16 = r"%(?:[abcd]x|[sd]i|r\d+w)"
FLOAT64 = re.compile(r"^v?(add|sub|mul|div|sqrt|max|min)[ps]d$|^vfn?m(add|sub)\d+[ps]d$|"
                     r"^v?cvt(ps2pd|pd2ps|ss2sd|sd2ss)$")   # float64 arithmetic and conversions


def scalar_16bit_access(op: str, args: str) -> bool:
    """A load of one 16-bit element into a general register, or a store of one from it."""
    stores = op in ("mov", "movw") and bool(re.match(REG16 + ",", args)) and "(" in args
    return op in ("movzwl", "movzwq") or stores

def packed_single(body: list[Insn], register: str) -> list[Insn]:
    """Packed single-precision instructions on `register`s (xmm, ymm or zmm)."""
    return [i for i in body if i[1].endswith("ps") and not i[1].startswith("vbroadcast")
            and register in i[2]]


def x86_conditional(op: str) -> bool:
    return op.startswith("j") and op != "jmp"


def hot_loop(function: list[Insn], register: str) -> list[Insn]:
    """The innermost loop with the most packed single-precision instructions on `register`s:
    the vectorizer's main loop (its epilogue runs narrower)."""
    innermost = innermost_loops(function, x86_conditional)
    assert innermost, "kernel has no loop"
    return max(innermost, key=lambda body: len(packed_single(body, register)))


def kernels(bundle, group: str, dtype: str) -> list[dict]:
    """Manifest entries of a group's kernels for one dtype whose inner dimension is contiguous
    or broadcast (strided inner loops are not expected to vectorize)."""
    out = [k for k in bundle.manifest["kernels"] if k["group"] == group
           and k["key"].startswith(f"{group}({dtype}:")
           and unstrided(k["key"], group)]
    assert out, f"no {dtype} kernels of {group}"
    return out


def test_every_isa_level_is_built(examples_bundle):
    """Every level is built and checked here, whatever the host runs (kernels of levels the host
    cannot run are only disassembled)."""
    targets = {k["target"] for k in examples_bundle.manifest["kernels"]}
    assert {f"cpu:{isa}" for levels in LEVELS.values() for isa in levels} == targets
    assert set(host_isas()) <= set(ISAS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("isa", ISAS)
def test_hot_loop_uses_vectors_of_the_isa_level(examples_bundle, group, dtype, isa):
    entries = [k for k in kernels(examples_bundle, group, dtype) if k["target"] == f"cpu:{isa}"]
    if dtype == "f16" and not entries:
        pytest.skip(f"{group} has no float16 variant")
    assert entries, f"{group} {dtype} not built for {isa}"
    path = os.path.join(examples_bundle.root, entries[0]["file"])
    functions = disassemble(path)
    everything = [i for body in functions.values() for i in body]
    wider = {"x86-64-v2": ("ymm", "zmm"), "x86-64-v3": ("zmm",), "x86-64-v4": ()}[isa]
    assert not [i for i in everything if any(w in i[2] for w in wider)], \
        f"{path} uses registers wider than {isa} allows"
    if isa == "x86-64-v2":
        assert not [i for i in everything if i[1].startswith("v")], f"{path} uses AVX encodings"
    for entry in entries:
        loop = hot_loop(functions[entry["symbol"]], REGISTER[isa])
        vector = packed_single(loop, REGISTER[isa])
        listing = "\n".join(f"  {op} {args}" for _, op, args in loop)
        assert len(vector) >= 8, f"{entry['key']} at {isa}: hot loop has {len(vector)} packed " \
                                 f"{REGISTER[isa]} float ops:\n{listing}"
        if dtype in ("bf16", "f16"):
            ops = [op for _, op, _ in loop]
            assert any(WIDEN.match(op) for op in ops), \
                f"{entry['key']} at {isa}: 16-bit loads are not widened as vectors:\n{listing}"
            assert any(NARROW.match(op) for op in ops), \
                f"{entry['key']} at {isa}: 16-bit stores are not narrowed as vectors:\n{listing}"
            scalar = [f"{op} {args}" for _, op, args in loop if scalar_16bit_access(op, args)]
            assert not scalar, f"{entry['key']} at {isa}: scalar 16-bit memory access {scalar}"


@pytest.mark.parametrize("isa", ISAS)
def test_16bit_operands_move_as_vectors_in_every_group(examples_bundle, isa):
    """In every example kernel with float16/bfloat16 operands and contiguous or broadcast inner
    loops, the hot loop holds vector instructions of the level and no scalar 16-bit load or store
    (a `where` rendered as a branch once let LLVM sink loads into it and scalarize them)."""
    files: dict[str, list[dict]] = {}
    for k in examples_bundle.manifest["kernels"]:
        descs = k["key"][len(k["group"]) + 1:-1].split(",")
        if k["target"] == f"cpu:{isa}" and any(d.split(":")[0] in ("f16", "bf16") for d in descs) \
                and all(not d.endswith("s") for d in descs):
            files.setdefault(k["file"], []).append(k)
    assert files
    for rel, entries in files.items():
        functions = disassemble(os.path.join(examples_bundle.root, rel))
        for k in entries:
            loop = hot_loop(functions[k["symbol"]], REGISTER[isa])
            listing = "\n".join(f"  {op} {args}" for _, op, args in loop)
            assert packed_single(loop, REGISTER[isa]), f"{k['key']} at {isa}:\n{listing}"
            scalar = [f"{op} {args}" for _, op, args in loop if scalar_16bit_access(op, args)]
            assert not scalar, f"{k['key']} at {isa}: scalar 16-bit memory access {scalar}"


def test_kernels_call_no_function(examples_bundle):
    """Every kernel of every example group without float64 operands is one inlined loop nest:
    no call to libm, to a math helper or to Philox, at any x86-64 level (a call per element
    would also keep the loop scalar; aarch64: test_aarch64_isa.py)."""
    by_file: dict[str, list[dict]] = {}
    for k in examples_bundle.manifest["kernels"]:
        if "f64:" not in k["key"] and k["target"] in {f"cpu:{isa}" for isa in ISAS}:
            by_file.setdefault(k["file"], []).append(k)
    for rel, entries in by_file.items():
        functions = disassemble(os.path.join(examples_bundle.root, rel))
        for k in entries:
            calls = [f"{op} {args}" for _, op, args in functions[k["symbol"]] if op == "call"]
            assert not calls, f"{k['key']} in {rel} calls {calls}"


@pytest.mark.parametrize("isa", ISAS)
def test_float32_gelu_computes_in_float32(examples_bundle, isa):
    """bias_gelu's float32/bfloat16/float16 kernels (GELU's erfc, and its gradient's) hold no
    float64 arithmetic or conversion at any level: erf/erfc/gelu evaluate in float32 lanes."""
    entries = [k for k in examples_bundle.manifest["kernels"] if k["target"] == f"cpu:{isa}"
               and k["group"] in ("bias_gelu", "bias_gelu__grad") and "f64:" not in k["key"]]
    assert entries
    for rel in {k["file"] for k in entries}:
        functions = disassemble(os.path.join(examples_bundle.root, rel))
        for k in (k for k in entries if k["file"] == rel):
            wide = sorted({op for _, op, _ in functions[k["symbol"]] if FLOAT64.match(op)})
            assert not wide, f"{k['key']} at {isa} computes in float64: {wide}"
