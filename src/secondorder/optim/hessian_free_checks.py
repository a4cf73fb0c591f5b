r"""Validation of the options and hyperparameters of :class:`~.hessian_free.HessianFree`.

Each check raises a ValueError naming the option, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import check_positive

__all__ = ["check_hyperparameters", "check_options"]

_CURVATURES = ("ggn", "hessian")
_PRECONDITIONERS = ("empirical_fisher", None)
_NEGATIVE_CURVATURE = ("stop", "continue")


def check_options(
    curvature: str,
    negative_curvature: str,
    preconditioner: Any,
    damping_rule: Callable[..., Any] | None,
    linesearch: Callable[..., Any] | None,
    *,
    adapt_damping: bool,
    martens_stop: bool,
    use_cg_backtracking: bool,
    use_linesearch: bool,
) -> None:
    """Check the choices and switches of a Hessian-free optimizer.

    Args:
        curvature: ``"ggn"`` or ``"hessian"``.
        negative_curvature: ``"stop"`` or ``"continue"``.
        preconditioner: ``"empirical_fisher"``, ``None`` or a callable.
        damping_rule: ``None`` or a callable.
        linesearch: ``None`` or a callable.
        adapt_damping: Must be a bool.
        martens_stop: Must be a bool.
        use_cg_backtracking: Must be a bool.
        use_linesearch: Must be a bool.

    Raises:
        ValueError: For an unknown choice, a non-callable piece or a non-bool switch.
    """
    if curvature not in _CURVATURES:
        raise ValueError(f"curvature must be one of {_CURVATURES}, got {curvature!r}")
    if negative_curvature not in _NEGATIVE_CURVATURE:
        raise ValueError(
            f"negative_curvature must be one of {_NEGATIVE_CURVATURE}, got {negative_curvature!r}"
        )
    if not callable(preconditioner) and preconditioner not in _PRECONDITIONERS:
        raise ValueError(
            f"preconditioner must be one of {_PRECONDITIONERS} or a callable "
            f"(grad_batches, damping) -> LinearOperator, got {preconditioner!r}"
        )
    for name, piece in (("damping_rule", damping_rule), ("linesearch", linesearch)):
        if piece is not None and not callable(piece):
            raise ValueError(f"{name} must be None or callable, got {piece!r}")
    for name, flag in (
        ("adapt_damping", adapt_damping),
        ("martens_stop", martens_stop),
        ("use_cg_backtracking", use_cg_backtracking),
        ("use_linesearch", use_linesearch),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")


def check_hyperparameters(group: dict[str, Any]) -> None:
    """Check a param group's numeric hyperparameters.

    Args:
        group: The param group (or the defaults) of a Hessian-free optimizer.

    Raises:
        ValueError: For a hyperparameter out of its range (named with its value).
    """
    check_positive("lr", group["lr"])
    check_positive("damping", group["damping"])
    check_positive("cg_maxiter", group["cg_maxiter"], integer=True)
    check_positive("cg_rtol", group["cg_rtol"], allow_zero=True)
    check_positive("martens_eps", group["martens_eps"])
    check_positive("cg_decay_x0", group["cg_decay_x0"], allow_zero=True)
    if group["cg_decay_x0"] > 1:
        raise ValueError(
            f"Invalid cg_decay_x0 value: {group['cg_decay_x0']!r} (expected a number in [0, 1])"
        )
    for name in ("ls_c", "ls_shrink"):
        check_positive(name, group[name])
        if group[name] >= 1:
            raise ValueError(f"Invalid {name} value: {group[name]!r} (expected a number in (0, 1))")
    check_positive("ls_max_steps", group["ls_max_steps"], integer=True)
    check_positive("min_damping", group["min_damping"])
    check_positive("max_damping", group["max_damping"])
    lo, lam, hi = group["min_damping"], group["damping"], group["max_damping"]
    if not lo <= lam <= hi:
        raise ValueError(
            f"Invalid damping value: {lam!r} (expected min_damping={lo!r} <= damping <= "
            f"max_damping={hi!r})"
        )
