"""Command line (the only module that imports click). Commands stay thin over the library."""
from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import warnings

import click

from . import __version__
from .errors import CacheWarning, FusebuildError, MissingExtra, SpecError
from .text import groups_phrase, plural


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run (workers stopped, stage removed)."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _errors(fn):
    """Expected failures print their message and exit with their code; no traceback. With
    --json the failure is also printed to stdout as a JSON object."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            try:
                return fn(*args, **kwargs)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] not in MissingExtra.BUILD_MODULES:
                    raise
                raise MissingExtra(e.name) from None
        except FusebuildError as e:
            if kwargs.get("as_json"):
                click.echo(json.dumps(_failure(e)))
            click.echo(f"fusebuild: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("fusebuild: interrupted", err=True)
            sys.exit(130)
        except _Terminated:
            click.echo("fusebuild: terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
    return wrapper


def _failure(e: FusebuildError) -> dict:
    """The JSON object of a failed command."""
    out = {"ok": False, "error": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
    if isinstance(e, SpecError):
        out.update(file=e.file, line=e.line, column=e.col)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusebuild")
def main():
    """fusebuild: ahead-of-time builds of fused elementwise kernels."""


_specs = click.argument("specs", nargs=-1, required=True, type=click.Path())
_target = click.option("--target", "targets", multiple=True, metavar="T",
                       help="Build for T instead of the specs' targets (repeatable): cpu, "
                            "cpu:x86-64-v3, cpu:aarch64, cpu:neoverse-v2, cuda:sm_90, "
                            "cuda:compute_90 ...")
_max = click.option("--max-kernels", type=click.IntRange(1), default=None,
                    help="Refuse matrices that expand to more kernels than this.")


def _plan(specs, targets, name=None, version=None, max_kernels=None):
    from .spec import DEFAULT_MAX_KERNELS, load_plan
    return load_plan(list(specs), list(targets) or None, name, version,
                     max_kernels or DEFAULT_MAX_KERNELS)


@main.command()
@_specs
@click.option("-o", "--out", "out_dir", default="build", show_default=True,
              help="Output directory; the bundle goes to OUT/<name>-<version>.")
@_target
@click.option("-j", "--jobs", type=click.IntRange(1), default=None,
              help="Parallel compile jobs [default: number of cores].")
@click.option("--keep-going", is_flag=True, help="Compile everything and report every failure.")
@click.option("--shard", default=None, metavar="I/N",
              help="Build only shard I of N (1-based); combine shards with `fusebuild merge`.")
@click.option("--cache-dir", default="", metavar="DIR",
              help="Compile cache [default: $FUSEBUILD_CACHE_DIR or ~/.cache/fusebuild/modules].")
@click.option("--no-cache", is_flag=True,
              help="Neither read nor write the compile caches (local and shared).")
@click.option("--cache-url", default=None, envvar="FUSEBUILD_CACHE_URL", metavar="URL",
              help="Shared cache behind the local one: file:///path or s3://bucket/prefix "
                   "[default: $FUSEBUILD_CACHE_URL].")
@click.option("--cache-mode", type=click.Choice(["read", "readwrite"]), default="read",
              show_default=True, help="Whether this build also uploads to the shared cache.")
@click.option("--job-timeout", type=click.FloatRange(min=1), default=900, show_default=True,
              help="Seconds one compile job may take before it is killed and reported.")
@click.option("--executor", default="local", show_default=True, metavar="local|dask://HOST:PORT",
              help="Where compile jobs run: local worker processes (-j), or the workers of a "
                   "Dask scheduler (they need this fusebuild and the same toolchains; others "
                   "get no jobs).")
@click.option("--executor-fallback", type=click.Choice(["local"]), default=None,
              help="Build locally, with a warning, when the Dask scheduler cannot be reached.")
@click.option("--emit-source", is_flag=True, help="Also store the generated source under src/.")
@click.option("--add-misses", "miss_logs", multiple=True, type=click.Path(), metavar="LOG",
              help="Also build the keys a runtime logged as missing (FUSEBUILD_MISS_LOG).")
@click.option("--name", default=None, help="Bundle name (overrides the specs).")
@click.option("--version", "bundle_version", default=None, help="Bundle version (overrides the specs).")
@_max
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
def compile(specs, out_dir, targets, jobs, keep_going, shard, cache_dir, no_cache, cache_url,
            cache_mode, job_timeout, executor, executor_fallback, emit_source, miss_logs, name,
            bundle_version, max_kernels, quiet, as_json):
    """Compile every kernel of SPECS into a bundle."""
    from .build import build, parse_shard
    from .executors import dask_address, executor_for
    from .spec import DEFAULT_MAX_KERNELS, add_misses
    shard_range = parse_shard(shard) if shard else None
    if executor != "local":
        dask_address(executor)          # bad usage before any work
    plan = _plan(specs, targets, name, bundle_version, max_kernels)
    for log in miss_logs:
        fold = add_misses(plan, log, max_kernels or DEFAULT_MAX_KERNELS)
        plan = fold.plan
        if not quiet:
            _report_misses(log, fold)
    with warnings.catch_warnings(), executor_for(
            executor, executor_fallback,
            lambda text: click.echo(f"fusebuild: {text}", err=True)) as pool:
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        result = build(plan, out_dir, jobs, keep_going, emit_source,
                       progress=False if quiet or as_json else None,
                       cache_dir=None if no_cache else cache_dir, shard=shard_range,
                       job_timeout=job_timeout, executor=pool,
                       cache_url=None if no_cache else cache_url, cache_mode=cache_mode)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    elif not quiet:
        click.echo(result.summary())


def _show_warning(show, message, category, filename, lineno, file=None, line=None):
    """The shared cache's warnings as one line on stderr; others as `show` prints them."""
    if issubclass(category, CacheWarning):
        click.echo(f"fusebuild: warning: {message}", err=True)
    else:
        show(message, category, filename, lineno, file, line)


