"""Training benchmark (issue 12), JSON lines: forward + backward of fusebuild's torch ops against
torch eager autograd and torch.compile of the same expression.

    python benchmarks/torch_bench.py [--out FILE] [--quick] [--elements N] [--groups a,b]
                                     [--threads 2] [--repeats R]

bias_gelu, bias_dropout_residual and lstm_cell, built with their backward groups (`grad:`) from
benchmarks/specs/torch.yaml for the host's best ISA level and registered with
`Bundle.torch_library` as torch.ops.torch_bench.<group>. Each case has 2^22 output elements
(`--elements`; the iteration space [B, C], C = 2^floor(log2(N) / 2); lstm_cell's gates are
[B, 4C]), float32 and bfloat16, `--threads` threads for every implementation
(torch.set_num_threads, FUSEBUILD_NUM_THREADS). One training step is `outs = fn(*inputs)` then
`torch.autograd.grad(outs, inputs, grads)` with fixed random output gradients, for:
- fusebuild: the torch.ops op (its autograd runs the `<group>__grad` kernel);
- torch_eager: the same expression in torch ops (F.gelu(x + bias), residual + F.dropout(x +
  bias, p), the LSTM cell written out);
- torch_compile: torch.compile (Inductor CPU, default mode) of the eager function; warmed up,
  the first step's time (compiling forward and backward) is reported apart as `compile_s`.
The implementations are timed in interleaved rounds (one step of each per round, each starting
`SETTLE_S` after the previous one, so load changes hit all alike and torch's spinning OpenMP
workers do not slow the next step); times are the best of the rounds after a warm-up round.
Every implementation's outputs and input gradients are compared with float64 torch autograd of
the same expression on the same inputs (max |difference| / max |oracle| over outputs and
gradients, bound TOLERANCE). Dropout masks differ between implementations, so for
bias_dropout_residual the oracle uses each implementation's own mask, read off its gradient
(grad_x != 0): forward and backward must agree on it (the fused backward recomputes it from the
seed). For the deterministic groups each row also gives the max |difference| of its gradients
from torch eager's.

Per-call overhead: torch.ops.torch_bench.bias_gelu (no grad) on 1,024 float32 elements against
the plain runtime call bundle.bias_gelu(x, bias) on the same torch tensors and torch eager
F.gelu(x + bias) (us per call); also the op on inputs that require grad (the forward recorded for
backward) and one forward + backward step of it and of torch eager at that size.

Targets (issue 12): forward + backward >= 2x torch eager and >= 1.0x torch.compile; (issue 22)
the torch.ops call <= 1.5x the plain runtime call and faster than torch eager.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, replace
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cpu_bench import cpu_model  # noqa: E402  (the benchmarks' shared helpers)
from gpu_bench import Emitter  # noqa: E402
SPEC = os.path.join(ROOT, "benchmarks", "specs", "torch.yaml")
NAMESPACE = "torch_bench"
ELEMENTS, QUICK_ELEMENTS = 1 << 22, 1 << 12
P, SEED, OFFSET = 0.1, 1234, 0           # dropout probability; the fused op's Philox seed
OVERHEAD_SHAPE = (8, 128)                # x [8, 128] + bias [128]: 1,024 elements
TOLERANCE = {"f32": 1e-4, "bf16": 3e-2}  # max |difference| / max |float64 oracle|
TARGET_EAGER, TARGET_COMPILE, TARGET_OVERHEAD = 2.0, 1.0, 1.5
SETTLE_S = 0.02                          # s between timed steps (none in --quick)
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


# ------------------------------------------------------------------ the operations -------------
# eager(torch, *tensors, *scalars) returns the group's outputs as a tuple, in its output order.

def eager_bias_gelu(torch, x, bias):
    return (torch.nn.functional.gelu(x + bias),)


def eager_bias_dropout_residual(torch, x, bias, residual, p):
    return (residual + torch.nn.functional.dropout(x + bias, p, training=True),)


def eager_lstm_cell(torch, gates, cx):
    i, f, g, o = gates.chunk(4, 1)
    cy = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cy), cy


@dataclass(frozen=True)
class Op:
    inputs: tuple[str, ...]              # the tensor inputs (all differentiable), group order
    shapes: Callable[[int, int], tuple[tuple[int, ...], ...]]   # (B, C) -> input shapes
    scalars: tuple[float, ...]           # after the tensors
    eager: Callable
    random: bool = False


OPS = {
    "bias_gelu": Op(("x", "bias"), lambda b, c: ((b, c), (c,)), (), eager_bias_gelu),
    "bias_dropout_residual": Op(("x", "bias", "residual"), lambda b, c: ((b, c), (c,), (b, c)),
                                (P,), eager_bias_dropout_residual, random=True),
    "lstm_cell": Op(("gates", "cx"), lambda b, c: ((b, 4 * c), (b, c)), (), eager_lstm_cell),
}


@dataclass(frozen=True)
class Case:
    group: str
    dtype: str                           # f32 | bf16
    rows: int
    cols: int

    @property
    def op(self) -> Op:
        return OPS[self.group]

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.op.shapes(self.rows, self.cols)

    def row(self) -> dict:
        return {"group": self.group, "dtype": self.dtype,
                "shapes": [list(s) for s in self.input_shapes()]}


def cases(groups: list[str], elements: int, quick: bool) -> list[Case]:
    cols = 1 << (int(math.log2(elements)) // 2)
    dtypes = ("f32",) if quick else ("f32", "bf16")
    return [Case(g, d, max(1, elements // cols), cols) for g in groups for d in dtypes]


def make_inputs(torch, case: Case) -> tuple[list, list]:
    """(inputs, output gradients) in the case's dtype: x, residual, cx, grads ~ N(0, 1),
    bias ~ N(0, 0.1^2), gates ~ N(0, 2^2); the inputs require grad."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, DTYPES[case.dtype])
    scale = {"bias": 0.1, "gates": 2.0}
    inputs = [(torch.randn(s, generator=gen) * scale.get(n, 1.0)).to(dtype).requires_grad_()
              for n, s in zip(case.op.inputs, case.input_shapes())]
    with torch.no_grad():
        outs = case.op.eager(torch, *inputs, *case.op.scalars)
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
    return inputs, grads


