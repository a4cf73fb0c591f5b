r"""Leading eigenpairs of a dense symmetric matrix by restarted block Krylov iteration.

:func:`top_eigh` returns the :math:`k` largest (algebraic) eigenpairs of a dense symmetric
:math:`A \in \mathbb{R}^{D \times D}` without a full eigendecomposition. One *cycle* builds the
block Krylov space

.. math::
    \mathcal{K} = \operatorname{span}\{X, A X, \dots, A^{q} X\},
    \qquad X \in \mathbb{R}^{D \times b},

with an orthonormal basis :math:`Q` (block Gram-Schmidt, two passes, then QR), and projects
(Rayleigh-Ritz): :math:`T = Q^\top A Q = Y \Theta Y^\top`. The Ritz pairs
:math:`(\theta_j, u_j = Q y_j)` of the :math:`b` largest :math:`\theta` start the next cycle
(a thick restart: the space only grows within a cycle, so the projected problem stays
:math:`(q+1) b` square). The block holds :math:`b = k + p` vectors (:math:`p` oversampling), so
the rate of the wanted pairs is governed by the gap to :math:`\lambda_{b+1}` rather than to
:math:`\lambda_{k+1}`. A pair is accepted when its residual is small against the matrix's scale,

.. math::
    \lVert A u_j - \theta_j u_j \rVert_2 \le \mathrm{tol} \cdot \max_i |\theta_i|,

(the residual bounds the eigenvalue error, :math:`|\theta_j - \lambda| \le \lVert r_j \rVert`,
and the eigenvector's angle by :math:`\lVert r_j \rVert / \mathrm{gap}_j`). All ``k`` pairs
must pass. Every product ``A @ Q`` is kept, so the residuals cost no extra product with
:math:`A`, and :math:`T` comes from the Gram-Schmidt coefficients (one product
:math:`Q^\top (A Q_q)` for the last block only). Pairs that pass are *locked*: they leave the
block, later blocks are orthogonalised against them (deflation), and the block shrinks to
:math:`k - l + p` for the :math:`k - l` pairs still wanted.

It falls back to ``torch.linalg.eigh`` of the whole matrix (and says so in the result) when
the Krylov space would not be small beside :math:`D` (``k`` a large share of :math:`D`, or a
small :math:`D`, where a dense eigendecomposition is cheap anyway) and when the iteration has
not converged after a budget of products comparable to the cost of that dense
decomposition. Randomness (the start block, and fresh directions when the Krylov space becomes
invariant) comes from an explicit ``torch.Generator``: the results are deterministic.

References:
    C. Musco, C. Musco. Randomized block Krylov methods for stronger and faster approximate
    singular value decomposition. NeurIPS 2015.
    Y. Saad. Numerical Methods for Large Eigenvalue Problems, 2nd ed., SIAM 2011 (ch. 4-5).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import NonFiniteError
from .precision import full_precision
from .status import SolverStatus

__all__ = ["TopEigh", "krylov_applies", "top_eigh"]


class TopEigh(NamedTuple):
    r"""Result of :func:`top_eigh`.

    Attributes:
        eigenvalues: The ``k`` largest eigenvalues in ascending order, shape ``(k,)``.
        eigenvectors: Orthonormal eigenvectors as columns, shape ``(D, k)``.
        method: ``"krylov"`` (every pair met the residual test) or ``"eigh"`` (the dense
            decomposition: at once, or after the Krylov iteration ran out of budget).
        cycles: Krylov restart cycles run (0 when it was not tried).
        products: Columns multiplied by ``A`` (each ``A @ Q`` with ``Q`` of shape ``(D, b)``
            counts ``b``).
        residual: Largest :math:`\lVert A u_j - \theta_j u_j \rVert / \max_i |\theta_i|` of
            the Krylov iteration's last check (``nan`` when it did not run).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    method: str
    cycles: int
    products: int
    residual: float

    @property
    def status(self) -> SolverStatus:
        """Always ``CONVERGED``.

        A Krylov run out of budget falls back to ``torch.linalg.eigh`` (``method="eigh"``),
        and NaN/Inf raise :class:`NonFiniteError`.
        """
        return SolverStatus.CONVERGED


def default_tol(D: int, dtype: torch.dtype) -> float:
    r"""The default residual tolerance :math:`10 \sqrt{D}\, \epsilon` of ``dtype``.

    A dense symmetric eigensolver's backward error is :math:`O(\epsilon \lVert A \rVert)` with
    a modest dimension factor; this asks the Krylov iteration for the same order.

    Args:
        D: Matrix size.
        dtype: Floating dtype.

    Returns:
        The relative tolerance.
    """
    return 10.0 * math.sqrt(max(D, 1)) * torch.finfo(dtype).eps


