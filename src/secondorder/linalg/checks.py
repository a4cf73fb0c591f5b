"""The argument checks of the linear-algebra layer, in one place.

Each raises ``ValueError`` (or ``TypeError`` where the type is wrong) naming what it expected
and what came.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import NonFiniteError
from .operator import LinearOperator, aslinearoperator


# ---------------------------------------------------------------- operands and vectors
def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor of shape {tuple(v.shape)}, dtype {v.dtype}, device {v.device}"
    return type(v).__name__


def _as_apply(
    op: Any, name: str, n: int, dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """Return a checked function ``v -> op @ v`` for an operator, a 2-D tensor or a callable."""
    if isinstance(op, Tensor):
        if op.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D tensor of shape ({n}, {n}), got {_describe(op)}"
            )
        op = aslinearoperator(op.detach())
    if isinstance(op, LinearOperator):
        if op.shape != (n, n):
            raise ValueError(
                f"{name}: expected shape ({n}, {n}) to match b of length {n}, got shape {op.shape}"
            )
        if op.dtype != dtype or op.device != device:
            raise ValueError(
                f"{name}: expected dtype {dtype} and device {device} (those of b), "
                f"got dtype {op.dtype} and device {op.device}"
            )
        return op.matvec
    if callable(op):

        def apply(v: Tensor) -> Tensor:
            out = op(v)
            if (
                not isinstance(out, Tensor)
                or out.shape != v.shape
                or out.dtype != dtype
                or out.device != device
            ):
                raise ValueError(
                    f"{name}: the callable must map a ({n},) tensor of dtype {dtype} on {device} "
                    f"to one of the same shape, dtype and device, got {_describe(out)}"
                )
            return out

        return apply
    raise ValueError(
        f"{name}: expected a LinearOperator, a 2-D tensor or a callable v -> {name} v, "
        f"got {type(op).__name__}"
    )


def _check_nonneg(value: Any, name: str) -> float:
    """``float(value)`` for a tolerance ``>= 0`` (``inf`` included: it is met at once)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative float, got {value!r}") from None
    if isinstance(value, bool) or not out >= 0:
        raise ValueError(f"{name} must be a non-negative float (inf allowed), got {value!r}")
    return out


def residual_threshold(rtol: float, rhs_norm: float, atol: float) -> float:
    """``max(rtol * rhs_norm, atol)``, with ``inf * 0 = 0`` (an infinite rtol and ``b = 0``)."""
    relative = rtol * rhs_norm if rhs_norm != 0 else 0.0
    return max(relative, atol)


def _check_vector(v: Any, name: str, like: Tensor | None = None) -> Tensor:
    if not isinstance(v, Tensor):
        raise ValueError(f"{name}: expected a 1-D torch.Tensor, got {type(v).__name__}")
    if like is None:
        if v.ndim != 1:
            raise ValueError(
                f"{name}: expected a 1-D tensor of shape (n,), got shape {tuple(v.shape)}"
            )
        if not v.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a real floating dtype, got {v.dtype}")
        return v
    if v.shape != like.shape or v.dtype != like.dtype or v.device != like.device:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)}, dtype {like.dtype} and device "
            f"{like.device} (those of b), got {_describe(v)}"
        )
    return v


# ----------------------------------------------------------------- Lanczos arguments
def _square_operator(A: Any, what: str) -> LinearOperator:
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{what}: expected a square operator, got shape {op.shape}")
    if not op.dtype.is_floating_point:
        raise TypeError(f"{what}: expected a real floating-point operator, got dtype {op.dtype}")
    return op


def _check_int(value: Any, name: str, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: expected an int for {name}, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{what}: expected {bound}, got {name}={value}")
    return value


def _generator(generator: torch.Generator | None, what: str) -> torch.Generator:
    """Return ``generator``, or a fresh one seeded with 0 (never the global RNG)."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{what}: expected a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def _check_start(v0: Tensor, op: LinearOperator, what: str, cols: tuple[int, ...]) -> None:
    n = op.shape[0]
    if not isinstance(v0, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor for v0, got {type(v0).__name__}")
    shapes = " or ".join(f"({n},)" if c == 0 else f"({n}, {c})" for c in cols)
    ok = (v0.ndim == 1 and 0 in cols) or (v0.ndim == 2 and (-1 in cols or v0.shape[1] in cols))
    if not ok or v0.shape[0] != n:
        raise ValueError(f"{what}: expected v0 of shape {shapes}, got {tuple(v0.shape)}")
    if v0.dtype != op.dtype or v0.device != op.device:
        raise ValueError(
            f"{what}: expected v0 with dtype {op.dtype} on {op.device}, "
            f"got dtype {v0.dtype} on {v0.device}"
        )
    if not bool(torch.isfinite(v0).all()):
        raise NonFiniteError(f"{what}: expected a finite v0, got non-finite entries")


# -------------------------------------------------------- preconditioner arguments
def _check_damping(damping: Any, name: str, *, positive: bool) -> float:
    try:
        mu = float(damping)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: damping must be a float, got {damping!r}") from None
    ok = mu > 0 if positive else mu >= 0
    if not ok or math.isinf(mu):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: damping must be a finite float {bound}, got {damping!r}")
    return mu


def _check_operator(A: Any, name: str) -> LinearOperator:
    if not isinstance(A, (LinearOperator, Tensor)):
        raise ValueError(
            f"{name}: expected a square LinearOperator or a 2-D tensor, got {type(A).__name__}"
        )
    if isinstance(A, Tensor) and A.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(A.shape)}")
    op = aslinearoperator(A.detach() if isinstance(A, Tensor) else A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{name}: expected a square operator, got shape {op.shape}")
    if not op.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a real floating dtype, got {op.dtype}")
    return op


def _check_rank(rank: Any, n: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"{name}: rank must be an int in [1, {n}], got {rank!r}")
    return rank


def _check_tol(tol: Any, default: float, name: str) -> float:
    if tol is None:
        return default
    try:
        tau = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: tol must be a float or None, got {tol!r}") from None
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"{name}: tol must be a finite float >= 0, got {tol!r}")
    return tau
