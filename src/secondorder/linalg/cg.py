r"""Preconditioned conjugate gradient for symmetric positive (semi-)definite systems.

:func:`cg` solves :math:`A x = b` for a symmetric positive definite :math:`A` given as a
:class:`~secondorder.linalg.operator.LinearOperator`, a 2-D tensor or a callable ``v -> A v``.
It is the inner loop of every Newton-type optimizer in this library; besides one product with
:math:`A` an iteration makes five in-place passes over the vectors and reads its step length
and residual norm as Python floats.

CG minimises the quadratic model

.. math::

    \phi(x) = \tfrac12 x^\top A x - b^\top x,

and every iterate's value :math:`\phi(x_k)` is recorded for free by the recurrence
:math:`\phi(x_k + \alpha_k p_k) = \phi(x_k) - \alpha_k r_k^\top z_k + \tfrac12 \alpha_k^2
p_k^\top A p_k` (CG's :math:`p_k^\top r_k = r_k^\top z_k`). Application rules that need it
(Martens' relative-progress stopping rule, the iterate snapshots of CG backtracking) come in
through the callback (:mod:`~secondorder.linalg.cg_callbacks`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .cg_callbacks import CGState
from .checks import _as_apply, _check_nonneg, _check_vector, residual_threshold
from .operator import LinearOperator
from .precision import full_precision
from .status import SolverStatus

__all__ = ["CGInfo", "CGStatus", "cg"]

CGStatus = SolverStatus
"""The former name of :class:`~secondorder.linalg.status.SolverStatus` (kept as an alias)."""


@dataclass
class CGInfo:
    r"""What happened in a :func:`cg` solve.

    Attributes:
        iterations: Number of CG iterations whose iterate was accepted; the returned ``x`` is
            ``x_iterations`` (``x_0`` is the initial guess).
        status: Why the solve stopped (a :class:`~secondorder.linalg.status.SolverStatus`).
        message: A sentence saying why it stopped and what to try.
        residual_norms: ``norm(r_k)`` for ``k = 0 .. iterations`` (the recursively updated
            residual, as in every CG implementation), including the initial one.
        quadratic_values: :math:`\phi(x_k) = \tfrac12 x_k^\top A x_k - b^\top x_k` for
            ``k = 0 .. iterations``.
        tol: The absolute residual threshold ``max(rtol * norm(b), atol)``.
        num_matvecs: Number of products with ``A`` (one per iteration, one more for ``x0``).
        negative_curvature_directions: With ``negative_curvature="continue"``, how many
            directions of negative curvature the solve stepped along.
    """

    iterations: int
    status: SolverStatus
    message: str
    residual_norms: list[float] = field(default_factory=list)
    quadratic_values: list[float] = field(default_factory=list)
    tol: float = 0.0
    num_matvecs: int = 0
    negative_curvature_directions: int = 0

    @property
    def converged(self) -> bool:
        """Whether a requested stopping rule was met (``CONVERGED`` or ``CALLBACK``)."""
        return self.status.success

    @property
    def residual_norm(self) -> float:
        """The last recorded residual norm ``norm(r_iterations)``."""
        return self.residual_norms[-1] if self.residual_norms else math.nan


# ----------------------------------------------------------------------- checks


def _check_arguments(
    rtol: float,
    atol: float,
    maxiter: int | None,
    callback: Any,
) -> tuple[float, float]:
    rtol_f = _check_nonneg(rtol, "rtol")
    atol_f = _check_nonneg(atol, "atol")
    if maxiter is not None and (
        isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0
    ):
        raise ValueError(f"maxiter must be None or an int >= 0, got {maxiter!r}")
    if rtol_f == 0 and atol_f == 0 and maxiter is None and callback is None:
        raise ValueError(
            "no stopping criterion: rtol=0, atol=0 and maxiter=None without a callback would "
            "run the 10*n default iterations for an exact zero residual; give rtol > 0, "
            "atol > 0, an explicit maxiter, or a callback that stops the solve"
        )
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be None or callable, got {type(callback).__name__}")
    return rtol_f, atol_f


_MESSAGES = {
    SolverStatus.CONVERGED: "converged: norm(r) <= max(rtol*norm(b), atol) = {tol:.3e} "
    "after {it} iterations.",
    SolverStatus.MAXITER: "stopped at maxiter={it} with norm(r) = {res:.3e} > tol = {tol:.3e}; "
    "try a larger maxiter, a preconditioner M, more damping, or a looser rtol/atol.",
    SolverStatus.NEGATIVE_CURVATURE: "non-positive curvature p^T A p = {curv:.3e} in "
    "iteration {next}: A is not positive definite along p; returned the last iterate "
    "x_{it}. Add damping (A + lam*I) or use a positive semi-definite curvature (GGN, Fisher).",
    SolverStatus.NONFINITE: "a non-finite value (NaN/Inf) appeared in {where} in iteration {next}; "
    "returned the last finite iterate x_{it}. Check the operator and b for NaN/Inf, "
    "or use float64.",
    SolverStatus.CALLBACK: "stopped by the callback (it returned True or raised "
    "StopIteration) after iteration {it}, with norm(r) = {res:.3e} (tol = {tol:.3e}).",
    SolverStatus.INDEFINITE_PRECONDITIONER: "r^T M^-1 r = {rz:.3e} <= 0 for a non-zero residual in "
    "iteration {it}: the preconditioner M is not positive definite; returned x_{it}.",
}


def _message(status: SolverStatus, **kw: Any) -> str:
    defaults: dict[str, Any] = {"tol": math.nan, "it": 0, "res": math.nan, "curv": math.nan}
    defaults.update(rz=math.nan, where="the computation")
    defaults.update(kw)
    defaults.setdefault("next", defaults["it"] + 1)
    return _MESSAGES[status].format(**defaults)


def _wants_state(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` takes ``intermediate_result`` (scipy.optimize's convention)."""
    try:
        return "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):  # no signature (some builtins): the scipy form callback(xk)
        return False


