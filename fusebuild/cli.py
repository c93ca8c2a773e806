"""Command line (the only module that imports click). Commands stay thin over the library."""
from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import FusebuildError


def _errors(fn):
    """Expected failures print their message and exit with their code; no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FusebuildError as e:
            click.echo(f"fusebuild: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("fusebuild: interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusebuild")
def main():
    """fusebuild: ahead-of-time builds of fused elementwise kernels."""


_specs = click.argument("specs", nargs=-1, required=True, type=click.Path())
_target = click.option("--target", "targets", multiple=True, metavar="T",
                       help="Build for T instead of the specs' targets (repeatable): cpu, "
                            "cpu:x86-64-v3, cuda:sm_90, cuda:compute_90 ...")
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
@click.option("--emit-source", is_flag=True, help="Also store the generated source under src/.")
@click.option("--name", default=None, help="Bundle name (overrides the specs).")
@click.option("--version", "bundle_version", default=None, help="Bundle version (overrides the specs).")
@_max
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_errors
def compile(specs, out_dir, targets, jobs, keep_going, emit_source, name, bundle_version,
            max_kernels, quiet, as_json):
    """Compile every kernel of SPECS into a bundle."""
    from .build import build
    plan = _plan(specs, targets, name, bundle_version, max_kernels)
    result = build(plan, out_dir, jobs, keep_going, emit_source,
                   progress=False if quiet or as_json else None)
    if as_json:
        m = result.manifest
        click.echo(json.dumps({"bundle": result.path, "id": m["id"], "name": m["name"],
                               "version": m["version"], "kernels": result.n_kernels,
                               "groups": len(m["groups"]), "jobs": result.jobs,
                               "seconds": round(result.seconds, 3)}))
    elif not quiet:
        click.echo(result.summary())


@main.command()
@_specs
@_target
@_max
@_errors
def check(specs, targets, max_kernels):
    """Parse and type-check SPECS without compiling."""
    plan = _plan(specs, targets, max_kernels=max_kernels)
    click.echo(f"ok: {len(plan.groups)} groups, {plan.n_kernels} kernels "
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
        click.echo(f"{p.n_kernels} kernels in {len(p.groups)} groups", err=True)


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
        click.echo(f"  {b[name].info.signature}    [{counts.get(name, 0)} kernels]")


if __name__ == "__main__":
    main()
