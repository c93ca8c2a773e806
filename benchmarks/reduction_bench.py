"""Row-reduction benchmark (issue 11), JSON lines: fusebuild against torch, numpy and copy speed.

softmax, log_softmax with its logsumexp, layer_norm (affine), rms_norm and fused add + rms_norm,
built from benchmarks/specs/reductions.yaml, against the peers people use today, measured in the
same run.

    python benchmarks/reduction_bench.py [--out FILE] [--quick] [--sections cpu,gpu]
                                         [--ops softmax,...] [--threads 2] [--gpu-ns 1024,...]
                                         [--time-budget S]

CPU section: shapes [4096, 4096] and [16384, 1024], float32 and bfloat16, `--threads` threads
(FUSEBUILD_NUM_THREADS for fusebuild, torch.set_num_threads for torch; numpy is single-threaded).
Per case: fusebuild through `fusebuild.runtime` with preallocated outputs (`fusebuild`) and
allocating them (`fusebuild_alloc`), torch CPU eager (torch.softmax, torch.log_softmax and
torch.logsumexp, F.layer_norm, F.rms_norm,
x + residual then F.rms_norm), numpy (float32; for bfloat16 numpy converts the inputs to float32
with ml_dtypes, computes in float32 and converts the outputs back, conversions timed), and the
copy bandwidth of the same byte count (half the bytes moved copied with `--threads` threads:
numpy copyto of one slice per Python thread, and torch `copy_`; the faster counts). A case's
implementations and copies are timed in interleaved rounds (each called once per round, so the
load of a shared machine hits all alike; each call starts 20 ms after the previous one, see
interleaved_ms); times are the medians of the rounds after two warm-up rounds. `GBps` = bytes of
inputs + outputs per second. Every implementation's outputs are compared with a float64 numpy
oracle written from the definitions (max |difference| / max |oracle| per output; bounds in
TOLERANCE), and on small cases (--quick) fusebuild's also with `fusebuild.reference`.

GPU section (only where cupy sees a device; otherwise one line saying why it was skipped):
N = 128 ... 65,536 at 2^26 elements per case, float32 and bfloat16: fusebuild (built for the
device's arch), torch eager and torch.compile when torch sees CUDA, and the device's copy
bandwidth (cupy device-to-device memcpy of the same byte count); CUDA-event timing (medians).

Targets (issue 11): CPU, 2 threads: >= 0.7x copy bandwidth, >= 2x torch eager, >= 5x numpy (the
ratios compare fusebuild_alloc with the peers, which allocate their outputs too; `*_out` ratios
use fusebuild with `out=`). GPU: >= 0.85x copy bandwidth for N >= 1024, >= 1.0x torch.compile.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cpu_bench import cpu_model  # noqa: E402  (the benchmarks' shared helpers)
from gpu_bench import Emitter  # noqa: E402
SPEC = os.path.join(ROOT, "benchmarks", "specs", "reductions.yaml")
F32 = np.float32
LN_EPS, RMS_EPS = 1e-5, 1e-6          # as written in the spec (add_rms_norm takes eps as a scalar)
CPU_SHAPES = ((4096, 4096), (16384, 1024))
QUICK_SHAPES = ((128, 1024), (33, 1000))
GPU_NS = tuple(1 << k for k in range(7, 17))             # 128 ... 65,536
GPU_ELEMENTS, QUICK_GPU_ELEMENTS = 1 << 26, 1 << 22
QUICK_GPU_NS = (128, 1024, 65536)
# max |difference| / max |oracle| per output
TOLERANCE = {"f32": 1e-5, "bf16": 1e-2}
TARGET_COPY, TARGET_TORCH, TARGET_NUMPY = 0.7, 2.0, 5.0
GPU_TARGET_COPY, GPU_TARGET_COMPILE, GPU_COPY_MIN_N = 0.85, 1.0, 1024
SETTLE_S = 0.02                        # s between timed calls (none in --quick)
REFERENCE_MAX_ELEMENTS = 1 << 18       # fusebuild.reference (float64, per node) on small cases only


# ------------------------------------------------------------------ the operations -------------
# oracle(xp, *float64 arrays) and numpy_peer(*float32 arrays) return the outputs in the group's
# output order; torch_peer(torch, *tensors) likewise.

def oracle_softmax(xp, x):
    e = xp.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True),)


def oracle_log_softmax(xp, x):
    m = x.max(-1, keepdims=True)
    lse = xp.log(xp.exp(x - m).sum(-1, keepdims=True)) + m
    return x - lse, lse


def oracle_layer_norm(xp, x, w, b):
    d = x - x.mean(-1, keepdims=True)
    return (d / xp.sqrt((d * d).mean(-1, keepdims=True) + LN_EPS) * w + b,)


def oracle_rms_norm(xp, x, w, eps=RMS_EPS):
    return (x / xp.sqrt((x * x).mean(-1, keepdims=True) + eps) * w,)


def oracle_add_rms_norm(xp, x, residual, w):
    h = x + residual
    return oracle_rms_norm(xp, h, w)[0], h


def np_softmax(x):
    e = x - x.max(-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return (e,)


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    e = x - m
    np.exp(e, out=e)
    lse = np.log(e.sum(-1, keepdims=True)) + m
    return x - lse, lse


def np_layer_norm(x, w, b):
    d = x - x.mean(-1, keepdims=True)
    y = d * (F32(1) / np.sqrt(np.square(d).mean(-1, keepdims=True) + F32(LN_EPS)))
    y *= w
    y += b
    return (y,)


def np_rms_norm(x, w):
    y = x * (F32(1) / np.sqrt(np.square(x).mean(-1, keepdims=True) + F32(RMS_EPS)))
    y *= w
    return (y,)


def np_add_rms_norm(x, residual, w):
    h = x + residual
    return np_rms_norm(h, w)[0], h


def torch_softmax(torch, x):
    return (torch.softmax(x, -1),)


def torch_log_softmax(torch, x):
    return torch.log_softmax(x, -1), torch.logsumexp(x, -1, keepdim=True)


def torch_layer_norm(torch, x, w, b):
    return (torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, LN_EPS),)


def torch_rms_norm(torch, x, w):
    return (torch.nn.functional.rms_norm(x, x.shape[-1:], w, RMS_EPS),)


def torch_add_rms_norm(torch, x, residual, w):
    h = x + residual
    return torch.nn.functional.rms_norm(h, h.shape[-1:], w, RMS_EPS), h


@dataclass(frozen=True)
class Op:
    group: str                       # in benchmarks/specs/reductions.yaml
    inputs: tuple[str, ...]          # tensors; `row` ones are [N], the others [B, N]
    row: tuple[str, ...]
    outputs: int
    scalars: tuple[float, ...]       # the group's scalar inputs, after its tensors
    oracle: Callable
    numpy: Callable
    torch: Callable
    row_outputs: int = 0             # outputs of shape [B, 1], after the [B, N] ones


OPS = {
    "softmax": Op("bench_softmax", ("x",), (), 1, (), oracle_softmax, np_softmax, torch_softmax),
    "log_softmax": Op("bench_log_softmax", ("x",), (), 1, (), oracle_log_softmax, np_log_softmax,
                      torch_log_softmax, row_outputs=1),
    "layer_norm": Op("bench_layer_norm", ("x", "w", "b"), ("w", "b"), 1, (), oracle_layer_norm,
                     np_layer_norm, torch_layer_norm),
    "rms_norm": Op("bench_rms_norm", ("x", "w"), ("w",), 1, (), oracle_rms_norm, np_rms_norm,
                   torch_rms_norm),
    "add_rms_norm": Op("bench_add_rms_norm", ("x", "residual", "w"), ("w",), 2, (RMS_EPS,),
                       oracle_add_rms_norm, np_add_rms_norm, torch_add_rms_norm),
}


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str                       # f32 | bf16
    rows: int
    n: int

    @property
    def spec(self) -> Op:
        return OPS[self.op]

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.n,) if i in self.spec.row else (self.rows, self.n) for i in self.spec.inputs]

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "f32" else 2

    def nbytes(self) -> int:
        """Bytes moved: every input at its own size, then the outputs ([B, N] or [B, 1])."""
        elements = sum(math.prod(s) for s in self.input_shapes())
        return (elements + self.spec.outputs * self.rows * self.n +
                self.spec.row_outputs * self.rows) * self.itemsize

    def row(self) -> dict:
        return {"op": self.op, "dtype": self.dtype, "shape": [self.rows, self.n],
                "bytes": self.nbytes()}


def cpu_cases(ops: list[str], quick: bool) -> list[Case]:
    dtypes = ("f32",) if quick else ("f32", "bf16")
    return [Case(op, d, r, n) for op in ops for r, n in (QUICK_SHAPES if quick else CPU_SHAPES)
            for d in dtypes]


def gpu_cases(ops: list[str], dtypes: tuple[str, ...], ns: tuple[int, ...],
              elements: int) -> list[Case]:
    return [Case(op, d, max(1, elements // n), n) for op in ops for d in dtypes for n in ns]


def host_inputs(case: Case, rng) -> list[np.ndarray]:
    """Storage arrays (bfloat16 as ml_dtypes.bfloat16): x and residual ~ N(0, 2^2), w ~ 1 +
    N(0, 0.1^2), b ~ N(0, 0.1^2)."""
    import ml_dtypes
    out = []
    for name, shape in zip(case.spec.inputs, case.input_shapes()):
        a = rng.standard_normal(shape, dtype=F32)
        a = 1 + a * F32(0.1) if name == "w" else a * F32(0.1) if name == "b" else a * F32(2)
        out.append(a.astype(ml_dtypes.bfloat16) if case.dtype == "bf16" else a)
    return out


def rel_errors(xp, got: tuple, want: tuple) -> list[float]:
    """Per output: max |got - want| / max |want| (float64; inf where non-finite values differ)."""
    errs = []
    for g, w in zip(got, want):
        g, w = xp.asarray(g).astype(xp.float64), xp.asarray(w).astype(xp.float64)
        if g.shape != w.shape:
            errs.append(math.inf)
            continue
        finite = xp.isfinite(w)
        if not bool((xp.isfinite(g) == finite).all()):
            errs.append(math.inf)
            continue
        scale = max(float(xp.abs(xp.where(finite, w, 0)).max()), 1e-30)
        errs.append(float(xp.abs(xp.where(finite, g - w, 0)).max()) / scale)
    return errs


def accuracy(xp, case: Case, got: tuple, want: tuple) -> dict:
    errs = rel_errors(xp, got, want)
    return {"max_rel_err": float(f"{max(errs):.3g}"), "ok": max(errs) <= TOLERANCE[case.dtype]}


# ------------------------------------------------------------------ timing ---------------------

def interleaved_ms(fns: dict[str, Callable], repeats: int, settle: float,
                   warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each function, timed in rounds that call every function once (a
    change of load on the shared machine then hits all of them alike). Each call starts `settle`
    seconds after the previous one: torch's OpenMP workers spin for milliseconds after a parallel
    op and would slow whatever runs next on the same cores (fusebuild by ~50% here)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def copy_calls(moved: int, threads: int, torch) -> dict[str, Callable]:
    """Copies of moved/2 bytes (so read + written = moved) with `threads` threads: numpy copyto
    of one slice per Python thread (copyto releases the GIL) and torch `copy_`."""
    n = moved // 2
    src = np.ones(n, np.uint8)
    dst = np.empty_like(src)
    cuts = [n * t // threads // 64 * 64 for t in range(threads)] + [n]
    parts = [(dst[a:b], src[a:b]) for a, b in zip(cuts, cuts[1:])]

    def numpy_copy():
        workers = [threading.Thread(target=np.copyto, args=p) for p in parts[1:]]
        for w in workers:
            w.start()
        np.copyto(*parts[0])
        for w in workers:
            w.join()
    calls = {"copy_numpy_threads": numpy_copy}
    if torch is not None:
        ts, td = torch.from_numpy(src), torch.from_numpy(dst)
        calls["copy_torch"] = lambda: td.copy_(ts)
    return calls


# ------------------------------------------------------------------ fusebuild ------------------

def build_bundle(targets: list[str], ops: list[str], dtypes: tuple[str, ...], out: str) -> str:
    """The bench groups of `ops` in `dtypes` built for `targets`; the bundle's path."""
    from fusebuild import build, spec
    plan = spec.load_plan([SPEC], targets=targets)
    groups = {OPS[o].group for o in ops}
    names = {"f32": "float32", "bf16": "bfloat16"}
    keep = {names[d] for d in dtypes}
    plan = replace(plan, groups=tuple(
        replace(gp, variants=tuple(v for v in gp.variants
                                   if {d.name for d in v.dtypes} <= keep))
        for gp in plan.groups if gp.group.name in groups))
    return build.build(plan, out, progress=False).path


