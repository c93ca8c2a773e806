"""Host arrays from other libraries: torch CPU tensors, DLPack and `__array_interface__`
objects become numpy views (no copy), and outputs go back in the inputs' framework."""
from __future__ import annotations

import sys

import numpy as np

from ..errors import ArgumentError


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


def to_framework(framework, a: np.ndarray):
    """A numpy output as a tensor of `framework`, sharing memory."""
    try:
        return framework.from_numpy(a)
    except TypeError:           # numpy's bfloat16 (ml_dtypes) is foreign to it: pass the bits
        if a.dtype.name != "bfloat16":
            raise
        return framework.from_numpy(a.view(np.int16)).view(framework.bfloat16)
