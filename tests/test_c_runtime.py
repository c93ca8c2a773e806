"""The C runtime (include/fusebuild.h, libfusebuild_rt.so; DESIGN §12), part 1: its ArgSpec key
equals the Python runtime's on random calls, programs in C99 and C++ build against the header,
and bad input is a status with a message (the C part run under ASan + UBSan)."""
from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import sys
import threading
from glob import glob

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

from fusebuild import c_runtime
from fusebuild.argspec import contiguous_strides
from fusebuild.errors import ArgumentError
from fusebuild.runtime import dispatch

FB_OK, FB_E_DTYPE, FB_E_SHAPE, FB_E_ARGUMENT = 0, 2, 3, 9
SOURCES = os.path.join(os.path.dirname(c_runtime.__file__), "src")


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class Split(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int32), ("dim", ctypes.c_int32)]


class GroupInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p),
                ("n_inputs", ctypes.c_int32), ("input_names", ctypes.POINTER(ctypes.c_char_p)),
                ("chunks", ctypes.POINTER(Split)), ("n_outputs", ctypes.c_int32),
                ("cats", ctypes.POINTER(Split)), ("row_outputs", ctypes.POINTER(ctypes.c_uint8)),
                ("reduces", ctypes.c_int32)]


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(c_runtime.library_path())
    lib.fb_abi_version.restype = ctypes.c_uint32
    lib.fb_last_error.restype = ctypes.c_char_p
    lib.fb_argspec_key.argtypes = [ctypes.POINTER(GroupInfo), ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_size_t)]
    return lib


# DLPack dtype codes and bits (DLPack spec), written here independently of the C table
DL_DTYPES = {"bool": (6, 8), "int8": (0, 8), "int16": (0, 16), "int32": (0, 32), "int64": (0, 64),
             "uint8": (1, 8), "float16": (2, 16), "bfloat16": (4, 16), "float32": (2, 32),
             "float64": (2, 64), "uint16": (1, 16), "complex64": (5, 64)}


class Tensors:
    """DLTensors of numpy arrays: numpy's own DLPack export where numpy has one (so the C side
    reads a real producer's structs), else built here (bfloat16, with NULL strides when the
    strides are exactly C-contiguous ones: numpy's flag and numpy's own strides of empty
    arrays differ from those, and the key tells them apart). `Tensors(arrays).array` is the
    `const DLTensor *const *` to pass; it keeps the structs alive."""

    def __init__(self, arrays):
        self.keep, ptrs = [], []
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        for a in arrays:
            if a.dtype != ml_dtypes.bfloat16:
                capsule = a.__dlpack__()
                self.keep.append(capsule)
                ptrs.append(get(capsule, b"dltensor"))   # DLManagedTensor starts with its DLTensor
                continue
            shape = (ctypes.c_int64 * a.ndim)(*a.shape)
            elements = tuple(s // a.itemsize for s in a.strides)
            strides = (ctypes.c_int64 * a.ndim)(*elements)
            t = DLTensor(None, DLDevice(1, 0), a.ndim, DLDataType(*DL_DTYPES["bfloat16"], 1), shape,
                         None if elements == contiguous_strides(a.shape) else strides, 0)
            self.keep += [shape, strides, t]
            ptrs.append(ctypes.addressof(t))
        self.array = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        self.array._keep = self.keep


def c_group(name, names, chunks, cats, rows, reduces) -> GroupInfo:
    """The fb_group_info of a group (it keeps its arrays alive)."""
    def splits(xs):
        return (Split * max(1, len(xs)))(*[Split(*(x or (0, 0))) for x in xs])
    arrays = [(ctypes.c_char_p * max(1, len(names)))(*[n.encode() for n in names]),
              splits(chunks), splits(cats), (ctypes.c_uint8 * max(1, len(rows)))(*rows)]
    g = GroupInfo(ctypes.sizeof(GroupInfo), name.encode(), len(names), arrays[0], arrays[1],
                  len(cats), arrays[2], arrays[3], int(reduces))
    g._keep = arrays
    return g


def c_key(lib, g, tensors, n) -> tuple[int, str]:
    """(status, the key or the error message)."""
    key, length = ctypes.create_string_buffer(512), ctypes.c_size_t(0)
    status = lib.fb_argspec_key(ctypes.byref(g), tensors.array, n, key, len(key),
                                ctypes.byref(length))
    text = (key.value if status == FB_OK else lib.fb_last_error()).decode()
    if status == FB_OK:
        assert length.value == len(text)
    return status, text


def python_key(name, names, chunks, cats, rows, reduces, arrays) -> str:
    """The Python runtime's key of the same call (its GroupInfo built as from a manifest)."""
    info = dispatch.GroupInfo(name, tuple((n, "tensor", None) for n in names), tuple(chunks),
                              tuple((f"y{k}", cat) for k, cat in enumerate(cats)), False, "",
                              reduces, tuple(rows))
    return dispatch.prepare(info, tuple(arrays), lambda a: (a.shape, a.strides, a.dtype)).key


DTYPES = [np.dtype(n) for n in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16",
                                "float32", "float64")] + [np.dtype(ml_dtypes.bfloat16)]
