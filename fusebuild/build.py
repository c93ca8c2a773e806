"""The build: plan -> compile jobs in a process pool -> one bundle.

One job per (group, backend module): a CPU job renders the group's numba source once and emits a
`.so` per requested ISA level; a CUDA job compiles one module per architecture.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import metadata

from . import __version__
from . import targets as tg
from .bundle import make_manifest, write_bundle
from .codegen.common import KernelSource
from .errors import BuildError, FusebuildError
from .ir import Group, instantiate
from .spec import Plan, Variant


@dataclass(frozen=True)
class Job:
    group: Group
    variants: tuple[Variant, ...]
    backend: str                  # 'cpu' | 'cuda'
    targets: tuple[str, ...]      # cpu: every CPU target of the group; cuda: one
    emit_source: bool = False

    @property
    def label(self) -> str:
        return f"{self.group.name} [{', '.join(self.targets)}]"


@dataclass
class JobResult:
    label: str
    artifacts: dict[str, bytes] = field(default_factory=dict)
    kernels: list[dict] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BuildResult:
    path: str
    manifest: dict
    jobs: int
    seconds: float

    @property
    def n_kernels(self) -> int:
        return len(self.manifest["kernels"])

    def summary(self) -> str:
        m = self.manifest
        targets = sorted({k["target"] for k in m["kernels"]})
        return (f"built {self.n_kernels} kernels ({len(m['groups'])} groups, {len(targets)} "
                f"targets: {', '.join(targets)}) in {self.seconds:.1f} s -> {self.path} "
                f"(id {m['id'][:12]})")


def plan_jobs(plan: Plan, emit_source: bool = False) -> list[Job]:
    jobs = []
    for gp in plan.groups:
        cpu = tuple(t for t in gp.targets if tg.backend(t) == "cpu")
        if cpu:
            jobs.append(Job(gp.group, gp.variants, "cpu", cpu, emit_source))
        for t in gp.targets:
            if tg.backend(t) == "cuda":
                jobs.append(Job(gp.group, gp.variants, "cuda", (t,), emit_source))
    return jobs


def kernel_sources(job: Job) -> list[KernelSource]:
    names = [i.name for i in job.group.tensor_inputs]
    return [KernelSource(instantiate(job.group, dict(zip(names, v.dtypes))), v.key)
            for v in job.variants]


def _entries(kernels: list[KernelSource], target: str, rel: str, data: bytes) -> list[dict]:
    import hashlib
    digest = hashlib.sha256(data).hexdigest()
    return [{"key": ks.key, "group": ks.kernel.group, "target": target, "file": rel,
             "symbol": ks.symbol, "sha256": digest,
             "outputs": [o.dtype.name for o in ks.kernel.outputs]} for ks in kernels]


def run_job(job: Job) -> JobResult:
    """Compile one job (in a worker process); errors are returned, not raised."""
    start = time.perf_counter()
    result = JobResult(job.label)
    try:
        kernels = kernel_sources(job)
        name = job.group.name
        if job.backend == "cpu":
            from .codegen.cpu import render_group
            from .toolchain.numba import compile_shared_objects
            source, entries = render_group(kernels)
            isas = tuple(tg.arch(t) for t in job.targets)
            objects = compile_shared_objects(source, entries, isas, f"{name}.so",
                                             f"<fusebuild group {name}>")
            for target in job.targets:
                rel = f"cpu/{tg.arch(target)}/{name}.so"
                result.artifacts[rel] = objects[tg.arch(target)]
                result.kernels += _entries(kernels, target, rel, objects[tg.arch(target)])
            if job.emit_source:
                result.artifacts[f"src/{name}.py"] = source.encode()
        elif job.backend == "cuda":
            from .codegen.cuda import render_module, vector_width
            from .toolchain.nvrtc import compile_cuda, ptx_isa
            target, arch = job.targets[0], tg.arch(job.targets[0])
            source = render_module(kernels)
            data = compile_cuda(source, target, name)
            ptx = arch.startswith("compute_")
            rel = f"cuda/{arch}/{name}.{'ptx' if ptx else 'cubin'}"
            result.artifacts[rel] = data
            extra = {"ptx_isa": ptx_isa(data)} if ptx else {}
            result.kernels += [{**e, "vector": vector_width(ks), **extra}
                               for e, ks in zip(_entries(kernels, target, rel, data), kernels)]
            if job.emit_source:
                result.artifacts[f"src/{name}.cu"] = source.encode()
        else:
            raise BuildError(f"backend '{job.backend}' is not supported by this build")
    except FusebuildError as e:
        result.error = str(e)
    except Exception:  # noqa: BLE001 - a crash of a compiler is reported with its traceback
        result.error = traceback.format_exc()
    result.seconds = time.perf_counter() - start
    return result


def toolchain_versions(plan: Plan) -> dict[str, str]:
    versions = {"fusebuild": __version__}
    backends = {tg.backend(t) for t in plan.targets}
    pkgs = (["numba", "llvmlite"] if "cpu" in backends else [])
    for pkg in pkgs:
        versions[pkg] = metadata.version(pkg)
    if "cuda" in backends:
        from .toolchain import nvrtc
        versions.update(nvrtc.versions())
    return versions


def build(plan: Plan, out_dir: str = "build", jobs: int | None = None, keep_going: bool = False,
          emit_source: bool = False, progress: bool | None = None) -> BuildResult:
    """Compile every kernel of `plan` and write the bundle; raises BuildError on failures
    (the previous bundle stays in place)."""
    start = time.perf_counter()
    job_list = plan_jobs(plan, emit_source)
    results = _run(job_list, jobs or os.cpu_count() or 1, keep_going, progress)
    failed = [r for r in results if r.error]
    if failed:
        lines = [f"  {r.label}: {_excerpt(r.error)}" for r in failed]
        raise BuildError(f"{len(failed)} of {len(job_list)} compile jobs failed; the previous "
                         f"bundle was left in place:\n" + "\n".join(lines))
    artifacts: dict[str, bytes] = {}
    kernels: list[dict] = []
    for r in results:
        artifacts.update(r.artifacts)
        kernels += r.kernels
    groups = {gp.group.name: {**gp.group.to_json(), "spec_hash": gp.group.spec_hash}
              for gp in plan.groups}
    manifest = make_manifest(plan.name, plan.version, toolchain_versions(plan), groups,
                             artifacts, kernels)
    path = write_bundle(out_dir, manifest, artifacts)
    return BuildResult(path, manifest, len(job_list), time.perf_counter() - start)


def _excerpt(text: str, lines: int = 12) -> str:
    parts = text.strip().splitlines()
    shown = parts[:lines] + ([f"... ({len(parts) - lines} more lines)"] if len(parts) > lines else [])
    return "\n    ".join(shown)


def _run(job_list: list[Job], workers: int, keep_going: bool, progress: bool | None
         ) -> list[JobResult]:
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(job_list), unit="job", desc="compiling", leave=False)
    results: list[JobResult] = []
    workers = max(1, min(workers, len(job_list)))
    try:
        if workers == 1:
            for job in job_list:
                results.append(run_job(job))
                if bar:
                    bar.update()
                if results[-1].error and not keep_going:
                    break
            return results
        # fork: workers need no re-import of the caller's __main__ (scripts without a main guard
        # work) and start fast; the parent holds no compiler threads.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending = {pool.submit(run_job, job) for job in job_list}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    results.append(fut.result())
                    if bar:
                        bar.update()
                if not keep_going and any(r.error for r in results):
                    for fut in pending:
                        fut.cancel()
                    break
    finally:
        if bar:
            bar.close()
    return results
