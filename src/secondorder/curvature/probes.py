r"""Per-sample output gradients of an ``nn.Sequential``'s layers through zero probes.

A zero tensor :math:`e_l` added to the output of layer :math:`l` (:math:`\partial\,
\mathrm{out}_l / \partial e_l = I`) turns the gradient with respect to that output into the
gradient with respect to :math:`e_l`. One forward pass with probes after the selected layers
and one (batched) backward pass of any output cotangents then give, for every selected layer,
the cotangent of its output for every sample, without per-sample gradients. With the layers'
inputs this is all the Kronecker-factored quantities need: exact diagonals
(:mod:`.diagonal`) and the low-rank GGN's columns (:mod:`.lowrank`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .activations import activation_function, is_activation
from .model import FunctionalModel

__all__ = ["ProbedForward", "layer_output", "probed_forward"]


def layer_output(layer: Any, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """A Linear or convolution layer's output at the given parameter values."""
    if type(layer) is nn.Linear:
        return F.linear(x, weight, bias)
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(layer)]
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@dataclass
class ProbedForward:
    """The output ``z`` (with a graph to the probes) and the probed layers' inputs.

    Attributes:
        z: The model output.
        probes: One zero tensor per probed layer, added to its output.
        recorded: ``(prefix, layer, input)`` per probed layer (inputs detached).
    """

    z: Tensor
    probes: list[Tensor]
    recorded: list[tuple[str, nn.Module, Tensor]]

    def output_gradients(self, cotangents: Tensor) -> list[Tensor]:
        r"""The probed layers' output cotangents for ``K`` output cotangents ``(K, *z.shape)``.

        Returns:
            One tensor per probed layer, shape ``(K, *out_l.shape)``.
        """
        if cotangents.shape[0] == 1:
            grads = torch.autograd.grad(self.z, self.probes, cotangents[0])
            return [g.unsqueeze(0) for g in grads]
        return list(torch.autograd.grad(self.z, self.probes, cotangents, is_grads_batched=True))


def probed_forward(
    fmodel: FunctionalModel,
    layers: list[tuple[str, nn.Module]],
    x: Tensor,
    probed: Callable[[nn.Module], bool],
    input_ndim: Callable[[nn.Module], int],
) -> ProbedForward | None:
    """Run ``layers`` on ``x`` with a probe after every ``probed`` layer holding a parameter.

    Args:
        fmodel: The model as a function of its parameters (selected parameters and aliases).
        layers: Its leaf layers with parameter-name prefixes.
        x: The input batch.
        probed: Whether a layer's output can be probed (Linear or convolution layers only).
        input_ndim: The input dimension such a layer needs to be probed.

    Returns:
        The probed forward pass, or ``None`` if a probed layer holding a selected parameter
        gets an input of another dimension.
    """
    alias = fmodel.alias
    values = fmodel.parameter_dict([p.detach() for p in fmodel.params])
    probes: list[Tensor] = []
    recorded: list[tuple[str, nn.Module, Tensor]] = []
    with torch.enable_grad():
        for prefix, layer in layers:
            if not probed(layer):  # activations out of place, also for inplace=True
                x = activation_function(layer)(x) if is_activation(layer) else layer(x)
                continue
            out = layer_output(layer, values[prefix + "weight"], values.get(prefix + "bias"), x)
            if prefix + "weight" in alias or prefix + "bias" in alias:
                if x.ndim != input_ndim(layer):
                    return None
                probe = torch.zeros_like(out, requires_grad=True)
                out = out + probe
                probes.append(probe)
                recorded.append((prefix, layer, x.detach()))
            x = out
    return ProbedForward(x, probes, recorded)
