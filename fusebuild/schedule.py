"""The order a backend renders a reduction kernel in (DESIGN §8): pure function of the typed graph.

A reduction kernel works row by row. Every node is UNIFORM (the same for the whole call: constants,
scalars, the row length), ROW (one value per row: a row reduction and what is computed from
reductions and uniform values) or FULL (one value per element). Reductions that depend on other
reductions need their values first, so the row is swept in passes: pass p accumulates the
reductions whose operands depend on reductions of earlier passes only; after it, the row values
that depend on them are computed; a last sweep computes and stores the full outputs. FULL nodes are
recomputed in every sweep that needs them (loads re-read the row, which stays in cache).
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import FULL, ROW, UNIFORM, Kernel
from .ops import ROW_OPS

REDUCE_OPS = ROW_OPS[:3]        # rsum, rmax, rmin (rowlen is uniform)


@dataclass(frozen=True)
class Pass:
    elem: tuple[int, ...]       # FULL nodes computed in this sweep, in topological order
    reds: tuple[int, ...]       # reductions accumulated in this sweep (operands in `elem`)
    after: tuple[int, ...]      # ROW nodes computable once `reds` are known


@dataclass(frozen=True)
class Schedule:
    hoisted: tuple[int, ...]    # UNIFORM nodes, computed once before the rows
    passes: tuple[Pass, ...]
    final: tuple[int, ...]      # FULL nodes the full outputs need, computed in the last sweep


def levels(k: Kernel) -> list[int]:
    """UNIFORM, ROW or FULL per node."""
    out: list[int] = []
    for n in k.nodes:
        if n.op in ("load", "rand"):
            out.append(FULL)
        elif n.op in REDUCE_OPS:
            out.append(ROW)
        else:
            out.append(max((out[a] for a in n.args), default=UNIFORM))
    return out


def _needed(k: Kernel, roots, lv: list[int]) -> tuple[int, ...]:
    """FULL nodes `roots` depend on without crossing a non-FULL node, in topological order."""
    seen, stack = set(), [r for r in roots if lv[r] == FULL]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in k.nodes[n].args if lv[a] == FULL)
    return tuple(sorted(seen))


def schedule(k: Kernel) -> Schedule:
    lv = levels(k)
    depth: list[int] = []       # reductions a node depends on, counted along the longest chain
    for n in k.nodes:
        d = max((depth[a] for a in n.args), default=0)
        depth.append(d + 1 if n.op in REDUCE_OPS else d)
    passes = []
    for p in range(1, max(depth, default=0) + 1):
        reds = tuple(i for i, n in enumerate(k.nodes) if n.op in REDUCE_OPS and depth[i] == p)
        after = tuple(i for i, n in enumerate(k.nodes)
                      if lv[i] == ROW and depth[i] == p and n.op not in REDUCE_OPS)
        passes.append(Pass(_needed(k, [k.nodes[r].args[0] for r in reds], lv), reds, after))
    hoisted = tuple(i for i in range(len(k.nodes)) if lv[i] == UNIFORM)
    final = _needed(k, [p for o in k.outputs if not o.row for p in o.parts], lv)
    return Schedule(hoisted, tuple(passes), final)
