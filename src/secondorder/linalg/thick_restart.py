r"""The thick-restart block Lanczos iteration behind :func:`~secondorder.linalg.lanczos.lanczos`.

:func:`_restarted_lanczos` grows an orthonormal block Krylov basis in a preallocated buffer,
tests the wanted Ritz pairs after every product and, when the basis is full, keeps the best
Ritz vectors and restarts from them (Wu & Simon 2000). It returns a :class:`_Run`; the
public function turns it into eigenpairs and a :class:`~secondorder.linalg.lanczos.LanczosInfo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .krylov import _breakdown_tol, _orthogonalize, _orthonormalize_block
from .operator import LinearOperator


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
