"""aarch64 targets on any build machine (issue 13): target names, the ld.lld link and its
errors, the linker's version in cache keys, and `verify` on bundles holding both families."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from fusebuild import build, spec
from fusebuild import targets as tg
from fusebuild.errors import BundleError, SpecError, ToolchainError, UsageError
from fusebuild.runtime.cpu import FAMILY_NAMES, LEVELS
from fusebuild.runtime.manifest import bundle_id
from fusebuild.toolchain import lld, numba as numba_toolchain
from fusebuild.verify import verify

from conftest import no_lld

SPEC = """fusebuild: 1
bundle: {name: arm, version: '1'}
targets: [TARGETS]
groups:
  - name: axpy
    inputs: {x: tensor, y: tensor, a: scalar(float32)}
    outputs: [z]
    body: 'z = a * x + y'
    matrix: {dtype: [float32, bfloat16], shapes: [{x: [N], y: [N]}]}
"""
ARM = tuple(f"cpu:{isa}" for isa in LEVELS["aarch64"])
X86 = tuple(f"cpu:{isa}" for isa in LEVELS["x86_64"])


needs_lld = pytest.mark.skipif(bool(no_lld()), reason=no_lld())


def write_spec(tmp_path, targets: str) -> str:
    path = tmp_path / "arm.yaml"
    path.write_text(SPEC.replace("TARGETS", targets))
    return str(path)


def fusebuild(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fusebuild", *args], capture_output=True,
                          text=True, env=env)


# ------------------------------------------------------------------ target names ---------------

@pytest.mark.parametrize("machine,family", [("x86_64", "x86_64"), ("AMD64", "x86_64"),
                                            ("aarch64", "aarch64"), ("arm64", "aarch64")])
def test_cpu_means_every_level_of_the_hosts_family(monkeypatch, machine, family):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert tg.host_family() == family
    assert tg.expand(["cpu"]) == tuple(f"cpu:{isa}" for isa in LEVELS[family])


def test_family_and_level_targets():
    assert tg.expand(["cpu:aarch64"]) == ARM == ("cpu:armv8.2-a", "cpu:neoverse-v1",
                                                 "cpu:neoverse-v2")
    assert tg.expand(["cpu:x86-64"]) == X86
    assert tg.expand(["cpu:neoverse-v1"]) == ("cpu:neoverse-v1",)
    assert tg.expand(["cpu:neoverse-v2", "cpu:aarch64", "cpu:x86-64-v3"]) == \
        ("cpu:neoverse-v2", "cpu:armv8.2-a", "cpu:neoverse-v1", "cpu:x86-64-v3")
    assert [tg.family(t[4:]) for t in ARM + X86] == ["aarch64"] * 3 + ["x86_64"] * 3
    assert set(numba_toolchain.MACHINES) == set(numba_toolchain.ISAS) == set(tg.CPU_ISAS)


@pytest.mark.parametrize("name", ["cpu:armv9-a", "cpu:arm64", "cpu:neoverse-n1", "cpu:x86-64-v1"])
def test_unknown_cpu_target_lists_every_known_name(name):
    with pytest.raises(ValueError) as info:
        tg.expand([name])
    message = str(info.value)
    assert message.startswith(f"unknown target '{name}'; use cpu, ")
    for known in ("cpu:x86-64", "cpu:aarch64", *X86, *ARM):
        assert f"{known}," in message


def test_unknown_level_in_a_spec_is_a_spec_error_at_its_position(tmp_path):
    path = write_spec(tmp_path, "cpu:aarch64, cpu:neoverse-n1")
    with pytest.raises(SpecError) as info:
        spec.load_plan([path])
    text = str(info.value)
    assert f"{path}:3:" in text and "unknown target 'cpu:neoverse-n1'" in text
    assert "cpu:neoverse-v2" in text
    plan = spec.load_plan([write_spec(tmp_path, "cpu:aarch64, cpu:x86-64-v2")])
    assert plan.targets == ARM + ("cpu:x86-64-v2",)


def test_unknown_level_on_the_command_line_is_a_usage_error(tmp_path):
    path = write_spec(tmp_path, "cpu:aarch64")
    with pytest.raises(UsageError, match=r"^--target cpu:sve: unknown target 'cpu:sve'"):
        spec.load_plan([path], targets=["cpu:sve"])
    r = fusebuild("plan", path, "--target", "cpu:sve")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--target cpu:sve: unknown target 'cpu:sve'; use cpu, cpu:x86-64, cpu:aarch64" \
        in r.stderr and "cpu:neoverse-v1" in r.stderr
    r = fusebuild("plan", path, "--target", "cpu:aarch64")
    assert r.returncode == 0 and r.stdout.split()[1::2] == list(ARM) * 2


# ------------------------------------------------------------------ the linker -----------------

def _fake_linker(folder, name: str, version: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)


def test_missing_linker_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(lld.ENV, raising=False)
    with pytest.raises(ToolchainError, match=r"no ld\.lld found: .*`apt-get install lld`"):
        lld.find()
    with pytest.raises(ToolchainError, match=r"no ld\.lld found"):
        build.toolchain_versions(("cpu:armv8.2-a",))
    monkeypatch.setenv(lld.ENV, "ld.lld-99")
    with pytest.raises(ToolchainError, match=r"FUSEBUILD_LLD='ld.lld-99' is not an executable"):
        lld.find()


def test_missing_linker_on_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != lld.ENV}
    env["PATH"] = str(tmp_path)            # no ld.lld (nor cc: aarch64 builds need neither)
    r = fusebuild("compile", write_spec(tmp_path, "cpu:armv8.2-a"), "-o", str(tmp_path / "o"),
                  "--no-cache", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no ld.lld found" in r.stderr and "apt-get install lld" in r.stderr


def test_numbered_linker_is_found_newest_first(tmp_path, monkeypatch):
    for n in ("9", "15", "14"):
        _fake_linker(tmp_path, f"ld.lld-{n}", f"LLD {n}.0.0")
    _fake_linker(tmp_path, "ld.lld-old", "LLD old")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(lld.ENV, raising=False)
    assert lld.find() == str(tmp_path / "ld.lld-15")
    assert lld.version() == "LLD 15.0.0"
    monkeypatch.setenv(lld.ENV, str(tmp_path / "ld.lld-9"))
    assert lld.version() == "LLD 9.0.0"


@needs_lld
def test_cache_key_holds_the_linker_version(tmp_path, monkeypatch):
    """The linker's version line is in the toolchain of builds with aarch64 levels (manifest
    and cache keys), not in x86-64-only builds (whose bundles stay as before); another linker
    version compiles the module again."""
    versions = build.toolchain_versions(ARM)
    assert versions["ld.lld"] == lld.version() and "cc" not in versions
    assert "ld.lld" not in build.toolchain_versions(X86)
    assert {"cc", "ld.lld"} <= set(build.toolchain_versions(("cpu:x86-64-v2", "cpu:armv8.2-a")))
    plan = spec.load_plan([write_spec(tmp_path, "cpu:armv8.2-a")])
    cache = str(tmp_path / "cache")
    first = build.build(plan, str(tmp_path / "a"), cache_dir=cache, progress=False)
    assert first.manifest["toolchain"]["ld.lld"] == lld.version()
    again = build.build(plan, str(tmp_path / "b"), cache_dir=cache, progress=False)
    assert (again.compiled, again.cached) == (0, 1)
    monkeypatch.setattr(lld, "version", lambda: "LLD 99.0.0")
    other = build.build(plan, str(tmp_path / "c"), cache_dir=cache, progress=False)
    assert (other.compiled, other.cached) == (1, 0)
    assert other.manifest["toolchain"]["ld.lld"] == "LLD 99.0.0"


# ------------------------------------------------------------------ verify ---------------------

@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A bundle with the lowest level of each family: one of them runs here, the other not."""
    if no_lld():
        pytest.skip(no_lld())
    d = tmp_path_factory.mktemp("both")
    plan = spec.load_plan([write_spec(d, "cpu:x86-64-v2, cpu:armv8.2-a")])
    return build.build(plan, str(d / "out"), progress=False).path


