"""Build-engine benchmark (JSON lines): cold builds at -j1/-j2, no-op rebuilds, incremental
rebuilds after editing one group, and peak memory of a 2,000-kernel build.

    python benchmarks/build_bench.py [--out results.jsonl] [--quick]

Targets (issue 4): -j2 >= 1.7x -j1 on 2 cores; no-op rebuild <= 1 s (examples) and <= 3 s
(2,000 kernels); editing one group recompiles only its modules; peak RSS <= 2 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")

SYNTH_GROUP = """
  - name: g{i}
    inputs: {{x: tensor, y: tensor, s: scalar(float32)}}
    outputs: [z]
    body: 'z = {expr}'
    matrix:
      dtype: [float32, float16, bfloat16, float64, {{x: float32, y: float16}}]
      shapes:
{shapes}
      strided: true
"""
SHAPES = ["{x: [N], y: [N]}", "{x: [B, C], y: [C]}", "{x: [B, C], y: [B, 1]}",
          "{x: [A, B, C], y: [B, C]}", "{x: [A, B, C], y: [A, 1, C]}", "{x: [A, B, C], y: [C]}",
          "{x: [A, B, C, D], y: [D]}", "{x: [A, B, C, D], y: [A, 1, 1, D]}",
          "{x: [A, B, C, D], y: [1, B, 1, D]}", "{x: [A, B, C, D], y: [B, C, D]}",
          "{x: [A, 1, C], y: [B, 1]}", "{x: [A, B, 1, D], y: [C, 1]}",
          "{x: [A, B, C, D], y: [A, B, 1, 1]}", "{x: [A, 1, C, 1], y: [B, 1, D]}"]
EXPRS = ["silu(x) * y + s", "tanh(x) - y * s", "x * sigmoid(y) + s", "gelu(x + y) * s",
         "exp(-x * x) * y + s"]


def synthetic_spec(groups: int) -> str:
    shapes = "\n".join(f"        - {s}" for s in SHAPES)
    body = "".join(SYNTH_GROUP.format(i=i, expr=EXPRS[i % len(EXPRS)], shapes=shapes)
                   for i in range(groups))
    return "fusebuild: 1\nbundle: {name: synth, version: '1'}\ntargets: [cpu:x86-64-v3]\ngroups:" + body


def fusebuild(*args, env=None) -> tuple[float, dict, int]:
    """Run the CLI with --json; (wall seconds, summary, peak RSS in bytes of its process tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fusebuild", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_rss(proc.pid))
    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"fusebuild {' '.join(args)} failed:\n{err}")
    return time.perf_counter() - start, json.loads(out), peak[0]


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
        stack += children.get(p, [])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--quick", action="store_true", help="small synthetic matrix (smoke run)")
    args = ap.parse_args()
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit({"what": "machine", "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "python": platform.python_version()})
    work = tempfile.mkdtemp(prefix="fusebuild-bench-")
    env = {**os.environ, "FUSEBUILD_CACHE_DIR": os.path.join(work, "cache")}
    try:
        cold = {}
        for j in (1, 2):
            secs, info, rss = fusebuild("compile", SPECS, "-o", os.path.join(work, f"j{j}"),
                                        "-j", str(j), "--no-cache", env=env)
            cold[j] = secs
            emit({"what": "cold_build_examples", "jobs": j, "s": round(secs, 2),
                  "kernels": info["kernels"], "kernels_per_s": round(info["kernels"] / secs, 1),
                  "peak_rss_mb": round(rss / 2**20)})
        emit({"what": "parallel_speedup_examples", "j2_over_j1": round(cold[1] / cold[2], 2),
              "target": 1.7})
        out = os.path.join(work, "examples")
        fusebuild("compile", SPECS, "-o", out, env=env)
        secs, info, _ = fusebuild("compile", SPECS, "-o", out, env=env)
        emit({"what": "noop_rebuild_examples", "s": round(secs, 3), "compiled": info["compiled"],
              "up_to_date": info["up_to_date"], "target_s": 1.0})

        synth = os.path.join(work, "synth")
        os.makedirs(synth)
        groups = 4 if args.quick else 37
        with open(os.path.join(synth, "s.yaml"), "w") as f:
            f.write(synthetic_spec(groups))
        out = os.path.join(work, "synth-out")
        secs, info, rss = fusebuild("compile", synth, "-o", out, env=env)
        emit({"what": "cold_build_synthetic", "s": round(secs, 1), "kernels": info["kernels"],
              "modules": info["modules"], "kernels_per_s": round(info["kernels"] / secs, 1),
              "peak_rss_mb": round(rss / 2**20), "target_rss_mb": 2048})
        secs, info, _ = fusebuild("compile", synth, "-o", out, env=env)
        emit({"what": "noop_rebuild_synthetic", "s": round(secs, 3), "kernels": info["kernels"],
              "compiled": info["compiled"], "target_s": 3.0})
        with open(os.path.join(synth, "s.yaml")) as f:
            text = f.read()
        with open(os.path.join(synth, "s.yaml"), "w") as f:
            f.write(text.replace("'z = tanh(x) - y * s'", "'z = tanh(x) - y * s + 1'", 1))
        secs, info, _ = fusebuild("compile", synth, "-o", out, env=env)
        emit({"what": "edit_one_group_rebuild", "s": round(secs, 1), "modules": info["modules"],
              "compiled": info["compiled"], "cached": info["cached"], "expected_compiled": 1})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
