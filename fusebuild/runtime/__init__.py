"""fusebuild runtime: load a bundle and call its kernels. Imports only numpy (cupy lazily).

    from fusebuild import runtime
    k = runtime.load("build/demo-0.1.0")
    y = k.bias_gelu(x, bias)
"""
from ..errors import ArgumentError, BundleError, FusebuildError, KernelNotFound
from .loader import Bundle, GroupCaller, load

__all__ = ["load", "Bundle", "GroupCaller", "ArgumentError", "BundleError", "FusebuildError",
           "KernelNotFound"]
