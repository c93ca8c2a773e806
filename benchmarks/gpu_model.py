"""Roofline model of the CUDA kernels (issue 20, items 3 and 5), JSON lines: every example
kernel's global-memory traffic counted in the host emulation, and its time on H100 and H200
predicted from that traffic. Nothing here runs on a GPU.

    python benchmarks/gpu_model.py [--out FILE] [--quick] [--elements N] [--groups a,b]

Traffic: tests/cuda_emulation (the emulator the CUDA tests use) compiles each group's
generated CUDA source with g++ and counts every byte its kernels load from and store to the
launch's arrays; each group runs at its float32 and one 16-bit dtype combination, every shape
pattern of its matrix, about `--elements` elements (default 2^20; reductions: rows of N = 1024,
4096 and 16384, at least 4 rows). Ideal bytes: each needed input byte read once (a broadcast
input at its own size), each output byte written once; measured bytes count a broadcast input by
its distinct bytes (its re-reads by other rows are cache hits on a GPU) and every other load and
store as made (a reduction reading its row once per pass counts each pass).

Model: time = LAUNCH_US + bytes / (EFFICIENCY * peak bandwidth), peak 3.35 TB/s (H100 SXM,
HBM3) and 4.8 TB/s (H200, HBM3e). EFFICIENCY is the device-to-device copy bandwidth measured on
an H200 (../shared/figures/h200_peers.jsonl: 4262 GB/s, bytes read + written) over its peak:
elementwise kernels launched like fusebuild's (one 16-byte vector per thread, 128-thread
blocks) reached 1.00-1.03x that copy from 2^26 elements, torch.compile's silu_add 0.99x.
LAUNCH_US is the time such kernels took beyond bytes / copy bandwidth at 2^20 elements
(../shared/figures/h200_launch_shapes.jsonl, float32 and bfloat16; the same assumed for H100).
The model is checked against those kernels at every size (`model_check` lines). Memory-bound
only: the instruction mix (SASS) is not part of it. Each kernel gets the prediction for its
counted bytes and for its ideal bytes (what a single-read reduction would reach), at the
counted shape and (`_2p26`) with both scaled to a largest input of 2^26 elements (the size of
gpu_bench.py's cases; broadcast inputs scaled too, which overstates them by their share).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}
COPY_GBPS_H200 = 4262.314681781022          # h200_peers.jsonl, copy_bw_GBps
# h200_launch_shapes.jsonl, silu_add (x, b -> y: 3 arrays) with one 16-byte vector per thread
# and 128-thread blocks: (elements, bytes per element, us)
LAUNCH_SHAPES = [(1 << 20, 4, 8.05866668621699), (1 << 20, 2, 5.90826670328776),
                 (1 << 24, 4, 49.24586613972982), (1 << 24, 2, 26.320000489552815),
                 (1 << 26, 4, 186.36266390482584), (1 << 26, 2, 94.62613264719644),
                 (1 << 28, 4, 734.5909118652344), (1 << 28, 2, 369.0314610799154)]
EFFICIENCY = COPY_GBPS_H200 / PEAK_GBPS["H200"]
LAUNCH_US = float(np.mean([us - 3 * size * n / COPY_GBPS_H200 / 1e3
                           for n, size, us in LAUNCH_SHAPES if n == 1 << 20]))
QUICK_GROUPS = ("silu_add", "bias_gelu", "softmax", "layer_norm")
LARGE = 1 << 26      # the size of gpu_bench.py's cases: predictions with the bytes scaled to it


def predict_us(nbytes: int, device: str) -> float:
    """The model's time of a kernel moving `nbytes` on `device`."""
    return LAUNCH_US + nbytes / (EFFICIENCY * PEAK_GBPS[device]) / 1e3


