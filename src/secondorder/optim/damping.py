r"""Damping rules: the reduction ratio and the Levenberg-Marquardt update, as pure functions.

A damped second-order step :math:`\delta` approximately minimises the quadratic model

.. math::
    q(\delta) = f(\theta) + g^\top \delta + \tfrac12 \delta^\top (C + \lambda I)\, \delta,

and the *reduction ratio*

.. math::
    \rho = \frac{f(\theta + \delta) - f(\theta)}{q(\delta) - q(0)}

compares the actual change of the objective with the change the model predicted. Both
numerator and denominator are negative for a successful step, so :math:`\rho \approx 1` means
the model is trustworthy (less damping), :math:`\rho < 1/4` that it is not (more damping).

References:
    J. Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.1.
    J. Martens and I. Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", 2012, §8.5.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["levenberg_marquardt", "reduction_ratio"]


def _finite(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return out


def reduction_ratio(loss_before: float, loss_after: float, predicted_change: float) -> float:
    r"""The reduction ratio :math:`\rho = (f(\theta+\delta) - f(\theta)) / (q(\delta) - q(0))`.

    Sign conventions: ``predicted_change`` is :math:`q(\delta) - q(0)`, *negative* when the
    model predicts a decrease (e.g. the value :math:`\phi` that CG reports for its iterate);
    ``loss_after - loss_before`` is negative when the loss fell. A step that does what the model
    predicts gives :math:`\rho = 1`; a step that increases the loss gives :math:`\rho < 0`.

    Guards: when the model predicts no decrease (``predicted_change >= 0``, e.g. a zero step or
    an indefinite model) or ``loss_before``/``predicted_change`` is not finite, :math:`\rho` is
    undefined and ``nan`` is returned (never a division by zero); a loss that rose to ``inf``
    gives ``-inf`` and a ``nan`` loss gives ``nan``. :func:`levenberg_marquardt` treats ``nan``
    as a failure.

    Args:
        loss_before: :math:`f(\theta)`.
        loss_after: :math:`f(\theta + \delta)`.
        predicted_change: :math:`q(\delta) - q(0)`.

    Returns:
        :math:`\rho` as a float (possibly ``nan`` or ``-inf``, see above).

    Example:
        >>> reduction_ratio(10.0, 9.0, -2.0)
        0.5
    """
    before, after, predicted = float(loss_before), float(loss_after), float(predicted_change)
    if not (math.isfinite(before) and math.isfinite(predicted) and predicted < 0):
        return math.nan
    if math.isnan(after):
        return math.nan
    if math.isinf(after):
        return -math.inf if after > 0 else math.inf
    return (after - before) / predicted


def levenberg_marquardt(
    damping: float,
    rho: float,
    *,
    decrease: float = 2.0 / 3.0,
    increase: float = 3.0 / 2.0,
    low: float = 0.25,
    high: float = 0.75,
    min_damping: float = 0.0,
    max_damping: float = math.inf,
) -> float:
    r"""Martens' Levenberg-Marquardt rule for the Tikhonov damping :math:`\lambda`.

    .. math::
        \lambda \leftarrow \operatorname{clip}\Big(
        \begin{cases}
            \lambda \cdot \texttt{increase} & \rho < \texttt{low} \text{ or } \rho
                \text{ is nan} \\
            \lambda \cdot \texttt{decrease} & \rho > \texttt{high} \\
            \lambda & \text{otherwise}
        \end{cases},\ \texttt{min\_damping},\ \texttt{max\_damping}\Big)

    with Martens' defaults ``increase = 3/2``, ``decrease = 2/3``, ``low = 1/4``,
    ``high = 3/4``.

    Args:
        damping: The current :math:`\lambda \ge 0`.
        rho: The reduction ratio (see :func:`reduction_ratio`); ``nan`` counts as a failure.
        decrease: Factor in ``(0, 1]`` applied when the model was good.
        increase: Factor ``>= 1`` applied when it was bad.
        low: Threshold below which the damping increases.
        high: Threshold above which it decreases (``low <= high``).
        min_damping: Lower bound of the result (``>= 0``).
        max_damping: Upper bound of the result (``>= min_damping``, may be ``inf``).

    Returns:
        The new damping.

    Raises:
        ValueError: For a negative or non-finite ``damping``, factors outside their ranges,
            ``low > high``, or inconsistent bounds.

    Example:
        >>> levenberg_marquardt(1.0, 0.1), levenberg_marquardt(1.0, 0.9)
        (1.5, 0.6666666666666666)
    """
    lam = _finite("damping", damping)
    if lam < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    dec, inc = _finite("decrease", decrease), _finite("increase", increase)
    if not 0 < dec <= 1:
        raise ValueError(f"decrease must be in (0, 1], got {decrease!r}")
    if inc < 1:
        raise ValueError(f"increase must be >= 1, got {increase!r}")
    lo, hi = _finite("low", low), _finite("high", high)
    if lo > hi:
        raise ValueError(f"low must be <= high, got low={low!r} and high={high!r}")
    lower = _finite("min_damping", min_damping)
    try:
        upper = float(max_damping)
    except (TypeError, ValueError):
        raise ValueError(f"max_damping must be a real number, got {max_damping!r}") from None
    if lower < 0 or math.isnan(upper) or upper < lower:
        raise ValueError(
            f"expected 0 <= min_damping <= max_damping, got min_damping={min_damping!r} and "
            f"max_damping={max_damping!r}"
        )
    r = float(rho)
    if math.isnan(r) or r < lo:
        lam *= inc
    elif r > hi:
        lam *= dec
    return min(max(lam, lower), upper)