SIZES = [1, 1, 1, 2, 2, 3, 4, 5, 0]


def strided(r: random.Random, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A numpy array of `shape` with strides a real program makes (contiguous, padded,
    transposed, reversed, broadcast) or arbitrary ones, size-1 dims' strides included."""
    rank = len(shape)
    padded = [n + r.choice([0, 0, 0, 1, 2]) for n in shape]
    order = list(range(rank))
    if r.random() < 0.5:
        r.shuffle(order)
    strides, acc = [0] * rank, 1
    for i in reversed(order):
        strides[i], acc = acc, acc * max(padded[i], 1)
    for i in range(rank):
        pick = r.choice(["keep"] * 6 + ["flip", "zero", "any"])
        strides[i] = {"keep": strides[i], "flip": -strides[i], "zero": 0,
                      "any": r.randint(-4, 4)}[pick]
    lo = sum(s * (n - 1) for s, n in zip(strides, shape) if s < 0 and n)
    hi = sum(s * (n - 1) for s, n in zip(strides, shape) if s > 0 and n)
    base = np.zeros(hi - lo + 1, dtype)
    return as_strided(base[-lo:], shape, [s * dtype.itemsize for s in strides])


def dim_of(r: random.Random, rank: int) -> int:
    """A dim of `rank` dims (negative or not), now and then one out of range."""
    return r.randint(-rank, rank - 1) if rank and r.random() < 0.95 else r.choice([-rank - 1, rank])


def random_call(r: random.Random) -> tuple:
    """A group (inputs chunked or not, cat and row outputs, reducing or not) and arrays to call
    it on: mostly calls that broadcast, sometimes ones that do not or cannot be chunked."""
    reduces = r.random() < 0.25
    rank = r.randint(1 if reduces and r.random() < 0.95 else 0, 4)
    shape = [r.choice(SIZES) for _ in range(rank)]
    n_in, n_out = r.randint(1, 4), r.randint(1, 3)
    names = [f"x{j}" for j in range(n_in)]
    rows = [reduces and r.random() < 0.5 for _ in range(n_out)]
    cats = [(r.randint(2, 3), dim_of(r, rank)) if not row and r.random() < 0.25 else None
            for row in rows]
    chunks, arrays = [], []
    for _ in range(n_in):
        in_rank = r.randint(0, rank)
        in_shape = [r.choice(SIZES) if r.random() < 0.05 else 1 if r.random() < 0.2 else n
                    for n in shape[rank - in_rank:]]
        chunk = None
        if in_rank and r.random() < 0.25:
            chunk = (r.randint(2, 3), dim_of(r, in_rank))
            if -in_rank <= chunk[1] < in_rank and r.random() < 0.85:
                in_shape[chunk[1]] *= chunk[0]
        dtype = np.dtype("complex64") if r.random() < 0.02 else r.choice(DTYPES)
        chunks.append(chunk)
        arrays.append(strided(r, tuple(in_shape), dtype))
    return "g", names, chunks, cats, rows, reduces, arrays


@settings(max_examples=2000, deadline=None)
@given(st.randoms(use_true_random=True))
def test_c_key_equals_python_key(lib, r):
    """Thousands of random calls (shapes, broadcasting, size-1 dims, strides, chunked inputs,
    cat and row outputs, reductions, dtypes): the same key, or both refuse the call (the C
    message of a shape error is Python's)."""
    name, names, chunks, cats, rows, reduces, arrays = random_call(r)
    g = c_group(name, names, chunks, cats, rows, reduces)
    status, text = c_key(lib, g, Tensors(arrays), len(arrays))
    try:
        want = python_key(name, names, chunks, cats, rows, reduces, arrays)
    except ArgumentError as e:
        assert status in (FB_E_DTYPE, FB_E_SHAPE), (status, text, str(e))
        if status == FB_E_SHAPE:
            assert text == str(e)
        else:
            assert "unsupported dtype" in str(e) and "unsupported dtype" in text
        return
    assert (status, text) == (FB_OK, want)


def test_key_examples(lib):
    """DESIGN §2 and §8's own examples, and a key too long for the buffer."""
    x, b = np.zeros((4, 8), np.float32), np.zeros(8, np.float32)
    g = c_group("bias_gelu", ["x", "bias"], [None, None], [None], [False], False)
    assert c_key(lib, g, Tensors([x, b]), 2) == (FB_OK, "bias_gelu(f32:cc,f32:bc)")
    gates = np.zeros((3, 64), np.float32)
    g2 = c_group("lstm_cell", ["gates", "cx"], [(4, 1), None], [None, None], [False] * 2,
                        False)
    assert c_key(lib, g2, Tensors([gates, np.zeros((3, 16), np.float32)]), 2) \
        == (FB_OK, "lstm_cell(f32:sc,f32:cc)")
    g3 = c_group("rms_norm", ["x", "w"], [None, None], [None], [False], True)
    assert c_key(lib, g3, Tensors([np.zeros((2, 3, 5), np.float32), np.zeros(5, np.float32)]),
                 2) == (FB_OK, "rms_norm(f32:cc,f32:bc)")
    length, tensors = ctypes.c_size_t(0), Tensors([x, b])
    for size in (0, 10, 24):                    # the key has 24 characters: no room for the NUL
        buf = ctypes.create_string_buffer(size) if size else None
        assert lib.fb_argspec_key(ctypes.byref(g), tensors.array, 2, buf, size,
                                  ctypes.byref(length)) == FB_E_ARGUMENT
        assert length.value == 24 and b"24 characters" in lib.fb_last_error()


def test_bad_input_is_a_status_with_a_message(lib):
    """NULL pointers, wrong counts, dtypes fusebuild has no kernels for, DLPack vectors, a
    struct from an older header, a malformed group: each a status and a message."""
    x = np.zeros((4, 8), np.float32)
    g = c_group("bias_gelu", ["x", "bias"], [None, None], [None], [False], False)
    key = ctypes.create_string_buffer(64)

    def status(group, tensors, n):
        return lib.fb_argspec_key(group, tensors, n, key, len(key), None), lib.fb_last_error()

    assert status(None, Tensors([x, x]).array, 2) == (FB_E_ARGUMENT,
                                                      b"fb_argspec_key: group is NULL")
    assert status(ctypes.byref(g), None, 2) == (
        FB_E_ARGUMENT, b"bias_gelu takes 2 tensor inputs, got 2 (inputs is NULL)")
    assert status(ctypes.byref(g), Tensors([x]).array, 1)[0] == FB_E_ARGUMENT
    assert status(ctypes.byref(g), (ctypes.c_void_p * 2)(None, None), 2) == (
        FB_E_ARGUMENT, b"input 'x' of bias_gelu is NULL")
    c64 = Tensors([x.astype(np.complex64), x])
    s, message = status(ctypes.byref(g), c64.array, 2)
    assert s == FB_E_DTYPE and b"input 'x' of bias_gelu has unsupported dtype (DLPack code 5, " \
        b"bits 64, lanes 1); supported: bool, int8" in message
    lanes = Tensors([x, x])
    ctypes.cast(lanes.array[1], ctypes.POINTER(DLTensor)).contents.dtype.lanes = 4
    assert status(ctypes.byref(g), lanes.array, 2)[0] == FB_E_DTYPE
    small = GroupInfo.from_buffer_copy(g)
    small._keep = g._keep
    small.struct_size = 8
    assert status(ctypes.byref(small), Tensors([x, x]).array, 2)[0] == FB_E_ARGUMENT
    small.struct_size, small.name = ctypes.sizeof(GroupInfo), b"bias-gelu"
    assert status(ctypes.byref(small), Tensors([x, x]).array, 2) == (
        FB_E_ARGUMENT, b"fb_group_info.name is a string, not an identifier")


def test_last_error_is_per_thread(lib):
    """Another thread does not see this thread's error."""
    assert lib.fb_argspec_key(None, None, 0, None, 0, None) == FB_E_ARGUMENT
    seen = []
    t = threading.Thread(target=lambda: seen.append(lib.fb_last_error()))
    t.start()
    t.join()
    assert seen == [b""] and lib.fb_last_error() == b"fb_argspec_key: group is NULL"


def test_library_links_only_libc(lib):
    """No Python, numpy or C++ runtime in the library; only the header's functions exported."""
    assert lib.fb_abi_version() >> 16 == 0
    out = subprocess.run(["readelf", "-d", c_runtime.library_path()], capture_output=True,
                         text=True, check=True).stdout
    needed = {line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}
    assert needed <= {"libc.so.6", "libdl.so.2", "libpthread.so.0", "ld-linux-x86-64.so.2",
                      "ld-linux-aarch64.so.1"}, needed
    symbols = subprocess.run(["nm", "-D", "--defined-only", c_runtime.library_path()],
                             capture_output=True, text=True, check=True).stdout
    assert {line.split()[-1] for line in symbols.splitlines()} == {
        "fb_abi_version", "fb_last_error", "fb_argspec_key"}


def test_where_it_is():
    """python -m fusebuild.c_runtime prints the header's folder and the library; no flag is a
    usage error (exit 2), not a traceback."""
    run = subprocess.run([sys.executable, "-m", "fusebuild.c_runtime", "--include", "--lib"],
                         capture_output=True, text=True, check=True)
    include, library = run.stdout.split()
    assert os.path.isfile(os.path.join(include, "fusebuild.h")) and os.path.isfile(library)
    run = subprocess.run([sys.executable, "-m", "fusebuild.c_runtime"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--cflags" in run.stderr and "Traceback" not in run.stderr


PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "fusebuild.h"

static DLTensor tensor(int32_t ndim, int64_t *shape, int64_t *strides)
{
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.device.device_type = kDLCPU;
    t.ndim = ndim;
    t.shape = shape;
    t.strides = strides;
    t.dtype.code = kDLFloat;
    t.dtype.bits = 32;
    t.dtype.lanes = 1;
    return t;
}

static void show(fb_status s, const char *key)
{
    printf("%d %s\n", (int)s, s == FB_OK ? key : fb_last_error());
}

int main(void)
{
    int64_t xs[2] = {4, 8}, bs[1] = {8}, ts[2] = {16, 1}, big[FB_MAX_RANK + 1];
    int64_t huge[3] = {(int64_t)1 << 40, (int64_t)1 << 40, 0}, neg[1] = {-3};
    DLTensor x = tensor(2, xs, NULL), b = tensor(1, bs, NULL), xt = tensor(2, xs, ts);
    const DLTensor *in[2];
    fb_group_info g;
    char key[64], tiny[4];
    size_t len = 0;
    int i;
    memset(&g, 0, sizeof g);
    g.struct_size = sizeof g;
    g.name = "bias_gelu";
    g.n_inputs = 2;
    g.n_outputs = 1;
    in[0] = &x;
    in[1] = &b;
    if (fb_abi_version() >> 16 != FB_ABI_VERSION_MAJOR)
        return 1;
    show(fb_argspec_key(&g, in, 2, key, sizeof key, &len), key);
    printf("%d\n", (int)len);
    in[0] = &xt;
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    for (i = 0; i <= 5; i++)                  /* keys cut at every length: never past the end */
        printf("%d", (int)fb_argspec_key(&g, in, 2, i ? tiny : NULL, (size_t)i % 5, &len));
    printf(" %d\n", (int)len);
    show(fb_argspec_key(NULL, in, 2, key, sizeof key, NULL), key);
    in[1] = NULL;
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    b.dtype.code = kDLComplex;
    b.dtype.bits = 64;
    in[1] = &b;
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    for (i = 0; i <= FB_MAX_RANK; i++)
        big[i] = 1;
    x = tensor(FB_MAX_RANK + 1, big, NULL);
    in[0] = &x;
    show(fb_argspec_key(&g, in, 1 + 1, key, sizeof key, NULL), key);
    x = tensor(3, huge, NULL);
    b = tensor(1, neg, NULL);
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    in[1] = &x;
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    x = tensor(FB_MAX_RANK, big, NULL);
    show(fb_argspec_key(&g, in, 2, key, sizeof key, NULL), key);
    return 0;
}
"""

EXPECTED = """0 bias_gelu(f32:cc,f32:bc)
24
0 bias_gelu(f32:sc,f32:bc)
999999 24
9 fb_argspec_key: group is NULL
9 input 'input1' of bias_gelu is NULL
2 input 'input1' of bias_gelu has unsupported dtype (DLPack code 5, bits 64, lanes 1); \
supported: bool, int8, int16, int32, int64, uint8, float16, bfloat16, float32, float64
3 input 'input0' of bias_gelu has 65 dims, more than 64
3 input 'input1' of bias_gelu has size -3 in dim 0
3 inputs of bias_gelu broadcast to more elements than int64 counts
0 bias_gelu(f32:,f32:)
"""


def _compile_and_run(tmp_path, compiler: list[str], name: str, sources: list[str]) -> str:
    """Build `name` from `sources` with `compiler` and the header, run it, give its stdout."""
    exe = str(tmp_path / name)
    subprocess.run(compiler + [f"-I{c_runtime.include_dir()}"] + sources + ["-o", exe],
                   check=True, capture_output=True, text=True)
    return subprocess.run([exe], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(not (shutil.which("cc") and shutil.which("c++")), reason="needs cc and c++")
def test_c_and_cpp_programs(tmp_path):
    """A C99 and a C++ program built against the header and the library (strict warnings);
    the same C99 program with the library's sources under ASan + UBSan: bad input is a status
    and a message, never a crash, and cut keys never write past the buffer."""
    source = tmp_path / "demo.c"
    source.write_text(PROGRAM)
    libs = c_runtime.libs().split()
    strict = ["-Wall", "-Wextra", "-Werror", "-pedantic"]
    assert _compile_and_run(tmp_path, ["cc", "-std=c99"] + strict, "demo_c",
                            [str(source)] + libs) == EXPECTED
    assert _compile_and_run(tmp_path, ["c++", "-std=c++11", "-x", "c++"] + strict, "demo_cpp",
                            [str(source), "-x", "none"] + libs) == EXPECTED
    sanitized = _compile_and_run(
        tmp_path, ["cc", "-std=c11", "-g", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=all", f"-I{SOURCES}"], "demo_asan",
        [str(source)] + sorted(glob(os.path.join(SOURCES, "*.c"))))
    assert sanitized == EXPECTED
