r"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import CurvatureOperator
from .linearization import EngineInfo, backward_into, batched_grad
from .losses import _check_scalar, check_targets
from .mlp_hessian import MLPHessian, mlp_layers
from .model import Batch

__all__ = ["Hessian"]


@dataclass
class _HessianState:
    leaves: list[Tensor]
    grad: list[Tensor | None]
    loss: Tensor


def _loss_of(loss_fn: Any, out: Any, targets: Any) -> Any:
    """``loss_fn(out, targets)``; a loss that fails on a non-tensor output gets a clear error."""
    if isinstance(out, Tensor):
        return loss_fn(out, targets)
    try:
        return loss_fn(out, targets)
    except (TypeError, AttributeError) as err:
        raise TypeError(
            f"the model must return a tensor, got {type(out).__name__} (the loss {loss_fn!r} "
            f"failed on it: {err}); return the outputs the loss takes, or a loss that takes "
            f"the {type(out).__name__}"
        ) from err


class Hessian(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla_\theta^2 L = \sum_b w_b \nabla_\theta^2 L_b` (indefinite).

    Building it runs one forward and one backward pass with ``create_graph=True`` per batch;
    each product :math:`Hv` is one backward pass through that gradient graph (reverse over
    reverse), reusing it. Works for any module and any scalar loss callable. For an
    ``nn.Sequential`` MLP (Linear layers, elementwise activations, reshapes) called on one
    tensor, the products are Pearlmutter's R-operator written by hand instead
    (:mod:`.mlp_hessian`: no autograd graph; ``engine="autograd"`` keeps the double backward).

    Example:
        >>> import torch, secondorder as so
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> H = so.Hessian(model, torch.nn.MSELoss(), (X, y))
        >>> bool(torch.allclose(H.to_dense(), H.to_dense().T))
        True
    """

    IS_PSD = False
    #: How products with several columns (``H @ V``, ``to_dense``) ran: ``"vmap"``, one batched
    #: backward (``is_grads_batched``), or ``"loop"``, one backward per column, the fallback for
    #: double backwards without a batching rule (e.g. GroupNorm's); the hand-written MLP path
    #: loops over columns as well.
    batched_products: str = "vmap"

    def _engine_info(self, state: Any) -> EngineInfo:
        return EngineInfo("mlp_hessian" if isinstance(state, MLPHessian) else "autograd")

    def _prepare(self, batch: Batch) -> _HessianState | MLPHessian:
        # a TorchFunctionMode (e.g. positive_curvature_mode) may change the recorded graph's
        # double backward: then the products must go through that graph
        hand_written = self.engine != "autograd" and not torch._C._is_torch_function_mode_enabled()
        if hand_written and len(batch.inputs) == 1:
            layers = mlp_layers(self.fmodel.model)
            if layers is not None and isinstance(batch.inputs[0], Tensor):
                return MLPHessian(self.fmodel, layers, batch.inputs, batch.targets, self.loss_fn)
        leaves = self.fmodel.leaves()
        with torch.enable_grad():
            out = self.fmodel(leaves, batch.inputs)
            check_targets(self.loss_fn, out, batch.targets)
            loss = _loss_of(self.loss_fn, out, batch.targets)
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
        if isinstance(state, MLPHessian):
            return self._apply_mlp(state, tangents, indices, batched)
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
        grads = batched_grad(self, outs, wrt, tans, batched)
        return [g if g is not None else z for g, z in zip(grads, zeros)]

    def _apply_mlp(
        self,
        state: MLPHessian,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        batched: bool,
    ) -> list[Tensor]:
        """Products of the R-operator path, one column at a time when batched."""
        idx = list(range(len(self.fmodel.params))) if indices is None else list(indices)
        shapes = [self.fmodel.shapes[i] for i in idx]
        if not batched:
            bufs = [self.fmodel.params[i].new_zeros(shape) for i, shape in zip(idx, shapes)]
            self._apply_into(state, tangents, indices, bufs, 1.0)
            return bufs
        K = next(t.shape[0] for t in tangents if t is not None)
        bufs = [self.fmodel.params[i].new_zeros(K, *shape) for i, shape in zip(idx, shapes)]
        for k in range(K):
            column = [t[k] if t is not None else None for t in tangents]
            self._apply_into(state, column, indices, [b[k] for b in bufs], 1.0)
        return bufs

    def _apply_into(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        out: Sequence[Tensor],
        weight: float,
    ) -> None:
        if isinstance(state, MLPHessian):
            idx = range(len(self.fmodel.params)) if indices is None else indices
            full: list[Tensor | None] = [None] * len(self.fmodel.params)
            for i, buf in zip(idx, out):
                full[i] = buf
            if weight != 1.0:
                tangents = [t * weight if t is not None else None for t in tangents]
            state.hvp_into(tangents, full)
            return
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
        if isinstance(state, MLPHessian):
            return state.loss, state.gradient
        grads = [
            g.detach() if g is not None else torch.zeros_like(p)
            for g, p in zip(state.grad, state.leaves)
        ]
        return state.loss, grads
