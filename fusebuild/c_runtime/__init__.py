"""Where the C runtime is: `include/fusebuild.h` and `libfusebuild_rt.so` (DESIGN §12),
installed with the package (setup.py builds the library from src/, which needs no Python).
`python -m fusebuild.c_runtime --cflags --libs` prints the compiler flags."""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "libfusebuild_rt.so"


def include_dir() -> str:
    """The folder holding fusebuild.h."""
    return os.path.join(_HERE, "include")


def library_path() -> str:
    """libfusebuild_rt.so; FileNotFoundError saying how to build it when it is not built."""
    path = os.path.join(_HERE, LIBRARY_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not built: run `pip install -e .` or "
                                "`python setup.py build_ext --inplace` in fusebuild's source tree")
    return path


def cflags() -> str:
    return f"-I{include_dir()}"


def libs() -> str:
    """Linker flags: the library's folder, its name, and an rpath so programs find it."""
    folder = os.path.dirname(library_path())
    return f"-L{folder} -lfusebuild_rt -Wl,-rpath,{folder}"
