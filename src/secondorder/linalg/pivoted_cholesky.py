r"""The partial pivoted Cholesky preconditioner.

:class:`PivotedCholeskyPreconditioner` factors :math:`A \approx L L^\top` of rank :math:`r`
from the diagonal and :math:`r` columns of :math:`A` and applies
:math:`(L L^\top + \mu I)^{-1}` by the Woodbury identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _check_damping, _check_operator, _check_rank, _check_tol
from .errors import NonFiniteError
from .operator import Dense, Diagonal, LinearOperator

__all__ = ["PivotedCholeskyPreconditioner"]


def _pivoted_cholesky(
    op: LinearOperator, d: Tensor, rank: int, stop: float
) -> tuple[Tensor, list[int]]:
    r"""Greedy pivoted Cholesky :math:`A \approx L L^\top` from the diagonal ``d`` (overwritten).

    Step :math:`k` pivots on :math:`i_k = \arg\max_i d_i`, computes
    :math:`L_{:,k} = (A e_{i_k} - L_{:,<k} L_{i_k,<k}^\top) / \sqrt{d_{i_k}}` with one product
    and updates :math:`d \leftarrow d - L_{:,k}^{\odot 2}` (clamped at 0, pivots set to 0).
    It stops after ``rank`` columns or before a step whose :math:`\max_i d_i \le`
    ``stop`` (or :math:`\le 0`).

    Returns:
        ``(L, pivots)`` with ``L`` of shape ``(n, k)``, ``k <= rank``.
    """
    n = op.shape[0]
    L = torch.zeros(n, rank, dtype=op.dtype, device=op.device)
    e = torch.zeros(n, dtype=op.dtype, device=op.device)
    pivots: list[int] = []
    for k in range(rank):
        dmax, idx = torch.max(d, 0)
        i, dmax_f = int(idx), float(dmax)
        if dmax_f <= stop or dmax_f <= 0:
            break
        e[i] = 1.0
        col = op.matvec(e).detach()
        e[i] = 0.0
        if k:
            col = col - L[:, :k] @ L[i, :k]
        col = col / math.sqrt(dmax_f)
        L[:, k] = col
        pivots.append(i)
        d.sub_(col.square()).clamp_min_(0.0)
        d[pivots] = 0.0
    return L[:, : len(pivots)].contiguous(), pivots


class PivotedCholeskyPreconditioner(LinearOperator):
    r"""Partial pivoted Cholesky preconditioner :math:`(L L^\top + \mu I)^{-1}`.

    The greedy pivoted Cholesky factorisation picks, at step :math:`k`, the index :math:`i_k`
    with the largest remaining diagonal :math:`d_i = A_{ii} - \sum_{j<k} L_{ij}^2` and sets

    .. math::

        L_{:,k} = \frac{A e_{i_k} - L_{:,<k} L_{i_k,<k}^\top}{\sqrt{d_{i_k}}},
        \qquad d \leftarrow d - L_{:,k}^{\odot 2},

    so it needs the diagonal of :math:`A` and :math:`r` columns :math:`A e_{i_k}`. The vector
    :math:`d` is the diagonal of the residual :math:`A - L L^\top` (which is SPSD), and the
    factorization stops before step :math:`k < r` if its largest entry is small relative to
    the largest diagonal entry of :math:`A`:

    .. math::

        \max_i d_i^{(k)} \le \tau \max_i A_{ii}, \qquad
        \tau = 100\, \epsilon_{\mathrm{mach}} \ \text{by default},

    since then :math:`|(A - L L^\top)_{ij}| \le \sqrt{d_i d_j} \le \tau \max_i A_{ii}`
    entrywise (Cauchy-Schwarz for the SPSD residual). The default :math:`\tau` is the rounding
    level of :math:`d`: the rounded updates :math:`d_i - \sum_{j<k} L_{ij}^2` carry errors up
    to about :math:`k\,\epsilon_{\mathrm{mach}} A_{ii}` (a partial-factorization analogue of
    LAPACK ``xPSTRF``'s :math:`n\,\epsilon_{\mathrm{mach}} \max_i A_{ii}`), so a low-rank
    :math:`A` stops at its numerical rank, while the requested rank is reached whenever the
    residual is still resolved. The threshold does not grow with :math:`n` or with the
    requested rank (an older rule, :math:`n\,\epsilon_{\mathrm{mach}} \operatorname{tr}(A)`,
    stopped a float32 GGN with :math:`n = 41{,}805` at rank 4). The inverse is applied by the
    Woodbury identity with an :math:`r \times r` Cholesky factor:

    .. math::

        (L L^\top + \mu I)^{-1} = \mu^{-1}\left(I - L (\mu I_r + L^\top L)^{-1} L^\top\right).

    Args:
        A: The SPSD matrix, a square :class:`LinearOperator` or 2-D tensor (without the
            damping).
        rank: Maximal rank :math:`r` of :math:`L`, ``1 <= rank <= n``.
        damping: The shift :math:`\mu > 0` (:math:`L L^\top` alone is singular for
            :math:`r < n`).
        diagonal: :math:`\operatorname{diag}(A)` if known (e.g. from an estimator). If
            ``None`` it is read from a :class:`Dense` or :class:`Diagonal` operator, and
            otherwise computed with :math:`n` products (``A @ I`` in chunks), which is only
            sensible for small :math:`n`.
        tol: The relative tolerance :math:`\tau \ge 0` of the stopping rule above (``None``:
            :math:`100\, \epsilon_{\mathrm{mach}}` of ``A``'s dtype; ``0``: stop only at
            rank :math:`r` or when the residual diagonal is exactly zero).

    Attributes:
        factor: :math:`L`, shape ``(n, k)`` with ``k <= rank``.
        pivots: The chosen indices :math:`i_0, \dots, i_{k-1}`.
        tol: The relative tolerance :math:`\tau` used.

    Raises:
        ValueError: If ``A`` is not a square floating operator, ``rank`` is out of range,
            ``damping <= 0``, ``tol`` is negative or not finite, or ``diagonal`` has the wrong
            shape, dtype or device, or contains NaN, Inf or entries below
            :math:`-\sqrt{\epsilon}\max_i |A_{ii}|`.
        NonFiniteError: (a ``ValueError``) If the diagonal or a column :math:`A e_i` holds
            NaN/Inf.

    References:
        H. Harbrecht, M. Peters, R. Schneider, "On the low-rank approximation by the pivoted
        Cholesky decomposition", Appl. Numer. Math. 62(4), 2012.
        J. Gardner et al., "GPyTorch: Blackbox matrix-matrix Gaussian process inference with
        GPU acceleration", NeurIPS 2018 (pivoted Cholesky as a CG preconditioner).
    """

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(
        self,
        A: LinearOperator | Tensor,
        rank: int,
        damping: float,
        diagonal: Tensor | None = None,
        tol: float | None = None,
    ) -> None:
        name = "PivotedCholeskyPreconditioner"
        op = _check_operator(A, name)
        n = op.shape[0]
        r = _check_rank(rank, n, name)
        mu = _check_damping(damping, name, positive=True)
        tau = _check_tol(tol, 100.0 * torch.finfo(op.dtype).eps, name)
        super().__init__(op.shape, op.dtype, op.device)
        eps = torch.finfo(op.dtype).eps

        d = self._diagonal(op, diagonal, name)
        scale = float(d.abs().max()) if n else 0.0
        if float(d.min()) < -math.sqrt(eps) * scale:
            raise ValueError(
                f"{name}: diagonal entries must be >= 0 for an SPSD matrix, got a minimum of "
                f"{float(d.min()):.3e}"
            )
        d = d.clamp_min(0.0)
        L, pivots = _pivoted_cholesky(op, d, r, tau * float(d.max()) if n else 0.0)
        if not bool(torch.isfinite(L).all()):
            raise NonFiniteError(f"{name}: the columns A e_i hold NaN/Inf")
        self.damping = mu
        self.tol = tau
        self.factor = L
        self.pivots = pivots
        core = L.T @ L
        core.diagonal().add_(mu)
        self._core_chol = torch.linalg.cholesky(core)

    @staticmethod
    def _diagonal(op: LinearOperator, diagonal: Tensor | None, name: str) -> Tensor:
        n = op.shape[0]
        if diagonal is not None:
            if (
                not isinstance(diagonal, Tensor)
                or diagonal.shape != (n,)
                or diagonal.dtype != op.dtype
                or diagonal.device != op.device
            ):
                got = (
                    f"shape {tuple(diagonal.shape)}, dtype {diagonal.dtype}, device "
                    f"{diagonal.device}"
                    if isinstance(diagonal, Tensor)
                    else type(diagonal).__name__
                )
                raise ValueError(
                    f"{name}: expected diagonal of shape ({n},), dtype {op.dtype} and device "
                    f"{op.device}, got {got}"
                )
            d = diagonal.detach().clone()
        elif isinstance(op, Dense):
            d = op.matrix.detach().diagonal().clone()
        elif isinstance(op, Diagonal):
            d = op.diagonal.detach().clone()
        else:
            d = torch.empty(n, dtype=op.dtype, device=op.device)
            chunk = 256
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                eye = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
                cols = torch.arange(stop - start, device=op.device)
                eye[start + cols, cols] = 1.0
                d[start:stop] = op.matvec(eye).detach()[start + cols, cols]
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteError(f"{name}: the diagonal of A contains NaN or Inf")
        return d

    @property
    def rank(self) -> int:
        """Number of columns of the factor :math:`L` (at most the requested rank)."""
        return int(self.factor.shape[1])

    def _matmat(self, X: Tensor) -> Tensor:
        L = self.factor
        w = torch.cholesky_solve(L.T @ X, self._core_chol)
        return (X - L @ w) / self.damping

    def _matvec(self, x: Tensor) -> Tensor:
        return self._matmat(x.unsqueeze(1)).squeeze(1)
