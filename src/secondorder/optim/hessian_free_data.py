r"""The data of a Hessian-free step: batch lists, their identity, and the loss and gradient.

:meth:`~secondorder.optim.hessian_free.HessianFree.acc_step` takes separate data for the
loss, the gradient and the curvature; these helpers read them, tell whether two of them are
the same tensors (then one forward pass serves both), and accumulate the loss and gradient
exactly over batches, weighted like the curvature operators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..curvature.model import Batch, FunctionalModel, as_batches
from ..curvature.weighting import batch_weights

__all__ = ["_as_batch_list", "_loss_and_gradient", "_same_batches", "_valid_damping"]


def _valid_damping(value: Any) -> bool:
    """Whether a damping state is a finite positive number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _same_batches(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    """Whether two batch lists hold the very same tensors (identity, not equality)."""
    if a is b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if len(x.inputs) != len(y.inputs) or x.targets is not y.targets:
            return False
        if any(p is not q for p, q in zip(x.inputs, y.inputs)):
            return False
    return True


def _as_batch_list(data: Any, name: str) -> list[Batch]:
    try:
        return list(as_batches(data))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _loss_and_gradient(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batches: Sequence[Batch],
    allreduce_sum: Callable[[Tensor], Tensor],
    process_group: Any = None,
) -> tuple[Tensor, Tensor]:
    r"""Loss and flat gradient over ``batches``, weighted like the curvature operators.

    .. math::
        L = \sum_b w_b L_b, \quad \nabla L = \sum_b w_b \nabla L_b, \qquad
        w_b = D_b / D \ (\text{mean}), \quad 1 \ (\text{sum}),

    with :math:`D_b` the normaliser of batch :math:`b`'s mean and :math:`D` its sum over all
    batches on all processes (:mod:`~secondorder.curvature.weighting`): ``allreduce_sum`` sums
    the loss and the gradient together over the process group (the identity for one process).
    One forward and one backward pass per batch, without second-order graphs.

    Args:
        fmodel: The model as a function of its parameters.
        loss_fn: The loss.
        batches: The data (this process's shard).
        allreduce_sum: Sums a tensor over the process group.
        process_group: The process group (for the normalisers), or None.

    Returns:
        ``(loss, gradient)``: a detached 0-dim tensor and a flat vector.

    Raises:
        ValueError: If the loss is not a scalar.
    """
    weighting = batch_weights(loss_fn, batches, fmodel, process_group)
    loss: Tensor | None = None
    flat: Tensor | None = None
    for batch in batches:
        weight = weighting.weight(batch)
        if weight == 0.0:  # every target ignored (its own mean is 0/0)
            continue
        leaves = fmodel.leaves()
        with torch.enable_grad():
            value = loss_fn(fmodel(leaves, batch.inputs), batch.targets)
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise ValueError(
                    f"loss_fn {loss_fn!r} must return a scalar tensor (reduction 'mean' or 'sum')"
                )
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        g = fmodel.flatten(
            [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(grads, leaves)]
        )
        value = value.detach()
        if flat is None or loss is None:
            flat, loss = g * weight, value * weight
        else:
            flat.add_(g, alpha=weight)
            loss = loss + value * weight
    if loss is None or flat is None:  # every batch of this rank has weight 0
        flat = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
        loss = torch.zeros((), dtype=fmodel.dtype, device=fmodel.device)
    reduced = allreduce_sum(torch.cat([loss.reshape(1).to(flat.dtype), flat]))
    return reduced[0].to(loss.dtype), reduced[1:]