def _report_misses(log: str, fold) -> None:
    """What --add-misses did with one log, on stderr."""
    def count(n: int, what: str) -> str:
        return f"{n} {what}" if n == 1 else f"{n} {what}s"

    notes = [f"{count(fold.backward, 'backward key')} with them"] if fold.backward else []
    if fold.duplicates:
        notes.append(count(fold.duplicates, "duplicate record"))
    if fold.other_groups:
        notes.append(f"{count(fold.other_groups, 'record')} of groups not in these specs skipped")
    if fold.bad:
        notes.append(f"{count(len(fold.bad), 'invalid record')} skipped")
    click.echo(f"{log}: {count(fold.added, 'missing key')} added"
               + "".join(f", {n}" for n in notes), err=True)
    for line in fold.bad:
        click.echo(f"  skipped {line}", err=True)
    if fold.underived:
        click.echo(f"  no backward key for {', '.join(fold.underived)}: the layout is none of "
                   "the matrix's and the group has cat outputs; add a shape pattern of the "
                   "call", err=True)
    if fold.unbuilt:
        click.echo(f"  misses were logged for targets these specs do not build: "
                   f"{', '.join(fold.unbuilt)} (add them with --target)", err=True)


@main.command()
@_specs
@_target
@_max
@_errors
def check(specs, targets, max_kernels):
    """Parse and type-check SPECS without compiling."""
    plan = _plan(specs, targets, max_kernels=max_kernels)
    click.echo(f"ok: {groups_phrase(gp.group.name for gp in plan.groups)}, "
               f"{plural(plan.n_kernels, 'kernel')} "
               f"({', '.join(plan.targets)})")


@main.command()
@_specs
@_target
@_max
@click.option("--json", "as_json", is_flag=True, help="One JSON object per kernel.")
@_errors
def plan(specs, targets, max_kernels, as_json):
    """List every (group, key, target) a compile of SPECS would build."""
    p = _plan(specs, targets, max_kernels=max_kernels)
    for gp in p.groups:
        for v in gp.variants:
            for t in gp.targets:
                click.echo(json.dumps({"group": gp.group.name, "key": v.key, "target": t})
                           if as_json else f"{v.key}\t{t}")
    if not as_json:
        click.echo(f"{plural(p.n_kernels, 'kernel')} in "
                   f"{groups_phrase(gp.group.name for gp in p.groups)}", err=True)


