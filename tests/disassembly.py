"""objdump disassembly of shared objects for the ISA tests (x86-64 and aarch64): each labelled
function's instructions, the innermost loops of a function, and which kernels should vectorize."""
from __future__ import annotations

import re
import subprocess
from typing import Callable

Insn = tuple[int, str, str]   # address, mnemonic, operands


def disassemble(path: str, objdump: str = "objdump") -> dict[str, list[Insn]]:
    """Instructions of each labelled function of a shared object."""
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True,
                         text=True, check=True).stdout
    functions: dict[str, list[Insn]] = {}
    current: list[Insn] | None = None
    for line in out.splitlines():
        label = re.match(r"^[0-9a-f]+ <([^>@]+)(@@\w+)?>:$", line)
        if label:
            current = functions.setdefault(label.group(1), [])
            continue
        insn = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if insn and current is not None:
            current.append((int(insn.group(1), 16), insn.group(2), insn.group(3)))
    return functions


def branch_target(args: str) -> int | None:
    """The address a branch's operands name (`... 1a2b <symbol+0x10>`), None if none."""
    m = re.search(r"\b([0-9a-f]+) <", args)
    return int(m.group(1), 16) if m else None


def innermost_loops(function: list[Insn], conditional: Callable[[str], bool]) -> list[list[Insn]]:
    """The bodies of the innermost loops of a function: spans closed by a backward branch whose
    mnemonic is `conditional`, holding no other such span."""
    index = {addr: n for n, (addr, _, _) in enumerate(function)}
    spans = []
    for n, (addr, op, args) in enumerate(function):
        start = branch_target(args)
        if conditional(op) and start is not None and start <= addr and start in index:
            spans.append((index[start], n))
    return [function[a:b + 1] for a, b in spans
            if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]


def unstrided(key: str, group: str) -> bool:
    """Whether every operand of kernel `key` of `group` has a contiguous or broadcast inner
    dimension (strided inner loops are not expected to vectorize)."""
    return all(d.split(":")[1][-1:] != "s" for d in key[len(group) + 1:-1].split(","))
