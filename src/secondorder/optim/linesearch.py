r"""Backtracking line search on a scalar function of the step length, as a pure function.

Given a direction :math:`\delta` with slope :math:`f'(0) = g^\top \delta < 0`, the Armijo
(sufficient decrease) condition on the step length :math:`\alpha` is

.. math::
    f(\alpha) \le f(0) + c\, \alpha\, f'(0), \qquad 0 < c < 1,

where :math:`f(\alpha)` stands for the objective at :math:`\theta + \alpha \delta`. Martens &
Sutskever (2012, §8.8) use :math:`c = 10^{-2}` and shrink the step by 0.8 until the condition
holds, starting from the step CG backtracking chose.

References:
    J. Nocedal and S. Wright, "Numerical Optimization", 2nd ed., 2006, Algorithm 3.1.
    J. Martens and I. Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", 2012, §8.8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LineSearchInfo", "armijo_backtracking"]


@dataclass
class LineSearchInfo:
    """What happened in a line search.

    Attributes:
        success: Whether a step length satisfied the condition.
        evaluations: Number of calls of ``f``.
        alphas: The step lengths tried, in order.
        values: ``f`` at each of them (as floats; ``nan``/``inf`` kept).
        message: A sentence saying what happened.
    """

    success: bool
    evaluations: int
    alphas: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    message: str = ""


def _positive(name: str, value: Any, upper: float | None = None) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    ok = not isinstance(value, bool) and math.isfinite(out) and out > 0
    if upper is not None:
        ok = ok and out < upper
    if not ok:
        bound = f"in (0, {upper:g})" if upper is not None else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return out


def armijo_backtracking(
    f: Callable[[float], Any],
    f0: float,
    slope: float,
    *,
    alpha0: float = 1.0,
    c: float = 1e-2,
    shrink: float = 0.8,
    max_steps: int = 30,
) -> tuple[float, float, LineSearchInfo]:
    r"""Backtrack from ``alpha0`` until the Armijo condition holds.

    Tries :math:`\alpha_i = \texttt{alpha0} \cdot \texttt{shrink}^i` for
    :math:`i = 0, \dots, \texttt{max\_steps} - 1` and returns the first with

    .. math::
        f(\alpha_i) \le f_0 + c\, \alpha_i\, \texttt{slope}

    (a ``nan`` value never satisfies it). If none does, the search fails and returns
    :math:`\alpha = 0` with ``f0``: the caller should reject the step. Failure is reported in
    ``info``, never raised.

    Args:
        f: The objective as a function of the step length; may return a float or a 0-dim
            tensor.
        f0: :math:`f(0)`, finite.
        slope: The directional derivative :math:`f'(0) = g^\top \delta`, finite and ``< 0``.
        alpha0: The first step length (``> 0``).
        c: The sufficient-decrease constant in ``(0, 1)``.
        shrink: The backtracking factor in ``(0, 1)``.
        max_steps: The most evaluations of ``f`` (an int ``>= 1``).

    Returns:
        ``(alpha, f(alpha), info)``; ``(0.0, f0, info)`` with ``info.success = False`` if no
        step length satisfied the condition.

    Raises:
        ValueError: For a non-finite ``f0``, a ``slope >= 0`` (not a descent direction) or an
            invalid option.

    Example:
        >>> alpha, value, info = armijo_backtracking(lambda a: (a - 0.3) ** 2, 0.09, -0.6)
        >>> round(alpha, 4), info.evaluations
        (0.512, 4)
    """
    base = float(f0)
    if not math.isfinite(base):
        raise ValueError(f"f0 must be finite, got {f0!r}")
    s = float(slope)
    if not (math.isfinite(s) and s < 0):
        raise ValueError(
            f"slope must be finite and < 0 (the step must be a descent direction), got {slope!r}"
        )
    alpha = _positive("alpha0", alpha0)
    c_f = _positive("c", c, upper=1.0)
    shrink_f = _positive("shrink", shrink, upper=1.0)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    info = LineSearchInfo(success=False, evaluations=0)
    for _ in range(max_steps):
        value = float(f(alpha))
        info.evaluations += 1
        info.alphas.append(alpha)
        info.values.append(value)
        if value <= base + c_f * alpha * s:  # False for nan
            info.success = True
            info.message = (
                f"the Armijo condition holds at alpha={alpha:.3e} after {info.evaluations} "
                "evaluation(s)"
            )
            return alpha, value, info
        alpha *= shrink_f
    info.message = (
        f"no step length in [{info.alphas[-1]:.3e}, {info.alphas[0]:.3e}] satisfied the Armijo "
        f"condition in {max_steps} evaluations; returned alpha=0 (reject the step)"
    )
    return 0.0, base, info
