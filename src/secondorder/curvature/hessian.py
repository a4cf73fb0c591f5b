r"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import CurvatureOperator
from .linearization import backward_into
from .losses import _check_scalar
from .model import Batch

__all__ = ["Hessian"]


@dataclass
class _HessianState:
    leaves: list[Tensor]
    grad: list[Tensor | None]
    loss: Tensor


class Hessian(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla_\theta^2 L = \sum_b w_b \nabla_\theta^2 L_b` (indefinite).

    Building it runs one forward and one backward pass with ``create_graph=True`` per batch;
    each product :math:`Hv` is one backward pass through that gradient graph (reverse over
    reverse), reusing it. Works for any module and any scalar loss callable.

    Example:
        >>> import torch, secondorder as so
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> H = so.Hessian(model, torch.nn.MSELoss(), (X, y))
        >>> bool(torch.allclose(H.to_dense(), H.to_dense().T))
        True
    """

    IS_PSD = False

    def _prepare(self, batch: Batch) -> _HessianState:
        leaves = self.fmodel.leaves()
        with torch.enable_grad():
            out = self.fmodel(leaves, batch.inputs)
            loss = self.loss_fn(out, batch.targets)
            _check_scalar(loss, self.loss_fn)
            grad = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return _HessianState(leaves, list(grad), loss.detach())

    def _apply(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        batched: bool,
    ) -> list[Tensor]:
        idx = list(range(len(state.leaves))) if indices is None else list(indices)
        outs, tans = [], []
        for g, t in zip(state.grad, tangents):
            if g is not None and t is not None and g.requires_grad:
                outs.append(g)
                tans.append(t)
        wrt = [state.leaves[i] for i in idx]
        lead = next(t.shape[0] for t in tangents if t is not None) if batched else None
        zeros = [
            torch.zeros(
                *(() if lead is None else (lead,)), *p.shape, dtype=p.dtype, device=p.device
            )
            for p in wrt
        ]
        if not outs:
            return zeros
        grads = torch.autograd.grad(
            outs, wrt, tans, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
        return [g if g is not None else z for g, z in zip(grads, zeros)]

    def _apply_into(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        out: Sequence[Tensor],
        weight: float,
    ) -> None:
        outs, tans = [], []
        for g, t in zip(state.grad, tangents):
            if g is not None and t is not None and g.requires_grad:
                outs.append(g)
                tans.append(t * weight if weight != 1.0 else t)
        if not outs:
            return
        wrt = state.leaves if indices is None else [state.leaves[i] for i in indices]
        backward_into(outs, tans, wrt, out)

    def _batch_loss_and_grad(self, state: Any) -> tuple[Tensor, list[Tensor]]:
        grads = [
            g.detach() if g is not None else torch.zeros_like(p)
            for g, p in zip(state.grad, state.leaves)
        ]
        return state.loss, grads
