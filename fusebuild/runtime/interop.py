"""Host arrays from other libraries: torch CPU tensors, DLPack and `__array_interface__`
objects become numpy views (no copy), and outputs go back in the inputs' framework."""
from __future__ import annotations

import sys

import numpy as np

from ..errors import ArgumentError


_DL_CUDA = (2, 13)     # DLPack device types kDLCUDA, kDLCUDAManaged


def is_cuda_array(a) -> bool:
    """Whether `a` lives in CUDA memory (cupy, DLPack CUDA tensor, CUDA array interface)."""
    if isinstance(a, np.ndarray):
        return False
    if type(a).__module__.startswith("cupy"):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.is_cuda            # (a quarter of a microsecond; __dlpack_device__ takes ~1.3)
    device = getattr(a, "__dlpack_device__", None)
    if device is not None:
        try:
            return device()[0] in _DL_CUDA
        except Exception:  # noqa: BLE001 - a producer that cannot tell is not a CUDA array
            return False
    try:
        return a.__cuda_array_interface__ is not None
    except Exception:  # noqa: BLE001 - e.g. torch raises for CPU tensors
        return False


def _torch_module(a):
    mod = type(a).__module__
    return sys.modules.get("torch") if mod.startswith("torch") else None


def as_numpy(a, name: str) -> np.ndarray:
    """A numpy view of host array `a` (bfloat16 torch tensors via ml_dtypes; an ndarray
    subclass as a plain ndarray)."""
    if isinstance(a, np.ndarray):
        return a.view(np.ndarray)
    torch = _torch_module(a)
    if torch is not None and isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ArgumentError(f"input '{name}' is a torch tensor on {a.device}; CUDA tensors go "
                                "to the CUDA kernels with every other input on the same device")
        if a.is_neg():
            raise ArgumentError(f"input '{name}' is a torch negative-bit view (such as "
                                "z.conj().imag); pass it through .resolve_neg() first")
        if a.dtype == torch.bfloat16:
            import ml_dtypes
            return a.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return a.detach().numpy() if a.requires_grad else a.numpy()
    if hasattr(a, "__dlpack__") and not hasattr(a, "__array_interface__"):
        try:
            return np.from_dlpack(a)
        except (TypeError, BufferError, RuntimeError) as e:
            raise ArgumentError(f"input '{name}' could not be read through DLPack: {e}") from None
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"input '{name}' is not an array: {e}") from None


def framework_of(args) -> object | None:
    """torch when any input is a torch tensor (outputs follow it), else None (numpy)."""
    for a in args:
        torch = _torch_module(a)
        if torch is not None and isinstance(a, torch.Tensor):
            return torch
    return None


def refuse_untracked_grad(torch, group: str, names: list[str], tensors: list) -> None:
    """ArgumentError for a direct call on torch tensors that require grad while grad mode is
    on: autograd would not see it, so its result would silently get no gradient. (Below
    autograd, in the torch ops' own kernels, grad mode is off.)"""
    if not torch.is_grad_enabled():
        return
    wanting = [n for n, t in zip(names, tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
    if wanting:
        which = ", ".join(f"'{n}'" for n in wanting)
        raise ArgumentError(
            f"input{'s' if len(wanting) > 1 else ''} {which} of {group} require"
            f"{'' if len(wanting) > 1 else 's'} grad, but a direct bundle call is invisible to "
            "autograd (its result would get no gradient): call the torch op instead, "
            f"`ops = bundle.torch_library(\"<namespace>\")` then `ops.{group}(...)`, which "
            "records it for backward; or pass detached tensors, or call under torch.no_grad()")


def to_framework(framework, a: np.ndarray):
    """A numpy output as a tensor of `framework`, sharing memory."""
    try:
        return framework.from_numpy(a)
    except TypeError:           # numpy's bfloat16 (ml_dtypes) is foreign to it: pass the bits
        if a.dtype.name != "bfloat16":
            raise
        return framework.from_numpy(a.view(np.int16)).view(framework.bfloat16)