# ------------------------------------------------------------------ implementations ------------

def as_tuple(r) -> tuple:
    return r if isinstance(r, tuple) else (r,)


def step(torch, fn: Callable, inputs: list, grads: list) -> tuple[tuple, tuple]:
    """One training step: the outputs (detached) and the gradients of every input."""
    outs = as_tuple(fn(*inputs))
    return tuple(o.detach() for o in outs), torch.autograd.grad(outs, inputs, grads)


def impls(torch, case: Case, fused) -> dict[str, Callable]:
    """The forward functions of one case (tensors -> outputs), fusebuild first where built."""
    scalars = case.op.scalars
    fns: dict[str, Callable] = {}
    if fused is not None:
        seed = {"seed": SEED, "offset": OFFSET} if case.op.random else {}
        fns["fusebuild"] = lambda *t: fused(*t, *scalars, **seed)

    def eager(*t):
        return case.op.eager(torch, *t, *scalars)
    fns["torch_eager"] = eager
    torch._dynamo.reset()                # one shape and dtype per case: no recompile limit
    fns["torch_compile"] = torch.compile(eager)
    return fns


# ------------------------------------------------------------------ checks ---------------------

def oracle(torch, case: Case, inputs: list, grads: list, got_grads: tuple) -> tuple[tuple, tuple]:
    """float64 torch autograd of the case's expression on the same inputs; for dropout with the
    mask of the implementation checked (its grad_x != 0)."""
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    if case.op.random:
        keep = (got_grads[0] != 0).double()
        x, bias, residual = x64
        outs = (residual + (x + bias) * keep / (1 - P),)
    else:
        outs = case.op.eager(torch, *x64, *case.op.scalars)
    return (tuple(o.detach() for o in outs),
            torch.autograd.grad(outs, x64, [g.double() for g in grads]))


def rel_err(torch, got, want) -> float:
    """max |got - want| / max |want| in float64 (inf for another shape or a non-finite value)."""
    got = got.double()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def check(torch, case: Case, inputs: list, grads: list, result: tuple, eager: tuple | None) -> dict:
    outs, got = result
    want_outs, want = oracle(torch, case, inputs, grads, got)
    err = max(rel_err(torch, g, w) for g, w in zip(outs + tuple(got), want_outs + tuple(want)))
    row = {"max_rel_err": float(f"{err:.3g}"), "ok": err <= TOLERANCE[case.dtype]}
    if case.op.random:
        row["keep_fraction"] = round(float((got[0] != 0).double().mean()), 4)
    elif eager is not None:
        diff = max(float((g.double() - e.double()).abs().max()) for g, e in zip(got, eager[1]))
        row["grad_max_abs_diff_vs_eager"] = float(f"{diff:.3g}")
    return row


# ------------------------------------------------------------------ timing ---------------------