def test_verify_a_bundle_of_both_families(both):
    here = FAMILY_NAMES[tg.host_family()]
    other = FAMILY_NAMES["aarch64" if tg.host_family() == "x86_64" else "x86_64"]
    report = verify(both, numerics=True)
    assert report.foreign == {other: 1}
    assert report.numerics == 2 and report.skipped == \
        {f"{other}: not runnable on this {here} host": 2}
    assert f"1 shared object not loadable here ({other})" in report.summary()
    assert f"numerics skipped for 2 kernels (2 {other}: not runnable on this {here} host)" \
        in report.summary()
    r = fusebuild("verify", both, "--numerics")
    assert r.returncode == 0 and "not loadable here" in r.stdout, r.stderr


@needs_lld
def test_verify_an_aarch64_bundle_on_x86(tmp_path):
    """`--target cpu:aarch64` on an x86-64 machine: verify passes (hashes, ELF machine,
    symbols); `--numerics` has nothing to run and says why, and passes with --allow-skip."""
    if tg.host_family() != "x86_64":
        pytest.skip("checks an aarch64 bundle on an x86-64 host")
    path = build.build(spec.load_plan([write_spec(tmp_path, "cpu:aarch64")]),
                       str(tmp_path / "o"), progress=False).path
    r = fusebuild("verify", path)
    assert r.returncode == 0 and "0 shared objects loaded, 3 shared objects not loadable " \
                                 "here (aarch64)" in r.stdout, r.stderr
    r = fusebuild("verify", path, "--numerics")
    assert r.returncode == 1 and "numerics skipped for 6 kernels (6 aarch64: not runnable on " \
                                 "this x86-64 host)" in r.stderr and "--allow-skip" in r.stderr
    assert fusebuild("verify", path, "--numerics", "--allow-skip").returncode == 0


def test_verify_checks_the_elf_machine_of_each_family(both, tmp_path):
    """A shared object of the other family in a level's folder (hashes recomputed) is refused."""
    root = str(tmp_path / "swapped")
    shutil.copytree(both, root)
    x86, arm = (os.path.join(root, f"cpu/{isa}/axpy.so") for isa in ("x86-64-v2", "armv8.2-a"))
    data = {p: open(p, "rb").read() for p in (x86, arm)}
    for dst, src in ((x86, arm), (arm, x86)):
        with open(dst, "wb") as f:
            f.write(data[src])
    with open(os.path.join(root, "manifest.json")) as f:
        m = json.load(f)
    for rel in m["artifacts"]:
        blob = open(os.path.join(root, rel), "rb").read()
        m["artifacts"][rel].update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    for k in m["kernels"]:
        k["sha256"] = m["artifacts"][k["file"]]["sha256"]
    m["id"] = bundle_id(m)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(BundleError, match=r"cpu/armv8.2-a/axpy.so: e_machine 62 is not aarch64 "
                                          r"\(183\), as cpu:armv8.2-a needs"):
        verify(root)
