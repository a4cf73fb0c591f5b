r"""The plain Lanczos tridiagonalisation :func:`lanczos_tridiag` (for quadrature and SLQ).

``num_steps`` steps of Lanczos with full reorthogonalisation from given start vectors, the
basis, the tridiagonal coefficients and the next residual; no restarts, no eigenpairs
(:func:`~secondorder.linalg.lanczos.lanczos` computes those).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .checks import _check_int, _check_start, _square_operator
from .errors import NonFiniteError
from .krylov import _breakdown_tol

__all__ = ["LanczosDecomposition", "lanczos_tridiag"]


class LanczosDecomposition(NamedTuple):
    r"""The result of :func:`lanczos_tridiag`: :math:`A Q = Q T + r e_m^\top`.

    For a single start vector the fields have shapes ``Q: (n, m)``, ``alpha: (m,)``,
    ``beta: (m - 1,)`` and ``residual: (n,)``; for ``b`` start vectors a leading batch
    dimension is added (``Q: (b, n, m)`` and so on).

    Attributes:
        Q: Orthonormal Lanczos vectors; ``Q[..., 0]`` is the normalized start vector.
        alpha: Diagonal of :math:`T`.
        beta: Off-diagonal of :math:`T`.
        residual: :math:`r = \beta_m q_{m+1}`, orthogonal to ``Q``.
    """

    Q: Tensor
    alpha: Tensor
    beta: Tensor
    residual: Tensor

    def tridiagonal(self) -> Tensor:
        """Return the dense symmetric tridiagonal :math:`T` (batched like ``alpha``).

        Returns:
            ``T`` of shape ``(..., m, m)``.
        """
        return (
            torch.diag_embed(self.alpha)
            + torch.diag_embed(self.beta, offset=1)
            + torch.diag_embed(self.beta, offset=-1)
        )


def lanczos_tridiag(A: Any, num_steps: int, v0: Tensor) -> LanczosDecomposition:
    r"""Run ``num_steps`` steps of Lanczos with full reorthogonalization from ``v0``.

    Computes :math:`A Q = Q T + r e_m^\top` with orthonormal :math:`Q` whose first column is
    :math:`v_0 / \lVert v_0 \rVert`, symmetric tridiagonal :math:`T` and :math:`Q^\top r = 0`.
    Each step reorthogonalizes the new direction against all previous ones by two passes of
    classical Gram-Schmidt in block form. When the Krylov space becomes invariant
    (:math:`\beta_j \le 10\sqrt{j}\,\varepsilon \max_i \lVert A q_i \rVert`) the process stops:
    for a single start vector the result is truncated to the ``m < num_steps`` steps taken
    (so :math:`T` is exact); for a batch, the finished columns are padded with zero vectors,
    ``alpha = beta = 0`` and ``residual = 0``, which keeps the relation valid.

    Args:
        A: A square, symmetric :class:`~secondorder.linalg.operator.LinearOperator` (or 2-D
            tensor). Symmetry is assumed, not checked.
        num_steps: Number of steps ``m >= 1`` (capped at ``n``).
        v0: Start vector ``(n,)``, or ``b`` start vectors ``(n, b)`` run as independent
            recurrences that share one ``A @ X`` per step. Not modified.

    Returns:
        A :class:`LanczosDecomposition`; batched outputs put the batch dimension first.

    Raises:
        TypeError: If ``A`` is not an operator or ``num_steps`` is not an int.
        ValueError: If ``A`` is not square, ``num_steps < 1``, or ``v0`` has the wrong shape,
            dtype or device, or has a zero column.
        NonFiniteError: If ``v0`` or a product with ``A`` holds NaN/Inf (a ``ValueError``
            and a ``FloatingPointError``).
    """
    op = _square_operator(A, "lanczos_tridiag")
    n = op.shape[0]
    _check_int(num_steps, "num_steps", "lanczos_tridiag", 1)
    _check_start(v0, op, "lanczos_tridiag", (0, -1))
    single = v0.ndim == 1
    V = v0.unsqueeze(1) if single else v0
    norms = V.norm(dim=0)
    if bool((norms == 0).any()) or V.shape[1] == 0:
        raise ValueError("lanczos_tridiag: expected nonzero start vectors, got a zero column")
    m = min(num_steps, n)
    b = V.shape[1]
    with torch.no_grad():
        Q = torch.zeros(b, n, m, dtype=op.dtype, device=op.device)
        alpha = torch.zeros(b, m, dtype=op.dtype, device=op.device)
        beta = torch.zeros(b, m, dtype=op.dtype, device=op.device)
        anorm = torch.zeros(b, dtype=op.dtype, device=op.device)
        active = torch.ones(b, dtype=torch.bool, device=op.device)
        q = V / norms
        w = q
        steps = m
        for j in range(m):
            Q[:, :, j] = q.T
            w = op @ q
            anorm = torch.maximum(anorm, w.norm(dim=0))
            Qj = Q[:, :, : j + 1]
            wt = w.T.unsqueeze(2)
            h = Qj.mT @ wt
            wt = wt - Qj @ h
            h2 = Qj.mT @ wt
            wt = wt - Qj @ h2
            alpha[:, j] = (h + h2)[:, j, 0]
            w = wt.squeeze(2).T
            bnorm = w.norm(dim=0)
            broke = bnorm <= _breakdown_tol(op.dtype, j + 1) * anorm
            if single and bool(broke[0]):
                steps = j + 1
                break
            active = active & ~broke
            beta[:, j] = torch.where(active, bnorm, torch.zeros_like(bnorm))
            if j + 1 < m:
                q = torch.where(active, w / torch.where(active, bnorm, 1.0), 0.0)
                w = torch.where(active, w, 0.0)
        if not bool(torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
            raise NonFiniteError(
                "lanczos_tridiag: the operator's products hold NaN/Inf; check the operator "
                "(or use float64 if they overflow)"
            )
        if single:
            return LanczosDecomposition(
                Q[0, :, :steps], alpha[0, :steps], beta[0, : steps - 1], w[:, 0]
            )
        return LanczosDecomposition(Q, alpha, beta[:, : m - 1], w.T.contiguous())
