r"""Preconditioners for :func:`~secondorder.linalg.cg.cg`: operators that apply :math:`M^{-1}`.

Each class here is a symmetric positive definite :class:`LinearOperator` whose product is the
*inverse* of an approximation :math:`M \approx A + \mu I`, so it can be passed directly as
``cg(A + mu * Identity(n), b, M=P)``:

* :class:`JacobiPreconditioner`: :math:`(\operatorname{diag}(d) + \mu)^{-\alpha}`, e.g. with
  Martens' empirical-Fisher diagonal and :math:`\alpha = 3/4`.
* :class:`NystromPreconditioner`: randomized Nyström approximation of rank :math:`r`, one
  product of :math:`A` with an :math:`n \times r` sketch (Frangella, Tropp, Udell 2023).
* :class:`PivotedCholeskyPreconditioner`: partial pivoted Cholesky :math:`A \approx L L^\top`
  of rank :math:`r`, from the diagonal and :math:`r` columns of :math:`A`, inverted by Woodbury.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import NonFiniteError
from .operator import Dense, Diagonal, LinearOperator, aslinearoperator

__all__ = [
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "PivotedCholeskyPreconditioner",
]


def _check_damping(damping: Any, name: str, *, positive: bool) -> float:
    try:
        mu = float(damping)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: damping must be a float, got {damping!r}") from None
    ok = mu > 0 if positive else mu >= 0
    if not ok or math.isinf(mu):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: damping must be a finite float {bound}, got {damping!r}")
    return mu


def _check_operator(A: Any, name: str) -> LinearOperator:
    if not isinstance(A, (LinearOperator, Tensor)):
        raise ValueError(
            f"{name}: expected a square LinearOperator or a 2-D tensor, got {type(A).__name__}"
        )
    if isinstance(A, Tensor) and A.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(A.shape)}")
    op = aslinearoperator(A.detach() if isinstance(A, Tensor) else A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{name}: expected a square operator, got shape {op.shape}")
    if not op.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a real floating dtype, got {op.dtype}")
    return op


def _check_rank(rank: Any, n: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"{name}: rank must be an int in [1, {n}], got {rank!r}")
    return rank


def _negative_power_(x: Tensor, alpha: float) -> Tensor:
    r"""``x ** -alpha`` for ``x > 0``, in place in ``x`` (which is returned).

    The common exponents go through square roots instead of ``pow``
    (``x^{-3/4} = r \sqrt{r}`` with ``r = x^{-1/2}``).
    """
    if alpha == 1.0:
        return x.reciprocal_()
    if alpha == 0.5:
        return x.rsqrt_()
    if alpha == 0.75:
        r = x.rsqrt_()
        return r.mul_(r.sqrt())
    return x.pow_(-alpha)


class JacobiPreconditioner(LinearOperator):
    r"""Diagonal preconditioner :math:`M^{-1} = (\operatorname{diag}(d) + \mu I)^{-\alpha}`.

    .. math::

        (M^{-1} x)_i = (d_i + \mu)^{-\alpha}\, x_i .

    With :math:`\alpha = 1` and :math:`d = \operatorname{diag}(A)` this is the classical Jacobi
    preconditioner; Martens (2010, §4.7) uses the diagonal of the empirical Fisher,
    :math:`\mu` = the damping and :math:`\alpha = 0.75`.

    Args:
        diagonal: The diagonal :math:`d`, a real floating 1-D tensor; it sets the operator's
            dtype and device.
        damping: The shift :math:`\mu` added to every entry.
        exponent: The exponent :math:`\alpha \ge 0`.

    Attributes:
        inverse_diagonal: The diagonal of :math:`M^{-1}`, :math:`(d + \mu)^{-\alpha}`.

    Raises:
        ValueError: If ``diagonal`` is not a finite real 1-D tensor, if ``damping`` or
            ``exponent`` are not finite, ``exponent < 0``, or if any :math:`d_i + \mu \le 0`.

    Example:
        >>> import torch
        >>> P = JacobiPreconditioner(torch.tensor([1.0, 4.0]), exponent=0.5)
        >>> P @ torch.tensor([1.0, 1.0])
        tensor([1.0000, 0.5000])
    """

    SELF_ADJOINT = True
    IS_PSD = True

    def __init__(self, diagonal: Tensor, damping: float = 0.0, exponent: float = 1.0) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.ndim != 1:
            got = (
                f"shape {tuple(diagonal.shape)}"
                if isinstance(diagonal, Tensor)
                else type(diagonal).__name__
            )
            raise ValueError(f"JacobiPreconditioner: expected a 1-D tensor diagonal, got {got}")
        if not diagonal.dtype.is_floating_point:
            raise ValueError(
                f"JacobiPreconditioner: expected a real floating diagonal, got {diagonal.dtype}"
            )
        try:
            mu, alpha = float(damping), float(exponent)
        except (TypeError, ValueError):
            raise ValueError(
                "JacobiPreconditioner: damping and exponent must be floats, "
                f"got {damping!r} and {exponent!r}"
            ) from None
        if not math.isfinite(mu):
            raise ValueError(f"JacobiPreconditioner: damping must be finite, got {damping!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(
                f"JacobiPreconditioner: exponent must be a finite float >= 0, got {exponent!r}"
            )
        shifted = diagonal.detach() + mu  # a new tensor: the power is taken in place in it
        # one pass for both checks: NaN propagates into the minimum, Inf shows in either end
        if shifted.numel():
            smallest, largest = (float(v) for v in torch.aminmax(shifted))
        else:
            smallest = largest = 1.0
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            raise ValueError("JacobiPreconditioner: the diagonal contains NaN or Inf")
        if smallest <= 0:
            raise ValueError(
                "JacobiPreconditioner: expected diagonal + damping > 0 everywhere, got a minimum "
                f"of {smallest:.3e} (damping={mu}); increase the damping"
            )
        super().__init__((diagonal.numel(), diagonal.numel()), diagonal.dtype, diagonal.device)
        self.damping = mu
        self.exponent = alpha
        self.inverse_diagonal = _negative_power_(shifted, alpha)

    def _matvec(self, x: Tensor) -> Tensor:
        return self.inverse_diagonal * x

    def _matvec_out(self, x: Tensor, out: Tensor) -> Tensor:
        return torch.mul(self.inverse_diagonal, x, out=out)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.inverse_diagonal.unsqueeze(1) * X

    def to_dense(self, chunk_size: int = 256) -> Tensor:  # noqa: D102
        return torch.diag(self.inverse_diagonal)


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


def _check_tol(tol: Any, default: float, name: str) -> float:
    if tol is None:
        return default
    try:
        tau = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: tol must be a float or None, got {tol!r}") from None
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"{name}: tol must be a finite float >= 0, got {tol!r}")
    return tau


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