@main.command(name="list")
@click.argument("bundle", type=click.Path())
@_errors
def list_(bundle):
    """List the groups of BUNDLE with their call signatures."""
    from .runtime import load
    b = load(bundle)
    click.echo(f"{b.name}-{b.version} (id {b.id[:12]})")
    counts: dict[str, int] = {}
    for k in b.manifest["kernels"]:
        counts[k["group"]] = counts.get(k["group"], 0) + 1
    for name in b.groups:
        click.echo(f"  {b[name].info.signature}    [{plural(counts.get(name, 0), 'kernel')}]")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--numerics", is_flag=True,
              help="Also run every CPU kernel this host can load against the reference; fails "
                   "if that is none.")
@click.option("--allow-skip", is_flag=True,
              help="With --numerics: succeed even if no kernel could be run on this host.")
@_errors
def verify(bundle, numerics, allow_skip):
    """Check BUNDLE: schema, format, every hash, every loadable artifact."""
    from .verify import verify as run
    click.echo(run(bundle, numerics, allow_skip=allow_skip).summary())


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("key", required=False)
@click.option("--target", default=None, help="With KEY: the target whose source to show.")
@click.option("--sass", is_flag=True,
              help="Report registers, spills, occupancy and the hot loop's instruction mix of "
                   "every CUDA kernel (of KEY), from the cubins' SASS.")
@_errors
def inspect(bundle, key, target, sass):
    """Show the kernels of BUNDLE, the generated source of KEY, or (--sass) the SASS report."""
    from .inspection import format_table, kernel_rows, kernel_source
    from .verify import open_root
    from .runtime.manifest import read_manifest
    root = open_root(bundle)
    manifest = read_manifest(root)
    if sass:
        from .sass import sass_table
        click.echo(sass_table(root, manifest, key, target))
        return
    click.echo(kernel_source(manifest, key, target) if key else format_table(kernel_rows(manifest)))


@main.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, help="Output directory of the merged bundle.")
@_errors
def merge(shards, out_dir):
    """Merge the shard bundles of one build into one bundle."""
    from .bundle import merge_shards
    path, manifest = merge_shards(list(shards), out_dir)
    click.echo(f"merged {plural(len(shards), 'shard')}: "
               f"{plural(len(manifest['kernels']), 'kernel')} -> {path} (id {manifest['id'][:12]})")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("-o", "--out", default=None, help="Archive path [default: BUNDLE.tar.gz].")
@_errors
def pack(bundle, out):
    """Write BUNDLE as a deterministic .tar.gz (runtime.load accepts it)."""
    from .bundle import pack as run
    click.echo(run(bundle, out))


@main.group()
def cache():
    """The local compile cache."""


_cache_dir = click.option("--cache-dir", default="", metavar="DIR",
                          help="Compile cache [default: $FUSEBUILD_CACHE_DIR or "
                               "~/.cache/fusebuild/modules].")


def _local_cache(cache_dir: str):
    from .cache import Cache, default_dir
    return Cache(cache_dir or default_dir())


@cache.command()
@_cache_dir
@_errors
def stats(cache_dir):
    """Entries and bytes of the local compile cache."""
    c = _local_cache(cache_dir)
    entries, size = c.stats()
    click.echo(f"{c.root}: {plural(entries, 'entry', 'entries')}, {_size(size)}")


@cache.command()
@_cache_dir
@click.option("--max-size", required=True, metavar="SIZE",
              help="Keep at most SIZE bytes (e.g. 500M, 2G; K/M/G/T are powers of 1000, KiB, "
                   "MiB, GiB, TiB of 1024), removing the least recently used entries first.")
@_errors
def prune(cache_dir, max_size):
    """Shrink the local compile cache to --max-size."""
    from .cache import parse_size
    limit = parse_size(max_size)
    c = _local_cache(cache_dir)
    removed, freed = c.prune(limit)
    entries, size = c.stats()
    click.echo(f"{c.root}: removed {plural(removed, 'entry', 'entries')} ({_size(freed)}); "
               f"{plural(entries, 'entry', 'entries')}, {_size(size)} left")


def _size(n: int) -> str:
    """Bytes in a short human form (powers of 1000, as --max-size reads them)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
