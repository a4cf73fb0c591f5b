r"""Orthonormal Krylov bases: block Gram-Schmidt with reorthogonalisation.

The Lanczos routines build their bases with these: classical Gram-Schmidt passes against the
basis (a second pass by the DGKS criterion), breakdown detection at the rounding level, and
fresh random directions when the Krylov space becomes invariant.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .operator import LinearOperator

_DGKS_ETA = 1.0 / math.sqrt(2.0)  # second Gram-Schmidt pass if a norm drops below eta times


def _randn(n: int, cols: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    # Draw on the generator's device (a CPU generator works for any operator), then move.
    x = torch.randn(cols, n, generator=generator, dtype=op.dtype, device=generator.device)
    return x.T.to(op.device)


def _breakdown_tol(dtype: torch.dtype, steps: int) -> float:
    """Relative size below which a new Lanczos direction counts as numerically zero."""
    return 10.0 * math.sqrt(max(steps, 1)) * torch.finfo(dtype).eps


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
