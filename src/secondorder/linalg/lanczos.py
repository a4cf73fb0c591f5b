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
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch
from torch import Tensor

from .errors import NonFiniteError
from .operator import LinearOperator, aslinearoperator
from .status import SolverStatus

__all__ = [
    "LanczosDecomposition",
    "LanczosInfo",
    "eigmax",
    "lanczos",
    "lanczos_tridiag",
]

Which = Literal["largest", "smallest", "both"]
_WHICH = ("largest", "smallest", "both")
_DGKS_ETA = 1.0 / math.sqrt(2.0)  # second Gram-Schmidt pass if a norm drops below eta times


# --------------------------------------------------------------------- helpers
def _square_operator(A: Any, what: str) -> LinearOperator:
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{what}: expected a square operator, got shape {op.shape}")
    if not op.dtype.is_floating_point:
        raise TypeError(f"{what}: expected a real floating-point operator, got dtype {op.dtype}")
    return op


def _check_int(value: Any, name: str, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: expected an int for {name}, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{what}: expected {bound}, got {name}={value}")
    return value


def _generator(generator: torch.Generator | None, what: str) -> torch.Generator:
    """Return ``generator``, or a fresh one seeded with 0 (never the global RNG)."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{what}: expected a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def _randn(n: int, cols: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    # Draw on the generator's device (a CPU generator works for any operator), then move.
    x = torch.randn(cols, n, generator=generator, dtype=op.dtype, device=generator.device)
    return x.T.to(op.device)


def _breakdown_tol(dtype: torch.dtype, steps: int) -> float:
    """Relative size below which a new Lanczos direction counts as numerically zero."""
    return 10.0 * math.sqrt(max(steps, 1)) * torch.finfo(dtype).eps


def _check_start(v0: Tensor, op: LinearOperator, what: str, cols: tuple[int, ...]) -> None:
    n = op.shape[0]
    if not isinstance(v0, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor for v0, got {type(v0).__name__}")
    shapes = " or ".join(f"({n},)" if c == 0 else f"({n}, {c})" for c in cols)
    ok = (v0.ndim == 1 and 0 in cols) or (v0.ndim == 2 and (-1 in cols or v0.shape[1] in cols))
    if not ok or v0.shape[0] != n:
        raise ValueError(f"{what}: expected v0 of shape {shapes}, got {tuple(v0.shape)}")
    if v0.dtype != op.dtype or v0.device != op.device:
        raise ValueError(
            f"{what}: expected v0 with dtype {op.dtype} on {op.device}, "
            f"got dtype {v0.dtype} on {v0.device}"
        )
    if not bool(torch.isfinite(v0).all()):
        raise NonFiniteError(f"{what}: expected a finite v0, got non-finite entries")


# ------------------------------------------------------------ the decomposition
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


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices (ascending) of the wanted Ritz values among ascending ``theta``."""
    M = theta.size
    if which == "largest":
        return np.arange(M - k, M)
    if which == "smallest":
        return np.arange(0, k)
    lo = k // 2
    return np.concatenate([np.arange(0, lo), np.arange(M - (k - lo), M)])


def _kept(M: int, k: int, p: int, which: str) -> np.ndarray:
    """Indices of the ``p >= k`` Ritz vectors kept at a thick restart (wanted ones included)."""
    if which == "largest":
        return np.arange(M - p, M)
    if which == "smallest":
        return np.arange(0, p)
    lo = k // 2
    lo_keep = lo + ((p - k) * lo) // k if k > 0 else 0
    hi_keep = p - lo_keep
    return np.concatenate([np.arange(0, lo_keep), np.arange(M - hi_keep, M)])


def _cgs_pass(basis: Tensor, W: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""One classical Gram-Schmidt pass: returns :math:`(W - Q H,\ H)` with :math:`H = Q^\top W`.

    ``basis`` holds the orthonormal vectors :math:`Q` as rows and ``W`` is ``(n,)`` or
    ``(n, b)``: two matrix-vector (matrix-matrix) products with a view of the basis buffer.
    The result is written to ``out`` (which must not overlap ``W``), or into ``W`` if ``None``.
    """
    if W.ndim == 1:
        H = torch.mv(basis, W)
        if out is None:
            return W.addmv_(basis.T, H, alpha=-1.0), H
        return torch.addmv(W, basis.T, H, alpha=-1.0, out=out), H
    H = basis @ W
    if out is None:
        return W.addmm_(basis.T, H, alpha=-1.0), H
    return torch.addmm(W, basis.T, H, alpha=-1.0, out=out), H


def _orthogonalize(
    Qt: Tensor, M: int, W: Tensor, local: bool, work: Tensor
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    r"""Orthogonalize :math:`W = A Q_j` against the basis ``Qt[:M + b]`` (block :math:`Q_j` last).

    For a plain Lanczos step (``local``) the three-term recurrence comes first, a
    Gram-Schmidt pass against the previous and the current block only (in exact arithmetic
    :math:`A Q_j` has no other components), and one full classical Gram-Schmidt pass follows
    as the reorthogonalization, as in Lanczos with complete reorthogonalization (Golub & Van
    Loan, *Matrix Computations*, §10.3.1). Otherwise (first step, or first step after a
    restart, where :math:`A Q_j` couples to every kept Ritz vector) the first pass is full.
    Either way another full pass runs only if the last one removed too much, by the
    Daniel-Gragg-Kaufman-Stewart criterion (as ARPACK):
    :math:`\lVert w' \rVert < \eta \lVert w \rVert` for a column, :math:`\eta = 1/\sqrt 2`,
    when cancellation may have left components along the basis of relative size
    :math:`\varepsilon \lVert w \rVert / \lVert w' \rVert`; otherwise the result is orthogonal
    to working precision ("twice is enough", Parlett, *The Symmetric Eigenvalue Problem*, §6.9).
    The norm before a pass follows from Pythagoras, :math:`\lVert w \rVert^2 =
    \lVert Q^\top w \rVert^2 + \lVert w' \rVert^2`, so each pass costs two products with
    the basis and one norm, and the coefficients and norms of a step reach the CPU in one
    transfer (one synchronization on a GPU).

    Returns:
        ``(W', H, norm)``: the orthogonalized block (in ``work``; ``W`` is not modified), the
        coefficients :math:`H = Q^\top A Q_j` of shape ``(M + b, b)`` and the ``(b,)`` column
        norms of :math:`W'`, both float64 NumPy.
    """
    b = 1 if W.ndim == 1 else W.shape[1]
    lo = M - b if local else 0
    W1, C = _cgs_pass(Qt[lo : M + b], W, out=work)
    H = C[:0]
    if local:
        H = _cgs_pass(Qt[: M + b], W1)[1]
    C64, H64, after = _to_numpy(C, H, torch.linalg.vector_norm(W1, dim=0))
    last = (H64 if local else C64).reshape(-1, b)
    norms = np.stack([np.sqrt((last * last).sum(axis=0) + after * after), after])
    coef = np.zeros((M + b, b))
    coef[lo:] = C64.reshape(-1, b)
    if local:
        coef += last
    for _ in range(2):  # a third pass is rare; after it only a breakdown is left
        if np.all(norms[1] >= _DGKS_ETA * norms[0]):
            break
        H2 = _cgs_pass(Qt[: M + b], W1)[1]
        H2_64, after = _to_numpy(H2, torch.linalg.vector_norm(W1, dim=0))
        coef += H2_64.reshape(M + b, b)
        norms = np.stack([norms[1], after])
    return W1, coef, norms[1]


def _to_numpy(*tensors: Tensor) -> list[np.ndarray]:
    """Copy small tensors to float64 NumPy arrays in one device-to-host transfer."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).to("cpu", torch.float64).numpy()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()])
        start += t.numel()
    return out


def _orthonormalize_block(
    W: Tensor,
    Qt: Tensor,
    anorm: float,
    generator: torch.Generator,
    op: LinearOperator,
) -> tuple[Tensor, Tensor]:
    """Orthonormalize ``W`` (already orthogonal to the rows of ``Qt``) within itself: ``W = V B``.

    Columns that are numerically dependent (an invariant subspace was found) get ``B`` entries
    of zero and are replaced by random directions orthogonal to ``Qt``'s rows and to ``V``.
    """
    n, b = W.shape
    V = torch.empty_like(W)
    B = torch.zeros(b, b, dtype=torch.float64)
    thresh = _breakdown_tol(op.dtype, Qt.shape[0] + b) * anorm
    for j in range(b):
        v = W[:, j]
        basis = V[:, :j]
        if j > 0:
            c = basis.T @ v
            v = v - basis @ c
            c2 = basis.T @ v
            v = v - basis @ c2
            B[:j, j] = (c + c2).to(torch.float64).cpu()
        nrm = float(v.norm())
        if nrm > thresh:
            V[:, j] = v / nrm
            B[j, j] = nrm
            continue
        # Breakdown: continue the Krylov space with a fresh direction (coupling zero).
        full = torch.cat([Qt, basis.T], dim=0)
        for _ in range(3):
            v = _randn(n, 1, op, generator)[:, 0]
            for _pass in range(2):
                v = v - full.T @ (full @ v)
            nrm = float(v.norm())
            if nrm > 0:
                break
        V[:, j] = v / nrm
    return V, B


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


@dataclass
class _Run:
    """State and outcome of :func:`_restarted_lanczos` (small arrays in float64 on the CPU)."""

    evals: np.ndarray  # the wanted Ritz values, ascending
    evecs: Tensor  # their Ritz vectors (n, k)
    bounds: np.ndarray  # their residual bounds
    ok: np.ndarray  # which of them passed the test
    converged: bool
    matvecs: int
    restarts: int
    fallback: bool = False  # n products did not suffice: solve densely instead
    nonfinite: bool = False  # a product with A held NaN/Inf: no eigenpairs


def _next_block(
    W: Tensor,
    norm: np.ndarray,
    Qt: Tensor,
    anorm: float,
    generator: torch.Generator,
    op: LinearOperator,
) -> tuple[Tensor | None, np.ndarray]:
    r"""Factor the orthogonalized residual block :math:`W = V B`; returns ``(V, B)``, ``V`` as rows.

    For one vector without breakdown :math:`B = \lVert w \rVert` is already known and ``V``
    is returned as ``None``: the caller divides ``W`` by it straight into the basis buffer.
    Blocks and breakdowns (:math:`\lVert w \rVert` at rounding level) go through
    :func:`_orthonormalize_block`.
    """
    if W.ndim == 1:
        if norm[0] > _breakdown_tol(op.dtype, Qt.shape[0] + 1) * anorm:
            return None, norm.reshape(1, 1).copy()
        W = W.unsqueeze(1)
    V, B = _orthonormalize_block(W, Qt, anorm, generator, op)
    return V.T, B.numpy()


def _ritz_test(
    theta: np.ndarray, bounds: np.ndarray, k: int, which: str, rtol: float, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return the wanted indices and which of them pass the test of :func:`lanczos`.

    The test is :math:`b_i \le \max(\mathrm{rtol}\,|\theta_i|,\
    \varepsilon \max_j |\theta_j|)` for the residual bounds :math:`b_i`.
    """
    idx = _wanted(theta, k, which)
    floor = eps * max(abs(float(theta[0])), abs(float(theta[-1])))  # theta is ascending
    wanted = np.abs(theta[idx])
    relative = rtol * wanted if math.isfinite(rtol) else np.where(wanted > 0, np.inf, 0.0)
    return idx, bounds[idx] <= np.maximum(relative, floor)


def _restarted_lanczos(
    op: LinearOperator,
    k: int,
    which: str,
    rtol: float,
    maxiter: int,
    ncv: int,
    start: Tensor,
    gen: torch.Generator,
) -> _Run:
    r"""Thick-restart block Lanczos from the ``(n, b)`` block ``start`` (see :func:`lanczos`).

    The basis lives in a preallocated ``(ncv, n)`` buffer (rows, so each vector is
    contiguous) and every Gram-Schmidt pass is two matrix-vector (or matrix-matrix) products
    with a view of it; the new vector is normalized straight into the buffer, and the Ritz
    vectors come out of one ``(k, m) @ (m, n)`` product (returned as a transposed view, so
    each eigenvector is contiguous). The projected matrix :math:`T = Q^\top A Q` and its
    eigenpairs are kept in float64 NumPy arrays; the Ritz test runs after every product and
    the iteration stops at the first product that suffices.
    """
    n, b = start.shape
    eps = torch.finfo(op.dtype).eps
    keep = min(ncv - b, k + (ncv - k) // 2)
    Qt = torch.empty(ncv, n, dtype=op.dtype, device=op.device)
    T = np.zeros((ncv, ncv))
    if b == 1 and float(start.norm()) > 0:
        torch.div(start[:, 0], start.norm(), out=Qt[0])
    else:
        V0, _ = _orthonormalize_block(start, Qt[:0], float(start.norm(dim=0).max()), gen, op)
        Qt[:b] = V0.T
    M = 0  # basis vectors already multiplied by A (T[:M, :M] is known)
    matvecs = restarts = 0
    anorm = 0.0
    local = False  # whether A Q_j couples only to the previous block (a plain step)
    work = torch.empty_like(start[:, 0] if b == 1 else start)
    while True:
        W: Tensor = op @ Qt[M] if b == 1 else op @ Qt[M : M + b].T.contiguous()
        matvecs += b
        W, H, norm = _orthogonalize(Qt, M, W, local, work)
        step_norm = math.sqrt(float(((H * H).sum(axis=0) + norm * norm).max()))
        anorm = max(anorm, step_norm)
        if not math.isfinite(step_norm):  # A Q_j held NaN/Inf (its norm and coefficients do)
            return _Run(
                np.empty(0), Qt, np.empty(0), np.empty(0), False, matvecs, restarts, nonfinite=True
            )
        T[: M + b, M : M + b] = H
        T[M : M + b, : M + b] = H.T
        T[M : M + b, M : M + b] = (H[M:] + H[M:].T) / 2
        M += b
        V, B = _next_block(W, norm, Qt[:M], anorm, gen, op)
        local = True
        if M >= k:
            theta, S = np.linalg.eigh(T[:M, :M])
            bounds = np.linalg.norm(B @ S[M - b :], axis=0)
            idx, ok = _ritz_test(theta, bounds, k, which, rtol, eps)
            if ok.all() or matvecs + b > maxiter:
                break
            if matvecs >= n and matvecs + n <= maxiter:
                return _Run(theta, Qt, bounds, ok, False, matvecs, restarts, fallback=True)
        if M + b > ncv:
            kept = _kept(M, k, keep, which)
            S_keep = torch.from_numpy(S[:, kept]).to(device=op.device, dtype=op.dtype)
            Qt[: kept.size] = S_keep.T @ Qt[:M]
            M = kept.size
            T[:] = 0.0
            T[:M, :M] = np.diag(theta[kept])
            restarts += 1
            local = False  # the next vector couples to every kept Ritz vector
        if V is None:  # one vector without breakdown: normalize straight into the basis
            torch.div(W, float(B[0, 0]), out=Qt[M])
        else:
            Qt[M : M + b] = V
    # (k, M) @ (M, n) and a transposed view: each eigenvector is contiguous
    S_idx = torch.from_numpy(np.ascontiguousarray(S[:, idx].T)).to(op.device, op.dtype)
    evecs = (S_idx @ Qt[:M]).T
    return _Run(theta[idx], evecs, bounds[idx], ok, bool(ok.all()), matvecs, restarts)


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
