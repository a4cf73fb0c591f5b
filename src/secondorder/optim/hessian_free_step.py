r"""One Hessian-free step: curvature, preconditioned CG, backtracking, damping, line search.

:func:`compute_direction` is the body of
:meth:`~secondorder.optim.hessian_free.HessianFree._compute_direction`, the five numbered
rules of :mod:`~secondorder.optim.hessian_free`'s docstring in order, composed from the pieces
of :mod:`.hessian_free_parts`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..curvature.model import Batch
from ..linalg.operator import Identity
from ..linalg.status import SolverStatus
from .damping import reduction_ratio
from .hessian_free_data import _loss_and_gradient, _same_batches
from .hessian_free_parts import cg_backtracking, descent_candidates, nan_as_inf, predicted_change

if TYPE_CHECKING:
    from .hessian_free import HessianFree

__all__ = ["compute_direction"]


def compute_direction(
    opt: HessianFree,
    batches: list[Batch],
    loss_batches: list[Batch],
    grad_batches: list[Batch],
) -> tuple[Tensor, Tensor | None]:
    """Compute one Hessian-free step of ``opt`` from the current parameters.

    Args:
        opt: The optimizer (its settings, state and diagnostics are read and written).
        batches: The curvature data.
        loss_batches: The loss data (reduction ratio, CG backtracking, line search).
        grad_batches: The gradient data.

    Returns:
        ``(f0, step)``: the loss on ``loss_batches`` at the start and the parameter update,
        or ``None`` when the step is rejected (then ``opt.diagnostics`` says why).
    """
    group = opt.param_groups[0]
    state = opt.global_state
    diag = opt.diagnostics
    lam = opt._current_damping()
    lr = float(group["lr"])
    diag.update(damping=lam, rho=math.nan, alpha=0.0, fallback=None, chosen_iterate=None)
    clock = time.perf_counter
    tic = clock()

    # 1. curvature, gradient and loss (one forward pass when the data coincide)
    C = opt._curvature(
        opt.curvature,
        batches,
        engine=opt.engine,
        cache=True,
        jacobian_factors=opt.jacobian_factors,
    )
    if _same_batches(grad_batches, batches):
        grad_loss, grad = C.loss, C.gradient()
    else:
        grad_loss, grad = _loss_and_gradient(
            opt.fmodel, opt.loss_fn, grad_batches, opt._allreduce_sum, opt.process_group
        )
    if _same_batches(loss_batches, grad_batches):
        f0 = grad_loss
    elif _same_batches(loss_batches, batches):
        f0 = C.loss
    else:
        f0 = opt.loss_at(opt.fmodel.current(), loss_batches)
    diag["time_curvature"] = clock() - tic
    if not opt._check_loss_and_gradient(f0, grad):
        return f0, None
    if not math.isfinite(float(grad_loss)):
        opt._reject("the loss on the gradient data is not finite")
        return f0, None
    f0_f = float(f0)
    if diag["grad_norm"] == 0.0:  # a stationary point: nothing to do
        diag.update(cg_iterations=0, cg_residual=0.0, cg_status="zero_gradient")
        diag.update(negative_curvature=False, cg_negative_directions=0)
        diag.update(next_damping=lam, new_loss=f0_f, loss_evaluations=0)
        return f0, torch.zeros_like(grad)

    # 2. preconditioned CG on (C + lam I) delta = -g      [M10] §4.1, §4.4, §4.5, §4.7
    tic = clock()
    try:
        M = opt._build_preconditioner(grad_batches, lam)
    except ValueError as err:
        opt._reject(f"the preconditioner's diagonal is not usable ({err})")
        return f0, None
    diag["time_preconditioner"] = clock() - tic
    tic = clock()
    A = C + Identity(opt.fmodel.dim, dtype=opt.fmodel.dtype, device=opt.fmodel.device) * lam
    previous = opt._check_warm_start("x0")
    if not diag["accepted"]:
        return f0, None
    decay = float(group["cg_decay_x0"])
    x0 = previous * decay if previous is not None and decay > 0 else None
    diag["warm_start"] = x0 is not None
    x, info, kept = opt._solve(A, -grad, x0, M)
    passed = info.negative_curvature_directions
    # only Martens' rule stops CG through the callback here
    status = "martens" if info.status == SolverStatus.CALLBACK else info.status.name.lower()
    stopped_at_negative = info.status == SolverStatus.NEGATIVE_CURVATURE
    diag.update(
        cg_iterations=info.iterations,
        cg_residual=info.residual_norm,
        cg_status=status,
        negative_curvature=stopped_at_negative or passed > 0,
        cg_negative_directions=passed,
        time_cg=clock() - tic,
    )
    if info.status == SolverStatus.NONFINITE:
        opt._reject("a curvature product was not finite during CG")
        return f0, None
    if info.iterations == 0 and x0 is None:
        state.pop("x0", None)  # CG did not move from zero: nothing to warm-start from
    else:
        state["x0"] = x  # the final iterate, not the backtracked one   [M10] §4.6

    # 3. CG backtracking over the kept iterates that descend          [M10] §4.6
    tic = clock()
    if not kept:
        kept = [(info.iterations, x, info.quadratic_values[-1])]
    candidates, fallback = descent_candidates(kept, grad, A.matvec, lam)
    if fallback:  # no descent direction from CG: the damped gradient step
        diag["fallback"] = "gradient"
    evaluations = 0

    def loss_along(scale: float, direction: Tensor) -> float:
        """The loss at theta + scale * direction (NaN read as +Inf)."""
        nonlocal evaluations
        evaluations += 1
        return nan_as_inf(float(opt.loss_along(direction, scale, loss_batches)))

    chosen, f_new = cg_backtracking(candidates, lambda d: loss_along(lr, d))
    delta, slope = chosen.step, chosen.slope
    diag["chosen_iterate"] = chosen.iteration if not fallback else None
    diag["time_backtracking"] = clock() - tic

    # 4. reduction ratio at the chosen iterate and the damping rule [M10] §4.1, [MS12] §8.5
    predicted = predicted_change(chosen.phi, slope, lr)  # phi(lr delta) = q(lr delta) - q(0)
    rho = reduction_ratio(f0_f, f_new, predicted)
    new_lam = lam
    if opt.adapt_damping:
        new_lam = opt._damping_rule()(lam, math.nan if stopped_at_negative else rho)
        state["damping"] = new_lam
    diag.update(rho=rho, predicted_change=predicted, next_damping=new_lam)

    # 5. line search from alpha = 1                                    [MS12] §8.8
    tic = clock()
    alpha = 1.0
    if opt.use_linesearch:
        f_one = f_new

        def along(a: float) -> float:
            return f_one if a == 1.0 else loss_along(a * lr, delta)

        alpha, f_new, ls = opt._linesearch()(along, f0_f, lr * slope)
        diag["linesearch"] = ls.message
    diag.update(
        alpha=alpha,
        new_loss=f_new,
        loss_evaluations=evaluations,
        time_linesearch=clock() - tic,
    )
    if opt.use_linesearch and alpha == 0.0:
        diag.update(accepted=False, rejected_reason="the line search found no decrease")
        return f0, None
    if not math.isfinite(f_new):
        opt._reject("the loss at the new parameters is not finite")
        return f0, None
    return f0, delta if alpha == 1.0 else delta * alpha
