r"""Factored Tikhonov damping of a Kronecker block and explicit inverses of its damped factors.

Martens & Grosse (2015, §6.3) damp :math:`G \otimes A` (``G``: ``(out, out)``, ``A``: ``(d, d)``)
as

.. math::
    (G + \tfrac{\sqrt\lambda}{\pi} I) \otimes (A + \pi \sqrt\lambda I)
    = G \otimes A + \lambda I + \pi\sqrt\lambda\, G \otimes I
      + \tfrac{\sqrt\lambda}{\pi}\, I \otimes A,
    \qquad \pi = \sqrt{\frac{\operatorname{tr} A / \dim A}{\operatorname{tr} G / \dim G}},

whose inverse is the Kronecker product of the damped factors' inverses: applied to ``V``
(``(out, d)``, row-major vec) it is :math:`(G + \delta_G I)^{-1} V (A + \delta_A I)^{-1}`, two
matrix products once the inverses exist. The inverses come from a Cholesky factorisation in the
factors' dtype; where it fails (an indefinite factor in floating point, or ``δ = 0`` on a
singular one) or gives a non-finite entry, they come from the eigendecomposition with the
eigenvalues clamped at 0 instead (and the caller is told). A factor may be 1-D (a diagonal
factor): its inverse is elementwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["damped_inverse", "factored_damping"]


def _mean_diagonal(F: Tensor) -> float:
    return float(F.mean() if F.ndim == 1 else F.diagonal().mean())


def factored_damping(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    r"""``(δ_G, δ_A) = (√λ / π, π √λ)`` (module docstring); ``π = 1`` where a trace is not > 0.

    Args:
        A: Input factor ``(d, d)`` or its diagonal ``(d,)``.
        G: Output factor ``(out, out)`` or its diagonal.
        damping: :math:`\lambda \ge 0`.
    """
    root = math.sqrt(damping)
    a, g = _mean_diagonal(A), _mean_diagonal(G)
    pi = math.sqrt(a / g) if a > 0 and g > 0 and math.isfinite(a / g) else 1.0
    if not (math.isfinite(pi) and pi > 0):
        pi = 1.0
    return root / pi, root * pi


def damped_inverse(F: Tensor, delta: float) -> tuple[Tensor, bool]:
    r""":math:`(F + \delta I)^{-1}` and whether the Cholesky path served (module docstring).

    Args:
        F: A symmetric positive semi-definite factor ``(n, n)``, or a diagonal one ``(n,)``.
        delta: :math:`\delta \ge 0`.

    Returns:
        The inverse (same shape and dtype as ``F``) and False where the eigendecomposition had
        to stand in for the Cholesky factorisation (the result may then still be non-finite,
        for ``δ = 0`` and a singular ``F``; the caller's guard sees it).
    """
    if F.ndim == 1:
        return 1.0 / (F.clamp_min(0) + delta), True
    eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    L, info = torch.linalg.cholesky_ex(F + delta * eye)
    if int(info) == 0:
        inv = torch.cholesky_inverse(L)
        if bool(torch.isfinite(inv).all()):
            return inv, True
    e, q = torch.linalg.eigh(F)
    return (q / (e.clamp_min(0) + delta)) @ q.T, False
