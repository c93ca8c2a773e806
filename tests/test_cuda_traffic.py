"""Global-memory traffic of every example kernel, counted by the host emulation (emu.h's
counting build: every load and store the compiled kernel makes to an array of the launch) at
the float32 and one 16-bit dtype combination of each group, every shape pattern, 2^16 elements
(reductions: rows of N = 1024, 4096 and 16384): measured / ideal bytes (each needed input byte
read once, a broadcast input at its own size, each output byte written once) is at most 1.02
for elementwise kernels and at most the group's REDUCTION_MAX for reductions.
benchmarks/gpu_model.py reports the same at 2^20 elements."""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fusebuild import spec
from fusebuild.codegen.cuda import HELD, render_module
from conftest import SPECS
from cuda_emulation.harness import (EmulatedGroup, compile_source, have_compiler, kernel_sources,
                                    launchers)
from cuda_emulation.traffic import cases, compile_traffic, measure

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the host emulation")
PLAN = spec.load_plan([SPECS])
ELEMENTS = 1 << 16
ELEMENTWISE_MAX = 1.02
# A reduction whose held inputs fit runtime.cuda.HELD_ROW_MAX bytes per row reads each row once
# (launch flag HELD): at most HELD_MAX. Longer rows re-read each row from global memory once per
# pass (DESIGN §8: a sweep per pass of reductions, then one storing the outputs): at most the
# multi-pass ratios below (largest over the test's shapes, measured before rows were held).
HELD_MAX = 1.05
ALWAYS_HELD_UP_TO = 4096      # three float64 inputs of N = 4096 take 96 KiB: a float32 row less
REDUCTION_MAX = {
    "softmax": 2.0, "softmax__grad": 2.34, "masked_softmax": 1.8, "log_softmax": 2.0,
    "layer_norm": 1.99, "layer_norm__grad": 2.25, "rms_norm": 1.5, "rms_norm__grad": 1.75,
    "add_rms_norm": 1.5, "add_rms_norm__grad": 1.5, "quant_per_token": 1.8,
}


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict[str, EmulatedGroup]:
    """Every example group's traffic kernels, counting, in two libraries compiled side by
    side."""
    out = str(tmp_path_factory.mktemp("traffic"))
    parts = [PLAN.groups[i::2] for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        libs = pool.map(lambda i: compile_traffic(parts[i], out, f"traffic{i}"), range(2))
        return {name: em for part in libs for name, em in part.items()}


def test_reduction_table_names_every_reduction():
    assert set(REDUCTION_MAX) == {gp.group.name for gp in PLAN.groups if gp.group.reduces}


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_traffic_of_every_example_kernel(counted, gp):
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    for dtypes, pattern, n in cases(gp):
        m = measure(counted[gp.group.name], gp, dtypes, pattern, ELEMENTS, n, rng)
        t, label = m.traffic, f"{m.key} {m.shapes}"
        held = bool(m.flags & HELD)
        assert held or not gp.group.reduces or n > ALWAYS_HELD_UP_TO, (label, m.flags)
        bound = (ELEMENTWISE_MAX if not gp.group.reduces else HELD_MAX if held
                 else REDUCTION_MAX[gp.group.name])
        n_in = len(t.broadcast) - len(gp.group.outputs)
        for i, (ld, st, d, need) in enumerate(zip(t.loaded, t.stored, t.distinct, t.needed)):
            if i < n_in:     # every byte of a needed input loaded, none of the others; no store
                assert (d, st) == (need, 0) and (ld > 0) == (need > 0), (label, i, t)
            else:            # every output byte stored once, none loaded
                assert (ld, st) == (0, need), (label, i, t)
        assert t.ratio <= bound, f"{label}: {t.measured} bytes / {t.ideal} = {t.ratio:.4f}"


def test_counting_changes_no_result(tmp_path, counted):
    """An elementwise and a reduction group give the same bits counting and not counting."""
    for name, shapes in (("bias_gelu", [(64, 1024), (1024,)]), ("layer_norm", [(8, 4096),
                                                                              (4096,), (4096,)])):
        gp = next(g for g in PLAN.groups if g.group.name == name)
        ks = kernel_sources(gp.group, gp.variants)
        text = '#include "emu.h"\n' + render_module(ks) + launchers([k.symbol for k in ks])
        plain = EmulatedGroup(gp.group, ks, compile_source(text, str(tmp_path), name))
        rng = np.random.default_rng(3)
        args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        got, want = counted[name](args), plain(args)
        assert got.traffic is not None and want.traffic is None
        for a, b in zip(got.outputs, want.outputs):
            assert a.tobytes() == b.tobytes()