# ------------------------------------------------------------------------- cg
@full_precision
def cg(
    A: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: LinearOperator | Tensor | Callable[[Tensor], Tensor] | None = None,
    callback: Callable[..., Any] | None = None,
    negative_curvature: Literal["stop", "continue"] = "stop",
) -> tuple[Tensor, CGInfo]:
    r"""Solve :math:`A x = b` by (preconditioned) conjugate gradient.

    ``A`` must be symmetric and should be positive definite; the solver detects where it is not
    (see *Breakdowns*). With a preconditioner, ``M`` applies :math:`M^{-1}` (an SPD
    approximation of :math:`A^{-1}`), as in ``scipy.sparse.linalg.cg``; the iterates are those
    of scipy's CG up to rounding.

    **Stopping.** With :math:`r_k = b - A x_k` (updated recursively), the solve stops at the
    first iteration :math:`k` with

    .. math::

        \|r_k\|_2 \le \max(\mathrm{rtol}\,\|b\|_2,\ \mathrm{atol}),

    checked for :math:`k = 0` too, or after ``maxiter`` iterations (``maxiter=None`` means
    ``10 * n``), or when the callback asks to stop. ``rtol = atol = 0`` together with
    ``maxiter=None`` and no callback is refused as having no stopping criterion; pass
    ``maxiter`` to run a fixed number of iterations.

    **Callback** (scipy's conventions). After each iteration :math:`k \ge 1`, a callback with a
    parameter named ``intermediate_result`` (as in ``scipy.optimize.minimize``) is called as
    ``callback(intermediate_result=state)`` with a
    :class:`~secondorder.linalg.cg_callbacks.CGState`: the iteration, the iterate itself
    (not a copy), the residual norms, the step length, the curvature and the values of the
    quadratic model :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x`, computed for free by the
    recurrence :math:`\phi(x_{k+1}) = \phi(x_k) - \alpha_k r_k^\top z_k + \tfrac12 \alpha_k^2
    p_k^\top A p_k` from :math:`\phi(x_0) = -\tfrac12 x_0^\top (b + r_0)`. Any other callable
    is called as ``callback(xk)`` with a copy of the iterate (as ``scipy.sparse.linalg.cg``).
    If the callback returns ``True`` or raises ``StopIteration``, the solve stops with status
    ``CALLBACK`` and returns :math:`x_k`, unless the residual rule holds at :math:`k` too
    (then ``CONVERGED``). Martens' relative-progress rule
    (:class:`~secondorder.linalg.cg_callbacks.MartensStop`) and the iterate snapshots of CG
    backtracking (:class:`~secondorder.linalg.cg_callbacks.IterateGrid`) are such callbacks;
    :class:`~secondorder.linalg.cg_callbacks.CallbackList` combines several.

    **Breakdowns.** If a search direction has numerically non-positive curvature,

    .. math::

        p_k^\top A p_k \le \epsilon_{\mathrm{mach}}\, \rho_{\max}\, \|p_k\|_2^2,
        \qquad \rho_{\max} = \max_{j < k} \frac{p_j^\top A p_j}{\|p_j\|_2^2}

    (curvature below the rounding level of the largest curvature seen; :math:`p_0^\top A p_0
    \le 0` in the first iteration), or a NaN/Inf appears in :math:`A p`, the step or
    :math:`M^{-1} r`, the solve stops at once and returns the last finite iterate;
    ``info.status`` says which. No division by zero happens and no NaN enters ``x``.

    **Through negative curvature** (``negative_curvature="continue"``): a direction with
    :math:`p_k^\top A p_k < 0` is taken with its negative step length
    :math:`\alpha_k = r_k^\top z_k / p_k^\top A p_k`. The iterates stay the Galerkin
    approximations of :math:`A x = b` on :math:`x_0 + \mathcal{K}_k` (residual orthogonal to the
    Krylov space; Paige & Saunders 1975), i.e. stationary points of :math:`\phi` there, which
    reach :math:`A^{-1}b` for an indefinite but invertible :math:`A` (PyTorchHessianFree's rule
    for Hessian-free with the Hessian). Only curvature at the rounding level,
    :math:`|p_k^\top A p_k| \le \epsilon_{\mathrm{mach}} \rho_{\max} \|p_k\|^2` with
    :math:`\rho_{\max}` now the largest :math:`|p_j^\top A p_j| / \|p_j\|^2`, stops the solve
    (``NEGATIVE_CURVATURE``). Such a step has a negative ``step_length`` in the callback's
    state; ``info.negative_curvature_directions`` counts the negative directions taken.

    The solve is not differentiated through: ``b`` and ``x0`` are detached, and neither is
    modified. Besides one product with ``A`` and one application of ``M``, an iteration costs
    five passes over ``n``-vectors (seven with ``M``), all in place, and two host
    synchronisations (the step length is computed on the host).

    Args:
        A: The symmetric matrix: a square :class:`LinearOperator`, a 2-D tensor, or a callable
            mapping a vector of shape ``(n,)`` to ``A v`` (same shape, dtype and device).
        b: Right-hand side, a real floating 1-D tensor of shape ``(n,)``; it sets the dtype and
            device of the solve.
        x0: Initial guess (same shape, dtype and device as ``b``); zeros if ``None``.
        rtol: Relative residual tolerance (``>= 0``; ``inf`` returns ``x0`` at once, as scipy).
        atol: Absolute residual tolerance (``>= 0``; ``inf`` likewise).
        maxiter: Maximal number of iterations (``>= 0``); ``None`` means ``10 * n``.
        M: Preconditioner applying :math:`M^{-1}` (operator, 2-D tensor or callable), symmetric
            positive definite; ``None`` for plain CG.
        callback: Called after each iteration (see *Callback*): as
            ``callback(intermediate_result=state)`` if it has that parameter, else as
            ``callback(x_k)`` with a copy of the iterate; returning ``True`` (or raising
            ``StopIteration``) stops the solve.
        negative_curvature: ``"stop"`` (default) or ``"continue"`` (see above).

    Returns:
        ``(x, info)``: the last accepted iterate (a new tensor) and a :class:`CGInfo`.
        Non-convergence is reported in ``info.status``, never raised.

    Raises:
        ValueError: If ``b``, ``x0``, ``A`` or ``M`` have the wrong type, shape, dtype or
            device, if a callable returns the wrong shape, or if a tolerance, ``maxiter`` or
            ``callback`` is invalid or no stopping criterion is given.

    Example:
        >>> import torch
        >>> from secondorder.linalg.cg import cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, info = cg(A, b, rtol=1e-12)
        >>> info.status.name, torch.allclose(A @ x, b)
        ('CONVERGED', True)
    """
    b = _check_vector(b, "b")
    n = b.shape[0]
    dtype, device = b.dtype, b.device
    rtol_f, atol_f = _check_arguments(rtol, atol, maxiter, callback)
    apply_a = _as_apply(A, "A", n, dtype, device)
    apply_m = None if M is None else _as_apply(M, "M", n, dtype, device)
    if x0 is not None:
        _check_vector(x0, "x0", like=b)
    if negative_curvature not in ("stop", "continue"):
        raise ValueError(
            f"negative_curvature must be 'stop' or 'continue', got {negative_curvature!r}"
        )
    through = negative_curvature == "continue"
    max_it = 10 * n if maxiter is None else maxiter
    wants_state = callback is not None and _wants_state(callback)
    eps = torch.finfo(dtype).eps

    b = b.detach()
    num_matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.detach().clone()
        ax = apply_a(x).detach()
        num_matvecs += 1
        r = b - ax
    z = r if apply_m is None else apply_m(r).detach()
    p = z.clone()
    # the scalars of the start; those known to be equal are not recomputed
    # (r = b without x0, z = r without M, and x^T x = x^T b = x^T r = 0 without x0)
    scalars = [torch.dot(b, b)]
    if x0 is not None:
        scalars += [torch.dot(r, r), torch.dot(x, b), torch.dot(x, r), torch.dot(x, x)]
    if apply_m is not None:
        scalars += [torch.dot(r, z), torch.dot(p, p)]
    values = [v.item() for v in scalars]
    bb_f = values[0]
    rr_f, xb_f, xr_f, xx_f = values[1:5] if x0 is not None else (bb_f, 0.0, 0.0, 0.0)
    rz_f, pp_f = values[-2:] if apply_m is not None else (rr_f, rr_f)
    phi_f = -0.5 * (xb_f + xr_f)
    # an upper bound of ||x_k|| (triangle inequality over the steps): while it stays below
    # the dtype's range, x_k cannot hold an Inf, and no entrywise check is needed at the end
    x_bound = math.sqrt(xx_f) if xx_f >= 0 else math.inf
    x_safe = torch.finfo(dtype).max / 4

    tol = residual_threshold(rtol_f, math.sqrt(bb_f), atol_f) if math.isfinite(bb_f) else atol_f
    residual_norms = [math.sqrt(rr_f) if rr_f >= 0 else math.nan]
    phis = [phi_f]
    it = 0
    msg_kw: dict[str, Any] = {}
    negatives = 0

    def finish(status: SolverStatus) -> tuple[Tensor, CGInfo]:
        nonlocal x, it
        if it > 0 and not x_bound < x_safe and not bool(torch.isfinite(x).all()):
            # a step overflowed (alpha * p beyond the dtype's range): never hand out Inf/NaN
            x = torch.zeros_like(b) if x0 is None else x0.detach().clone()
            del residual_norms[1:], phis[1:]
            msg_kw["where"] = "the iterate (a step overflowed; x was reset to x0)"
            msg_kw["next"] = it
            it = 0
            status = SolverStatus.NONFINITE
        message = _message(status, tol=tol, it=it, res=residual_norms[-1], **msg_kw)
        info = CGInfo(
            iterations=it,
            status=status,
            message=message,
            residual_norms=residual_norms,
            quadratic_values=phis,
            tol=tol,
            num_matvecs=num_matvecs,
            negative_curvature_directions=negatives,
        )
        return x, info

    if not all(math.isfinite(v) for v in (bb_f, rr_f, phi_f)):
        msg_kw["where"] = "b, the initial residual b - A x0 or its norm"
        msg_kw["next"] = 0
        return finish(SolverStatus.NONFINITE)
    if residual_norms[0] <= tol:
        return finish(SolverStatus.CONVERGED)
    if not (math.isfinite(rz_f) and math.isfinite(pp_f)):
        msg_kw["where"] = "M^-1 r"
        msg_kw["next"] = 0
        return finish(SolverStatus.NONFINITE)
    if rz_f <= 0:
        msg_kw["rz"] = rz_f
        return finish(SolverStatus.INDEFINITE_PRECONDITIONER)

    rho_max = 0.0  # largest Rayleigh quotient p^T A p / p^T p seen so far
    for i in range(1, max_it + 1):
        ap = apply_a(p)
        num_matvecs += 1
        if ap.requires_grad:
            ap = ap.detach()
        if apply_m is None:  # ||p||^2 is known from the recurrence below
            pap_f = torch.dot(p, ap).item()
        else:
            pap_f, pp_f = torch.dot(p, ap).item(), torch.dot(p, p).item()
        # the step is refused (x stays exactly as it is) for rounding-level or NaN curvature
        threshold = eps * rho_max * pp_f
        if through:
            accept = abs(pap_f) > threshold and pap_f != 0
        else:
            accept = pap_f > threshold
        alpha_f = rz_f / pap_f if accept else 0.0
        if not (accept and math.isfinite(alpha_f)):
            msg_kw["next"] = i
            if math.isfinite(pap_f):
                msg_kw["curv"] = pap_f
                return finish(SolverStatus.NEGATIVE_CURVATURE)
            msg_kw["where"] = "A p"
            return finish(SolverStatus.NONFINITE)
        if pp_f > 0:
            rho_max = max(rho_max, abs(pap_f) / pp_f)
        if alpha_f < 0:
            negatives += 1
        x.add_(p, alpha=alpha_f)
        r.add_(ap, alpha=-alpha_f)
        x_bound += abs(alpha_f) * math.sqrt(pp_f)
        if apply_m is None:
            z = r
            rz_new_f = rr_f = torch.dot(r, r).item()
        else:
            z = apply_m(r).detach()
            rz_new_f, rr_f = torch.dot(r, z).item(), torch.dot(r, r).item()
        # phi(x + a p) = phi(x) - a p^T r + a^2 p^T A p / 2, and p^T r = r^T z in CG
        phi_f = phis[-1] - alpha_f * rz_f + 0.5 * alpha_f * alpha_f * pap_f
        if not (math.isfinite(rr_f) and math.isfinite(phi_f)):
            # the accepted step overflowed; never hand out a non-finite x
            it = i
            residual_norms.append(math.sqrt(rr_f) if rr_f >= 0 else math.nan)
            phis.append(phi_f)
            msg_kw["where"] = "the residual"
            msg_kw["next"] = i
            return finish(SolverStatus.NONFINITE)

        it = i
        res = math.sqrt(rr_f)
        residual_norms.append(res)
        phis.append(phi_f)
        stop = False
        if callback is not None:
            try:
                if wants_state:
                    state = CGState(i, x, residual_norms, phis, alpha_f, pap_f)
                    stop = callback(intermediate_result=state) is True
                else:
                    stop = callback(x.clone()) is True
            except StopIteration:
                stop = True

        if res <= tol:
            return finish(SolverStatus.CONVERGED)
        if stop:
            return finish(SolverStatus.CALLBACK)
        if not math.isfinite(rz_new_f):
            msg_kw["where"] = "M^-1 r or the search direction"
            return finish(SolverStatus.NONFINITE)
        if rz_new_f <= 0:
            msg_kw["rz"] = rz_new_f
            return finish(SolverStatus.INDEFINITE_PRECONDITIONER)
        beta = rz_new_f / rz_f
        torch.add(z, p, alpha=beta, out=p)  # p = z + beta p
        if apply_m is None:
            # ||p_new||^2 = ||r||^2 + beta^2 ||p||^2, since r is orthogonal to the old p
            pp_f = rr_f + beta * beta * pp_f
            if not math.isfinite(pp_f):
                msg_kw["where"] = "the search direction"
                return finish(SolverStatus.NONFINITE)
        rz_f = rz_new_f

    return finish(SolverStatus.MAXITER)
