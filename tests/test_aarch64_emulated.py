"""The aarch64 kernels of the example bundle, cross-built on this machine, run on emulated Arm
CPUs: qemu-user with the arm64 root of tests/aarch64/setup-root.sh runs fusebuild.runtime (C
fast path and Python path) on every call of tests/test_examples.py (every group, dtype variant
and layout: random sizes, 1-element, empty, broadcast operands, strided views; and a call of
about 3,000 elements per pattern, to run every vector loop's body many times), and the outputs
are compared here with the reference evaluated here. Each emulated CPU also shows the level the
runtime picks from its HWCAP flags.

Skipped, saying why, without qemu or the root; with CI set, that is a failure instead.
"""
from __future__ import annotations

import math
import os
import tempfile
import zlib

import numpy as np
import pytest

from fusebuild import spec
from conftest import (SPECS, check_outputs, concrete, example_calls, expected, group_of,
                      make_args, symbols)
from aarch64 import harness

# name, qemu -cpu, environment, the level the runtime must pick, SVE vector length in bits
CPUS = [
    ("armv8.2-a", "cortex-a76", {}, "armv8.2-a", None),
    ("neoverse-v1-sve256", "max,sve-default-vector-length=32",
     {"FUSEBUILD_CPU_ISA": "neoverse-v1"}, "neoverse-v1", 256),
    ("neoverse-v2-sve128", "max,sve-default-vector-length=16", {}, "neoverse-v2", 128),
    ("neoverse-v2-sve512", "max,sve-default-vector-length=64", {}, "neoverse-v2", 512),
]
V80 = "cortex-a57"          # Armv8.0: no fp16 arithmetic, no dot product
TIMEOUT = 600.0
# elements of the large call of each pattern: many times the unrolled body of every vector loop
# (4 x 2048-bit SVE vectors hold 256 floats)
LARGE = 3000


@pytest.fixture(scope="module")
def emulation():
    why = harness.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated aarch64 tests: {why}")
        pytest.skip(why)


def large_calls(gp):
    """One call of about LARGE elements (odd sizes) per dtype variant and shape pattern."""
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()) + 1)
    seed = dict(seed=int(rng.integers(0, 2**63)), offset=int(rng.integers(0, 2**40))) \
        if gp.group.has_random else {}
    syms = symbols(gp)
    size = math.ceil(LARGE ** (1 / len(syms))) | 1 if syms else 1
    for dtypes in dict.fromkeys(v.dtypes for v in gp.variants):
        for pattern in gp.shapes:
            shapes = {k: concrete(s, dict.fromkeys(syms, size)) for k, s in pattern.items()}
            yield make_args(gp, dtypes, shapes, rng), seed, True


@pytest.fixture(scope="module")
def calls():
    """(case, served): every call of test_examples, and the large calls."""
    out = []
    for gp in spec.load_plan([SPECS]).groups:
        for args, seed, served in [*example_calls(gp), *large_calls(gp)]:
            out.append((harness.Case(gp.group.name, args, seed.get("seed"),
                                     seed.get("offset", 0)), served))
    return out


@pytest.fixture(scope="module")
def runs(emulation, examples_bundle, calls):
    """The runners' reports, by CPU name; all run at once (one emulated process each)."""
    work = tempfile.mkdtemp(prefix="fusebuild-qemu-")
    harness.write_cases(os.path.join(work, "cases"), [case for case, _ in calls])
    # one call of each kind for the Armv8.0 CPU: it only has to refuse them
    harness.write_cases(os.path.join(work, "one-case"), [calls[0][0]])
    site = harness.make_site(os.path.join(work, "site"),
                             harness.build_dispatch(os.path.join(harness.REPO, "build", "aarch64")))
    started = {}
    for name, cpu, env, _, _ in CPUS + [("armv8.0", V80, {}, None, None)]:
        run = harness.Run(name, cpu, env, os.path.join(work, name))
        run.start(examples_bundle.root,
                  os.path.join(work, "one-case" if cpu == V80 else "cases"), site)
        started[name] = run
    return {name: (run, run.report(TIMEOUT)) for name, run in started.items()}


@pytest.mark.parametrize("name, cpu, env, level, bits", CPUS, ids=[c[0] for c in CPUS])
def test_the_runtime_picks_the_level_from_hwcap(runs, examples_bundle, name, cpu, env, level,
                                                bits):
    report = runs[name][1]
    assert report["isas"][-1] == level, report["features"]
    assert report["vector_bits"] == bits
    assert report["loaded"] == sorted(f"cpu/{level}/{g}.so" for g in examples_bundle.groups)


def test_max_cpu_runs_every_level(runs):
    assert runs["neoverse-v2-sve128"][1]["isas"] == ["armv8.2-a", "neoverse-v1", "neoverse-v2"]


@pytest.mark.parametrize("name, cpu, env, level, bits", CPUS, ids=[c[0] for c in CPUS])
def test_every_example_kernel_matches_the_reference(runs, calls, examples_bundle, record_property,
                                                    name, cpu, env, level, bits):
    run, report = runs[name]
    failures, checked = [], 0
    for (case, served), result in zip(calls, report["cases"]):
        what = f"{case.group} call {checked}"
        if "error" in result:
            failures.append(f"{what}: {result['error']}")
        elif not served:
            if case.group not in result.get("missing", ""):
                failures.append(f"{what}: a strided call of a group built without strided "
                                f"views gave {result} instead of KernelNotFound")
        elif "missing" in result:
            failures.append(f"{what}: {result['missing']}")
        elif not result["paths_agree"]:
            failures.append(f"{what} ({result['key']}): fast and Python paths differ")
        else:
            g = group_of(examples_bundle, case.group)
            try:
                check_outputs(g, run.outputs(result), _expected(g, case), result["key"])
            except AssertionError as e:
                failures.append(str(e))
        checked += 1
    assert checked == len(calls)
    assert not failures, f"{len(failures)} of {checked} calls failed:\n" + "\n".join(failures[:20])
    record_property("emulated", f"{level}:{bits or ''}")      # for the run's summary line


_EXPECTED: dict[int, object] = {}       # reference results by case, shared by the CPUs


def _expected(g, case: harness.Case):
    if id(case) not in _EXPECTED:
        _EXPECTED[id(case)] = expected(g, case.args, case.seed, case.offset)
    return _EXPECTED[id(case)]


def test_an_armv8_0_cpu_runs_no_level_and_says_why(runs):
    report = runs["armv8.0"][1]
    assert report["isas"] == []
    (result,) = report["cases"]
    assert "which this CPU cannot run (it runs none of the aarch64 levels: armv8.2-a needs " \
           "asimddp, asimdhp, fphp, which this CPU lacks)" in result["missing"], result


def test_a_cap_of_the_other_family_is_an_error(runs):
    assert runs["armv8.2-a"][1]["foreign_cap_error"] == (
        "FUSEBUILD_CPU_ISA='x86-64-v3' is not one of armv8.2-a, neoverse-v1, neoverse-v2 "
        "(x86-64-v3 is an x86-64 level and this host is aarch64)")
