"""The SASS table of RESULTS.md ("SASS, static, no device"): per example group, over its kernels
built for sm_80, sm_90, sm_100 and sm_120 (where NVRTC has them), the register range, the lowest
theoretical occupancy per SM (reductions at every launch shape the runtime makes:
tests/test_sass.py's `_launches`), the hot loop's global load and store widths, FP64
instructions and spill/local bytes. Markdown on stdout; nothing runs on a GPU.

    python3 benchmarks/sass_table.py
"""
from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from fusebuild import dtypes as dt, sass, spec  # noqa: E402
from conftest import SPECS  # noqa: E402
import test_sass  # noqa: E402

SMS = (80, 86, 89, 90, 100, 120)
HEAD = ("| group | kind | kernels | registers | min occupancy sm_80/86/89/90/100/120 | "
        "hot-loop LDG widths | STG widths | FP64 (no f64 operand / f64 kernels) | spill, local |")


def occupancy(ks, k: sass.KernelSass, sm: int) -> float:
    """A kernel's lowest theoretical occupancy on `sm` over the launches the runtime makes."""
    if not ks.kernel.reduce:
        return k.occupancy[sm]
    return min(sass.occupancy(k.registers, b, sm, t) for t, b in test_sass._launches(ks, k, sm))


def row(group: str, items: list) -> str:
    occ = {s: min(occupancy(ks, k, s) for ks, k in items if s in k.occupancy) for s in SMS}
    f64 = [(dt.float64 in [*ks.kernel.in_dtypes, *(o.dtype for o in ks.kernel.outputs)], k.fp64)
           for ks, k in items]
    most = max((n for has, n in f64 if has), default=None)
    spill = sum(k.spill_stores + k.spill_loads + k.local + k.stack for _, k in items)
    widths = [" ".join(map(str, sorted({w for _, k in items for w in getattr(k.hot, kind)})))
              for kind in ("loads", "stores")]
    regs = [k.registers for _, k in items]
    return (f"| {group} | {'reduction' if items[0][0].kernel.reduce else 'elementwise'} | "
            f"{len(items)} | {min(regs)}-{max(regs)} | "
            f"{'/'.join(str(round(100 * occ[s])) for s in SMS)}% | {widths[0]} | {widths[1]} | "
            f"{sum(n for has, n in f64 if not has)} / {'-' if most is None else most} | {spill} |")


def main() -> int:
    plan = spec.load_plan([SPECS], targets=[f"cuda:{a}" for a in test_sass._archs()])
    with tempfile.TemporaryDirectory(prefix="fusebuild-sass-table-") as out:
        kernels = test_sass._analyse(plan, out)
    groups: dict[str, list] = {}
    for _, group, ks, k in kernels:
        groups.setdefault(group, []).append((ks, k))
    print(HEAD)
    print("| --- " * 9 + "|")
    for group in sorted(groups):
        print(row(group, groups[group]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
