r"""The pieces of a Hessian-free step, each a pure function or a small class.

:class:`~secondorder.optim.hessian_free.HessianFree` composes them; each is tested alone.

1. :func:`truncated_cg`: preconditioned CG on :math:`(C + \lambda I)\delta = -g`, stopped by
   Martens' rule and keeping the iterates for backtracking (both through CG's callback,
   :mod:`~secondorder.linalg.cg_callbacks`).
2. :func:`descent_candidates` and :func:`cg_backtracking`: among the kept iterates that
   descend, the last one, then earlier ones while the loss keeps falling (Martens' code).
3. :class:`LevenbergMarquardt`: the damping update from the reduction ratio
   (:func:`~secondorder.optim.damping.levenberg_marquardt`).
4. :class:`ArmijoLineSearch`: backtracking on the chosen step
   (:func:`~secondorder.optim.linesearch.armijo_backtracking`).

A damping rule is any callable ``rule(damping, rho) -> new damping`` (``rho`` is ``nan`` for
a failed step), a line search any callable ``search(f, f0, slope) -> (alpha, f(alpha), info)``
with ``info.message`` (``alpha = 0`` when no step length is acceptable), where
``f(alpha)`` is the loss at :math:`\theta + \alpha\,\mathrm{lr}\,\delta`.

References:
    J. Martens, "Deep learning via Hessian-free optimization", ICML 2010, §4.1, §4.4, §4.6.
    J. Martens and I. Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", 2012, §8.5, §8.8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..linalg.cg import CGInfo, cg
from ..linalg.cg_callbacks import CallbackList, IterateGrid, MartensStop
from ..linalg.operator import LinearOperator
from .damping import levenberg_marquardt
from .linesearch import LineSearchInfo, armijo_backtracking

__all__ = [
    "ArmijoLineSearch",
    "Candidate",
    "LevenbergMarquardt",
    "cg_backtracking",
    "descent_candidates",
    "nan_as_inf",
    "predicted_change",
    "truncated_cg",
]

BACKTRACK_GAMMA = 1.3  # [M10] §4.6


class Candidate(NamedTuple):
    r"""A CG iterate offered to backtracking.

    Attributes:
        iteration: ``k`` (``0`` for the damped gradient step of the fallback).
        step: :math:`\delta_k`.
        phi: :math:`\phi(\delta_k) = \tfrac12 \delta_k^\top (C + \lambda I) \delta_k
            + g^\top \delta_k`.
        slope: :math:`g^\top \delta_k` (negative: a descent direction).
    """

    iteration: int
    step: Tensor
    phi: float
    slope: float


def truncated_cg(
    A: LinearOperator,
    b: Tensor,
    x0: Tensor | None = None,
    M: LinearOperator | None = None,
    *,
    rtol: float,
    maxiter: int,
    martens_eps: float | None = 5e-4,
    backtracking_gamma: float | None = BACKTRACK_GAMMA,
    negative_curvature: str = "stop",
) -> tuple[Tensor, CGInfo, list[tuple[int, Tensor, float]]]:
    r"""Truncated preconditioned CG of Hessian-free optimisation ([M10] §4.4, §4.6).

    :func:`~secondorder.linalg.cg` on :math:`A x = b` (``atol = 0``), stopped by Martens'
    relative-progress rule (:class:`~secondorder.linalg.cg_callbacks.MartensStop`) and
    keeping copies of the iterates at :math:`k = \lceil\gamma^j\rceil`, the final one and, with
    ``negative_curvature="continue"``, the one before the first negative direction
    (:class:`~secondorder.linalg.cg_callbacks.IterateGrid`).

    Args:
        A: The damped curvature :math:`C + \lambda I`.
        b: The right-hand side :math:`-g`.
        x0: Warm start, or ``None``.
        M: Preconditioner (applies :math:`M^{-1}`), or ``None``.
        rtol: CG's relative residual tolerance.
        maxiter: CG's iteration limit.
        martens_eps: The :math:`\varepsilon` of Martens' rule; ``None`` turns it off.
        backtracking_gamma: The grid ratio :math:`\gamma`; ``None`` keeps no iterates.
        negative_curvature: ``"stop"`` or ``"continue"`` (see :func:`~secondorder.linalg.cg`).

    Returns:
        ``(x, info, kept)``: the final iterate, CG's info (status ``CALLBACK`` when Martens'
        rule stopped it) and the kept ``(k, x_k, phi(x_k))`` in increasing ``k`` (empty when
        ``backtracking_gamma`` is ``None``).
    """
    through = negative_curvature == "continue"
    grid = (
        None
        if backtracking_gamma is None
        else IterateGrid(backtracking_gamma, keep_before_negative=through)
    )
    martens = None if martens_eps is None else MartensStop(martens_eps)
    callbacks = CallbackList([grid, martens])
    x, info = cg(
        A,
        b,
        x0,
        rtol=rtol,
        atol=0.0,
        maxiter=maxiter,
        M=M,
        callback=callbacks if callbacks.callbacks else None,
        negative_curvature=negative_curvature,  # type: ignore[arg-type]
    )
    kept = grid.snapshots(x, info) if grid is not None else []
    return x, info, kept


def descent_candidates(
    kept: Sequence[tuple[int, Tensor, float]],
    grad: Tensor,
    A: Callable[[Tensor], Tensor],
    damping: float,
) -> tuple[list[Candidate], bool]:
    r"""The kept iterates that descend (:math:`g^\top \delta_k < 0`), in the order kept.

    If none does (negative curvature in the first iteration, a warm start pointing uphill),
    the damped gradient step :math:`\delta = -g/\lambda` is the only candidate, with its
    :math:`\phi` computed by one product with ``A``.

    Args:
        kept: ``(k, delta_k, phi(delta_k))`` from :func:`truncated_cg` (or the final iterate).
        grad: The gradient :math:`g`.
        A: ``v -> (C + lambda I) v`` (used only by the fallback).
        damping: :math:`\lambda > 0` (used only by the fallback).

    Returns:
        ``(candidates, fallback)``: the candidates and whether they are the gradient step.
    """
    slopes = [torch.dot(grad, xk).item() for _, xk, _ in kept]
    candidates = [Candidate(k, xk, phi, s) for (k, xk, phi), s in zip(kept, slopes) if s < 0]
    if candidates:
        return candidates, False
    delta = grad / -damping
    phi = float(0.5 * torch.dot(delta, A(delta)) + torch.dot(grad, delta))
    return [Candidate(0, delta, phi, float(torch.dot(grad, delta)))], True


def cg_backtracking(
    candidates: Sequence[Candidate], loss: Callable[[Tensor], float]
) -> tuple[Candidate, float]:
    r"""Martens' CG backtracking ([M10] §4.6, in the order of his code).

    Evaluates the loss at the last candidate, then at the earlier ones from the last
    backwards while the loss keeps decreasing; the last improvement is chosen.

    Args:
        candidates: Non-empty, in increasing iteration.
        loss: ``delta -> f(theta + lr * delta)`` as a float (NaN read as ``+inf`` by the
            caller).

    Returns:
        ``(chosen, loss at chosen)``.

    Raises:
        ValueError: If ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("cg_backtracking: expected at least one candidate, got none")
    chosen = candidates[-1]
    best = loss(chosen.step)
    for cand in reversed(candidates[:-1]):
        value = loss(cand.step)
        if not value < best:
            break
        chosen, best = cand, value
    return chosen, best