def block_size(k: int, D: int, oversample: int | None = None) -> int:
    r"""Block width :math:`b = k + p`, rounded up to a multiple of 8, at most :math:`D`.

    Multiples of 8 suit the CPU's matrix kernels.

    Args:
        k: Wanted pairs.
        D: Matrix size.
        oversample: :math:`p` (default :math:`\max(4, \lceil k/2 \rceil)`).

    Returns:
        The block width.
    """
    p = max(4, -(-k // 2)) if oversample is None else oversample
    return min(D, -(-(k + p) // 8) * 8)


def krylov_applies(
    k: int, D: int, *, oversample: int | None = None, depth: int = 5, max_share: float = 0.5
) -> bool:
    r"""Whether :func:`top_eigh` with these settings tries the Krylov iteration at all.

    It does when the per-cycle space :math:`(q + 1) b` is at most ``max_share`` of :math:`D`
    (:math:`b` from :func:`block_size`); otherwise it decomposes densely at once.

    Args:
        k: Wanted pairs.
        D: Matrix size.
        oversample: As for :func:`top_eigh`.
        depth: As for :func:`top_eigh`.
        max_share: As for :func:`top_eigh`.

    Returns:
        True if the Krylov iteration would run.
    """
    return (depth + 1) * block_size(k, D, oversample) <= max_share * D


def _dense(A: Tensor, k: int) -> TopEigh:
    evals, evecs = torch.linalg.eigh(A)
    return TopEigh(evals[-k:], evecs[:, -k:], "eigh", 0, 0, float("nan"))


def _orthonormal_block(
    Z: Tensor, Q: Tensor | None, generator: torch.Generator | None, scale: float
) -> tuple[Tensor, Tensor | None, Tensor, bool]:
    r"""Orthonormal columns spanning ``Z``'s part orthogonal to ``Q`` (:math:`Q^\top Q = I`).

    Two passes of block classical Gram-Schmidt against ``Q``, then a Householder QR of the
    block: :math:`Z = Q H + Q_{\mathrm{new}} R`. After two passes the remainder is orthogonal
    to ``Q`` up to :math:`\epsilon \lVert z' \rVert` (:math:`z'` a column after the first
    pass), and so is :math:`Q_{\mathrm{new}}`, unless a column is *suspect*:
    :math:`|R_{jj}| < \lVert z'_j \rVert / 10` (it nearly lay in the span of ``Q`` or of the
    block's other columns, e.g. when the Krylov space is invariant: rank-deficient matrices)
    or at rounding level against ``scale``. Only then is the orthogonality checked
    (:math:`\max |Q^\top Q_{\mathrm{new}}| \le 100 \sqrt{m}\, \epsilon`); if it is lost,
    one more pass and QR follow, and columns that this pass reduces to less than half (they
    were rounding noise in ``span(Q)``), as well as columns at rounding level, are replaced
    by random ones and the block is treated again, so the basis stays orthonormal. Small but
    genuine remainders (near convergence the new directions are as small as the residuals)
    are kept: they are exactly what the iteration needs.

    Args:
        Z: Shape ``(D, b)``.
        Q: Current basis ``(D, m)`` or None.
        generator: For the random replacement.
        scale: Norm that ``Z``'s columns are measured against (e.g. ``||A||``).

    Returns:
        ``Q_new`` ``(D, b)``, the coefficients ``H = Q^T Z`` ``(m, b)`` (None without ``Q``),
        ``R`` ``(b, b)``, and whether ``Z = Q H + Q_new R`` holds (False once a column was
        renewed or an extra pass was needed).
    """
    if Q is not None:  # the common case in few operations: accept when nothing is suspect
        H1 = Q.T @ Z
        Z1 = torch.addmm(Z, Q, H1, alpha=-1.0)
        H2 = Q.T @ Z1
        Qn, R = torch.linalg.qr(torch.addmm(Z1, Q, H2, alpha=-1.0))
        floor = Z1.norm(dim=0).clamp_min_(100.0 * torch.finfo(Z.dtype).eps * scale)
        if bool((R.diagonal().abs() >= 0.1 * floor).all()):
            return Qn, H1.add_(H2), R, True
    return _careful_block(Z, Q, generator, scale)


def _careful_block(
    Z: Tensor, Q: Tensor | None, generator: torch.Generator | None, scale: float
) -> tuple[Tensor, Tensor | None, Tensor, bool]:
    """:func:`_orthonormal_block` for blocks with suspect columns (and the start block)."""
    eps = torch.finfo(Z.dtype).eps
    threshold = 10.0 * eps * scale
    H: Tensor | None = None
    exact = True
    Qn = R = Z
    for attempt in range(3):
        if Q is not None:
            H1 = Q.T @ Z
            Z = torch.addmm(Z, Q, H1, alpha=-1.0)
            H2 = Q.T @ Z
            Z = torch.addmm(Z, Q, H2, alpha=-1.0)
            H = H1 + H2 if H is None else H
        Qn, R = torch.linalg.qr(Z)
        renew = R.diagonal().abs() <= threshold
        if Q is not None and not bool(renew.any()):
            E = Q.T @ Qn
            if float(E.abs().max()) > 100.0 * math.sqrt(Q.shape[1]) * eps:
                exact = False
                Qn, R2 = torch.linalg.qr(torch.addmm(Qn, Q, E, alpha=-1.0))
                renew = R2.diagonal().abs() <= 0.5
        if not bool(renew.any()) or attempt == 2:
            return Qn, H, R, exact and attempt == 0
        exact = False
        fresh = torch.randn(Z.shape, generator=generator, dtype=Z.dtype, device=Z.device)
        Z = torch.where(renew, fresh, Qn)  # keep the good directions, renew the others
        threshold = 10.0 * eps
    return Qn, H, R, False  # pragma: no cover - the loop always returns


@full_precision
def top_eigh(
    A: Tensor,
    k: int,
    *,
    tol: float | None = None,
    oversample: int | None = None,
    depth: int = 5,
    max_products: int | None = None,
    max_share: float = 0.5,
    generator: torch.Generator | None = None,
) -> TopEigh:
    r"""The ``k`` largest eigenpairs of the dense symmetric matrix ``A``.

    Restarted block Krylov iteration with Rayleigh-Ritz and a residual test (module
    docstring); falls back to ``torch.linalg.eigh`` of ``A``.

    Args:
        A: Symmetric matrix, shape ``(D, D)`` (only symmetry of the products is assumed;
            the projected matrix is symmetrised).
        k: Number of pairs, ``1 <= k <= D``.
        tol: Relative residual tolerance (default :func:`default_tol`).
        oversample: Extra block columns :math:`p` (default
            :math:`\max(4, \lceil k/2 \rceil)`; see :func:`block_size`).
        depth: Krylov blocks :math:`q` added per cycle (the projected matrix has size
            :math:`(q + 1) b`).
        max_products: Budget of columns multiplied by ``A`` before falling back (default
            :math:`D`: about the cost at which a dense eigendecomposition is as cheap).
        max_share: Use the Krylov iteration only if the per-cycle space :math:`(q+1) b` is at
            most this share of :math:`D`; else decompose densely at once.
        generator: Random generator for the start block (default: a fresh one seeded 0).

    Returns:
        A :class:`TopEigh`; eigenvalues ascending, the eigenvectors' signs arbitrary.

    Raises:
        ValueError: If ``A`` is not square or ``k`` is out of range, ``depth < 1``.
        NonFiniteError: If ``A`` holds NaN/Inf, or its products overflow (a ``ValueError``
            and a ``FloatingPointError``).
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
    D = A.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= D:
        raise ValueError(f"k must be an int in [1, {D}], got {k!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not bool(torch.isfinite(A).all()):
        raise NonFiniteError("top_eigh: A holds NaN/Inf entries; no eigenpairs")
    if not krylov_applies(k, D, oversample=oversample, depth=depth, max_share=max_share):
        return _dense(A, k)
    p = max(4, -(-k // 2)) if oversample is None else oversample
    tol = default_tol(D, A.dtype) if tol is None else tol
    budget = D if max_products is None else max_products
    if generator is None:
        generator = torch.Generator(device=A.device).manual_seed(0)
    b = block_size(k, D, p)
    start = torch.randn(D, b, generator=generator, dtype=A.dtype, device=A.device)
    X = _orthonormal_block(start, None, generator, float(start.norm(dim=0).max()))[0]
    AX = A @ X
    locked = _Locked(A.new_zeros(D, 0), A.new_zeros(0))
    products, cycles, residual, scale = b, 0, float("nan"), 0.0
    while products + depth * X.shape[1] <= budget:
        cycles += 1
        products += depth * X.shape[1]
        X, AX, theta, residuals, cycle_scale = _cycle(A, X, AX, depth, locked.U, generator)
        scale = max(scale, cycle_scale)
        want = k - locked.theta.numel()
        done = residuals[-want:] <= (tol * scale if scale > 0 else 0.0)
        residual = float(residuals[-want:].max()) / scale if scale > 0 else 0.0
        if not (math.isfinite(residual) and math.isfinite(scale)):
            raise NonFiniteError("top_eigh: the products with A overflowed; use float64")
        if bool(done.all()):
            return _merge(locked, theta[-want:], X[:, -want:], cycles, products, residual)
        locked, X, AX = _lock(locked, X, AX, theta, done, want, block_size(want, D, p))
    return _dense(A, k)._replace(cycles=cycles, products=products, residual=residual)


class _Locked(NamedTuple):
    """Converged Ritz pairs taken out of the iteration: vectors ``(D, l)``, values ``(l,)``."""

    U: Tensor
    theta: Tensor


def _lock(
    locked: _Locked, X: Tensor, AX: Tensor, theta: Tensor, done: Tensor, want: int, width: int
) -> tuple[_Locked, Tensor, Tensor]:
    r"""Lock the converged ones of the ``want`` leading Ritz pairs; keep a block for the rest.

    Locked vectors leave the block and every later block is orthogonalised against them
    (deflation), so the remaining pairs converge in the complement. The new block holds the
    ``width`` leading unconverged Ritz vectors (at most the current block).
    """
    b = X.shape[1]
    flags = torch.zeros(b, dtype=torch.bool, device=X.device)
    flags[b - want :] = done
    if bool(flags.any()):
        locked = _Locked(
            torch.cat([locked.U, X[:, flags]], 1), torch.cat([locked.theta, theta[flags]])
        )
    keep = (~flags).nonzero().squeeze(1)[-min(width, b - int(flags.sum())) :]
    return locked, X[:, keep], AX[:, keep]


def _merge(
    locked: _Locked, theta: Tensor, X: Tensor, cycles: int, products: int, residual: float
) -> TopEigh:
    """The locked pairs and the converged block pairs, sorted ascending."""
    values = torch.cat([locked.theta, theta])
    order = values.argsort()
    vectors = torch.cat([locked.U, X], 1)[:, order]
    return TopEigh(values[order], vectors, "krylov", cycles, products, residual)


def _cycle(
    A: Tensor, X: Tensor, AX: Tensor, depth: int, L: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    r"""One cycle: extend :math:`[X, AX, \dots]` by ``depth`` blocks, then Rayleigh-Ritz.

    Every new block is orthogonalised against the locked vectors ``L`` ``(D, l)`` as well.
    The projection :math:`T = Q^\top A Q` comes from the Gram-Schmidt coefficients: block
    :math:`j` is obtained from :math:`A Q_{j-1} = L H' + Q_{<j} H_j + Q_j R_j`, so column
    block :math:`j-1` of :math:`T` is :math:`[H_j; R_j; 0]` and only the last column block
    needs a product :math:`Q^\top (A Q_q)`. A block whose columns were renewed (an invariant
    space) gets its column block by that product too.

    Returns:
        The leading Ritz vectors ``X`` (as many as the block, ascending), ``A X``, their Ritz
        values, the residual norms :math:`\lVert A x_j - \theta_j x_j \rVert` and the scale
        :math:`\max_i |\theta_i|` of the projected matrix.
    """
    D, b, nl = X.shape[0], X.shape[1], L.shape[1]
    m = (depth + 1) * b
    basis = X.new_empty(D, nl + m)  # [L, Q_0, ..., Q_depth]
    basis[:, :nl] = L
    basis[:, nl : nl + b] = X
    W = X.new_empty(D, m)  # A Q
    W[:, :b] = AX
    T = X.new_zeros(m, m)
    scale = float(AX.norm(dim=0).max())
    for j in range(1, depth + 1):
        lo, hi = (j - 1) * b, j * b
        Qn, H, R, exact = _orthonormal_block(W[:, lo:hi], basis[:, : nl + hi], generator, scale)
        basis[:, nl + hi : nl + hi + b] = Qn
        if exact and H is not None:
            T[:hi, lo:hi] = H[nl:]
            T[hi : hi + b, lo:hi] = R
        else:
            T[: hi + b, lo:hi] = basis[:, nl : nl + hi + b].T @ W[:, lo:hi]
        W[:, hi : hi + b] = A @ Qn
    Q = basis[:, nl:]
    T[:, depth * b :] = Q.T @ W[:, depth * b :]
    theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
    Yb = Y[:, -b:]
    X, AX = Q @ Yb, W @ Yb
    theta_b = theta[-b:]
    residuals = (AX - X * theta_b).norm(dim=0)
    return X, AX, theta_b, residuals, float(theta.abs().max())
