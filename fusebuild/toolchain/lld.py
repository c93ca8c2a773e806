"""ld.lld: links objects of another architecture (aarch64) into shared objects on any build
machine, with no C library of that architecture installed.

The object is linked against two stub shared objects that lld makes from an empty object of the
same machine, with the sonames libm.so.6 and libc.so.6: the result records DT_NEEDED libm.so.6
and libc.so.6 and leaves every libc/libm function it calls undefined and unversioned, which the
target's dynamic loader binds to glibc's default version of the symbol.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import tempfile

from ..errors import ToolchainError

ENV = "FUSEBUILD_LLD"
LINK_FLAGS = ("-shared", "--build-id=none", "-s", "-z", "noexecstack")
STUBS = ("libm.so.6", "libc.so.6")


def find() -> str:
    """The linker: $FUSEBUILD_LLD, else `ld.lld` on PATH, else the newest `ld.lld-NN` there."""
    name = os.environ.get(ENV)
    if name:
        path = shutil.which(name)
        if not path:
            raise ToolchainError(f"{ENV}={name!r} is not an executable on PATH")
        return path
    path = shutil.which("ld.lld")
    if path:
        return path
    numbered = [p for d in os.environ.get("PATH", "").split(os.pathsep) if d
                for p in glob.glob(os.path.join(d, "ld.lld-*"))
                if re.fullmatch(r"ld\.lld-\d+", os.path.basename(p)) and os.access(p, os.X_OK)]
    if numbered:
        return max(numbered, key=lambda p: int(p.rsplit("-", 1)[1]))
    raise ToolchainError("no ld.lld found: aarch64 CPU targets are linked with LLVM's linker. "
                         f"Install it (`apt-get install lld`) or set {ENV} to its path.")


def version() -> str:
    """The linker's version line (e.g. 'Debian LLD 14.0.6 (compatible with GNU linkers)')."""
    lld = find()
    proc = subprocess.run([lld, "--version"], capture_output=True, text=True, timeout=30)
    line = proc.stdout.strip().splitlines()[:1]
    if proc.returncode != 0 or not line:
        raise ToolchainError(f"{lld} --version failed:\n{proc.stderr}")
    return line[0]


def _empty_object(machine: int) -> bytes:
    """An ELF64 relocatable object with no sections for e_machine `machine`."""
    return (b"\x7fELF\x02\x01\x01" + bytes(9) +
            struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, 0, 0, 64, 0, 0, 64, 0, 0))


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"linking {what} failed ({' '.join(cmd)}):\n{proc.stderr}")


def link_shared(obj: bytes, soname: str) -> bytes:
    """Link one ELF64 object into a stripped shared object that needs only libm and libc."""
    lld = find()
    (machine,) = struct.unpack_from("<H", obj, 18)
    with tempfile.TemporaryDirectory(prefix="fusebuild-lld-") as tmp:
        empty, o_path, so_path = (os.path.join(tmp, n) for n in ("empty.o", "k.o", "k.so"))
        with open(empty, "wb") as f:
            f.write(_empty_object(machine))
        stubs = [os.path.join(tmp, name) for name in STUBS]
        for stub in stubs:
            _run([lld, *LINK_FLAGS, "-soname", os.path.basename(stub), "-o", stub, empty],
                 f"the stub {os.path.basename(stub)}")
        with open(o_path, "wb") as f:
            f.write(obj)
        _run([lld, *LINK_FLAGS, "-soname", soname, "-o", so_path, o_path, *stubs], soname)
        with open(so_path, "rb") as f:
            return f.read()