class LevenbergMarquardt:
    r"""Martens' Levenberg-Marquardt damping rule as a callable ``rule(damping, rho)``.

    :math:`\lambda \leftarrow \tfrac32\lambda` if :math:`\rho < \tfrac14` (or ``nan``),
    :math:`\tfrac23\lambda` if :math:`\rho > \tfrac34`, clipped to the bounds
    (:func:`~secondorder.optim.damping.levenberg_marquardt`, whose keywords it takes).

    Args:
        **kwargs: ``decrease``, ``increase``, ``low``, ``high``, ``min_damping``,
            ``max_damping`` of :func:`~secondorder.optim.damping.levenberg_marquardt`.

    Raises:
        ValueError: For invalid factors, thresholds or bounds.
    """

    def __init__(self, **kwargs: Any) -> None:
        levenberg_marquardt(1.0, 1.0, **kwargs)  # validate now, not at the first step
        self.kwargs = kwargs

    def __call__(self, damping: float, rho: float) -> float:
        """The new damping."""
        return levenberg_marquardt(damping, rho, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"LevenbergMarquardt({args})"


class ArmijoLineSearch:
    r"""Armijo backtracking as a callable ``search(f, f0, slope)`` ([MS12] §8.8).

    Tries :math:`\alpha = 1, s, s^2, \dots` until
    :math:`f(\alpha) \le f_0 + c\,\alpha\,\mathrm{slope}`
    (:func:`~secondorder.optim.linesearch.armijo_backtracking`).

    Args:
        c: Armijo constant in ``(0, 1)`` (default 1e-2).
        shrink: Backtracking factor ``s`` in ``(0, 1)`` (default 0.8).
        max_steps: Maximal evaluations of ``f`` (default 30).
    """

    def __init__(self, c: float = 1e-2, shrink: float = 0.8, max_steps: int = 30) -> None:
        self.c, self.shrink, self.max_steps = c, shrink, max_steps

    def __call__(
        self, f: Callable[[float], float], f0: float, slope: float
    ) -> tuple[float, float, LineSearchInfo]:
        """``(alpha, f(alpha), info)``; ``alpha = 0`` when no step length is acceptable."""
        return armijo_backtracking(
            f, f0, slope, c=self.c, shrink=self.shrink, max_steps=self.max_steps
        )

    def __repr__(self) -> str:
        return (
            f"ArmijoLineSearch(c={self.c!r}, shrink={self.shrink!r}, max_steps={self.max_steps!r})"
        )


def predicted_change(phi: float, slope: float, lr: float) -> float:
    r"""The damped model's change along the scaled step, :math:`\phi(\mathrm{lr}\,\delta)`.

    .. math::
        \phi(\mathrm{lr}\,\delta) = \mathrm{lr}^2 (\phi(\delta) - g^\top\delta)
        + \mathrm{lr}\, g^\top \delta.

    Args:
        phi: :math:`\phi(\delta)`.
        slope: :math:`g^\top \delta`.
        lr: The step's scale.

    Returns:
        The predicted change :math:`q(\mathrm{lr}\,\delta) - q(0)`.
    """
    return lr * lr * (phi - slope) + lr * slope


def nan_as_inf(value: float) -> float:
    """A loss value with NaN read as ``+inf`` (a failed evaluation is never the best)."""
    return value if not math.isnan(value) else math.inf
