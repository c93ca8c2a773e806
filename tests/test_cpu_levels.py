"""Which ISA levels a CPU runs, from synthetic flags on any host: aarch64 HWCAP words (bit
numbers checked against the Linux uapi header where the cross toolchain installed it), the
FUSEBUILD_CPU_ISA cap on an aarch64 host, and the message of a host that runs no level."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from fusebuild import build, runtime, spec
from fusebuild.errors import BundleError, KernelNotFound
from fusebuild.runtime import cpu

HEADER = "/usr/aarch64-linux-gnu/include/asm/hwcap.h"    # linux-libc-dev-arm64-cross


def hwcap(*names: str) -> tuple[int, int]:
    """The AT_HWCAP and AT_HWCAP2 words with these features set."""
    return (sum(1 << cpu._HWCAP[n] for n in names if n in cpu._HWCAP),
            sum(1 << cpu._HWCAP2[n] for n in names if n in cpu._HWCAP2))


# Features as Linux reports them (/proc/cpuinfo) on real cores, of those the levels look at
CORTEX_A72 = ("fp", "asimd")                                        # Armv8.0: Graviton1
NEOVERSE_N1 = CORTEX_A72 + ("fphp", "asimdhp", "asimddp")           # Graviton2, Ampere Altra
NEOVERSE_V1 = NEOVERSE_N1 + ("sha3", "sve", "bf16", "svebf16", "i8mm", "svei8mm")  # Graviton3
GRACE = NEOVERSE_V1 + ("sve2",)                                     # Neoverse V2


@pytest.fixture
def aarch64_host(monkeypatch):
    """Make this process an aarch64 host whose HWCAP words `set_cpu` chooses."""
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("FUSEBUILD_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu, "_WARNED", set())

    def set_cpu(*names: str) -> None:
        monkeypatch.setattr(cpu, "hwcap_words", lambda: hwcap(*names))
    return set_cpu


@pytest.mark.skipif(not os.path.isfile(HEADER), reason=f"no {HEADER} (gcc-aarch64-linux-gnu)")
def test_hwcap_bits_are_those_of_the_linux_uapi_header():
    with open(HEADER, encoding="ascii") as f:
        defined = {(m.group(1), m.group(2).lower()): int(m.group(3)) for m in re.finditer(
            r"#define\s+(HWCAP2?)_(\w+)\s+\(1(?:UL)?\s*<<\s*(\d+)\)", f.read())}
    for word, bits in (("HWCAP", cpu._HWCAP), ("HWCAP2", cpu._HWCAP2)):
        for feature, bit in bits.items():
            assert defined[word, feature] == bit, f"{word}_{feature.upper()}"


@pytest.mark.parametrize("features, levels", [
    (CORTEX_A72, ()),
    (NEOVERSE_N1, ("armv8.2-a",)),
    (NEOVERSE_V1, ("armv8.2-a", "neoverse-v1")),
    (GRACE, ("armv8.2-a", "neoverse-v1", "neoverse-v2")),
    (tuple(f for f in GRACE if f != "sha3"), ("armv8.2-a", "neoverse-v2")),  # no NEON eor3
    (tuple(f for f in GRACE if f != "svebf16"), ("armv8.2-a",)),
])
def test_levels_follow_the_hwcap_features(features, levels):
    flags = cpu.hwcap_features(*hwcap(*features))
    assert flags == set(features)
    assert cpu.supported_levels("aarch64", flags) == levels


def test_unknown_hwcap_bits_are_ignored():
    every = (1 << 64) - 1
    assert cpu.hwcap_features(every, every) == set(cpu._HWCAP) | set(cpu._HWCAP2)


def test_fusebuild_cpu_isa_caps_the_aarch64_levels(aarch64_host, monkeypatch):
    aarch64_host(*GRACE)
    assert cpu.host_isas() == ("armv8.2-a", "neoverse-v1", "neoverse-v2")
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "neoverse-v1")
    assert cpu.host_isas() == ("armv8.2-a", "neoverse-v1")
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "armv8.2-a")
    assert cpu.host_isas() == ("armv8.2-a",)


def test_a_cap_above_the_cpu_is_its_best_level_below_the_cap(aarch64_host, monkeypatch):
    aarch64_host(*(f for f in GRACE if f != "sha3"))
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "neoverse-v1")
    with pytest.warns(RuntimeWarning, match="FUSEBUILD_CPU_ISA=neoverse-v1, but this CPU runs "
                                            "only armv8.2-a, neoverse-v2: using armv8.2-a"):
        assert cpu.host_isas() == ("armv8.2-a",)


def test_a_cap_of_the_other_family_is_an_error(aarch64_host, monkeypatch):
    aarch64_host(*GRACE)
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "x86-64-v3")
    with pytest.raises(BundleError, match=re.escape(
            "FUSEBUILD_CPU_ISA='x86-64-v3' is not one of armv8.2-a, neoverse-v1, neoverse-v2 "
            "(x86-64-v3 is an x86-64 level and this host is aarch64)")):
        cpu.host_isas()
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("FUSEBUILD_CPU_ISA", "neoverse-v2")
    with pytest.raises(BundleError, match=r"\(neoverse-v2 is an aarch64 level and this host is "
                                          r"x86-64\)"):
        cpu.host_isas()


SPEC = """fusebuild: 1
targets: [cpu:x86-64-v2]
groups:
  - name: twice
    inputs: {x: tensor}
    outputs: [y]
    body: 'y = x * 2.0'
    matrix: {dtype: [float32], shapes: [{x: [N]}]}
"""


def test_a_host_that_runs_no_level_says_what_the_lowest_level_needs(aarch64_host, tmp_path):
    (tmp_path / "s.yaml").write_text(SPEC)
    path = build.build(spec.load_plan([str(tmp_path / "s.yaml")]), str(tmp_path / "out"),
                       progress=False).path
    aarch64_host(*CORTEX_A72)
    k = runtime.load(path)
    with pytest.raises(KernelNotFound, match=re.escape(
            "has twice(f32:c) only for cpu:x86-64-v2, which this CPU cannot run (it runs none of "
            "the aarch64 levels: armv8.2-a needs asimddp, asimdhp, fphp, which this CPU lacks); "
            "no CPU kernel of fusebuild runs here")):
        k.twice(np.ones(3, np.float32))
    aarch64_host(*NEOVERSE_N1)
    with pytest.raises(KernelNotFound, match=re.escape(
            "(it runs cpu:armv8.2-a); the key and dtypes are fine: rebuild with `--target "
            "cpu:aarch64` (every aarch64 level) or `--target cpu:armv8.2-a`")):
        runtime.load(path).twice(np.ones(3, np.float32))
