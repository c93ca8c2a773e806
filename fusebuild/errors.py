"""Exception types shared by the build side and the runtime.

Every expected failure is one of these; the CLI prints their message and maps them to exit codes
without a traceback.
"""
from __future__ import annotations


class FusebuildError(Exception):
    """Base class of every error fusebuild raises on purpose."""

    exit_code = 1


class SpecError(FusebuildError):
    """A problem in a spec file, located at file:line:column, with a hint on what to do."""

    exit_code = 2

    def __init__(self, message: str, file: str = "<spec>", line: int = 0, col: int = 0,
                 hint: str = ""):
        self.message, self.file, self.line, self.col, self.hint = message, file, line, col, hint
        text = f"{file}:{line}:{col}: error: {message}"
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


class UsageError(FusebuildError):
    """Bad command-line usage (unknown target, bad shard syntax, ...)."""

    exit_code = 2


class MissingExtra(UsageError):
    """A module of the build extras is not installed (a runtime-only install, or one with the
    extra of the other backend only)."""

    BUILD_MODULES = ("click", "yaml", "tqdm", "numba", "llvmlite")
    CPU_MODULES = ("numba", "llvmlite")

    def __init__(self, module: str):
        extra = ("pip install 'fusebuild[cpu]' (CPU kernels; 'fusebuild[build]' for CPU and CUDA)"
                 if module.split(".")[0] in self.CPU_MODULES else
                 "pip install 'fusebuild[cpu]' (CPU kernels), 'fusebuild[cuda]' (CUDA kernels) or "
                 "'fusebuild[build]' (both)")
        super().__init__(f"fusebuild's command line needs the build extras ({module} is not "
                         f"installed): {extra}")


class ToolchainError(FusebuildError):
    """A compiler or linker is missing or failed."""


class BuildError(FusebuildError):
    """One or more compile jobs failed; the previous bundle was left in place."""


class BundleError(FusebuildError):
    """A bundle is missing, corrupt, tampered with, or of an incompatible format."""


class ArgumentError(FusebuildError, TypeError):
    """A kernel was called with arguments that do not fit its group (count, shape, dtype, out=)."""


class GradientError(FusebuildError, RuntimeError):
    """torch autograd asked for the gradient of an input that the bundle has no backward for
    (the group has no `grad:`, or its `grad:` does not list the input)."""


class KernelNotFound(FusebuildError, LookupError):
    """The bundle holds no kernel for this ArgSpec key on any loadable target."""

    def __init__(self, message: str, key: str = "", nearest: tuple[str, ...] = ()):
        self.key, self.nearest = key, nearest
        super().__init__(message)


class CacheWarning(UserWarning):
    """The shared cache could not serve or store an entry; the build goes on without it."""