def interleaved_best_ms(fns: dict[str, Callable], repeats: int, settle: float) -> dict[str, float]:
    """Best ms per call of each function over `repeats` rounds that call every function once
    (after one warm-up round); each call starts `settle` seconds after the previous one."""
    best = dict.fromkeys(fns, math.inf)
    for round_ in range(1 + repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return {k: v * 1e3 for k, v in best.items()}


def per_call_us(fn: Callable, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


# ------------------------------------------------------------------ fusebuild ------------------

def build_bundle(groups: list[str], dtypes: tuple[str, ...], out: str) -> str:
    """The groups (and their backward groups) in `dtypes`, built for the host; the bundle's
    path."""
    from fusebuild import build, spec
    from fusebuild.runtime.cpu import host_isas
    plan = spec.load_plan([SPEC], targets=[f"cpu:{host_isas()[-1]}"])
    keep = {DTYPES[d] for d in dtypes}
    plan = replace(plan, groups=tuple(
        replace(gp, variants=tuple(v for v in gp.variants
                                   if {d.name for d in v.dtypes} <= keep))
        for gp in plan.groups if gp.group.name.removesuffix("__grad") in groups))
    return build.build(plan, out, progress=False).path


def load_ops(torch, groups: list[str], dtypes: tuple[str, ...], tmp: str, emit: Callable):
    """(bundle, {group: torch.ops op}), or (None, {}) after a line saying why not."""
    from fusebuild import runtime
    from fusebuild.runtime.cpu import host_isas
    start = time.perf_counter()
    row = {"what": "build", "target": f"cpu:{host_isas()[-1]}"}
    try:
        bundle = runtime.load(build_bundle(groups, dtypes, os.path.join(tmp, "bundle")))
        bundle.torch_library(NAMESPACE)
        ops = {g: getattr(getattr(torch.ops, NAMESPACE), g) for g in groups}
    except Exception as e:  # noqa: BLE001 - the peers are measured without the fusebuild column
        emit({**row, "error": _error(e), "note": "no fusebuild column"})
        return None, {}
    emit({**row, "seconds": round(time.perf_counter() - start, 2),
          "backward_groups": sorted(g for g in bundle.groups if g.endswith("__grad"))})
    return bundle, ops


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# ------------------------------------------------------------------ sections -------------------

def run_case(torch, case: Case, fused, args, emit: Callable) -> dict:
    """Check and time every implementation of one case; the case's summary line."""
    inputs, grads = make_inputs(torch, case)
    base = {"what": "train", **case.row(), "threads": args.threads}
    steps: dict[str, Callable] = {}
    results: dict[str, tuple] = {}
    extra: dict[str, dict] = {}
    for name, fn in impls(torch, case, fused).items():
        steps[name] = lambda fn=fn: step(torch, fn, inputs, grads)
        try:
            start = time.perf_counter()
            results[name] = steps[name]()
            if name == "torch_compile":
                extra[name] = {"compile_s": round(time.perf_counter() - start, 2)}
        except Exception as e:  # noqa: BLE001 - one implementation failing leaves the others
            emit({**base, "impl": name, "error": _error(e)})
            del steps[name]
    for name, result in results.items():
        try:
            extra.setdefault(name, {}).update(
                check(torch, case, inputs, grads, result, results.get("torch_eager")))
        except Exception as e:  # noqa: BLE001 - e.g. a gradient of the wrong type
            emit({**base, "impl": name, "error": _error(e)})
            del steps[name]
    del results
    times = interleaved_best_ms(steps, args.repeats, 0.0 if args.quick else SETTLE_S)
    for name, ms in times.items():
        emit({**base, "impl": name, "ms": round(ms, 3), **extra[name]})
    row = {"what": "train_summary", **case.row(), "threads": args.threads,
           **{f"{k}_ms": round(v, 3) for k, v in times.items()}}
    if "fusebuild" not in times:
        return {**row, "error": "fusebuild was not measured"}
    for peer in ("torch_eager", "torch_compile"):
        if peer in times:
            row[f"vs_{peer}"] = round(times[peer] / times["fusebuild"], 2)
    return row


def overhead(torch, bundle, ops: dict, quick: bool) -> dict:
    """us per call of the torch.ops op and of the plain runtime call, bias_gelu, 1,024 float32
    elements, inputs that do not require grad; then the op on inputs that do (the forward
    recorded), and a forward + backward step of the op and of torch eager."""
    x = torch.randn(OVERHEAD_SHAPE)
    bias = torch.randn(OVERHEAD_SHAPE[-1:])
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    gy = torch.randn(OVERHEAD_SHAPE)
    number = 2000 if quick else 20000
    op = per_call_us(lambda: ops["bias_gelu"](x, bias), number)
    plain = per_call_us(lambda: bundle.bias_gelu(x, bias), number)
    eager = per_call_us(lambda: torch.nn.functional.gelu(x + bias), number)
    steps = {"torch_ops": ops["bias_gelu"], "torch_eager": lambda a, b: torch.nn.functional.gelu(a + b)}
    return {"what": "call_overhead_1024_f32", "group": "bias_gelu", "torch_ops_us": round(op, 3),
            "runtime_us": round(plain, 3), "ratio": round(op / plain, 2),
            "torch_eager_us": round(eager, 3), "ratio_vs_eager": round(op / eager, 2),
            "torch_ops_recorded_us": round(per_call_us(lambda: ops["bias_gelu"](xg, bg),
                                                       number), 3),
            **{f"{name}_fwd_bwd_us": round(per_call_us(
                lambda f=f: torch.autograd.grad(f(xg, bg), (xg, bg), gy), number // 4), 3)
               for name, f in steps.items()}}


def targets(summaries: list[dict], call: dict | None) -> list[dict]:
    """Each target: met or not, its worst case and the cases that miss it."""
    out = []
    for name, key, bound in ((f">= {TARGET_EAGER}x torch eager", "vs_torch_eager", TARGET_EAGER),
                             (f">= {TARGET_COMPILE}x torch.compile", "vs_torch_compile",
                              TARGET_COMPILE)):
        values = {f"{s['group']} {s['dtype']}": s[key] for s in summaries if key in s}
        if not values:
            out.append({"what": "target", "target": name, "met": None, "note": "not measured"})
            continue
        worst = min(values, key=values.get)
        out.append({"what": "target", "target": name, "met": values[worst] >= bound,
                    "cases": len(values), "worst": worst, "worst_value": values[worst],
                    "missed": [f"{c}: {v}" for c, v in values.items() if v < bound]})
    name = (f"torch.ops call <= {TARGET_OVERHEAD}x plain runtime call and < torch eager "
            "(1,024 elements)")
    out.append({"what": "target", "target": name, "met": None, "note": "not measured"} if call is None else
               {"what": "target", "target": name,
                "met": call["ratio"] <= TARGET_OVERHEAD and call["ratio_vs_eager"] < 1.0,
                "value": call["ratio"], "vs_eager": call["ratio_vs_eager"]})
    return out


# ------------------------------------------------------------------ main -----------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK_ELEMENTS} elements, float32 only, 2 repeats")
    ap.add_argument("--elements", type=int, help=f"elements of each case's iteration space [B, C] (default {ELEMENTS})")
    ap.add_argument("--groups", type=lambda s: s.split(","), default=list(OPS),
                    help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--threads", type=int, default=2, help="threads of every implementation "
                                                            "(default 2)")
    ap.add_argument("--repeats", type=int, help="timed rounds per case (default 7, --quick 2)")
    args = ap.parse_args(argv)
    if bad := set(args.groups) - set(OPS):
        ap.error(f"unknown groups {sorted(bad)}; choose from {','.join(OPS)}")
    args.elements = args.elements or (QUICK_ELEMENTS if args.quick else ELEMENTS)
    args.repeats = args.repeats or (2 if args.quick else 7)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["FUSEBUILD_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    emit = Emitter(args.out)
    try:
        emit({"what": "machine", "cpu": cpu_model(), "cores": os.cpu_count(),
              "loadavg": os.getloadavg(), "python": platform.python_version(),
              "torch": torch.__version__, "threads": args.threads,
              "torch_threads": torch.get_num_threads()})
        todo = cases(args.groups, args.elements, args.quick)
        with tempfile.TemporaryDirectory(prefix="fusebuild-torch-bench-") as tmp:
            bundle, ops = load_ops(torch, args.groups, tuple(dict.fromkeys(c.dtype for c in todo)),
                                   tmp, emit)
            summaries = []
            for case in todo:
                summaries.append(run_case(torch, case, ops.get(case.group), args, emit))
                emit(summaries[-1])
            call = None
            if "bias_gelu" in ops:
                try:
                    call = overhead(torch, bundle, ops, args.quick)
                    emit(call)
                except Exception as e:  # noqa: BLE001 - the targets are still tallied
                    emit({"what": "call_overhead_1024_f32", "error": _error(e)})
        for row in targets(summaries, call):
            emit(row)
        emit({"what": "loadavg_at_end", "loadavg": os.getloadavg()})
    finally:
        emit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
