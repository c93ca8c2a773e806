"""The one compiled part of fusebuild: the runtime's C fast path (fusebuild/runtime/_dispatch.c).
Everything else is declared in pyproject.toml."""
import numpy
from setuptools import Extension, setup

setup(ext_modules=[Extension("fusebuild.runtime._dispatch", ["fusebuild/runtime/_dispatch.c"],
                             include_dirs=[numpy.get_include()],
                             extra_compile_args=["-std=c11"])])
