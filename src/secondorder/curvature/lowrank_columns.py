r"""Columns of the low-rank GGN factor :math:`V` held per parameter.

Each object covers some parameters and answers, for them, the kernels
:math:`V_p^\top V_p` and :math:`G_p^\top V_p` (per-sample gradients :math:`G_p`), the
combinations :math:`V_p c` and the gradient; see :mod:`secondorder.curvature.lowrank`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Columns:
    """Columns of :math:`V` and the per-sample gradients restricted to some parameters."""

    indices: tuple[int, ...]  # parameters (positions in the FunctionalModel) this object covers

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Return ``(V_p^T V_p, G_p^T V_p)`` summed over ``members``: shapes (D, D), (N, D)."""
        raise NotImplementedError

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        """Return :math:`V_p c` for parameter ``index``, shape ``(K, *p.shape)``."""
        raise NotImplementedError

    def gradient(self, index: int) -> Tensor:
        """Return the gradient of parameter ``index`` (mean of per-sample gradients)."""
        raise NotImplementedError


class ExplicitColumns(Columns):
    """One parameter's rows of :math:`V` (as ``(D, numel)``) and of the per-sample gradients."""

    def __init__(self, index: int, shape: torch.Size, V: Tensor, G: Tensor) -> None:
        self.indices = (index,)
        self.shape = shape
        self.V, self.G = V, G

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        """See :meth:`Columns.kernels`."""
        return self.V @ self.V.T, self.G @ self.V.T

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        """See :meth:`Columns.combine`."""
        return (coeffs.T @ self.V).view(coeffs.shape[1], *self.shape)

    def gradient(self, index: int) -> Tensor:
        """See :meth:`Columns.gradient`."""
        return self.G.mean(0).view(self.shape)


class LinearColumns(Columns):
    r"""An ``nn.Linear`` layer's weight and/or bias in Kronecker form.

    Column :math:`(n, c')` of :math:`V` is :math:`f_{nc'} x_n^\top` for the weight and
    :math:`f_{nc'}` for the bias; the per-sample gradient of sample :math:`n` is
    :math:`h_n x_n^\top` and :math:`h_n`.
    """

    def __init__(
        self, weight: int | None, bias: int | None, X: Tensor, Fo: Tensor, H: Tensor
    ) -> None:
        self.weight, self.bias = weight, bias
        self.indices = tuple(i for i in (weight, bias) if i is not None)
        self.X, self.F, self.H = X, Fo, H  # (N, d_in), (N, C', d_out), (N, d_out)

    def kernels(self, members: Sequence[int]) -> tuple[Tensor, Tensor]:
        """See :meth:`Columns.kernels`."""
        N, Cp, d = self.F.shape
        Fm = self.F.reshape(N * Cp, d)
        gram = Fm @ Fm.T
        cross = self.H @ Fm.T
        with_w, with_b = self.weight in members, self.bias in members
        if with_w:
            xx = self.X @ self.X.T
            if with_b:
                xx += 1.0
            gram.view(N, Cp, N, Cp).mul_(xx[:, None, :, None])
            cross.view(N, N, Cp).mul_(xx[:, :, None])
        return gram, cross

    def combine(self, index: int, coeffs: Tensor) -> Tensor:
        """See :meth:`Columns.combine`."""
        N, Cp, d = self.F.shape
        K = coeffs.shape[1]
        # A[n, k] = sum_c' coeffs[(n, c'), k] f_{nc'}
        A = torch.bmm(coeffs.view(N, Cp, K).transpose(1, 2), self.F)  # (N, K, d_out)
        if index == self.bias:
            return A.sum(0)
        return (A.permute(1, 2, 0).reshape(K * d, N) @ self.X).view(K, d, -1)

    def gradient(self, index: int) -> Tensor:
        """See :meth:`Columns.gradient`."""
        if index == self.bias:
            return self.H.mean(0)
        return self.H.T @ self.X / self.H.shape[0]


def drop_softmax_null_column(S: Tensor, p: Tensor) -> Tensor:
    r"""A ``(C-1)``-column factor of the softmax cross-entropy Hessian from the square one.

    :math:`S = (\operatorname{diag}\sqrt p - p \sqrt p^\top)\sqrt t` annihilates
    :math:`\sqrt p` (:math:`\sum_c p_c = 1`). The Householder reflection
    :math:`H = I - 2 w w^\top / w^\top w`, :math:`w = \sqrt p + e_C`, maps :math:`e_C` to
    :math:`-\sqrt p`, so :math:`S H` has a zero last column and
    :math:`(SH)(SH)^\top = S S^\top`; the column is dropped.

    Args:
        S: Square factors, shape ``(R, C, C)``.
        p: Predicted probabilities, shape ``(R, C)``.

    Returns:
        Factors of shape ``(R, C, C - 1)``.
    """
    w = p.sqrt()
    w[:, -1] += 1.0
    coef = (S @ w.unsqueeze(-1)) * (2.0 / w.square().sum(-1))[:, None, None]  # (R, C, 1)
    return (S - coef * w[:, None, :])[..., :-1]
