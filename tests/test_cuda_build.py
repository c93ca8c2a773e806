"""CUDA builds without a GPU: every example spec compiled by NVRTC for several architectures,
each cubin checked as a CUDA ELF for the right SM exporting every symbol its manifest names
(`fusebuild.elf`, itself checked against NVRTC output for every architecture it supports)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from fusebuild import build, dtypes as dt, ir, syntax, spec, verify
from fusebuild.codegen.common import KernelSource
from fusebuild.codegen.cuda import render_module
from fusebuild.elf import check_bounds, cubin_sm, functions
from fusebuild.errors import BundleError, FusebuildError, ToolchainError
from fusebuild.runtime.manifest import bundle_id
from fusebuild.toolchain import nvrtc
from conftest import SPECS

ARCHS = ("sm_80", "sm_90", "sm_100")


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    plan = spec.load_plan([SPECS], targets=[f"cuda:{a}" for a in ARCHS])
    result = build.build(plan, str(tmp_path_factory.mktemp("cuda")), progress=False)
    return plan, result


def test_every_example_kernel_is_built_for_every_arch(cuda_bundle):
    plan, result = cuda_bundle
    m = result.manifest
    want = {(v.key, f"cuda:{a}") for gp in plan.groups for v in gp.variants for a in ARCHS}
    assert {(k["key"], k["target"]) for k in m["kernels"]} == want
    assert m["toolchain"]["nvrtc"] == nvrtc.versions()["nvrtc"]
    for k in m["kernels"]:
        assert k["file"] == f"cuda/{k['target'][5:]}/{k['group']}.cubin"
        assert k["vector"] in (1, 2, 4, 8, 16)


def test_cubins_are_cuda_elf_for_their_sm_and_export_every_symbol(cuda_bundle):
    _, result = cuda_bundle
    by_file: dict[str, set[str]] = {}
    for k in result.manifest["kernels"]:
        by_file.setdefault(k["file"], set()).add(k["symbol"])
    assert len(by_file) == len(ARCHS) * len(result.manifest["groups"])
    for rel, symbols in by_file.items():
        with open(os.path.join(result.path, rel), "rb") as f:
            data = f.read()
        assert cubin_sm(data) == int(rel.split("/")[1][3:]), rel
        missing = symbols - functions(data)
        assert not missing, f"{rel} lacks {sorted(missing)}"


def test_elf_sm_encoding_matches_every_supported_arch():
    source = 'extern "C" __global__ void k(float *x) { x[threadIdx.x] = expf(x[threadIdx.x]); }\n'
    archs = nvrtc.supported_archs()
    assert {"sm_75", "sm_80", "sm_90"} <= set(archs)
    for arch in archs:
        data = nvrtc.compile_cuda(source, f"cuda:{arch}", "probe")
        check_bounds(data)
        assert cubin_sm(data) == int(arch[3:]), arch
        assert functions(data) == {"k"}


def _nvdisasm() -> str:
    """nvdisasm of the nvidia-cuda-nvdisasm wheel; skipped without it (a failure under CI)."""
    import nvidia
    for folder in nvidia.__path__:
        path = os.path.join(folder, "cu13", "bin", "nvdisasm")
        if os.access(path, os.X_OK):
            return path
    why = "needs nvdisasm from the pip wheel nvidia-cuda-nvdisasm (the test extra)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must disassemble the cubins: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def all_arch_bundle(tmp_path_factory):
    """One group built for every architecture this NVRTC supports among the GPU generations."""
    archs = [a for a in ("sm_80", "sm_89", "sm_90", "sm_100", "sm_120")
             if a in nvrtc.supported_archs()]
    plan = _one_group_plan("bias_dropout_residual", f"cuda:{archs[0]}")
    plan = dataclasses.replace(plan, groups=(dataclasses.replace(
        plan.groups[0], targets=tuple(f"cuda:{a}" for a in archs)),))
    return build.build(plan, str(tmp_path_factory.mktemp("archs")), progress=False, jobs=1)


def test_nvdisasm_reads_every_cubin_and_prints_its_kernels(all_arch_bundle):
    """Cubins were once one byte short of their program header table: nvdisasm called them
    invalid ELF files."""
    nvdisasm = _nvdisasm()
    by_file: dict[str, set[str]] = {}
    for k in all_arch_bundle.manifest["kernels"]:
        by_file.setdefault(k["file"], set()).add(k["symbol"])
    assert len(by_file) >= 4, sorted(by_file)
    for rel, symbols in sorted(by_file.items()):
        proc = subprocess.run([nvdisasm, os.path.join(all_arch_bundle.path, rel)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (rel, proc.stderr)
        printed = {line.split()[1] for line in proc.stdout.splitlines()
                   if line.strip().startswith(".global")}
        assert symbols <= printed, (rel, sorted(symbols - printed))


def test_a_cubin_cut_short_is_refused_by_verify_and_the_toolchain(all_arch_bundle, tmp_path,
                                                                   monkeypatch):
    root = str(tmp_path / "b")
    shutil.copytree(all_arch_bundle.path, root)
    rel = all_arch_bundle.manifest["kernels"][0]["file"]
    with open(os.path.join(root, rel), "rb") as f:
        short = f.read()[:-1]
    with open(os.path.join(root, rel), "wb") as f:
        f.write(short)
    with open(os.path.join(root, "manifest.json")) as f:
        m = json.load(f)
    digest = hashlib.sha256(short).hexdigest()
    m["artifacts"][rel] = {"sha256": digest, "size": len(short)}
    for k in m["kernels"]:
        if k["file"] == rel:
            k["sha256"] = digest
    m["id"] = bundle_id(m)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(BundleError, match=f"{rel}: its program header table ends at byte "
                                          f"{len(short) + 1}, past the end of the file"):
        verify.verify(root)
    real = nvrtc._output
    monkeypatch.setattr(nvrtc, "_output", lambda prog, what: real(prog, what)[:-1]
                        if what == "CUBIN" else real(prog, what))
    with pytest.raises(ToolchainError, match=r"malformed cubin for group 'g' \(cuda:sm_90\): "
                                             "its program header table ends"):
        nvrtc.compile_cuda('extern "C" __global__ void k() {}', "cuda:sm_90", "g")


def _one_group_plan(name: str, target: str) -> spec.Plan:
    plan = spec.load_plan([SPECS])
    gp = next(g for g in plan.groups if g.group.name == name)
    return dataclasses.replace(plan, groups=(dataclasses.replace(gp, targets=(target,)),))


def test_ptx_target_records_its_isa_and_sources_are_emitted(tmp_path):
    plan = _one_group_plan("bias_dropout_residual", "cuda:compute_90")
    result = build.build(plan, str(tmp_path), emit_source=True, progress=False)
    entries = result.manifest["kernels"]
    assert {k["file"] for k in entries} == {"cuda/compute_90/bias_dropout_residual.ptx"}
    with open(os.path.join(result.path, entries[0]["file"]), "rb") as f:
        ptx = f.read()
    assert b".target sm_90" in ptx and not ptx.endswith(b"\0")
    assert {k["ptx_isa"] for k in entries} == {nvrtc.ptx_isa(ptx)}
    with open(os.path.join(result.path, "src", "bias_dropout_residual.cu")) as f:
        source = f.read()
    for k in entries:
        assert f'extern "C" __global__ void __launch_bounds__(128) {k["symbol"]}(' in source
    again = build.build(plan, str(tmp_path / "again"), emit_source=True, progress=False,
                        cache_dir=None)
    assert again.manifest["id"] == result.manifest["id"]      # byte-identical recompile


def test_unsupported_arch_lists_what_nvrtc_supports():
    with pytest.raises(ToolchainError, match=r"cannot compile for sm_70; it supports sm_75"):
        nvrtc.compile_cuda("", "cuda:sm_70", "g")
    with pytest.raises(ToolchainError, match=r"sm_80a.*it supports sm_75"):
        nvrtc.compile_cuda("", "cuda:sm_80a", "g")


def test_compile_error_names_group_target_log_and_source_line():
    source = "// line 1\nextern \"C\" __global__ void k() {\n  undefined_thing(1);\n}\n"
    with pytest.raises(ToolchainError) as e:
        nvrtc.compile_cuda(source, "cuda:sm_90", "mygroup")
    text = str(e.value)
    assert "group 'mygroup' for cuda:sm_90" in text
    assert 'identifier "undefined_thing" is undefined' in text      # the NVRTC log
    assert "mygroup.cu:3: undefined_thing(1);" in text               # the offending line


def test_missing_nvrtc_names_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)
    nvrtc._nvrtc.cache_clear()
    try:
        with pytest.raises(ToolchainError, match="nvidia-cuda-nvrtc"):
            nvrtc.compile_cuda("", "cuda:sm_90", "g")
        with pytest.raises(FusebuildError, match="nvidia-cuda-nvrtc"):
            build.build(_one_group_plan("silu_add", "cuda:sm_90"), str(tmp_path), jobs=1,
                        progress=False, cache_dir=None)
    finally:
        nvrtc._nvrtc.cache_clear()


def test_half_rounding_uses_ptx_cvt_where_the_arch_has_it():
    """f32 -> f16 by cvt.rn.f16.f32 everywhere; f32 -> bf16 by cvt.rn.bf16.f32 from sm_80 on,
    by the integer round-to-nearest-even trick on sm_75."""
    group = syntax.parse_group("cvt", [("x", "tensor", None)],
                           [("h", dt.float16), ("b", dt.bfloat16)], "h = x\nb = x", syntax.SourceMap())
    ks = KernelSource(ir.instantiate(group, {"x": dt.float32}), "cvt(f32:c)")
    source = render_module([ks])
    for arch, has_bf16 in (("compute_75", False), ("compute_80", True), ("compute_90", True)):
        ptx = nvrtc.compile_cuda(source, f"cuda:{arch}", "cvt").decode()
        assert "cvt.rn.f16.f32" in ptx, arch
        assert ("cvt.rn.bf16.f32" in ptx) == has_bf16, arch
    assert cubin_sm(nvrtc.compile_cuda(source, "cuda:sm_75", "cvt")) == 75


def test_multiply_adds_are_not_contracted():
    """--fmad=false: `s + v * a * b` and lerp round each op, like the CPU backend (contracted,
    they leave the reference's tolerances; see toolchain/nvrtc.py)."""
    group = syntax.parse_group("muladd", [(n, "tensor", None) for n in "sab"], [("y", None)],
                           "y = addcmul(s, a, b, value=3) + lerp(s, a, b)", syntax.SourceMap())
    ks = KernelSource(ir.instantiate(group, dict.fromkeys("sab", dt.float32)),
                      "muladd(f32:c,f32:c,f32:c)")
    ptx = nvrtc.compile_cuda(render_module([ks]), "cuda:compute_90", "muladd").decode()
    assert "mul.rn.f32" in ptx and "fma.rn.f32" not in ptx
