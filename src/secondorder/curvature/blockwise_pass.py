r"""The stored forward pass of the block-diagonal engine on one batch, with its backward.

The backward gives every block's gradient and, for ``"hessian"`` and PCH, the residual terms
:math:`\rho(\delta \odot f'')` of the activations (see :mod:`~secondorder.curvature.blockwise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blockwise_layers import Layer, make_layer
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel


@dataclass
class Pass:
    """The stored forward pass of one batch."""

    layers: list[Layer]
    terms: LossTerms
    weight: float
    residuals: list[Tensor | None]
    gradient: list[Tensor]
    loss: Tensor


def modify_residual(r: Tensor | None, curvature: str) -> Tensor | None:
    r""":math:`\rho(r)`: ``r`` clipped at 0 (``"pch_clip"``), ``|r|`` (``"pch_abs"``) or ``r``."""
    if r is None:
        return None
    if curvature == "pch_clip":
        return r.clamp_min(0)
    if curvature == "pch_abs":
        return r.abs()
    return r


@torch.no_grad()
def forward_pass(
    fmodel: FunctionalModel,
    specs: list[tuple[str, nn.Module]],
    loss_fn: object,
    batch: Batch,
    weight: float,
    curvature: str,
    lowest: int,
) -> Pass:
    """Run ``specs`` forward on ``batch`` storing each layer, then backward down to ``lowest``.

    Args:
        fmodel: The model as a function of its selected parameters.
        specs: ``(prefix, module)`` of every layer, in order.
        loss_fn: The loss.
        batch: One batch with one input tensor.
        weight: The batch's weight.
        curvature: ``"ggn"``, ``"hessian"``, ``"pch_clip"`` or ``"pch_abs"``.
        lowest: The lowest layer holding a selected parameter.

    Returns:
        The stored pass: layers, loss terms, residuals, per-block gradients and the loss.
    """
    values = fmodel.parameter_dict(fmodel.values())
    second = curvature != "ggn"
    layers: list[Layer] = []
    x = batch.inputs[0]
    for prefix, module in specs:
        layer = make_layer(module, values.get(prefix + "weight"), values.get(prefix + "bias"))
        for role in ("weight", "bias"):
            if prefix + role in fmodel.alias:
                layer.roles[role] = fmodel.alias[prefix + role]
        x = layer.forward(x, second)
        layers.append(layer)
    terms = loss_terms(loss_fn, x, batch.targets)
    # backward: the gradient, and the residual terms rho(delta * f'') of the activations
    gradient: list[Tensor] = [torch.empty(0)] * len(fmodel.params)
    residuals: list[Tensor | None] = [None] * len(layers)
    u = terms.grad_output.unsqueeze(0).to(x.dtype)
    for j in range(len(layers) - 1, lowest - 1, -1):
        layer = layers[j]
        for role, index in layer.roles.items():
            gradient[index] = layer.param_vjp(role, u)[0]
        if j == lowest:
            break
        if second and layer.residual_capable:
            residuals[j] = modify_residual(layer.residual(u[0]), curvature)
        u = layer.vjp(u)
    return Pass(layers, terms, weight, residuals, gradient, terms.value.detach())
