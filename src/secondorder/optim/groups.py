"""Checks of the optimizers' param groups (hyperparameters valid, options consistent)."""

from __future__ import annotations

from typing import Any

from .._checks import check_positive
from ..curvature.jacobian_factors import check_jacobian_factors_option

__all__ = [
    "COMMON_DEFAULTS",
    "check_cg_group",
    "check_common_group",
    "check_jacobian_factors",
    "check_positive",
]

COMMON_DEFAULTS: dict[str, Any] = {"weight_decay": 0.0, "max_grad_norm": None, "momentum": 0.0}
"""Hyperparameters every curvature optimizer's param groups hold, with their defaults."""


def check_common_group(group: dict[str, Any]) -> None:
    """Check ``weight_decay`` (>= 0), ``max_grad_norm`` (None or > 0), ``momentum`` ([0, 1)).

    Raises:
        ValueError: Naming the invalid value.
    """
    check_positive("weight_decay", group.get("weight_decay", 0.0), allow_zero=True)
    momentum = group.get("momentum", 0.0)
    check_positive("momentum", momentum, allow_zero=True)
    if momentum >= 1:
        raise ValueError(f"Invalid momentum value: {momentum!r} (expected a number in [0, 1))")
    if group.get("max_grad_norm") is not None:
        check_positive("max_grad_norm", group["max_grad_norm"])


def check_jacobian_factors(value: Any, curvature: str) -> None:
    """Check an optimizer's ``jacobian_factors`` option against its curvature.

    Raises:
        ValueError: Unless ``value`` is ``True`` or ``False`` (or the retired ``"auto"``, which
            means ``False``), or for ``True`` with the Hessian.
    """
    check_jacobian_factors_option(value)
    if value is True and curvature == "hessian":
        raise ValueError("jacobian_factors=True serves GGN and Fisher products, not the Hessian")


def check_cg_group(group: dict[str, Any]) -> None:
    """Check the hyperparameters of a damped Newton-CG param group (or of the defaults).

    Args:
        group: Holds ``lr``, ``damping``, ``cg_maxiter``, ``cg_rtol`` and ``cg_atol``.

    Raises:
        ValueError: Naming the first invalid value.
    """
    check_positive("lr", group["lr"])
    check_positive("damping", group["damping"], allow_zero=True)
    check_positive("cg_maxiter", group["cg_maxiter"], integer=True)
    check_positive("cg_rtol", group["cg_rtol"], allow_zero=True)
    check_positive("cg_atol", group["cg_atol"], allow_zero=True)
