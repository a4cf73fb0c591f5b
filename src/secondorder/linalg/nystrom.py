r"""The randomized Nyström preconditioner (Frangella, Tropp, Udell 2023).

:class:`NystromPreconditioner` applies the inverse of a rank-:math:`r` Nyström approximation of
:math:`A + \mu I`, built from one product of :math:`A` with an :math:`n \times r` sketch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _check_damping, _check_operator, _check_rank
from .errors import NonFiniteError
from .operator import LinearOperator

__all__ = ["NystromPreconditioner"]


def _times_inverse_transpose(a: Tensor, chol: Tensor) -> Tensor:
    r""":math:`A C^{-\top}` for a tall ``(n, r)`` matrix and a small lower-triangular ``C``.

    Through the explicit inverse of the ``r x r`` triangle and one ``(n, r) @ (r, r)`` product
    (a matrix product instead of a triangular solve with ``n`` right-hand sides).
    """
    eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return a @ inv.T.to(a.dtype)


def _orthonormal_columns(a: Tensor) -> Tensor:
    """Orthonormal basis of the columns of a tall ``(n, r)`` matrix by Cholesky-QR.

    Two passes of ``Q = A R^{-1}`` with ``R`` the Cholesky factor of the small ``A^T A``
    (formed in float64): a few ``n x r`` passes instead of a Householder QR, which is 10x
    slower for ``n >> r`` on the CPU. Falls back to ``torch.linalg.qr`` if the Gram matrix is
    not numerically positive definite.
    """
    q = a
    for _ in range(2):
        gram = (q.T @ q).double()
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            return torch.linalg.qr(a).Q
        q = _times_inverse_transpose(q, chol)
    return q


def _thin_svd(b: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of a tall ``(n, r)`` matrix, descending.

    From the eigendecomposition of the small ``B^T B`` (float64): ``B = U S V^T`` with
    ``U = B V S^{-1}``; then one Cholesky-QR pass restores orthonormality lost to rounding.
    Columns with singular value 0 are dropped.
    """
    evals, v = torch.linalg.eigh((b.T @ b).double())
    evals, v = evals.flip(0), v.flip(1)
    keep = evals > evals[0].clamp_min(0) * b.shape[1] * torch.finfo(b.dtype).eps
    s = evals[keep].sqrt()
    u = (b @ v[:, keep].to(b.dtype)) / s.to(b.dtype)
    return _orthonormal_columns(u), s.to(b.dtype)


