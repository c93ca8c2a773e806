"""Scale-out benchmark (issue 21, JSON lines): the example specs built cold with `--executor
local -j2` and on a 2-worker Dask LocalCluster in the same run; a synthetic plan of >= 20,000
kernels whose jobs run a trivial compile stand-in, for the planning and scheduling bookkeeping
per module (local pool and Dask); a fresh machine building the examples from a warm remote cache.

    python benchmarks/scale_bench.py [--out results.jsonl] [--quick]

Targets (issue 21): the 2-worker LocalCluster >= 0.9x the throughput of -j2 local on the
examples (overhead <= 20 ms per module); a fresh machine with a warm remote cache builds the
examples in <= 10% of the cold time; the synthetic 20,000-kernel plan: planning + scheduling
bookkeeping <= 30 s. `--quick` (a smoke run): activations.yaml at one CPU level, 990 kernels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from build_bench import synthetic_spec   # noqa: E402  (the 2,000-kernel benchmark's groups)


# 5 CUDA archs, PTX and 3 x86-64 levels: the matrix of a real model (issue 21, "Why")
SYNTH_TARGETS = ["cuda:sm_80", "cuda:sm_89", "cuda:sm_90", "cuda:sm_100", "cuda:sm_120",
                 "cuda:compute_90", "cpu:x86-64-v2", "cpu:x86-64-v3", "cpu:x86-64-v4"]
QUICK = [os.path.join(SPECS, "activations.yaml"), "--target", "cpu:x86-64-v2"]  # --quick
SYNTH_GROUPS = 41           # x 55 variants x 9 targets = 20,295 kernels (--quick: 2, 990)


def stand_in(job):
    """A trivial compile: run_job's entries for the job's kernels over bytes derived from the
    job, no code generation or compiler (what is left is fusebuild's own bookkeeping)."""
    from fusebuild import build, targets as tg
    result = build.JobResult(job.label)
    kernels = build.kernel_sources(job.group, job.variants)
    for target in job.targets:
        arch = tg.arch(target)
        rel = (f"cpu/{arch}/{job.group.name}.so" if job.backend == "cpu"
               else f"cuda/{arch}/{job.group.name}.cubin")
        data = hashlib.sha256(f"{job.label} {target}".encode()).digest() * 64
        result.artifacts[rel] = data
        result.kernels += build._entries(kernels, target, rel, data)
    return result


def fusebuild_cli(*args, env=None) -> tuple[float, dict]:
    """Run `fusebuild ARGS --json`; (wall seconds, summary)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fusebuild", *args, "--json"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"fusebuild {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, json.loads(proc.stdout)


def examples(work: str, specs: list[str], env: dict, address: str, emit) -> None:
    """Cold builds of `specs` (CLI arguments) with the local pool (-j2) and on the cluster at
    `address`."""
    runs = {}
    for name, extra in (("local_j2", ["--executor", "local", "-j", "2"]),
                        ("dask_2_workers", ["--executor", f"dask://{address}"])):
        secs, info = fusebuild_cli("compile", *specs, "-o", os.path.join(work, name),
                                   "--no-cache", *extra, env=env)
        runs[name] = (secs, info)
        emit({"what": "cold_build_examples", "executor": name, "s": round(secs, 2),
              "kernels": info["kernels"], "modules": info["modules"],
              "workers": info["workers"], "retried": info["retried"], "id": info["id"]})
    (local_s, local), (dask_s, dask) = runs["local_j2"], runs["dask_2_workers"]
    emit({"what": "dask_vs_local_examples", "throughput_ratio": round(local_s / dask_s, 3),
          "target_ratio": 0.9,
          "overhead_ms_per_module": round((dask_s - local_s) / local["modules"] * 1e3, 1),
          "target_overhead_ms": 20, "same_bundle": local["id"] == dask["id"]})


def synthetic(work: str, groups: int, client, emit) -> None:
    """Plan, then build with the stand-in compile: the local pool (-j2, whole `build()`) and the
    Dask adapter on `client` (its run of the same jobs)."""
    from fusebuild import build, executors, spec
    path = os.path.join(work, "synth.yaml")
    with open(path, "w") as f:
        f.write(synthetic_spec(groups))
    start = time.perf_counter()
    plan = spec.load_plan([path], targets=SYNTH_TARGETS, max_kernels=50_000)
    plan_s = time.perf_counter() - start
    real, build.run_job = build.run_job, stand_in        # forked local workers inherit it
    try:
        start = time.perf_counter()
        result = build.build(plan, os.path.join(work, "synth-out"), jobs=2, cache_dir=None,
                             progress=False)
        build_s = time.perf_counter() - start
    finally:
        build.run_job = real
    jobs = build.jobs_for(build.plan_modules(plan))
    start = time.perf_counter()
    runner = executors.DaskRunner(client, plan.targets, build.DEFAULT_JOB_TIMEOUT, work=stand_in)
    results = runner.run(jobs, False, lambda r: None)
    dask_s = time.perf_counter() - start
    assert not [r for r in results if r.error], [r.error for r in results if r.error][:1]
    emit({"what": "synthetic_plan", "kernels": result.n_kernels, "modules": result.modules,
          "jobs": len(jobs), "targets": len(plan.targets), "groups": groups,
          "plan_s": round(plan_s, 2), "build_local_j2_s": round(build_s, 2),
          "local_ms_per_module": round(build_s / result.modules * 1e3, 2),
          "planning_plus_bookkeeping_s": round(plan_s + build_s, 2), "target_s": 30,
          "dask_run_s": round(dask_s, 2),
          "dask_ms_per_module": round(dask_s / result.modules * 1e3, 2)})


def fresh_machine_warm_remote_cache(work: str, specs: list[str], env: dict, emit) -> None:
    """A CI machine fills a shared cache (`file://`, `--cache-mode readwrite`) with a cold build;
    a fresh machine (empty local cache) then builds the same specs from it: its time against
    the cold build's (target <= 10%), and whether it compiled nothing."""
    shared = "file://" + os.path.join(work, "shared")
    os.makedirs(os.path.join(work, "shared"))
    runs = {}
    for name, mode in (("ci_cold", "readwrite"), ("fresh_machine", "read")):
        cold_env = {**env, "FUSEBUILD_CACHE_DIR": os.path.join(work, f"cache-{name}")}
        runs[name] = fusebuild_cli("compile", *specs, "-o", os.path.join(work, name),
                                   "--cache-url", shared, "--cache-mode", mode, env=cold_env)
    (cold_s, cold), (warm_s, warm) = runs["ci_cold"], runs["fresh_machine"]
    emit({"what": "fresh_machine_warm_remote_cache", "cold_s": round(cold_s, 2),
          "warm_remote_s": round(warm_s, 2), "fraction_of_cold": round(warm_s / cold_s, 3),
          "target_fraction": 0.1, "compiled": warm["compiled"],
          "remote_hits": warm["remote_hits"], "uploaded_by_cold": cold["uploaded"],
          "same_bundle": cold["id"] == warm["id"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--quick", action="store_true",
                    help="activations.yaml at one CPU level and a 990-kernel synthetic plan "
                         "(smoke run)")
    args = ap.parse_args()
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    from distributed import Client, LocalCluster
    emit({"what": "machine", "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "python": platform.python_version()})
    work = tempfile.mkdtemp(prefix="fusebuild-scale-")
    env = {**os.environ, "FUSEBUILD_CACHE_DIR": os.path.join(work, "cache"),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    specs = QUICK if args.quick else [SPECS]
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            examples(work, specs, env, cluster.scheduler_address.removeprefix("tcp://"), emit)
            synthetic(work, 2 if args.quick else SYNTH_GROUPS, client, emit)
        fresh_machine_warm_remote_cache(work, specs, env, emit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
