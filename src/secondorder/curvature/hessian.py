r"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice
from .base import CurvatureOperator
from .engines.dispatch import select
from .engines.second_order import GraphHessian, graph_hessian
from .linearization import EngineInfo, backward_into, batched_grad
from .losses import _check_scalar, check_targets
from .model import Batch
from .pch_mode import positive_curvature_mode
from .vocabulary import PCH_MODIFICATIONS

__all__ = ["Hessian"]


@dataclass
class _HessianState:
    leaves: list[Tensor]
    grad: list[Tensor | None]
    loss: Tensor
    fallback_reason: str | None = None


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

    With ``engine="auto"``, ``"graph"`` or ``"sequential"`` (``nn.Sequential`` is a graph like
    any other), the model is traced and each product is Pearlmutter's R-operator node by node
    (:mod:`.engines.second_order`): one :math:`Jv`, one :math:`J^\top u` and each nonlinear
    node's second-order (residual) term, with no autograd graph of the model; the build is one
    forward and one backward pass. Where the model cannot be traced (``engine_info`` says why),
    under a ``TorchFunctionMode``, and with ``engine="autograd"``, building runs one forward and
    one backward pass with ``create_graph=True`` per batch and each product is one backward
    pass through that gradient graph (reverse over reverse). Works for any module and any
    scalar loss callable.

    Args:
        model: Any ``nn.Module``.
        loss_fn: The loss.
        data: One batch or an iterable of batches.
        modify: ``None`` (the Hessian), or the positive-curvature modification ``"clip"`` /
            ``"abs"``: every elementwise activation's second-order term
            :math:`\delta \odot f''(a)` is replaced by its positive part or absolute value (as
            :func:`~secondorder.curvature.pch_mode.positive_curvature_mode`; the PCH's blocks).
        **kwargs: Forwarded to :class:`CurvatureOperator` (``params``, ``engine``, ...).

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
    #: double backwards without a batching rule (e.g. GroupNorm's); on the graph engine, a
    #: node differentiated by autograd that loops makes it ``"loop"`` too.
    _batched_products: str = "vmap"

    @property
    def batched_products(self) -> str:
        """``"vmap"`` or ``"loop"``: how products with several columns ran (comment above)."""
        graphs = [s.lin for s, _ in self._states or () if isinstance(s, GraphHessian)]
        if self._batched_products == "loop" or any(g.batched_products == "loop" for g in graphs):
            return "loop"
        return "vmap"

    @batched_products.setter
    def batched_products(self, value: str) -> None:
        self._batched_products = value

    def __init__(
        self, model: Any, loss_fn: Any, data: Any, *, modify: str | None = None, **kwargs: Any
    ) -> None:
        if modify is not None:
            check_choice("modify", modify, PCH_MODIFICATIONS)
        self.modify = modify
        super().__init__(model, loss_fn, data, **kwargs)

    def _engine_info(self, state: Any) -> EngineInfo:
        if isinstance(state, GraphHessian):
            return EngineInfo.of(state.lin)
        return EngineInfo("autograd", state.fallback_reason)

    def _prepare(self, batch: Batch) -> _HessianState | GraphHessian:
        # the one dispatch site: the graph engine, or whole-model autograd (engine="autograd",
        # or a TorchFunctionMode such as positive_curvature_mode that may change the recorded
        # graph's double backward: then the products must go through that graph)
        reason = None
        if select(self.fmodel, batch.inputs, self.engine) == "graph":
            got = graph_hessian(self.fmodel, batch.inputs, batch.targets, self.loss_fn, self.modify)
            if isinstance(got, GraphHessian):
                return got
            reason = getattr(got, "fallback_reason", None) or "the model does not return a tensor"
        return self._double_backward(batch, reason)

    def _double_backward(self, batch: Batch, reason: str | None) -> _HessianState:
        """The gradient graph of one batch (``create_graph=True``), under the PCH mode if set."""
        leaves = self.fmodel.leaves()
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if self.modify is not None:
                stack.enter_context(positive_curvature_mode(self.modify))
            out = self.fmodel(leaves, batch.inputs)
            check_targets(self.loss_fn, out, batch.targets)
            loss = _loss_of(self.loss_fn, out, batch.targets)
            _check_scalar(loss, self.loss_fn)
            grad = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return _HessianState(leaves, list(grad), loss.detach(), reason)

    def _apply(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        batched: bool,
    ) -> list[Tensor]:
        if isinstance(state, GraphHessian):
            return state.hvp(tangents, indices, batched)
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

    def _apply_into(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        out: Sequence[Tensor],
        weight: float,
    ) -> None:
        if isinstance(state, GraphHessian):
            if weight != 1.0:
                tangents = [t * weight if t is not None else None for t in tangents]
            state.hvp_into(tangents, out, indices)
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
        if isinstance(state, GraphHessian):
            return state.loss, state.gradient
        grads = [
            g.detach() if g is not None else torch.zeros_like(p)
            for g, p in zip(state.grad, state.leaves)
        ]
        return state.loss, grads