class NystromPreconditioner(LinearOperator):
    r"""Randomized Nyström preconditioner for :math:`A + \mu I` with :math:`A` SPSD.

    A rank-:math:`r` Nyström approximation :math:`\hat A = \hat U \hat\Lambda \hat U^\top
    \approx A` is built from one product :math:`Y = A\Omega` with a Gaussian sketch
    :math:`\Omega \in \mathbb{R}^{n \times r}` (orthonormalised), stabilised by a tiny shift
    :math:`\nu` (Frangella, Tropp & Udell 2023, Algorithm 2.1):

    .. math::

        Y_\nu = Y + \nu\Omega,\quad C C^\top = \Omega^\top Y_\nu\ \text{(Cholesky)},\quad
        B = Y_\nu C^{-\top} = \hat U \Sigma V^\top\ \text{(thin SVD)},\quad
        \hat\Lambda = \max(\Sigma^2 - \nu I, 0),

    with :math:`\nu = \sqrt{n}\,\epsilon_{\mathrm{mach}} \|Y\|_F`. The operator applies

    .. math::

        P^{-1} = (\hat\lambda_r + \mu)\, \hat U (\hat\Lambda + \mu I)^{-1} \hat U^\top
                 + (I - \hat U \hat U^\top),

    whose eigenvalues are :math:`(\hat\lambda_r + \mu)/(\hat\lambda_i + \mu) \in (0, 1]` on
    :math:`\operatorname{range}(\hat U)` and 1 on its complement. If :math:`\hat A = A`
    (which holds when :math:`\operatorname{rank} A \le r`), then
    :math:`P^{-1}(A + \mu I) = \mu I + \hat\lambda_r \hat U \hat U^\top` has at most two
    distinct eigenvalues (one, :math:`\mu`, if :math:`\operatorname{rank} A < r`), so
    preconditioned CG converges in two iterations (one).

    Args:
        A: The SPSD matrix, a square :class:`LinearOperator` or 2-D tensor (not including the
            damping :math:`\mu`).
        rank: Sketch size :math:`r`, ``1 <= rank <= n``.
        damping: The shift :math:`\mu \ge 0` of the system :math:`A + \mu I`.
        generator: Source of the Gaussian sketch; ``None`` uses a fresh generator seeded with 0
            (never the global RNG state). The sketch is drawn on the generator's device and
            moved to ``A``'s.

    Attributes:
        eigenvalues: :math:`\hat\Lambda`, descending, shape ``(r,)``.
        eigenvectors: :math:`\hat U`, shape ``(n, r)`` with orthonormal columns.

    Raises:
        ValueError: If ``A`` is not a square floating operator, ``rank`` is out of range,
            ``damping`` is negative, or ``damping == 0`` while :math:`\hat\lambda_r = 0`
            (the preconditioner would divide by zero).
        NonFiniteError: If the products :math:`A \Omega` hold NaN/Inf.

    References:
        Z. Frangella, J. A. Tropp, M. Udell, "Randomized Nyström preconditioning",
        SIAM J. Matrix Anal. Appl. 44(2), 2023. https://arxiv.org/abs/2110.02820
    """

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(
        self,
        A: LinearOperator | Tensor,
        rank: int,
        damping: float,
        generator: torch.Generator | None = None,
    ) -> None:
        op = _check_operator(A, "NystromPreconditioner")
        n = op.shape[0]
        r = _check_rank(rank, n, "NystromPreconditioner")
        mu = _check_damping(damping, "NystromPreconditioner", positive=False)
        super().__init__(op.shape, op.dtype, op.device)
        dtype, device = op.dtype, op.device
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0)

        omega = torch.randn(n, r, dtype=dtype, device=generator.device, generator=generator)
        omega = _orthonormal_columns(omega.to(device))
        y = op.matvec(omega).detach()
        y_norm = float(torch.linalg.matrix_norm(y))
        if not math.isfinite(y_norm):
            raise NonFiniteError("NystromPreconditioner: the products A @ Omega hold NaN/Inf")
        nu = math.sqrt(n) * torch.finfo(dtype).eps * y_norm
        if nu == 0.0:  # A @ omega == 0: nothing to capture
            nu = torch.finfo(dtype).tiny
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        core = 0.5 * (core + core.T)
        chol, info = torch.linalg.cholesky_ex(core)
        if int(info) == 0:
            # B = Y_nu C^{-T}, so that B B^T = Y_nu (Omega^T Y_nu)^{-1} Y_nu^T
            b_mat = _times_inverse_transpose(y_nu, chol)
        else:
            # rounding (or a slightly indefinite A) broke the Cholesky: pseudo-inverse square
            # root of the core matrix from its eigendecomposition instead
            w, v = torch.linalg.eigh(core)
            keep = w > w.abs().max() * r * torch.finfo(dtype).eps
            b_mat = (y_nu @ v[:, keep]) * w[keep].rsqrt()
        u, s = _thin_svd(b_mat)
        if u.shape[1] < r:  # rank(A) < r: complete U with directions of zero eigenvalue
            w = omega - u @ (u.T @ omega)
            extra, _ = _thin_svd(w)
            extra = extra[:, : r - u.shape[1]]
            u = _orthonormal_columns(torch.cat([u, extra], dim=1))
            s = torch.cat([s, s.new_zeros(extra.shape[1])])
        lam = (s.square() - nu).clamp_min(0.0)
        lam_r = float(lam[-1]) if lam.numel() == r else 0.0
        if lam_r + mu <= 0:
            raise ValueError(
                "NystromPreconditioner: the smallest Nyström eigenvalue is 0 and damping=0, so "
                f"the preconditioner is undefined; pass damping > 0 or a rank below {r}"
            )
        self.damping = mu
        self.eigenvalues = lam
        self.eigenvectors = u
        # P^{-1} x = x + U diag((lam_r + mu)/(lam + mu) - 1) U^T x
        self._scale = (lam_r + mu) / (lam + mu) - 1.0

    @property
    def rank(self) -> int:
        """Number of Nyström eigenpairs kept."""
        return int(self.eigenvalues.numel())

    def _matvec(self, x: Tensor) -> Tensor:
        u = self.eigenvectors
        return x + u @ (self._scale * (u.T @ x))

    def _matmat(self, X: Tensor) -> Tensor:
        u = self.eigenvectors
        return X + u @ (self._scale.unsqueeze(1) * (u.T @ X))
