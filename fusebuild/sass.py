"""Static SASS report of cubins: what each CUDA kernel costs on a GPU, read without one.

Per kernel of a cubin: registers, spill bytes (static bytes of its local-memory stores STL and
loads LDL: with no local arrays in the generated code, these are spills), local memory and call
stack, static shared memory, the launch bound, the most threads a block may have, the theoretical
occupancy at the launch block size (`codegen.cuda.BLOCK`) on each architecture, the FP64
instructions of the kernel and the instruction mix of its hot loop. (A reduction kernel also runs
as a block per row of 64 to 1024 threads with the dynamic shared memory of its held rows:
`occupancy` takes those, and tests/test_sass.py checks every such launch shape.)

Tools: `nvdisasm` and `cuobjdump` of the pip wheels nvidia-cuda-nvdisasm and
nvidia-cuda-cuobjdump (found under site-packages/nvidia/cu*/bin). nvdisasm takes one ELF file a
run and spends ~0.4 s of CPU starting, so the code sections (`.text.<kernel>`) of every cubin of
one SM are concatenated and disassembled as one raw instruction stream (`nvdisasm --binary SMxy`):
one run per SM whatever the number of cubins. Registers, stack, local and shared memory come from
`cuobjdump -res-usage`, the launch bound from the kernel's `.nv.info` attributes
(EIATTR_MAX_THREADS).

Hot loop: the innermost loops of the kernel's own code that access global memory, a loop being
the span from a backward branch (`BRA` to an address at or before its own) to its target;
"innermost" keeps the spans holding no other such span (a loop over a row, not the fmod or
integer-pow loop inside it, which touch no global memory). A kernel with no such loop (the flat
elementwise launch: each thread computes V elements and exits) counts its whole body, every
instantiation of the vector/scalar and 32/64-bit paths included. A kernel's section also holds
the subroutines NVRTC emits for it (division slow paths, the Payne-Hanek reduction of sin(double):
a call target up to its RET): they are left out of the hot loop (the calls to them are counted)
but counted in the kernel's FP64 instructions and spills.

Occupancy follows NVIDIA's occupancy calculator (cuda_occupancy.h of CUDA 13: warp, block,
register and shared-memory limits; registers allocated per warp in units of 256 across 4 SM
sub-partitions; 1 KB of shared memory reserved per block from compute capability 8.0, allocated in
128-byte units, the largest carveout) with the per-SM limits of the CUDA C++ Programming Guide's
"Technical Specifications per Compute Capability" table (`SM_LIMITS`). Build side only: the
runtime never imports this module.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from . import elf
from .codegen.cuda import BLOCK
from .errors import BundleError, ToolchainError, UsageError

INSTALL = ("install the pip packages nvidia-cuda-nvdisasm and nvidia-cuda-cuobjdump "
           "(`pip install 'fusebuild[cuda]'`)")
WARP = 32
REGS_PER_SM = REGS_PER_BLOCK = 65536
REG_UNIT = 256                  # registers are allocated per warp in units of 256
SUB_PARTITIONS = 4
MAX_REGS_PER_THREAD = 255
SHARED_UNIT, SHARED_RESERVED = 128, 1024
MAX_THREADS_PER_BLOCK = 1024


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of one compute capability."""
    threads: int        # resident threads
    blocks: int         # resident blocks
    shared: int         # shared memory (bytes, the largest carveout)
    optin: int          # shared memory a block may have (bytes, with the opt-in attribute)


SM_LIMITS = {80: SmLimits(2048, 32, 164 << 10, 163 << 10),
             86: SmLimits(1536, 16, 100 << 10, 99 << 10),
             89: SmLimits(1536, 24, 100 << 10, 99 << 10),
             90: SmLimits(2048, 32, 228 << 10, 227 << 10),
             100: SmLimits(2048, 32, 228 << 10, 227 << 10),
             120: SmLimits(1536, 24, 100 << 10, 99 << 10)}

_FP64_OPS = {"DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX", "DMMA"}
_FP64_MODS = {"F64", "RCP64H", "RSQ64H"}
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}
_INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_EIATTR_MAX_THREADS, _EIFMT_SVAL = 0x05, 4

