r"""Adaptive damping with step acceptance: Levenberg-Marquardt on the reduction ratio.

A damped Newton-type step solves :math:`(C + \kappa\Lambda)\, s = g` (:math:`\Lambda`: the param
groups' ``damping``, :math:`\kappa`: a scale adapted from step to step, 1 at the start) and would
move the parameters by :math:`\delta = -\mathrm{lr}\, s`. The damped quadratic model predicts the
change :math:`q(\delta) - q(0) = g^\top\delta + \tfrac12 \delta^\top (C + \kappa\Lambda)\delta`;
the loss on the step's batch gives the actual change; their ratio is :math:`\rho`
(:func:`~secondorder.optim.damping.reduction_ratio`). With ``adapt_damping=True``:

- the step is **accepted** only when the loss on the batch is finite and did not rise
  (:math:`\rho \ge 0` where the model predicts a decrease); then :math:`\kappa` follows
  Martens' Levenberg-Marquardt rule (an undefined :math:`\rho`, where the model predicts no
  decrease, counts as a poor model)
  (:func:`~secondorder.optim.damping.levenberg_marquardt`: :math:`\times 3/2` when
  :math:`\rho < 1/4`, :math:`\times 2/3` when :math:`\rho > 3/4`);
- a **rejected** trial multiplies :math:`\kappa` by :data:`REJECT_FACTOR` and solves again with
  the same curvature (no new linearisation), up to ``damping_retries`` times; if every trial is
  rejected, the step is skipped and the parameters stay as they were. Every rejection is counted
  (``diagnostics["rejections"]``, ``state["rejections"]`` over the run) and warned about with its
  reason (:class:`RejectedStepWarning`).

:math:`\kappa` stays within :math:`[1, 10^8]`: the groups' ``damping`` is the smallest damping
used, where the rule starts and to which it relaxes (on mini-batches a floor keeps each step from
fitting its batch too closely; for full-batch problems give a small ``damping``). It lives in the
state (``state_dict`` carries it). Each trial costs one forward pass on the batch (and, with
per-group step sizes, one curvature product).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .damping import levenberg_marquardt, reduction_ratio
from .warn import warn_at_caller

__all__ = ["REJECT_FACTOR", "RejectedStepWarning", "Trial", "adaptive_direction"]

REJECT_FACTOR = 10.0
"""How much a rejected trial raises the damping scale before the next solve."""
MIN_SCALE, MAX_SCALE = 1.0, 1e8


class RejectedStepWarning(UserWarning):
    """A trial step did not decrease the loss on its batch; the damping was raised."""


@dataclass
class Trial:
    r"""One solve at a damping scale.

    Attributes:
        direction: :math:`-s`, the step before ``lr`` (flat).
        model_change: :math:`q(-s) - q(0) = -g^\top s + \tfrac12 s^\top (C + \kappa\Lambda) s`.
        apply: :math:`v \mapsto (C + \kappa\Lambda) v`, for a model change along ``lr * -s``
            with per-group ``lr`` (None when ``lr`` is one number).
        predict: Where the solver knows it in closed form, the model change along the step as
            applied (``lr`` of every group included); used instead of the two above.
    """

    direction: Tensor
    model_change: float
    apply: Callable[[Tensor], Tensor] | None = None
    predict: Callable[[], float] | None = None


def _predicted(trial: Trial, grad: Tensor, lr: float | Tensor) -> float:
    r""":math:`q(\mathrm{lr}\,\delta) - q(0)` of the damped model."""
    if trial.predict is not None:
        return trial.predict()
    d = trial.direction
    if isinstance(lr, Tensor):
        if trial.apply is None:
            return math.nan
        step = d * lr
        return float(grad @ step + 0.5 * (step @ trial.apply(step)))
    slope = float(grad @ d)
    return lr * lr * (trial.model_change - slope) + lr * slope


def adaptive_direction(
    opt: Any,
    loss: Tensor,
    grad: Tensor,
    batches: list[Any],
    solve: Callable[[float], Trial | None],
) -> Tensor | None:
    """The step's direction under adaptive damping (module docstring), or None if skipped.

    Args:
        opt: The optimizer: ``adapt_damping``, ``damping_retries``, ``global_state``,
            ``diagnostics``, ``loss_along``, ``_group_vector`` and ``_reject`` are used.
        loss: The loss on ``batches`` at the current parameters.
        grad: Its gradient (flat).
        batches: The step's batches.
        solve: ``solve(kappa)`` solves with the damping scaled by ``kappa``; None when it
            rejected the step itself (a non-finite product).

    Returns:
        The direction to apply (before ``lr``), or None.
    """
    if not opt.adapt_damping:
        trial = solve(1.0)
        return None if trial is None else trial.direction
    state, diag = opt.global_state, opt.diagnostics
    kappa = float(state.get("damping_scale", 1.0))
    if not (math.isfinite(kappa) and kappa > 0):
        kappa = 1.0  # a poisoned state: start again
    lr = opt._group_vector("lr")
    f0 = float(loss)
    rejections = 0
    for _ in range(1 + opt.damping_retries):
        trial = solve(kappa)
        if trial is None:
            state["damping_scale"] = min(kappa * REJECT_FACTOR, MAX_SCALE)
            return None
        predicted = _predicted(trial, grad, lr)
        if isinstance(lr, Tensor):  # per-group step sizes: the scaled direction itself
            f_new = float(opt.loss_along(trial.direction * lr, 1.0, batches))
        else:
            f_new = float(opt.loss_along(trial.direction, lr, batches))
        rho = reduction_ratio(f0, f_new, predicted)
        diag.update(damping_scale=kappa, rho=rho, predicted_change=predicted, new_loss=f_new)
        if math.isfinite(f_new) and f_new <= f0:  # rho > 0, or a poor model but a decrease
            state["damping_scale"] = min(max(levenberg_marquardt(kappa, rho), MIN_SCALE), MAX_SCALE)
            diag.update(rejections=rejections, next_damping_scale=state["damping_scale"])
            return trial.direction
        rejections += 1
        state["rejections"] = int(state.get("rejections", 0)) + 1
        reason = (
            f"the loss on the batch went from {f0:.6g} to {f_new:.6g} (model: "
            f"{predicted:+.3g}, rho {rho:.3g})"
        )
        kappa = min(kappa * REJECT_FACTOR, MAX_SCALE)
        warn_at_caller(
            f"{type(opt).__name__}: step {state.get('step', 0)}: trial rejected: {reason}; "
            f"damping scale raised to {kappa:.3g}",
            RejectedStepWarning,
        )
    state["damping_scale"] = kappa
    diag.update(
        rejections=rejections,
        next_damping_scale=kappa,
        accepted=False,
        rejected_reason=f"{rejections} trials did not decrease the loss on the batch",
        step_norm=0.0,
    )
    return None
