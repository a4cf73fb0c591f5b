"""Precision of solver arithmetic: solvers compute in the dtype of their tensors.

Inside a ``torch.autocast`` region PyTorch runs matrix products (``mm``, ``matmul``, ...) in
bfloat16 or float16 whatever the dtype of their operands. A Krylov solver or a curvature product
inside such a region would then lose its float32 accuracy silently (Lanczos' reorthogonalisation
in bfloat16 keeps about two digits). :func:`autocast_disabled` switches every active autocast
off; the solvers and operators of this library compute inside it, in their tensors' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import torch

__all__ = ["autocast_disabled", "full_precision"]

F = TypeVar("F", bound=Callable[..., Any])

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def autocast_disabled() -> ExitStack:
    """A ``with`` block in which every active ``torch.autocast`` is switched off.

    Curvature products and solvers compute in the dtype of their tensors: an enclosing
    ``torch.autocast`` region would otherwise run their matrix products in bfloat16 or float16.
    Costs one query per device type when no autocast is active.

    Returns:
        The entered contexts, closed when the block exits.
    """
    stack = ExitStack()
    for device_type in _DEVICE_TYPES:
        try:
            active = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError):  # pragma: no cover - a device type torch lacks
            continue
        if active:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def full_precision(fn: F) -> F:
    """Decorate ``fn`` to run inside :func:`autocast_disabled`.

    Args:
        fn: A function (a solver).

    Returns:
        The wrapped function, with ``fn``'s name and docstring.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