Insn = tuple[int, str, str]     # address in the kernel's section, mnemonic, operands


@dataclass(frozen=True)
class Mix:
    """Instruction mix of a stretch of SASS."""
    instructions: int
    loads: dict[int, int]       # global loads (LDG) by width in bits
    stores: dict[int, int]      # global stores (STG) by width in bits
    fp64: int
    calls: int
    bar: int
    shfl: int


@dataclass(frozen=True)
class KernelSass:
    symbol: str
    sm: int
    registers: int
    stack: int                  # bytes of call stack per thread (local memory)
    local: int                  # bytes of local memory per thread
    shared: int                 # bytes of static shared memory per block
    bound: int                  # __launch_bounds__ (0: none)
    spill_stores: int           # bytes of STL instructions (static)
    spill_loads: int            # bytes of LDL instructions (static)
    fp64: int                   # FP64 instructions in the whole kernel
    hot: Mix
    looped: bool                # the hot stretch is a loop (else the whole body)
    occupancy: dict[int, float] = field(default_factory=dict)   # at BLOCK, per SM of runs_on

    @property
    def max_threads(self) -> int:
        """The most threads a block may have (cudaFuncAttributes.maxThreadsPerBlock)."""
        per_warp = _regs_per_warp(self.registers)
        warps = (REGS_PER_BLOCK // per_warp) // SUB_PARTITIONS * SUB_PARTITIONS if per_warp \
            else MAX_THREADS_PER_BLOCK // WARP
        return min(self.bound or MAX_THREADS_PER_BLOCK, MAX_THREADS_PER_BLOCK, warps * WARP)


def find_tool(name: str) -> str:
    """Path of `name` (nvdisasm, cuobjdump) from its pip wheel; UsageError naming the wheels if
    it is not installed."""
    try:
        import nvidia
        folders = list(nvidia.__path__)
    except ImportError:
        folders = []
    for folder in folders:
        for sub in sorted(os.listdir(folder), reverse=True):
            path = os.path.join(folder, sub, "bin", name)
            if sub.startswith("cu") and os.access(path, os.X_OK):
                return path
    raise UsageError(f"the SASS report needs {name}, which is not installed: {INSTALL}")


def occupancy(registers: int, shared: int, sm: int, block: int = BLOCK) -> float:
    """Theoretical occupancy (resident warps / the SM's warp slots) of blocks of `block` threads
    using `registers` per thread and `shared` bytes of shared memory (static and dynamic), on SM
    `sm`."""
    lim = SM_LIMITS[sm]
    warps, slots = -(-block // WARP), lim.threads // WARP
    per_warp = _regs_per_warp(registers)
    if registers > MAX_REGS_PER_THREAD or \
            per_warp * -(-warps // SUB_PARTITIONS) * SUB_PARTITIONS > REGS_PER_BLOCK:
        return 0.0
    by_regs = (REGS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // warps \
        if per_warp else lim.blocks
    smem = -(-(shared + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    blocks = min(lim.blocks, slots // warps, by_regs, lim.shared // smem)
    return blocks * warps / slots


def runs_on(sm: int) -> list[int]:
    """The SMs of `SM_LIMITS` that run SASS built for `sm` (same major, no lower minor)."""
    return [s for s in SM_LIMITS if s // 10 == sm // 10 and s >= sm]


def _regs_per_warp(registers: int) -> int:
    return -(-registers * WARP // REG_UNIT) * REG_UNIT


def report(paths: list[str]) -> dict[str, list[KernelSass]]:
    """The kernels of each cubin file in `paths`, in symbol order."""
    cubins = {p: _read(p) for p in paths}
    by_sm: dict[int, list[str]] = {}
    for p, data in cubins.items():
        by_sm.setdefault(elf.cubin_sm(data), []).append(p)
    code: dict[tuple[str, str], list[Insn]] = {}
    for sm, group in by_sm.items():
        code.update(_disassemble(sm, [(p, cubins[p]) for p in group]))
    out = {}
    for p, data in cubins.items():
        res = _resources(p)
        sm = elf.cubin_sm(data)
        out[p] = [_kernel(sym, sm, res[sym], _bound(data, sym), code[(p, sym)])
                  for sym in sorted(elf.functions(data))]
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    try:
        elf.cubin_sm(data)
    except ValueError as e:
        raise ToolchainError(f"{path} is not a cubin: {e}") from None
    return data


def _kernel(symbol: str, sm: int, res: tuple[int, int, int, int], bound: int,
            insns: list[Insn]) -> KernelSass:
    registers, stack, shared, local = res
    hot, looped = hot_loop(insns)
    return KernelSass(
        symbol, sm, registers, stack, local, shared, bound,
        spill_stores=sum(_width(op) // 8 for _, op, _ in insns if op.startswith("STL")),
        spill_loads=sum(_width(op) // 8 for _, op, _ in insns if op.startswith("LDL")),
        fp64=sum(map(is_fp64, (op for _, op, _ in insns))), hot=mix(hot), looped=looped,
        occupancy={s: occupancy(registers, shared, s) for s in runs_on(sm)})


def is_fp64(op: str) -> bool:
    """Whether SASS mnemonic `op` (with its modifiers) is a double-precision instruction."""
    name, *mods = op.split(".")
    return name in _FP64_OPS or (name in ("F2F", "F2I", "I2F", "FRND", "MUFU")
                                 and bool(_FP64_MODS & set(mods)))


def _width(op: str) -> int:
    """Bits moved by a load or store mnemonic (32 without a width modifier)."""
    widths = [_WIDTH[m] for m in op.split(".")[1:] if m in _WIDTH]
    return widths[0] if widths else 32


def mix(insns: list[Insn]) -> Mix:
    ops = [op for _, op, _ in insns]
    names = Counter(op.split(".")[0] for op in ops)
    def widths(kind: str) -> dict[int, int]:
        return dict(sorted(Counter(_width(o) for o in ops if o.startswith(kind)).items()))
    return Mix(len(ops), widths("LDG."), widths("STG."), sum(map(is_fp64, ops)), names["CALL"],
               names["BAR"], names["SHFL"])


def hot_loop(insns: list[Insn]) -> tuple[list[Insn], bool]:
    """The instructions of the innermost loops of the kernel's own code (its subroutines, the
    targets of its calls, left out) that access global memory, and True; that code and False
    when no loop does (see the module docstring)."""
    insns = _own_code(insns)
    index = {addr: n for n, (addr, _, _) in enumerate(insns)}
    spans = []
    for n, (addr, op, args) in enumerate(insns):
        target = _target(args)
        if op.split(".")[0] == "BRA" and target is not None and target <= addr \
                and target in index:
            a = index[target]
            if any(op.startswith(("LDG.", "STG.")) for _, op, _ in insns[a:n + 1]):
                spans.append((a, n))
    inner = {(a, b) for a, b in spans
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)}
    if not inner:
        return insns, False
    keep = sorted({i for a, b in inner for i in range(a, b + 1)})
    return [insns[i] for i in keep], True


def _own_code(insns: list[Insn]) -> list[Insn]:
    """A kernel's instructions less its subroutines: from a call target to the first RET after
    it, with no EXIT between (on sm_80 a predicated CALL.REL.NOINC also leaves divergent loops:
    its target is the kernel's own code)."""
    drop = set()
    for target in {_target(args) for _, op, args in insns if op.startswith("CALL")} - {None}:
        span = [n for n, (addr, _, _) in enumerate(insns) if addr >= target]
        for n in span:
            op = insns[n][1]
            if op.startswith("EXIT"):
                break
            if op.startswith("RET"):
                drop.update(range(span[0], n + 1))
                break
    return [insn for n, insn in enumerate(insns) if n not in drop]


def _target(args: str) -> int | None:
    """The address a branch or call names (its last operand), None if none."""
    m = re.search(r"0x([0-9a-f]+)\s*$", args)
    return int(m.group(1), 16) if m else None


def _sections(data: bytes) -> dict[str, tuple[int, int]]:
    """(offset, size) of each named section of an ELF file."""
    sections = elf._sections(data)
    (shstrndx,) = struct.unpack_from("<H", data, 62)
    names = sections[shstrndx][4]
    return {data[names + s[0]:data.index(b"\0", names + s[0])].decode(): (s[4], s[5])
            for s in sections}


def _disassemble(sm: int, cubins: list[tuple[str, bytes]]) -> dict[tuple[str, str], list[Insn]]:
    """The instructions of every kernel of `cubins` (all for SM `sm`), by (path, symbol): one
    nvdisasm run over their code sections concatenated."""
    stream, starts = bytearray(), []
    for path, data in cubins:
        sections = _sections(data)
        for sym in sorted(elf.functions(data)):
            offset, size = sections[f".text.{sym}"]
            starts.append((len(stream), len(stream) + size, path, sym))
            stream += data[offset:offset + size]
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(stream)
        f.flush()
        text = _run([find_tool("nvdisasm"), "--binary", f"SM{sm}", f.name])
    out: dict[tuple[str, str], list[Insn]] = {(p, s): [] for _, _, p, s in starts}
    k = 0
    for line in text.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        while addr >= starts[k][1]:
            k += 1
        base, _, path, sym = starts[k]
        args = m.group(3)
        if m.group(2).split(".")[0] in ("BRA", "CALL", "BSSY", "BREAK", "JMP"):
            args = re.sub(r"\b0x([0-9a-f]+)\b", lambda t: hex(int(t.group(1), 16) - base), args)
        out[(path, sym)].append((addr - base, m.group(2), args))
    return out


def _resources(path: str) -> dict[str, tuple[int, int, int, int]]:
    """(registers, stack, shared, local) of each function of a cubin (cuobjdump -res-usage)."""
    text = _run([find_tool("cuobjdump"), "-res-usage", path])
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in _RES.finditer(text)}


def _bound(data: bytes, symbol: str) -> int:
    """The kernel's __launch_bounds__ (EIATTR_MAX_THREADS of .nv.info.<symbol>), 0 if none."""
    offset, size = _sections(data).get(f".nv.info.{symbol}", (0, 0))
    pos, end = offset, offset + size
    while pos + 4 <= end:
        fmt, attr, value = struct.unpack_from("<BBH", data, pos)
        pos += 4
        if fmt == _EIFMT_SVAL:
            if attr == _EIATTR_MAX_THREADS:
                x, y, z = struct.unpack_from("<III", data, pos)
                return x * y * z
            pos += value
    return 0


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise ToolchainError(f"{os.path.basename(cmd[0])} failed on {cmd[-1]}: "
                             f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def sass_table(root: str, manifest: dict, key: str | None = None, target: str | None = None
               ) -> str:
    """The report of a bundle's cubins as a text table, one row per kernel (those of `key`, in
    the cubins of `target`, when given); BundleError if no cubin matches."""
    from .inspection import format_table
    files: dict[str, str] = {}
    for k in manifest["kernels"]:
        if k["file"].endswith(".cubin") and key in (None, k["key"]) \
                and target in (None, k["target"]):
            files.setdefault(os.path.join(root, k["file"]), k["target"])
    if not files:
        raise BundleError("the bundle has no cubin" + (f" holding {key}" if key else "")
                          + (f" for {target}" if target else ""))
    keys = {k["symbol"]: k["key"] for k in manifest["kernels"]}
    rows = []
    for path, kernels in report(list(files)).items():
        for ks in kernels:
            if ks.symbol in keys and key in (None, keys[ks.symbol]):
                h = ks.hot
                rows.append((files[path], keys[ks.symbol], ks.registers,
                             f"{ks.spill_stores}/{ks.spill_loads}", ks.local + ks.stack,
                             ks.shared, ks.max_threads,
                             " ".join(f"{s}:{round(100 * o)}%" for s, o in ks.occupancy.items()),
                             _widths(h.loads) + ("" if ks.looped else " (body)"),
                             _widths(h.stores), f"{h.fp64}/{ks.fp64}", h.calls, h.bar, h.shfl))
    head = ("target", "key", "regs", "spill st/ld B", "local B", "shared B", "max threads",
            f"occupancy@{BLOCK}", "hot LDG bits x n", "hot STG bits x n", "fp64 hot/all",
            "calls", "bar", "shfl")
    return format_table(rows, head)


def _widths(counts: dict[int, int]) -> str:
    return " ".join(f"{w}x{n}" for w, n in counts.items()) or "-"
