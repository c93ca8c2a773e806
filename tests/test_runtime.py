"""Runtime behaviour on bad calls and bad bundles, and import hygiene."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fusebuild import dtypes as dt, runtime
from fusebuild.runtime import dispatch
from fusebuild.errors import ArgumentError, BundleError, KernelNotFound


@pytest.fixture
def bundle_copy(examples_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(examples_bundle.root, dst)
    return dst


def f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_wrong_number_of_arrays(examples_bundle):
    with pytest.raises(ArgumentError, match=r"bias_gelu\(x, bias\) -> y takes 2 arguments \(3 given\)"):
        examples_bundle.bias_gelu(f32(4), f32(4), f32(4))


def test_dtype_not_in_bundle_names_key_nearest_and_fix(examples_bundle):
    with pytest.raises(KernelNotFound) as info:
        examples_bundle.bias_gelu(np.ones((4, 8)), np.ones(8))
    e = info.value
    assert e.key == "bias_gelu(f64:cc,f64:bc)"
    assert "bias_gelu(f32:cc,f32:bc)" in e.nearest
    assert "{x: float64, bias: float64}" in str(e) and "matrix.dtype" in str(e)


def test_unsupported_dtype(examples_bundle):
    with pytest.raises(ArgumentError, match="unsupported dtype complex64"):
        examples_bundle.bias_gelu(np.ones(4, np.complex64), np.ones(4, np.complex64))


def test_mismatched_shapes(examples_bundle):
    with pytest.raises(ArgumentError, match=r"do not broadcast \(x\[4, 8\], bias\[7\]\)"):
        examples_bundle.bias_gelu(f32(4, 8), f32(7))


def test_chunk_that_does_not_divide(examples_bundle):
    with pytest.raises(ArgumentError, match="chunked 4 ways along dim 1"):
        examples_bundle.lstm_cell(f32(2, 10), f32(2, 2))


@pytest.mark.parametrize("out,pattern", [
    (np.empty((4, 7), np.float32), r"must be float32\[4, 8\]"),
    (np.empty((4, 8), np.float64), r"must be float32\[4, 8\]"),
    (np.empty((8, 4), np.float32).T, "C-contiguous"),
    ([np.empty((4, 8), np.float32)] * 2, "has 1 output "),
    ([1.0], "must be a numpy array"),
])
def test_bad_out(examples_bundle, out, pattern):
    with pytest.raises(ArgumentError, match=pattern):
        examples_bundle.bias_gelu(f32(4, 8), f32(8), out=out)


def test_out_overlapping_an_input_is_refused_but_exact_in_place_works(examples_bundle):
    x, b = f32(4, 8), f32(8)
    want = examples_bundle.silu_add(x, x)
    buf = np.zeros(40, np.float32)
    buf[:32] = x.ravel()
    with pytest.raises(ArgumentError, match="overlaps input 'x'"):
        examples_bundle.silu_add(buf[:32], buf[:32], out=buf[8:40])
    y = x.copy()
    examples_bundle.silu_add(y, x, out=y)
    np.testing.assert_array_equal(y, want)
    ro = np.empty(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ArgumentError, match="writeable"):
        examples_bundle.bias_gelu(f32(8), b, out=ro)


def test_scalar_arguments_are_checked(examples_bundle):
    img = np.zeros((3, 3), np.uint8)
    with pytest.raises(ArgumentError, match=r"scalar input 'offset' \(int32\) cannot hold"):
        examples_bundle.leaky_clip_u8(img, 2**40)
    with pytest.raises(ArgumentError, match="needs a Python number"):
        examples_bundle.leaky_clip_u8(img, "3")


def test_scalars_and_inputs_by_name(examples_bundle):
    x, r, w = f32(3, 8), f32(3, 8), f32(8)
    want = examples_bundle.add_rms_norm(x, r, w, 1e-6)
    for got in (examples_bundle.add_rms_norm(x, r, w, eps=1e-6),
                examples_bundle.add_rms_norm(x, residual=r, eps=1e-6, w=w)):
        for g, e in zip(got, want):
            np.testing.assert_array_equal(g, e)
    with pytest.raises(ArgumentError, match=r"add_rms_norm\(\) got an unexpected keyword "
                                            r"argument 'epsilon'; it takes add_rms_norm\(x, "
                                            r"residual, w, eps: float32\)"):
        examples_bundle.add_rms_norm(x, r, w, epsilon=1e-6)
    with pytest.raises(ArgumentError, match="multiple values for argument 'eps'"):
        examples_bundle.add_rms_norm(x, r, w, 1e-6, eps=1e-6)
    with pytest.raises(ArgumentError, match="missing argument 'eps'"):
        examples_bundle.add_rms_norm(x, r, w=w)


def test_random_group_needs_seed(examples_bundle):
    with pytest.raises(ArgumentError, match="pass seed="):
        examples_bundle.bias_dropout_residual(f32(4), f32(4), f32(4), 0.1)
    with pytest.raises(ArgumentError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        examples_bundle.bias_dropout_residual(f32(4), f32(4), f32(4), 0.1, seed=-1)


def test_bool_seeds_and_offsets_are_refused_as_numpy_and_torch_refuse_them(examples_bundle):
    x = f32(4)
    for random in ({"seed": True}, {"seed": False}, {"seed": 1, "offset": True}):
        for _ in range(2):       # the first call plans, the second may take the C fast path
            with pytest.raises(ArgumentError, match=r"must be an integer in \[0, 2\*\*64\), "
                                                    r"got (True|False)"):
                examples_bundle.bias_dropout_residual(x, x, x, 0.1, **random)
        examples_bundle.bias_dropout_residual(x, x, x, 0.1, seed=1)
    with pytest.raises(ArgumentError, match="draws no random numbers"):
        examples_bundle.bias_gelu(x, x, offset=False)


def test_dropout_probabilities_outside_0_1_do_what_the_readme_says(examples_bundle):
    """The README (Specs, rand_like) documents p outside [0, 1) of the example dropout, which
    no spec can validate: p >= 1 and NaN drop everything, p < 0 keeps all scaled by 1/(1-p)."""
    x, bias, res = f32(64), f32(64), f32(64)
    for p in (1.0, 2.0, float("nan")):
        np.testing.assert_array_equal(
            examples_bundle.bias_dropout_residual(x, bias, res, p, seed=3), res)
    want = res.astype(np.float64) + (x.astype(np.float64) + bias) / 2
    np.testing.assert_allclose(examples_bundle.bias_dropout_residual(x, bias, res, -1.0, seed=3),
                               want, rtol=1e-6, atol=1e-6)


def test_seed_is_refused_by_groups_without_random_numbers(examples_bundle):
    with pytest.raises(ArgumentError, match="bias_gelu draws no random numbers"):
        examples_bundle.bias_gelu(f32(4), f32(4), seed=1)


def test_complex_scalars_are_refused_not_truncated(examples_bundle):
    x = f32(4)
    with pytest.raises(ArgumentError, match="complex number"):
        examples_bundle.bias_dropout_residual(x, x, x, np.complex64(0.1 + 0.5j), seed=1)


def test_dir_and_repr_of_a_bundle(examples_bundle, tmp_path):
    names = dir(examples_bundle)
    assert len(names) == len(set(names)) and set(examples_bundle.groups) <= set(names)
    assert repr(examples_bundle).endswith(f"({len(examples_bundle.groups)} groups)>")
    one = dict(examples_bundle.manifest, groups={"bias_gelu":
                                                 examples_bundle.manifest["groups"]["bias_gelu"]})
    assert repr(runtime.Bundle(examples_bundle.root, one)).endswith("(1 group)>")


def test_unknown_group(examples_bundle):
    with pytest.raises(AttributeError, match="has no group 'nope'"):
        examples_bundle.nope


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        runtime.load(str(tmp_path / "missing"))
    with pytest.raises(BundleError, match="manifest.json is missing"):
        runtime.load(str(tmp_path))


def test_flipped_byte_in_an_artifact_is_refused_naming_the_file(bundle_copy):
    so = sorted((bundle_copy / "cpu").rglob("*.so"))[3]
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x01
    so.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{so.name} is corrupt or tampered"):
        runtime.load(str(bundle_copy))


def test_tampered_or_incompatible_manifest_is_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["groups"]["bias_gelu"]["body"] = "y = x"
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="was modified"):
        runtime.load(str(bundle_copy))
    m["format"] = 999
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format 999"):
        runtime.load(str(bundle_copy))
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        runtime.load(str(bundle_copy))


def test_runtime_imports_no_build_side_and_so_loads_without_numba(examples_bundle):
    """Nor, for CPU calls (elementwise, reduction, empty), the IR or the CUDA runtime: output
    dtypes come from the artifacts' descriptions (issue 22: cold start)."""
    code = f"""
import sys, numpy as np
from fusebuild import runtime
k = runtime.load({examples_bundle.root!r})
y = k.silu_add(np.ones(1000, np.float32), np.zeros(1000, np.float32))
assert abs(float(y[0]) - 0.7310586) < 1e-6
assert k.layer_norm(*(np.ones(s, np.float32) for s in ((2, 8), 8, 8))).dtype == np.float32
assert k.silu_add(np.ones(0, np.float16), np.ones(0, np.float16)).dtype == np.float16
bad = [m for m in ("yaml", "click", "tqdm", "numba", "llvmlite", "fusebuild.syntax",
                   "fusebuild.ir", "fusebuild.codegen", "fusebuild.runtime.cuda")
       if m in sys.modules]
print("BAD" if bad else "CLEAN", bad)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CLEAN"), proc.stdout


def test_shared_objects_need_only_libc_and_libm(examples_bundle):
    nm = shutil.which("nm")
    assert nm, "binutils' nm is needed (it comes with the C toolchain the CPU backend links with)"
    for so in sorted(os.listdir(os.path.join(examples_bundle.root, "cpu"))):
        folder = os.path.join(examples_bundle.root, "cpu", so)
        for name in os.listdir(folder):
            out = subprocess.run([nm, "-D", "--undefined-only", os.path.join(folder, name)],
                                 capture_output=True, text=True, check=True).stdout
            syms = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
            syms -= {"__cxa_finalize", "_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable",
                     "__gmon_start__"}
            libm = {"expf", "exp", "tanhf", "tanh", "logf", "log", "log1pf", "log1p", "erfcf",
                    "erfc", "expm1f", "expm1", "sqrtf", "sqrt", "pow", "powf", "fmodf", "fmod",
                    "memcpy", "memset"}
            assert syms <= libm, (name, syms - libm)


@pytest.mark.parametrize("d", dt.FLOATS, ids=lambda d: d.name)
def test_float_scalar_words_are_numpys_conversion(d):
    """Python floats take a struct-packing shortcut to their meta word; it gives numpy's bits."""
    for value in (0.1, -0.0, 1 / 3, 2.5, 1e300, -1e300, 3.4028235e38, 3.4028236e38, 1e-45,
                  7e-46, float("inf"), float("-inf"), float("nan"), 1e-310):
        with np.errstate(over="ignore"):
            want = (np.array(value, np.float64).view(np.int64) if d == dt.float64
                    else np.array(value, np.float32).view(np.uint32))
        assert dispatch._scalar_bits("s", value, d) == int(want)
