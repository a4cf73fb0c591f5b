r"""Lanczos eigen-solver for symmetric linear operators.

Three entry points share one kernel, the Lanczos process with full reorthogonalization:

- :func:`lanczos_tridiag` runs a fixed number of steps and returns the decomposition

  .. math::

      A Q = Q T + r e_m^\top, \qquad Q^\top Q = I_m, \qquad Q^\top r = 0,

  with :math:`T` symmetric tridiagonal. Several start vectors run as independent recurrences
  that share one ``A @ X`` per step (this is what stochastic Lanczos quadrature needs).
- :func:`lanczos` computes ``k`` extreme eigenpairs by thick-restart (block) Lanczos, checking
  the Ritz residual bounds after every product, so it stops as soon as the wanted pairs are
  accurate.
- :func:`eigmax` estimates the largest eigenvalue (for step sizes and damping).

All of them assume :math:`A = A^\top`; this is not checked (many operators, such as products of
symmetric factors, do not declare ``SELF_ADJOINT``). Applied to a non-symmetric operator they
return the eigenpairs of the symmetric part of its projection, which is rarely what one wants.

Besides the products with ``A``, a step costs a few dense ``(n, m)`` matrix-vector products
(Gram-Schmidt) and an eigendecomposition of an ``m x m`` matrix (in NumPy, float64).

References:
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
    SIAM J. Matrix Anal. Appl. 22 (2000).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .checks import _check_int, _check_start, _generator, _square_operator
from .errors import NonFiniteError
from .krylov import _randn
from .operator import LinearOperator
from .precision import full_precision
from .status import SolverStatus
from .thick_restart import _restarted_lanczos, _wanted
from .tridiagonal import LanczosDecomposition, lanczos_tridiag

__all__ = [
    "LanczosDecomposition",
    "LanczosInfo",
    "eigmax",
    "lanczos",
    "lanczos_tridiag",
]

Which = Literal["largest", "smallest", "both"]
_WHICH = ("largest", "smallest", "both")


# --------------------------------------------------------------------- helpers


# ------------------------------------------------------------ the decomposition


# ------------------------------------------------------------- the eigensolver
@dataclass(frozen=True)
class LanczosInfo:
    r"""Diagnostics of :func:`lanczos`.

    Attributes:
        converged: Whether every wanted Ritz pair met
            :math:`\lVert B E^\top s_i \rVert \le \max(\mathrm{tol}\,|\theta_i|,
            \varepsilon\lVert T\rVert)`.
        num_converged: How many of the ``k`` wanted pairs met it.
        num_matvecs: Number of operator-vector products (a block of ``b`` counts ``b``).
        num_restarts: Number of thick restarts.
        residual_bounds: ``(k,)`` bounds on :math:`\lVert A y_i - \theta_i y_i \rVert`, in the
            order of the returned eigenvalues (computed in float64).
        message: Why the iteration stopped, and what to try if it did not converge.
        status: ``SolverStatus.CONVERGED``, ``SolverStatus.MAXITER`` (not converged within
            ``maxiter``) or ``SolverStatus.NONFINITE`` (a product with ``A`` held NaN/Inf; the
            returned eigenpairs are NaN).
    """

    converged: bool
    num_converged: int
    num_matvecs: int
    num_restarts: int
    residual_bounds: Tensor
    message: str
    status: SolverStatus = SolverStatus.CONVERGED


def _dense_eigh(
    op: LinearOperator, k: int, which: str, matvecs: int = 0, restarts: int = 0
) -> tuple[Tensor, Tensor, LanczosInfo]:
    n = op.shape[0]
    D = op.to_dense()
    D64 = ((D + D.T) / 2).to(torch.float64)
    if not bool(torch.isfinite(D64).all()):
        return _nonfinite_result(op, k, matvecs + n, restarts)
    theta, S = torch.linalg.eigh(D64)
    idx = torch.from_numpy(_wanted(theta.cpu().numpy(), k, which)).to(theta.device)
    evals, evecs = theta[idx], S[:, idx]
    bounds = (D64 @ evecs - evecs * evals).norm(dim=0).cpu()
    info = LanczosInfo(
        converged=True,
        num_converged=k,
        num_matvecs=matvecs + n,
        num_restarts=restarts,
        residual_bounds=bounds,
        message=(
            f"n={n} is small: solved densely with {n} products"
            + (f" after {matvecs} Lanczos products did not converge" if matvecs else "")
        ),
    )
    return evals.to(op.dtype), evecs.to(op.dtype), info


def _nonfinite_result(
    op: LinearOperator, k: int, matvecs: int, restarts: int, what: str = "a product with A"
) -> tuple[Tensor, Tensor, LanczosInfo]:
    """NaN eigenpairs and an info with ``status=NONFINITE`` (``what`` held NaN/Inf)."""
    n = op.shape[0]
    info = LanczosInfo(
        converged=False,
        num_converged=0,
        num_matvecs=matvecs,
        num_restarts=restarts,
        residual_bounds=torch.full((k,), math.nan, dtype=torch.float64),
        message=(
            f"{what} held NaN/Inf after {matvecs} products: no eigenpairs; check the operator "
            "and v0 for NaN/Inf (or use float64 if the products overflow)"
        ),
        status=SolverStatus.NONFINITE,
    )
    nan = math.nan
    evals = torch.full((k,), nan, dtype=op.dtype, device=op.device)
    return evals, torch.full((n, k), nan, dtype=op.dtype, device=op.device), info


@overload
def lanczos(
    A: Any,
    k: int,
    which: Which = ...,
    *,
    tol: float = ...,
    maxiter: int | None = ...,
    v0: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    ncv: int | None = ...,
    block_size: int = ...,
    return_info: Literal[False] = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def lanczos(
    A: Any,
    k: int,
    which: Which = ...,
    *,
    tol: float = ...,
    maxiter: int | None = ...,
    v0: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    ncv: int | None = ...,
    block_size: int = ...,
    return_info: Literal[True],
) -> tuple[Tensor, Tensor, LanczosInfo]: ...


@full_precision
def lanczos(
    A: Any,
    k: int,
    which: Which = "largest",
    *,
    tol: float = 1e-6,
    maxiter: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    return_info: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, LanczosInfo]:
    r"""Compute ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    The Krylov basis :math:`Q` (at most ``ncv`` columns) grows by one block of ``block_size``
    vectors per step, fully reorthogonalized: the three-term recurrence, then one full
    classical Gram-Schmidt pass, and a second one only where the
    Daniel-Gragg-Kaufman-Stewart criterion asks for it (see :func:`_orthogonalize`). The projected
    matrix :math:`T = Q^\top A Q` satisfies :math:`A Q = Q T + V B E^\top` with the next block
    :math:`V`, so the Ritz pair :math:`(\theta_i, Q s_i)` has residual norm
    :math:`\lVert B E^\top s_i \rVert` (for ``block_size=1``: :math:`|\beta_m s_{m,i}|`).
    After every step the wanted pairs are tested against

    .. math::

        \lVert B E^\top s_i \rVert \le
        \max\bigl(\mathrm{tol} \cdot |\theta_i|,\; \varepsilon \max_j |\theta_j|\bigr),

    where :math:`\varepsilon` is the machine epsilon of ``A.dtype`` (the floor keeps the test
    attainable for eigenvalues near zero). The iteration stops as soon as all wanted pairs
    pass, or after ``maxiter`` products. When
    the basis is full it is restarted with the wanted Ritz vectors and about half of the
    remaining nearest ones (Wu and Simon's thick restart). An invariant subspace (zero
    residual) ends the iteration with exact eigenpairs, or continues with a fresh random
    direction while fewer than ``k`` Ritz values exist. (A random start vector touches every
    eigenspace, so its invariant subspace holds all distinct eigenvalues; a ``v0`` of your
    own that lies in a small invariant subspace yields exact but not necessarily extreme
    eigenpairs.) For small ``n``, if ``n`` products have not sufficed and ``maxiter`` allows
    ``n`` more, the operator is materialized and solved densely instead.

    Symmetry of ``A`` is assumed, not checked. A single start vector cannot reliably resolve
    the multiplicity of a repeated eigenvalue (neither can ARPACK's): in exact arithmetic its
    Krylov space holds one direction per distinct eigenvalue, and the other copies enter only
    through rounding errors. Pass ``block_size`` at least the largest multiplicity that
    matters when eigenvalues may repeat exactly.

    Args:
        A: A square, symmetric :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D
            tensor).
        k: Number of eigenpairs, ``1 <= k <= n``.
        which: ``"largest"`` or ``"smallest"`` (algebraic), or ``"both"``: the ``k // 2``
            smallest and the ``k - k // 2`` largest.
        tol: Relative tolerance on the Ritz residuals (see above); ``0`` means machine
            precision of ``A.dtype``.
        maxiter: Maximum number of products with ``A`` (default ``100 * ncv``).
        v0: Start vector ``(n,)`` or start block ``(n, block_size)`` (default: Gaussian from
            ``generator``). Not modified.
        generator: Source of the random start vector and of fresh directions after a
            breakdown. ``None`` uses a generator seeded with 0, never the global RNG.
        ncv: Maximal basis size, ``k + block_size <= ncv <= n`` (default
            ``max(2 k + 1, 30) * block_size``, or ``n`` if that exceeds ``n - block_size``;
            ARPACK's ``max(2 k + 1, 20)`` restarts a curvature operator's top-5 problem that
            needs ~21 products once, and rows of the basis that are never reached cost no
            memory traffic). Larger means fewer products and restarts, more memory
            (``n * ncv``). If
            ``ncv > n - block_size`` the operator is materialized (``n`` products) and solved
            densely.
        block_size: Number of vectors per Lanczos block (products per step).
        return_info: Also return a :class:`LanczosInfo`.

    Returns:
        ``(evals, evecs)``: eigenvalues ``(k,)`` in ascending order and orthonormal
        eigenvectors ``(n, k)`` as columns (from the iteration a transposed view of a
        ``(k, n)`` tensor, so each eigenvector is contiguous), in ``A``'s dtype; with
        ``return_info=True`` also the :class:`LanczosInfo`. If the iteration does not
        converge, the current Ritz pairs are returned and a ``RuntimeWarning`` is issued
        unless ``return_info=True``. If ``v0`` or a product with ``A`` holds NaN/Inf, the
        eigenpairs are NaN and ``info.status`` is ``SolverStatus.NONFINITE`` with
        ``return_info=True``; without it
        :class:`~secondorder.linalg.errors.NonFiniteError` is raised.

    Raises:
        TypeError: If ``A`` is not an operator, an integer argument is not an int, or
            ``generator`` is not a ``torch.Generator``.
        ValueError: If ``A`` is not square, ``k`` is out of range, ``which`` is unknown,
            ``tol < 0``, ``ncv``/``maxiter``/``block_size`` are out of range, or ``v0`` has the
            wrong shape, dtype or device.
        NonFiniteError: Without ``return_info``, if ``v0`` or a product with ``A`` holds
            NaN/Inf (with it, ``info.status`` says so).

    Example:
        >>> import torch
        >>> from secondorder.linalg.lanczos import lanczos
        >>> M = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> evals, evecs = lanczos(M, 3)
        >>> evals.round(decimals=6)
        tensor([ 98.,  99., 100.], dtype=torch.float64)
        >>> evecs.shape
        torch.Size([100, 3])
    """
    op = _square_operator(A, "lanczos")
    n = op.shape[0]
    _check_int(k, "k", "lanczos", 1, n)
    if which not in _WHICH:
        raise ValueError(f"lanczos: expected which in {_WHICH}, got {which!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"lanczos: expected a float tol >= 0, got {tol!r}")
    b = _check_int(block_size, "block_size", "lanczos", 1, n)
    if ncv is None:
        ncv = max(2 * k + 1, 30) * b
        if ncv > n - b:
            ncv = n  # the basis would span (nearly) everything: solve densely
    else:
        _check_int(ncv, "ncv", "lanczos", k + b, n)
    if maxiter is None:
        maxiter = 100 * ncv
    min_iter = b * math.ceil(k / b)
    _check_int(maxiter, "maxiter", "lanczos", min_iter)
    gen = _generator(generator, "lanczos")
    if v0 is not None:
        try:
            _check_start(v0, op, "lanczos", (0, b) if b > 1 else (0, 1))
        except NonFiniteError:
            if not return_info:
                raise
            return _nonfinite_result(op, k, 0, 0, what="v0")
    if ncv > n - b:
        evals, evecs, info = _dense_eigh(op, k, which)
        return _checked(evals, evecs, info, return_info)

    rtol = float(tol) if tol > 0 else torch.finfo(op.dtype).eps
    with torch.no_grad():
        if v0 is None:
            start = _randn(n, b, op, gen)
        elif v0.ndim == 1 and b > 1:
            start = torch.cat([v0.unsqueeze(1), _randn(n, b - 1, op, gen)], dim=1)
        else:
            start = v0.reshape(n, b)
        run = _restarted_lanczos(op, k, which, rtol, maxiter, ncv, start, gen)
    if run.nonfinite:
        evals, evecs, info = _nonfinite_result(op, k, run.matvecs, run.restarts)
        return _checked(evals, evecs, info, return_info)
    if run.fallback:  # n products did not suffice: materializing A is cheaper from here on
        evals, evecs, info = _dense_eigh(op, k, which, run.matvecs, run.restarts)
        return _checked(evals, evecs, info, return_info)
    num_ok = int(run.ok.sum())
    if run.converged:
        message = f"converged: {k} Ritz pairs after {run.matvecs} products"
    else:
        message = (
            f"not converged: {num_ok} of {k} Ritz pairs met tol={tol:g} after {run.matvecs} "
            f"products (maxiter={maxiter}); try increasing maxiter or ncv, or loosening tol"
        )
    info = LanczosInfo(
        converged=run.converged,
        num_converged=num_ok,
        num_matvecs=run.matvecs,
        num_restarts=run.restarts,
        residual_bounds=torch.from_numpy(run.bounds),
        message=message,
        status=SolverStatus.CONVERGED if run.converged else SolverStatus.MAXITER,
    )
    out_evals = torch.from_numpy(run.evals).to(device=op.device, dtype=op.dtype)
    if return_info:
        return out_evals, run.evecs, info
    if not run.converged:
        warnings.warn(f"lanczos: {message}", RuntimeWarning, stacklevel=2)
    return out_evals, run.evecs


def _checked(
    evals: Tensor, evecs: Tensor, info: LanczosInfo, return_info: bool
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, LanczosInfo]:
    """The result of :func:`lanczos`; without ``return_info`` a non-finite one raises."""
    if return_info:
        return evals, evecs, info
    if info.status == SolverStatus.NONFINITE:
        raise NonFiniteError(f"lanczos: {info.message}")
    return evals, evecs


@full_precision
def eigmax(
    A: Any,
    *,
    tol: float = 1e-3,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    r"""Estimate the largest (algebraic) eigenvalue :math:`\lambda_{\max}` of a symmetric ``A``.

    Runs :func:`lanczos` with ``k=1``. The Ritz value :math:`\theta` is a lower bound of
    :math:`\lambda_{\max}` and lies within :math:`\mathrm{tol}\,|\theta|` of an eigenvalue
    (of :math:`\lambda_{\max}` unless the start vector is nearly orthogonal to its
    eigenvector); for a simple eigenvalue the error is even quadratic in the residual.

    Args:
        A: A square, symmetric :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D
            tensor).
        tol: Relative residual tolerance, as in :func:`lanczos`.
        maxiter: Maximum number of products (default: that of :func:`lanczos`).
        generator: Source of the random start vector (``None``: seeded with 0).

    Returns:
        The estimate, as a Python float. A ``RuntimeWarning`` is issued if it did not reach
        ``tol``.

    Raises:
        TypeError: As :func:`lanczos`.
        ValueError: As :func:`lanczos`.
        NonFiniteError: If a product with ``A`` holds NaN/Inf.
    """
    evals, _, info = lanczos(
        A, 1, "largest", tol=tol, maxiter=maxiter, generator=generator, return_info=True
    )
    if info.status == SolverStatus.NONFINITE:
        raise NonFiniteError(f"eigmax: {info.message}")
    if not info.converged:
        warnings.warn(f"eigmax: {info.message}", RuntimeWarning, stacklevel=2)
    return float(evals[0])
