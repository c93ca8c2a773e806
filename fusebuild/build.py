"""The build: plan -> modules -> cache lookups -> compile jobs on an executor -> bundle.

A module is one (group, target) artifact. Modules found in the cache are reused; the others
become compile jobs: one per (group, CUDA arch), and one per group for all its CPU ISA levels,
which share one numba lowering. Jobs run where `executors` puts them: forked local worker
processes with a per-job timeout by default, or any concurrent.futures.Executor (a Dask cluster).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

from . import __version__
from . import targets as tg
from .artifact import describe
from .bundle import make_manifest, plan_hash, write_bundle
from .cache import Cache, CacheChain, Entry, default_dir, module_key
from .codegen.common import KernelSource
from .errors import BuildError, FusebuildError, UsageError
from .syntax import Group
from .ir import instantiate
from .runtime.manifest import is_plain_path
from .spec import Plan, Variant
from .text import backward_groups, groups_phrase, plural

DEFAULT_JOB_TIMEOUT = 900.0


@dataclass(frozen=True)
class Module:
    group: Group
    variants: tuple[Variant, ...]
    target: str

    @property
    def label(self) -> str:
        return f"{self.group.name} [{self.target}]"


@dataclass(frozen=True)
class Job:
    group: Group
    variants: tuple[Variant, ...]
    backend: str                  # 'cpu' | 'cuda'
    targets: tuple[str, ...]      # cpu: the group's CPU targets to build; cuda: one

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
class RunStats:
    """What running the jobs did besides their results (filled by the executor's runner)."""
    retried: int = 0                                        # attempts lost or failed, run again
    workers: set[str] = field(default_factory=set)          # where the results came from
    excluded: dict[str, str] = field(default_factory=dict)  # worker -> why it got no jobs


@dataclass
class BuildResult:
    path: str
    manifest: dict
    modules: int
    compiled: int
    cached: int                   # modules served by a cache: local hits + remote_hits
    seconds: float
    up_to_date: bool = False
    remote_hits: int = 0          # of `cached`, those a remote cache served
    uploaded: int = 0             # modules written to a remote cache (new ones, and local
                                  # hits it lacked)
    retried: int = 0              # job attempts lost with a worker or failed, run again
    workers: int = 0              # workers that ran a job
    excluded: dict[str, str] = field(default_factory=dict)   # worker -> why it got no jobs

    @property
    def n_kernels(self) -> int:
        return len(self.manifest["kernels"])

    @property
    def local_hits(self) -> int:
        return self.cached - self.remote_hits

    def summary(self) -> str:
        m = self.manifest
        targets = sorted({k["target"] for k in m["kernels"]})
        shard = m.get("shard")
        what = f"shard {shard['index'] + 1}/{shard['count']}: " if shard else ""
        state = "up to date" if self.up_to_date else "written"
        on = f" on {plural(self.workers, 'worker')}" if self.compiled else ""
        excluded = "".join(f"; worker {w} got no jobs: {why}" for w, why in self.excluded.items())
        return (f"{what}{plural(self.n_kernels, 'kernel')} ({groups_phrase(m['groups'])}, "
                f"{plural(len(targets), 'target')}: {', '.join(targets)}); "
                f"{plural(self.modules, 'module')}: {self.compiled} compiled{on}, {self.cached} "
                f"cached ({self.local_hits} local, {self.remote_hits} remote), {self.uploaded} "
                f"uploaded, {self.retried} retried{excluded}; {self.seconds:.1f} s -> "
                f"{self.path} ({state}, id {m['id'][:12]})")

    def to_json(self) -> dict:
        """The summary's counts as the JSON of `fusebuild compile --json`."""
        m = self.manifest
        backward = backward_groups(m["groups"])
        return {"ok": True, "bundle": self.path, "id": m["id"], "name": m["name"],
                "version": m["version"], "kernels": self.n_kernels,
                "groups": len(m["groups"]) - backward, "backward_groups": backward,
                "modules": self.modules, "compiled": self.compiled, "cached": self.cached,
                "local_hits": self.local_hits, "remote_hits": self.remote_hits,
                "uploaded": self.uploaded, "retried": self.retried, "workers": self.workers,
                "excluded_workers": self.excluded, "up_to_date": self.up_to_date,
                "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------- compile jobs -----------------

def kernel_sources(group: Group, variants: tuple[Variant, ...]) -> list[KernelSource]:
    names = [i.name for i in group.tensor_inputs]
    return [KernelSource(instantiate(group, dict(zip(names, v.dtypes))), v.key) for v in variants]


def render_source(group: Group, variants: tuple[Variant, ...], backend: str) -> tuple[str, str]:
    """The generated source of a group for a backend, and its file extension."""
    kernels = kernel_sources(group, variants)
    if backend == "cpu":
        from .codegen.cpu import render_group
        return render_group(kernels)[0], "py"
    from .codegen.cuda import render_module
    return render_module(kernels), "cu"


def _entries(kernels: list[KernelSource], target: str, rel: str, data: bytes) -> list[dict]:
    digest = hashlib.sha256(data).hexdigest()
    return [{"key": ks.key, "group": ks.kernel.group, "target": target, "file": rel,
             "symbol": ks.symbol, "sha256": digest,
             "outputs": [o.dtype.name for o in ks.kernel.outputs]} for ks in kernels]


def run_job(job: Job) -> JobResult:
    """Compile one job (in a worker process); errors are returned, not raised."""
    start = time.perf_counter()
    result = JobResult(job.label)
    try:
        kernels = kernel_sources(job.group, job.variants)
        name = job.group.name
        keys = [v.key for v in job.variants]
        if job.backend == "cpu":
            from .codegen.cpu import render_group
            from .toolchain.numba import compile_shared_objects
            source, entries = render_group(kernels)
            embeds = {tg.arch(t): describe(job.group, keys, t) for t in job.targets}
            objects = compile_shared_objects(source, entries, embeds, f"{name}.so",
                                             f"<fusebuild group {name}>")
            for target in job.targets:
                rel = f"cpu/{tg.arch(target)}/{name}.so"
                result.artifacts[rel] = objects[tg.arch(target)]
                result.kernels += _entries(kernels, target, rel, objects[tg.arch(target)])
        elif job.backend == "cuda":
            from .codegen.cuda import render_module, vector_width
            from .toolchain.nvrtc import compile_cuda, ptx_isa
            target, arch = job.targets[0], tg.arch(job.targets[0])
            data = compile_cuda(render_module(kernels), target, name,
                                describe(job.group, keys, target))
            ptx = arch.startswith("compute_")
            rel = f"cuda/{arch}/{name}.{'ptx' if ptx else 'cubin'}"
            result.artifacts[rel] = data
            extra = {"ptx_isa": ptx_isa(data)} if ptx else {}
            result.kernels += [{**e, "vector": vector_width(ks), **extra}
                               for e, ks in zip(_entries(kernels, target, rel, data), kernels)]
        else:
            raise BuildError(f"backend '{job.backend}' is not supported by this build")
    except FusebuildError as e:
        result.error = str(e)
    except Exception:  # noqa: BLE001 - a crash of a compiler is reported with its traceback
        result.error = traceback.format_exc()
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- the build --------------------

def toolchain_versions(targets: tuple[str, ...]) -> dict[str, str]:
    """fusebuild's version and those of the toolchains that build `targets` (numba, llvmlite
    and the linker of each CPU architecture family; NVRTC)."""
    versions = {"fusebuild": __version__}
    isas = tuple(tg.arch(t) for t in targets if tg.backend(t) == "cpu")
    if isas:
        from .toolchain import numba as numba_toolchain
        versions.update(numba_toolchain.versions(isas))
    if any(tg.backend(t) == "cuda" for t in targets):
        from .toolchain import nvrtc
        versions.update(nvrtc.versions())
    return versions


# The toolchain entries that shape a module's bytes, by CPU family or backend (see
# toolchain_versions): a module's cache key holds these and fusebuild's version, nothing of the
# toolchains of the build's other targets.
_SHAPED_BY = {"x86_64": ("numba", "llvmlite", "cc"), "aarch64": ("numba", "llvmlite", "ld.lld"),
              "cuda": ("nvrtc",)}


def module_toolchain(target: str, toolchain: dict[str, str]) -> dict[str, str]:
    """The part of a build's `toolchain` that builds modules of `target`."""
    kind = tg.family(tg.arch(target)) if tg.backend(target) == "cpu" else tg.backend(target)
    return {k: v for k, v in toolchain.items() if k == "fusebuild" or k in _SHAPED_BY[kind]}


def plan_modules(plan: Plan, shard: tuple[int, int] | None = None) -> list[Module]:
    """Every (group, target) module of the plan in a stable order, or shard I of N of them."""
    modules = [Module(gp.group, gp.variants, t) for gp in plan.groups for t in gp.targets]
    modules.sort(key=lambda m: (m.group.name, m.target))
    if shard:
        index, count = shard
        modules = modules[index::count]
    return modules


def jobs_for(modules: list[Module]) -> list[Job]:
    """Compile jobs for modules: CPU modules of one group share a job."""
    jobs: list[Job] = []
    cpu: dict[str, list[Module]] = {}
    for m in modules:
        if tg.backend(m.target) == "cpu":
            cpu.setdefault(m.group.name, []).append(m)
        else:
            jobs.append(Job(m.group, m.variants, "cuda", (m.target,)))
    for ms in cpu.values():
        jobs.append(Job(ms[0].group, ms[0].variants, "cpu", tuple(m.target for m in ms)))
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1-based I) -> (I - 1, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes I/N, e.g. 2/4; got {text!r}") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be between 1 and N")
    return i - 1, n


def build(plan: Plan, out_dir: str = "build", jobs: int | None = None, keep_going: bool = False,
          emit_source: bool = False, progress: bool | None = None, cache_dir: str | None = "",
          shard: tuple[int, int] | None = None, job_timeout: float = DEFAULT_JOB_TIMEOUT,
          executor: concurrent.futures.Executor | None = None, cache_url: str | None = None,
          cache_mode: str = "read") -> BuildResult:
    """Compile every kernel of `plan` (or of one shard) and write the bundle.

    cache_dir "" means the default cache directory and None disables the cache. cache_url is a
    shared cache behind it (file:// or s3://, see remote_cache), cache_mode 'read' or
    'readwrite'. Jobs run in `jobs` local worker processes, or on `executor` (any
    concurrent.futures.Executor, e.g. `distributed.Client(...).get_executor()`, whose workers
    are checked first). Raises BuildError on failures; the previous bundle stays in place.
    """
    start = time.perf_counter()
    remote = None
    if cache_url:
        from .remote_cache import RemoteCache
        remote = RemoteCache(cache_url, cache_mode)
    cache = CacheChain(Cache(default_dir() if cache_dir == "" else cache_dir), remote)
    toolchain = toolchain_versions(plan.targets)
    modules = plan_modules(plan, shard)
    keys = {(m.group.name, m.target): module_key(m.group.ir_json(), [v.key for v in m.variants],
                                                 m.target, module_toolchain(m.target, toolchain))
            for m in modules}
    hits = cache.get_many({keys[m.group.name, m.target]: (m.label, functools.partial(_holds, m=m))
                           for m in modules})
    entries: dict[tuple[str, str], Entry] = {
        (m.group.name, m.target): hits[keys[m.group.name, m.target]]
        for m in modules if keys[m.group.name, m.target] in hits}
    missing = [m for m in modules if (m.group.name, m.target) not in entries]
    job_list = jobs_for(missing)
    stats = RunStats()
    results: list[JobResult] = []
    if job_list:
        from .executors import runner_for
        runner = runner_for(executor, jobs or os.cpu_count() or 1, plan.targets, job_timeout)
        stats = runner.stats
        results = _compile(runner, job_list, keep_going, progress)
    failed = [r for r in results if r.error]
    if failed:
        lines = [f"  {r.label}: {_excerpt(r.error)}" for r in failed]
        raise BuildError(f"{len(failed)} compile job(s) failed; the previous bundle was left in "
                         f"place:\n" + "\n".join(lines))
    new: dict[str, Entry] = {}
    for r in results:
        by_target: dict[str, list[dict]] = {}
        for k in r.kernels:
            by_target.setdefault(k["target"], []).append(k)
        for target, ks in by_target.items():
            entry = Entry({ks[0]["file"]: r.artifacts[ks[0]["file"]]}, ks)
            entries[ks[0]["group"], target] = entry
            new[keys[ks[0]["group"], target]] = entry
    cache.put_many(new)
    artifacts: dict[str, bytes] = {}
    kernels: list[dict] = []
    for entry in entries.values():
        artifacts.update(entry.artifacts)
        kernels += entry.kernels
    if emit_source:
        for group, variants, backend in sorted({(m.group, m.variants, tg.backend(m.target))
                                                for m in modules}, key=lambda t: (t[0].name, t[2])):
            text, ext = render_source(group, variants, backend)
            artifacts[f"src/{group.name}.{ext}"] = text.encode()
    groups = {gp.group.name: {**gp.group.to_json(), "spec_hash": gp.group.spec_hash}
              for gp in plan.groups}
    extra = {"shard": {"index": shard[0], "count": shard[1],
                       "plan": plan_hash(plan_modules(plan), toolchain, plan.name, plan.version)}
             } if shard else {}
    manifest = make_manifest(plan.name, plan.version, toolchain, groups, artifacts, kernels,
                             **extra)
    suffix = f".shard-{shard[0] + 1}-of-{shard[1]}" if shard else ""
    path, written = write_bundle(out_dir, manifest, artifacts, suffix)
    return BuildResult(path, manifest, len(modules), len(missing), len(modules) - len(missing),
                       time.perf_counter() - start, up_to_date=not written,
                       remote_hits=cache.remote_hits, uploaded=cache.uploaded,
                       retried=stats.retried, workers=len(stats.workers),
                       excluded=stats.excluded)


def _holds(entry: Entry, m: Module) -> bool:
    """Whether a cache entry is module `m`: one artifact in its target's folder, and kernels of
    exactly its keys and target in that artifact (anything else counts as a miss)."""
    (rel, *more) = entry.artifacts or [""]
    return (not more and is_plain_path(rel) and rel.startswith(m.target.replace(":", "/") + "/")
            and sorted(k["key"] for k in entry.kernels) == sorted(v.key for v in m.variants)
            and all(k["target"] == m.target and k["file"] in entry.artifacts
                    for k in entry.kernels))


def _excerpt(text: str, lines: int = 15) -> str:
    parts = text.strip().splitlines()
    if len(parts) > lines:   # the end of a log or traceback says most
        parts = [f"... ({len(parts) - lines} lines before)"] + parts[-lines:]
    return "\n    ".join(parts)


def _compile(runner, job_list: list[Job], keep_going: bool,
             progress: bool | None) -> list[JobResult]:
    """Run the jobs; on a TTY (or with progress) a bar of modules and kernels with an ETA."""
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    kernels = [0, sum(len(j.variants) * len(j.targets) for j in job_list)]
    if show:
        import tqdm
        tqdm.tqdm.monitor_interval = 0
        bar = tqdm.tqdm(total=sum(len(j.targets) for j in job_list), desc="compiling",
                        leave=False, postfix=f"0/{kernels[1]} kernels",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "modules{postfix} [{elapsed}<{remaining}]")

    def done(result: JobResult) -> None:
        if bar:
            kernels[0] += len(result.kernels)
            bar.set_postfix_str(f"{kernels[0]}/{kernels[1]} kernels", refresh=False)
            bar.update(len({k["target"] for k in result.kernels}) or 1)

    try:
        return runner.run(job_list, keep_going, done)
    finally:
        if bar:
            bar.close()