def reference_outputs(bundle, case: Case, inputs: list[np.ndarray]) -> tuple:
    """fusebuild.reference's evaluation of the case's group (float64, rounded once)."""
    from fusebuild import dtypes as dt, ir, reference, syntax
    group = syntax.group_from_json(bundle.manifest["groups"][case.spec.group])
    d = dt.float32 if case.dtype == "f32" else dt.bfloat16
    kernel = ir.instantiate(group, dict.fromkeys(case.spec.inputs, d), expand=False)
    result = reference.evaluate(kernel, inputs, list(case.spec.scalars))
    return tuple(result.outputs[o.name] for o in kernel.outputs)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# ------------------------------------------------------------------ CPU section ----------------

def as_torch(torch, a: np.ndarray):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(torch, t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_call(case: Case, inputs: list[np.ndarray]) -> Callable[[], tuple]:
    if case.dtype == "f32":
        return lambda: case.spec.numpy(*inputs)
    bf16 = inputs[0].dtype
    return lambda: tuple(o.astype(bf16) for o in case.spec.numpy(*(a.astype(F32)
                                                                   for a in inputs)))


def cpu_impls(case: Case, inputs: list[np.ndarray], caller, torch) -> dict[str, Callable]:
    """Zero-argument calls returning the outputs as numpy arrays, fusebuild first."""
    impls: dict[str, Callable] = {}
    if caller is not None:
        args = [*inputs, *case.spec.scalars]
        first = caller(*args)
        outs = first if isinstance(first, tuple) else (first,)
        out = outs if len(outs) > 1 else outs[0]
        impls["fusebuild"] = lambda: (caller(*args, out=out), outs)[1]
        impls["fusebuild_alloc"] = lambda: (lambda r: r if isinstance(r, tuple) else (r,))(
            caller(*args))
    if torch is not None:
        tensors = [as_torch(torch, a) for a in inputs]
        impls["torch_eager"] = lambda: tuple(from_torch(torch, t)
                                             for t in case.spec.torch(torch, *tensors))
    impls["numpy"] = numpy_call(case, inputs)
    return impls


def cpu_case(case: Case, caller, bundle, torch, args, emit: Callable) -> dict:
    inputs = host_inputs(case, np.random.default_rng(0))
    want = case.spec.oracle(np, *(a.astype(np.float64) for a in inputs))
    threads = args.threads
    base = {"what": "cpu", **case.row(), "threads": threads}
    if caller is None:
        emit({**base, "impl": "fusebuild", "error": "not built (see the cpu_build line)"})
    try:
        impls = cpu_impls(case, inputs, caller, torch)
    except Exception as e:  # noqa: BLE001 - fusebuild's first call failed: peers still run
        emit({**base, "impl": "fusebuild", "error": _error(e)})
        impls = cpu_impls(case, inputs, None, torch)
    checks: dict[str, dict] = {}
    for name, fn in list(impls.items()):
        try:
            checks[name] = accuracy(np, case, fn(), want)
            if name == "fusebuild" and math.prod(case.input_shapes()[0]) <= REFERENCE_MAX_ELEMENTS:
                ref = accuracy(np, case, fn(), reference_outputs(bundle, case, inputs))
                checks[name].update(reference_rel_err=ref["max_rel_err"], reference_ok=ref["ok"])
        except Exception as e:  # noqa: BLE001 - one implementation failing leaves the others
            emit({**base, "impl": name, "error": _error(e)})
            del impls[name]
    copies = copy_calls(case.nbytes(), threads, torch)
    times = interleaved_ms({**impls, **copies}, args.repeats, 0.0 if args.quick else SETTLE_S)
    moved = case.nbytes()
    copy_gbps = {k: round(moved / times.pop(k) / 1e6, 2) for k in copies}
    copy = max(copy_gbps.values())
    emit({"what": "cpu_copy", **case.row(), "threads": threads,
          **{f"{k}_GBps": v for k, v in copy_gbps.items()}, "GBps": copy})
    for name, ms in times.items():
        gbps = moved / ms / 1e6
        emit({**base, "impl": name, **checks[name], "ms": round(ms, 3), "GBps": round(gbps, 2),
              "frac_of_copy": round(gbps / copy, 3)})
    return cpu_summary(case, times, copy, threads)


def cpu_summary(case: Case, times: dict[str, float], copy: float, threads: int) -> dict:
    row = {"what": "cpu_summary", **case.row(), "threads": threads, "copy_GBps": copy,
           **{f"{k}_ms": round(v, 3) for k, v in times.items()}}
    fb, alloc = times.get("fusebuild"), times.get("fusebuild_alloc")
    if fb is None or alloc is None:
        return {**row, "error": "fusebuild was not measured"}
    row["frac_of_copy"] = round(case.nbytes() / fb / 1e6 / copy, 3)
    for peer in ("torch_eager", "numpy"):
        if peer in times:
            row[f"vs_{peer}"] = round(times[peer] / alloc, 2)
            row[f"vs_{peer}_out"] = round(times[peer] / fb, 2)
    return row


def cpu_targets(summaries: list[dict]) -> list[dict]:
    """Each CPU target: met or not, its worst case and the cases that miss it."""
    checks = {f">= {TARGET_COPY}x copy bandwidth": ("frac_of_copy", TARGET_COPY),
              f">= {TARGET_TORCH}x torch eager (both allocate)": ("vs_torch_eager", TARGET_TORCH),
              f">= {TARGET_TORCH}x torch eager (fusebuild out=)": ("vs_torch_eager_out",
                                                                  TARGET_TORCH),
              f">= {TARGET_NUMPY}x numpy (both allocate)": ("vs_numpy", TARGET_NUMPY),
              f">= {TARGET_NUMPY}x numpy (fusebuild out=)": ("vs_numpy_out", TARGET_NUMPY)}
    out = []
    for name, (key, bound) in checks.items():
        values = {f"{s['op']} {s['dtype']} {s['shape']}": s[key] for s in summaries if key in s}
        if not values:
            out.append({"what": "cpu_target", "target": name, "met": None,
                        "note": "not measured"})
            continue
        worst = min(values, key=values.get)
        out.append({"what": "cpu_target", "target": name, "met": min(values.values()) >= bound,
                    "cases": len(values), "worst": worst, "worst_value": values[worst],
                    "missed": [f"{c}: {v}" for c, v in values.items() if v < bound]})
    return out


def cpu_section(args, emit: Callable, tmp: str) -> None:
    os.environ["FUSEBUILD_NUM_THREADS"] = str(args.threads)
    from fusebuild import runtime
    from fusebuild.runtime.cpu import host_isas
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    isa = host_isas()[-1]
    cases = cpu_cases(args.ops, args.quick)
    emit({"what": "cpu_machine", **machine(), "isa": isa, "threads": args.threads,
          "torch": torch.__version__ if torch else None,
          "torch_threads": torch.get_num_threads() if torch else None})
    bundle = None
    start = time.perf_counter()
    try:
        path = build_bundle([f"cpu:{isa}"], args.ops, tuple(dict.fromkeys(c.dtype for c in cases)),
                            os.path.join(tmp, "cpu"))
        bundle = runtime.load(path)
        emit({"what": "cpu_build", "target": f"cpu:{isa}",
              "seconds": round(time.perf_counter() - start, 2)})
    except Exception as e:  # noqa: BLE001 - the peers are measured without the fusebuild column
        emit({"what": "cpu_build", "target": f"cpu:{isa}", "error": _error(e),
              "note": "no fusebuild column: building benchmarks/specs/reductions.yaml failed"})
    summaries = []
    for case in cases:
        caller = bundle[OPS[case.op].group] if bundle is not None else None
        summaries.append(cpu_case(case, caller, bundle, torch, args, emit))
        emit(summaries[-1])
    for row in cpu_targets(summaries):
        emit(row)


# ------------------------------------------------------------------ GPU section ----------------

def _gpu_tools():
    """gpu_bench's timers, copy, environment and array helpers (it imports no GPU library)."""
    import gpu_bench
    return gpu_bench


def gpu_device():
    """cupy when it sees a device; else (None, why not)."""
    try:
        import cupy as cp
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no cupy, no driver, no device
        return None, _error(e)
    return (cp, None) if count else (None, "cupy sees no CUDA device")


def gpu_inputs(gpu, case: Case) -> list:
    """Device storage arrays (bfloat16 as uint16 bits), distributed like host_inputs."""
    F = gpu.cupy_ops
    out = []
    for name, shape in zip(case.spec.inputs, case.input_shapes()):
        a = F.gen.standard_normal(shape, F.xp.float32)
        a = 1 + a * 0.1 if name == "w" else a * 0.1 if name == "b" else a * 2
        out.append(F.to_storage(a.astype(F.xp.float32), "float32" if case.dtype == "f32"
                                else "bfloat16"))
    return out


def gpu_impls(gpu, case: Case, inputs: list) -> dict[str, Callable[[], Callable]]:
    """Builders of the zero-argument calls to time (each returns its outputs), fusebuild first;
    fusebuild gets torch tensors when torch sees CUDA (cupy may lack bfloat16)."""
    from fusebuild import dtypes as dt
    d = dt.float32 if case.dtype == "f32" else dt.bfloat16
    torch = gpu.torch
    tensors = [gpu.to_torch(a, d) for a in inputs] if torch else None
    builders: dict[str, Callable[[], Callable]] = {}
    if gpu.bundle is not None:
        fb = gpu.bundle[case.spec.group]
        args = [*(tensors or [a.view(dt.bfloat16.numpy) if d == dt.bfloat16 else a
                              for a in inputs]), *case.spec.scalars]
        builders["fusebuild"] = lambda: lambda: fb(*args)
    if torch:
        eager = lambda *t: case.spec.torch(torch, *t)  # noqa: E731
        builders["torch_eager"] = lambda: lambda: eager(*tensors)

        def compiled():
            torch._dynamo.reset()        # one shape per case: no recompile limit to run into
            fn = torch.compile(eager, dynamic=False)
            return lambda: fn(*tensors)
        builders["torch_compile"] = compiled
    return builders


def gpu_case(gpu, case: Case, copy: float, emit: Callable) -> dict:
    F = gpu.cupy_ops
    inputs = gpu_inputs(gpu, case)
    name = "float32" if case.dtype == "f32" else "bfloat16"
    want = case.spec.oracle(F.xp, *(F.as_float64(a, name) for a in inputs))
    times = {}
    for impl, build in gpu_impls(gpu, case, inputs).items():
        row = {"what": "gpu", **case.row(), "impl": impl}
        try:
            call = build()
            got = tuple(F.as_float64(o, name) for o in gpu.outputs(call()))
            row.update(accuracy(F.xp, case, got, want))
            us = gpu.gpu_time_us(call)
        except Exception as e:  # noqa: BLE001 - one implementation failing leaves the others
            emit({**row, "error": _error(e)})
            continue
        times[impl] = us
        gbps = case.nbytes() / us / 1e3
        emit({**row, "us": round(us, 2), "GBps": round(gbps, 1),
              "frac_of_copy": round(gbps / copy, 3)})
    del inputs, want
    gpu.free()
    return gpu_summary(case, times, copy)


def gpu_summary(case: Case, times: dict[str, float], copy: float) -> dict:
    row = {"what": "gpu_summary", **case.row(), "copy_GBps": round(copy, 1),
           **{f"{k}_us": round(v, 2) for k, v in times.items()}}
    fb = times.get("fusebuild")
    if fb is None:
        return {**row, "error": "fusebuild was not measured"}
    row["frac_of_copy"] = round(case.nbytes() / fb / 1e3 / copy, 3)
    for peer in ("torch_eager", "torch_compile"):
        if peer in times:
            row[f"vs_{peer}"] = round(times[peer] / fb, 3)
    return row


def gpu_targets(summaries: list[dict]) -> list[dict]:
    checks = {f">= {GPU_TARGET_COPY}x copy bandwidth (N >= {GPU_COPY_MIN_N})":
              ("frac_of_copy", GPU_TARGET_COPY, GPU_COPY_MIN_N),
              f">= {GPU_TARGET_COMPILE}x torch.compile": ("vs_torch_compile",
                                                           GPU_TARGET_COMPILE, 0)}
    out = []
    for name, (key, bound, min_n) in checks.items():
        values = {f"{s['op']} {s['dtype']} {s['shape']}": s[key] for s in summaries
                  if key in s and s["shape"][1] >= min_n}
        worst = min(values, key=values.get) if values else None
        out.append({"what": "gpu_target", "target": name,
                    "met": min(values.values()) >= bound if values else None,
                    "cases": len(values), "worst": worst,
                    "worst_value": values[worst] if values else None,
                    "missed": [f"{c}: {v}" for c, v in values.items() if v < bound]})
    return out


def gpu_section(args, emit: Callable, tmp: str) -> None:
    cp, why = gpu_device()
    if cp is None:
        emit({"what": "gpu", "skipped": f"no GPU section: {why}"})
        return
    gb = _gpu_tools()
    from fusebuild import runtime
    started = time.perf_counter()
    emit(gb.environment(cp))
    torch = gb._import_torch_cuda()
    dtypes = ("f32",) if args.quick else ("f32", "bf16")
    target = f"cuda:sm_{cp.cuda.Device().compute_capability}"
    bundle = None
    try:
        bundle = runtime.load(build_bundle([target], args.ops, dtypes, os.path.join(tmp, "gpu")))
        emit({"what": "gpu_build", "target": target,
              "seconds": round(time.perf_counter() - started, 2)})
    except Exception as e:  # noqa: BLE001 - the peers are measured without the fusebuild column
        emit({"what": "gpu_build", "target": target, "error": _error(e),
              "note": "no fusebuild column: building benchmarks/specs/reductions.yaml failed"})
    gpu = gb.Gpu(cp, torch, bundle, args.repeats)
    elements = QUICK_GPU_ELEMENTS if args.quick else GPU_ELEMENTS
    ns = args.gpu_ns or (QUICK_GPU_NS if args.quick else GPU_NS)
    cases = gpu_cases(args.ops, dtypes, ns, elements)
    copies: dict[int, float] = {}
    summaries = []
    for case in cases:
        if time.perf_counter() - started > args.time_budget:
            emit({"what": "gpu", **case.row(), "skipped": "time budget (--time-budget)"})
            continue
        try:
            if case.nbytes() not in copies:
                row = gb.copy_bandwidth(gpu, case.nbytes() // 2)
                copies[case.nbytes()] = row["GBps"]
                emit({**row, "what": "gpu_copy"})
            summaries.append(gpu_case(gpu, case, copies[case.nbytes()], emit))
            emit(summaries[-1])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next case still runs
            emit({"what": "gpu", **case.row(), "error": _error(e),
                  "traceback": traceback.format_exc()[-1500:]})
            gpu.free()
    for row in gpu_targets(summaries):
        emit(row)


# ------------------------------------------------------------------ main -----------------------

def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "numpy": np.__version__, "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: CPU shapes {list(QUICK_SHAPES)}, float32 only, 3 repeats; "
                         f"GPU {QUICK_GPU_ELEMENTS} elements, N in {list(QUICK_GPU_NS)}")
    ap.add_argument("--sections", type=lambda s: s.split(","), default=["cpu", "gpu"],
                    help="comma-separated subset of cpu,gpu")
    ap.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                    help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--gpu-ns", type=lambda s: tuple(int(v) for v in s.split(",")),
                    help="comma-separated GPU row lengths (default 128,256,...,65536)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, help="timed rounds per case (default 9, --quick 3)")
    ap.add_argument("--time-budget", type=float, default=480,
                    help="seconds for the GPU section; later cases are skipped (default 480)")
    args = ap.parse_args(argv)
    if bad := set(args.ops) - set(OPS):
        ap.error(f"unknown ops {sorted(bad)}; choose from {','.join(OPS)}")
    if bad := set(args.sections) - {"cpu", "gpu"}:
        ap.error(f"unknown sections {sorted(bad)}; choose from cpu,gpu")
    args.repeats = args.repeats or (3 if args.quick else 9)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit = Emitter(args.out)
    try:
        with tempfile.TemporaryDirectory(prefix="fusebuild-reduction-bench-") as tmp:
            if "cpu" in args.sections:
                cpu_section(args, emit, tmp)
            if "gpu" in args.sections:
                gpu_section(args, emit, tmp)
        emit({"what": "loadavg_at_end", "loadavg": os.getloadavg()})
    finally:
        emit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
