"""The x86-64 side of the qemu tests: the arm64 root (made by setup-root.sh), the aarch64 build of
the runtime's C fast path, a site folder with fusebuild for the emulated python, case files, and
one runner process (runner.py) per emulated CPU.

Cases are written as JSON plus one file of bytes: each tensor argument is its dtype, shape, byte
strides and the bytes it spans, so the runner rebuilds the very layout (broadcast operands,
strided views) with any numpy version; outputs come back the same way.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from fusebuild import dtypes as dt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, "build", "aarch64-root")
SETUP = "bash tests/aarch64/setup-root.sh"
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
QEMU = "qemu-aarch64-static"
CROSS_CC = "aarch64-linux-gnu-gcc"
DISPATCH = os.path.join(REPO, "fusebuild", "runtime", "_dispatch.c")
EXT_SUFFIX = ".cpython-311-aarch64-linux-gnu.so"


def missing() -> str | None:
    """Why the emulated tests cannot run here (None: they can)."""
    for tool in (QEMU, CROSS_CC):
        if not shutil.which(tool):
            return f"{tool} is not installed: run `{SETUP}`"
    if not os.path.isfile(os.path.join(ROOT, ".recipe")):
        return f"no arm64 root at {ROOT}: run `{SETUP}`"
    return None


def _sysconfig() -> dict:
    """The build variables of the root's python3.11 (what setuptools would compile with)."""
    path = os.path.join(ROOT, "usr", "lib", "python3.11", "_sysconfigdata__aarch64-linux-gnu.py")
    namespace: dict = {}
    with open(path, encoding="utf-8") as f:
        exec(f.read(), namespace)       # a dict literal written by the root's Python build
    return namespace["build_time_vars"]


def build_dispatch(out_dir: str) -> str:
    """Cross-compile the runtime's C fast path for the root's python3.11 with the flags setup.py
    gets from it (its CFLAGS, CCSHARED, LDSHARED, and -std=c11) against the root's Python and numpy
    headers; reused while the source and command are unchanged. Returns the .so path."""
    v = _sysconfig()
    numpy_include = os.path.join(ROOT, "usr", "lib", "python3", "dist-packages", "numpy", "core",
                                 "include")
    cmd = [v["CC"], *v["CFLAGS"].split(), *v["CCSHARED"].split(), "-std=c11",
           "-I" + os.path.join(ROOT, "usr", "include", "python3.11"),
           "-idirafter", os.path.join(ROOT, "usr", "include"),      # the multiarch pyconfig.h
           "-I" + numpy_include, DISPATCH, *v["LDSHARED"].split()[1:]]
    with open(DISPATCH, "rb") as f:
        digest = hashlib.sha256(f.read() + "\0".join(cmd).encode()).hexdigest()[:16]
    so = os.path.join(out_dir, f"_dispatch-{digest}{EXT_SUFFIX}")
    if not os.path.isfile(so):
        os.makedirs(out_dir, exist_ok=True)
        proc = subprocess.run([*cmd, "-o", so + ".tmp"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cross-compiling _dispatch.c failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr}")
        os.replace(so + ".tmp", so)
    return so


def make_site(dest: str, dispatch_so: str) -> str:
    """A folder to put on the emulated python's path: fusebuild's sources, the aarch64 C fast
    path, and ml_dtypes (unpacked into the root by setup-root.sh). Returns its PYTHONPATH."""
    pkg = os.path.join(dest, "fusebuild")
    shutil.copytree(os.path.join(REPO, "fusebuild"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(dispatch_so, os.path.join(pkg, "runtime", "_dispatch" + EXT_SUFFIX))
    return f"{dest}:{os.path.join(ROOT, 'opt', 'site')}"


@dataclass
class Case:
    group: str
    args: list                      # arrays and Python scalars, in the group's parameter order
    seed: int | None = None
    offset: int = 0


def _span(a: np.ndarray) -> bytes:
    """The bytes array `a` spans from its data pointer (non-negative strides)."""
    if a.size == 0:
        return b""
    return ctypes.string_at(a.ctypes.data,
                            sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize)


def write_cases(cases_dir: str, cases: list[Case]) -> None:
    os.makedirs(cases_dir, exist_ok=True)
    blob = bytearray()
    records = []
    for case in cases:
        args = []
        for a in case.args:
            if isinstance(a, np.ndarray):
                data = _span(a)
                args.append({"tensor": {"dtype": dt.from_numpy(a.dtype).name,
                                        "shape": list(a.shape), "strides": list(a.strides),
                                        "at": len(blob), "nbytes": len(data)}})
                blob += data
            else:
                args.append({"scalar": a})
        records.append({"group": case.group, "args": args, "seed": case.seed,
                        "offset": case.offset})
    with open(os.path.join(cases_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(records, f)
    with open(os.path.join(cases_dir, "cases.bin"), "wb") as f:
        f.write(blob)


@dataclass
class Run:
    """One runner process on one emulated CPU."""
    name: str
    cpu: str                        # qemu -cpu value
    env: dict
    out_dir: str
    proc: subprocess.Popen | None = None
    _blob: bytes | None = None

    def start(self, bundle: str, cases_dir: str, pythonpath: str) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": pythonpath,
               "PYTHONDONTWRITEBYTECODE": "1", **self.env}
        cmd = [QEMU, "-L", ROOT, "-cpu", self.cpu, os.path.join(ROOT, "usr", "bin", "python3.11"),
               RUNNER, bundle, cases_dir, self.out_dir]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def report(self, timeout: float) -> dict:
        """The runner's report; RuntimeError with its output when it failed."""
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
            raise RuntimeError(f"{self.name} (-cpu {self.cpu}) ran over {timeout:.0f} s:\n"
                               f"{output[-3000:]}") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.name} (-cpu {self.cpu}) exited {self.proc.returncode}:\n"
                               f"{output[-3000:]}")
        with open(os.path.join(self.out_dir, "report.json"), encoding="utf-8") as f:
            return json.load(f)

    def outputs(self, result: dict) -> tuple[np.ndarray, ...]:
        """The output arrays of one case's result (read-only views of the runner's bytes)."""
        if self._blob is None:
            with open(os.path.join(self.out_dir, "outputs.bin"), "rb") as f:
                self._blob = f.read()
        return tuple(np.frombuffer(self._blob[o["at"]:o["at"] + o["nbytes"]],
                                   dt.lookup(o["dtype"]).numpy).reshape(o["shape"])
                     for o in result["outputs"])
