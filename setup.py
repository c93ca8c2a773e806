"""The compiled parts of fusebuild: the runtime's C fast path (fusebuild/runtime/_dispatch.c) and
the C runtime's plain shared library, libfusebuild_rt.so (fusebuild/c_runtime/src: no Python or
numpy in it; `python -m fusebuild.c_runtime --libs` says where it is).
Everything else is declared in pyproject.toml."""
import os
from glob import glob

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_RUNTIME = "fusebuild/c_runtime"
LIBRARY = "fusebuild.c_runtime.libfusebuild_rt"


class BuildExt(build_ext):
    """build_ext that names the C runtime libfusebuild_rt.so (no Python ABI tag) and exports
    only its FB_API functions (no PyInit_ symbol: it is not a Python module)."""

    def get_ext_filename(self, fullname: str) -> str:
        # called with the full dotted name and with its last part alone
        if LIBRARY.endswith(fullname):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext) -> list:
        return [] if ext.name == LIBRARY else super().get_export_symbols(ext)


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[
    Extension("fusebuild.runtime._dispatch", ["fusebuild/runtime/_dispatch.c"],
              include_dirs=[numpy.get_include()], extra_compile_args=["-std=c11"]),
    Extension(LIBRARY, sorted(glob(f"{C_RUNTIME}/src/*.c")), include_dirs=[f"{C_RUNTIME}/include"],
              depends=sorted(glob(f"{C_RUNTIME}/src/*.h") + [f"{C_RUNTIME}/include/fusebuild.h"]),
              extra_compile_args=["-std=c11", "-fvisibility=hidden", "-Wall", "-Wextra"]),
])
