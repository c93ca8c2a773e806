"""Global-memory traffic of every example kernel, counted by the host emulation (emu.h's
counting build: every load and store the compiled kernel makes to an array of the launch) at
the float32 and one 16-bit dtype combination of each group, every shape pattern, 2^16 elements
(reductions: rows of N = 1024, 4096 and 16384): measured / ideal bytes (each needed input byte
read once, a broadcast input at its own size, each output byte written once) is at most 1.02
for elementwise kernels, and every reduction launch is HELD (its row read once: the emulated
device has sm_90's shared memory, `harness.SM`) at most 1.05. (On sm_80 the three-input
add_rms_norm__grad rows of N = 16384 float32 stay multi-pass, on sm_86/89/120 the two- and
three-input ones: tests/test_cuda_runtime.py checks that decision per architecture.)
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
HELD_MAX = 1.05        # a reduction reading its row once (launch flag HELD)


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict[str, EmulatedGroup]:
    """Every example group's traffic kernels, counting, in two libraries compiled side by
    side."""
    out = str(tmp_path_factory.mktemp("traffic"))
    parts = [PLAN.groups[i::2] for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        libs = pool.map(lambda i: compile_traffic(parts[i], out, f"traffic{i}"), range(2))
        return {name: em for part in libs for name, em in part.items()}


@pytest.mark.parametrize("gp", PLAN.groups, ids=lambda gp: gp.group.name)
def test_traffic_of_every_example_kernel(counted, gp):
    rng = np.random.default_rng(zlib.crc32(gp.group.name.encode()))
    for dtypes, pattern, n in cases(gp):
        m = measure(counted[gp.group.name], gp, dtypes, pattern, ELEMENTS, n, rng)
        t, label = m.traffic, f"{m.key} {m.shapes}"
        assert bool(m.flags & HELD) == gp.group.reduces, (label, m.flags)
        bound = HELD_MAX if gp.group.reduces else ELEMENTWISE_MAX
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