def calibration_rows() -> list[dict]:
    rows = [{"what": "calibration", "device": d, "peak_GBps": peak, "efficiency":
             round(EFFICIENCY, 4), "achievable_GBps": round(EFFICIENCY * peak, 1),
             "launch_us": round(LAUNCH_US, 3),
             "source": "H200 copy bandwidth (h200_peers.jsonl) / peak; launch: "
                       "h200_launch_shapes.jsonl at 2^20 elements" +
                       ("" if d == "H200" else "; H100 assumed alike")}
            for d, peak in PEAK_GBPS.items()]
    for n, size, us in LAUNCH_SHAPES:
        predicted = predict_us(3 * size * n, "H200")
        rows.append({"what": "model_check", "device": "H200", "kernel": "silu_add",
                     "elements": n, "dtype": {4: "f32", 2: "bf16"}[size],
                     "measured_us": round(us, 2), "predicted_us": round(predicted, 2),
                     "rel_err": round(predicted / us - 1, 4)})
    return rows


def machine() -> dict:
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"what": "machine", "cpu": model, "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "gxx": gxx.splitlines()[0] if gxx else None, "loadavg": os.getloadavg()}


def kernel_rows(groups: list[str] | None, elements: int, tmp: str, emit) -> list[dict]:
    """One line per measured kernel launch: its counted traffic and predicted times."""
    from fusebuild import spec
    from conftest import SPECS
    from cuda_emulation.traffic import cases, compile_traffic, measure
    plan = spec.load_plan([SPECS])
    unknown = set(groups or ()) - {gp.group.name for gp in plan.groups}
    if unknown:
        raise SystemExit(f"gpu_model.py: no example group {', '.join(sorted(unknown))}")
    gps = [gp for gp in plan.groups if groups is None or gp.group.name in groups]
    parts = [gps[i::2] for i in range(2)]
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        counted = {name: em for part in pool.map(lambda i: compile_traffic(
            parts[i], tmp, f"traffic{i}"), range(2)) for name, em in part.items()}
    emit({"what": "compile", "groups": len(gps), "seconds": round(time.perf_counter() - start, 2)})
    rows = []
    for gp in gps:
        rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
        for dtypes, pattern, n in cases(gp):
            m = measure(counted[gp.group.name], gp, dtypes, pattern, elements, n, rng)
            row = {"what": "kernel", **m.row()}
            scale = LARGE / math.prod(max(m.shapes.values(), key=math.prod))
            for device in PEAK_GBPS:
                for suffix, factor in (("", 1), ("_2p26", scale)):
                    row[f"{device}_us{suffix}"] = round(
                        predict_us(m.traffic.measured * factor, device), 2)
                    row[f"{device}_ideal_us{suffix}"] = round(
                        predict_us(m.traffic.ideal * factor, device), 2)
            emit(row)
            rows.append(row)
    return rows


def summary_row(rows: list[dict]) -> dict:
    """Worst elementwise ratio and each reduction group's worst ratio."""
    elementwise = [r for r in rows if r["kind"] == "elementwise"]
    reductions: dict[str, float] = {}
    for r in rows:
        if r["kind"] == "reduction":
            reductions[r["group"]] = max(reductions.get(r["group"], 0.0), r["ratio"])
    worst = max(elementwise, key=lambda r: r["ratio"]) if elementwise else None
    return {"what": "summary", "kernels": len(rows),
            "elementwise_max_ratio": worst and worst["ratio"],
            "elementwise_worst": worst and worst["kernel"],
            "elementwise_target_1.02_met": all(r["ratio"] <= 1.02 for r in elementwise),
            "reduction_max_ratio": reductions,
            "reduction_target_1.05_met": all(v <= 1.05 for v in reductions.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: 2^12 elements, groups {', '.join(QUICK_GROUPS)}")
    ap.add_argument("--elements", type=int, help="elements per case (default 2^20)")
    ap.add_argument("--groups", help="comma-separated example groups (default: all)")
    args = ap.parse_args(argv)
    elements = args.elements or (1 << 12 if args.quick else 1 << 20)
    groups = args.groups.split(",") if args.groups else (list(QUICK_GROUPS) if args.quick
                                                          else None)
    out = open(args.out, "w") if args.out else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    try:
        emit(machine())
        for row in calibration_rows():
            emit(row)
        with tempfile.TemporaryDirectory(prefix="fusebuild-gpu-model-") as tmp:
            rows = kernel_rows(groups, elements, tmp, emit)
        emit(summary_row(rows))
        emit({"what": "loadavg_at_end", "loadavg": os.getloadavg()})
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
