"""Computing curvature of low-precision models in a wider dtype: the dtype and a cast copy.

A bfloat16 or float16 model's curvature is computed on a copy of the model in float32 (or a
``dtype=`` the user chooses) at the current low-precision values
(:class:`~secondorder.curvature.model.FunctionalModel` re-reads them at every pass).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LOW_PRECISION", "cast_copy", "cast_tensor", "compute_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes whose curvature is computed in float32 by default."""


def compute_dtype(param_dtype: torch.dtype, dtype: Any = None) -> torch.dtype:
    """The dtype curvature products are computed in, for parameters of ``param_dtype``.

    Args:
        param_dtype: The dtype of the trainable parameters.
        dtype: The user's choice, or None: float32 for bfloat16 and float16 parameters, else
            the parameters' own dtype.

    Returns:
        A real floating-point dtype of at least 16 bits.

    Raises:
        TypeError: If ``dtype`` is not a ``torch.dtype`` or not a real floating-point one.
    """
    if dtype is None:
        return torch.float32 if param_dtype in LOW_PRECISION else param_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype: expected a torch.dtype such as torch.float32, got {type(dtype).__name__} "
            f"{dtype!r}"
        )
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise TypeError(
            "dtype: expected a real floating-point dtype of at least 16 bits (torch.float32, "
            f"torch.float64, torch.bfloat16, torch.float16), got {dtype}"
        )
    return dtype


def cast_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` if it is a real floating-point tensor, else ``t``."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are new tensors, floating ones in ``dtype``.

    Modules are copied shallowly (:func:`copy.copy`: the same class and attributes) with their
    own parameter, buffer, submodule and hook dictionaries; shared submodules and tied
    parameters stay shared, and hooks stay registered (as on the module itself, whose passes
    they would see). Nothing else is copied: not the gradients, not whatever a hook holds.
    """
    modules: dict[int, nn.Module] = {}
    tensors: dict[int, Tensor] = {}

    def tensor(t: Tensor, parameter: bool) -> Tensor:
        if id(t) not in tensors:
            with torch.no_grad():
                data = t.detach().to(dtype, copy=True) if t.is_floating_point() else t.clone()
            tensors[id(t)] = nn.Parameter(data, t.requires_grad) if parameter else data
        return tensors[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = copy.copy(m)
        modules[id(m)] = new
        state = new.__dict__
        for key, value in list(state.items()):
            if "hook" in key and isinstance(value, dict):
                state[key] = type(value)(value)
        state["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        state["_parameters"] = {
            k: None if p is None else tensor(p, True) for k, p in m._parameters.items()
        }
        state["_buffers"] = {
            k: None if b is None else tensor(b, False) for k, b in m._buffers.items()
        }
        state["_modules"] = {k: None if c is None else module(c) for k, c in m._modules.items()}
        return new

    return module(model)
