r"""The blocks of K-FAC and EKFAC operators: a layer's Kronecker factors, other exact blocks.

A :class:`KronBlock` holds one layer's factors :math:`G` ``(out, out)`` and :math:`A`
``(d~, d~)`` (or its diagonal ``(d,)`` for one-hot inputs), whose Kronecker product is the
block of the layer's ``[W | b]`` (row-major ``(out, d~)``); :func:`kron_solve` applies the
damped inverse :math:`(G \otimes A + \lambda I)^{-1}` through their eigendecompositions. An
:class:`OtherBlock` is the exact dense or diagonal block of a parameter outside such layers.
How the factors are accumulated is :mod:`.kfac_factors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BlockLayout",
    "KronBlock",
    "OtherBlock",
    "kron_solve",
    "times_a",
    "transposed_view",
]


def transposed_view(x: Tensor) -> bool:
    """Whether ``x`` (at least 2-D) is a transposed view of a contiguous tensor."""
    return x.ndim >= 2 and not x.is_contiguous() and x.mT.is_contiguous()


@dataclass
class KronBlock:
    """The Kronecker block of one layer's weight (and bias).

    Attributes:
        node: The graph node of the layer.
        weight: Index of its weight in the flat parameter list, or None (not selected).
        bias: Index of its bias, or None.
        out: Output features (rows of the weight viewed as ``(out, d)``).
        d: Input features ``d`` (columns of the weight; 0 without a selected weight).
        A: Input factor ``(d~, d~)`` with ``d~ = d + [bias]`` (a sum until finished), or its
            diagonal ``(d,)`` for one-hot inputs (no bias).
        G: Output factor ``(out, out)``.
        D: EKFAC's eigenvalues ``(out, d~)`` in the basis of ``G`` and ``A`` (or None).
        wrow: First row of the block in its weight (a row block of a packed weight).
        brow: First entry of the block in its bias.
        transposed: The weight is stored as ``(d, out)`` (``nn.Embedding``'s ``(V, out)``).
    """

    node: str
    weight: int | None
    bias: int | None
    out: int
    d: int
    A: Tensor
    G: Tensor
    D: Tensor | None = None
    wrow: int = 0
    brow: int = 0
    transposed: bool = False
    eig: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = field(default=None, repr=False)

    def augment(self, a: Tensor) -> Tensor:
        """Inputs ``(N, T, d)`` -> ``(N, T, d~)`` (a column of ones for the bias).

        A transposed view (convolution patches, ``(N, d, T)`` in memory) stays one.
        """
        if self.weight is None:
            return a.new_ones(*a.shape[:-1], 1)
        if self.bias is None:
            return a
        if transposed_view(a):
            return torch.cat([a.mT, a.new_ones(*a.shape[:-2], 1, a.shape[-2])], dim=-2).mT
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(eigenvalues of G, Q_G, eigenvalues of A, Q_A)``, eigenvalues clamped at 0.

        ``Q_A`` is None (the identity) where ``A`` is diagonal (1-D).
        """
        if self.eig is None:
            lg, qg = torch.linalg.eigh(self.G)
            if self.A.ndim == 1:
                self.eig = (lg.clamp_min(0), qg, self.A.clamp_min(0), None)
            else:
                la, qa = torch.linalg.eigh(self.A)
                self.eig = (lg.clamp_min(0), qg, la.clamp_min(0), qa)
        return self.eig


def times_a(V: Tensor, A: Tensor | None, transpose: bool = False) -> Tensor:
    """``V @ A`` (``V @ A.T`` if ``transpose``) for a 2-D ``A``, ``V * A`` for a 1-D one.

    ``A`` None is the identity (``Q_A`` of a diagonal factor): ``V`` itself.
    """
    if A is None:
        return V
    if A.ndim == 1:
        return V * A
    return V @ (A.T if transpose else A)


def kron_solve(
    V: Tensor, eig: tuple[Tensor, Tensor, Tensor, Tensor | None], damping: float
) -> Tensor:
    r""":math:`(G \otimes A + \lambda I)^{-1}` on ``V`` ``(..., out, d~)``.

    From ``eig`` (:meth:`KronBlock.eigh`): :math:`Q_G [(Q_G^\top V Q_A) \oslash
    (\lambda_G \lambda_A^\top + \lambda)] Q_A^\top`.
    """
    lg, qg, la, qa = eig
    rot = times_a(qg.T @ V, qa)
    return qg @ times_a(rot / (lg[:, None] * la[None, :] + damping), qa, transpose=True)


@dataclass
class OtherBlock:
    """The exact ``"dense"`` ``(m, m)`` or ``"diagonal"`` ``(m,)`` block of one parameter."""

    index: int
    kind: str
    value: Tensor


@dataclass(frozen=True)
class BlockLayout:
    """Where a Kronecker block's ``[W | b]`` (``(out, d~)``) lies in the flat parameter vector.

    Attributes:
        weight: Flat range of the block's weight entries (rows ``wrow`` to ``wrow + out`` of a
            weight viewed ``(rows, d)``, or all of one stored ``(d, out)``), or None.
        bias: Flat range of its bias entries, or None.
        out: Output features.
        d: Input features.
        transposed: The weight is stored ``(d, out)``.
    """

    weight: slice | None
    bias: slice | None
    out: int
    d: int
    transposed: bool

    @classmethod
    def of(
        cls,
        offsets: Sequence[int],
        weight: int | None,
        bias: int | None,
        out: int,
        d: int,
        wrow: int = 0,
        brow: int = 0,
        transposed: bool = False,
    ) -> BlockLayout:
        """The layout from parameter indices into ``offsets`` (their flat starts)."""
        w = b = None
        if weight is not None:
            start = offsets[weight] + wrow * d
            w = slice(start, start + out * d)
        if bias is not None:
            start = offsets[bias] + brow
            b = slice(start, start + out)
        return cls(w, b, out, d, transposed)

    def gather(self, X: Tensor) -> Tensor:
        """The columns of ``X`` (``(n, k)``) on the block as ``(k, out, d~)``."""
        parts = []
        k = X.shape[1]
        if self.weight is not None:
            if self.transposed:
                parts.append(X[self.weight].T.reshape(k, self.d, self.out).transpose(1, 2))
            else:
                parts.append(X[self.weight].T.reshape(k, self.out, self.d))
        if self.bias is not None:
            parts.append(X[self.bias].T.reshape(k, self.out, 1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def scatter(self, Y: Tensor, V: Tensor) -> None:
        """Write ``V`` (``(k, out, d~)``) into the block's rows of ``Y`` (contiguous ``(n, k)``)."""
        k = V.shape[0]
        if self.weight is not None:  # one strided copy (an assignment of the transpose is slow)
            Vw = V[..., : self.d]
            if self.transposed:
                Y[self.weight].view(self.d, self.out, k).copy_(Vw.permute(2, 1, 0))
            else:
                Y[self.weight].view(self.out, self.d, k).copy_(Vw.permute(1, 2, 0))
        if self.bias is not None:
            Y[self.bias] = V[..., -1].T
