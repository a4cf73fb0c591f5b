r"""The layers of an ``nn.Sequential`` chain: which are supported, and one recording forward.

:func:`sequential_layers` decides which ``nn.Sequential`` models count as a chain of supported
layers (the factored fast path :mod:`~secondorder.curvature.factored` needs one, and the
Kronecker paths of the diagonals and of :class:`~secondorder.curvature.lowrank.LowRankGGN` use
it); :func:`record_layer` runs one layer forward and records what its derivatives need (the
factored path's forward pass). Products of every ``nn.Sequential`` are the graph engine's
(:mod:`~secondorder.curvature.engines.graph`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .activations import (
    activation_derivatives,
    activation_function,
    is_activation,
    unsupported_activation,
)

CONV: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
MAXPOOL: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MaxPool1d: F.max_pool1d,
    nn.MaxPool2d: F.max_pool2d,
    nn.MaxPool3d: F.max_pool3d,
}
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
LINEAR_NO_PARAMS = (*RESHAPES, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Dropout)
# eval-mode BatchNorm (exact types: a subclass may change forward)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _relu_derivative(s: Tensor) -> Tensor:
    """:math:`1[a > 0] = 1[s > 0]`, a bool mask (one byte per entry)."""
    return s > 0


def _sigmoid_derivative(s: Tensor) -> Tensor:
    r""":math:`\sigma'(a) = s(1 - s)`."""
    return s * (1 - s)


def _tanh_derivative(s: Tensor) -> Tensor:
    r""":math:`\tanh'(a) = 1 - s^2`."""
    return 1 - s * s


def _times_relu_derivative(g: Tensor, s: Tensor, out: Tensor | None) -> Tensor:
    """``g * (s > 0)`` in one pass (into ``out`` if given, which may be ``g``)."""
    op = torch.ops.aten.threshold_backward
    return op(g, s, 0) if out is None else op.grad_input(g, s, 0, grad_input=out)


def _times_sigmoid_derivative(g: Tensor, s: Tensor, out: Tensor | None) -> Tensor:
    """``g * s * (1 - s)`` in one pass (into ``out`` if given, which may be ``g``)."""
    op = torch.ops.aten.sigmoid_backward
    return op(g, s) if out is None else op.grad_input(g, s, grad_input=out)


def _times_tanh_derivative(g: Tensor, s: Tensor, out: Tensor | None) -> Tensor:
    """``g * (1 - s**2)`` in one pass (into ``out`` if given, which may be ``g``)."""
    op = torch.ops.aten.tanh_backward
    return op(g, s) if out is None else op.grad_input(g, s, grad_input=out)


# activations whose derivative is a function of their output s: (derivative from s, fused g*σ')
FROM_OUTPUT: dict[
    type[nn.Module],
    tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor, Tensor | None], Tensor]],
] = {
    nn.ReLU: (_relu_derivative, _times_relu_derivative),
    nn.Sigmoid: (_sigmoid_derivative, _times_sigmoid_derivative),
    nn.Tanh: (_tanh_derivative, _times_tanh_derivative),
}


def supported(module: nn.Module) -> bool:
    """Whether the engine computes ``module`` exactly: exact torch types, their own forward."""
    if "forward" in vars(module):  # an instance-level forward replaces the class's
        return False
    t = type(module)
    m: Any = module
    if t in CONV:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if is_activation(module):
        return unsupported_activation(module) is None
    if t in MAXPOOL:
        return not m.return_indices
    if t is nn.Linear:
        return True
    if t is nn.Dropout:
        return not m.training or m.p == 0
    if t in LINEAR_NO_PARAMS:
        return True
    if t in BATCHNORM:
        return not m.training and m.track_running_stats
    return False


def sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Flatten nested ``nn.Sequential`` into ``(prefix, layer)`` pairs, or None if unsupported.

    Args:
        model: The module.

    Returns:
        The leaf layers with their parameter-name prefixes, or ``None`` when ``model`` is not a
        (nested) ``nn.Sequential`` of layers the hand-written engine supports, or a layer
        carries hooks.
    """
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> bool:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            # every entry, as Sequential.forward applies them (named_children skips repeats)
            children = [
                (name, child) for name, child in module._modules.items() if child is not None
            ]
            return all(visit(child, f"{prefix}{name}.") for name, child in children)
        hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        if hooks or not supported(module):
            return False
        layers.append((prefix, module))
        return True

    return layers if visit(model, "") else None


def record_layer(
    steps: list[tuple[nn.Module, dict[str, Any]]],
    keep_outputs: bool,
    layer: nn.Module,
    prefix: str,
    x: Tensor,
    frozen: dict[str, Tensor],
    leaves: list[Tensor],
    alias: dict[str, int],
) -> Tensor:
    """Run ``layer`` on ``x`` and append ``(layer, record)`` to ``steps``.

    The record holds what the layer's derivatives need (module docstring); an activation
    followed by max-pooling is moved behind it. ``keep_outputs``: an activation whose derivative
    is a function of its output keeps a reference to that output (see ``settle``).
    """
    t = type(layer)
    rec: dict[str, Any] = {"in_shape": x.shape}

    def param(name: str) -> tuple[Tensor | None, int | None]:
        full = prefix + name
        if full in alias:  # trainable (tied names included)
            return leaves[alias[full]].detach(), alias[full]
        value = frozen.get(full)  # frozen, or absent (bias=False)
        return (value.detach() if value is not None else None), None

    if t is nn.Linear or t in CONV:
        (w, rec["iw"]), (b, rec["ib"]) = param("weight"), param("bias")
        rec["x"], rec["w"], rec["has_bias"] = x, w, b is not None
        if t is nn.Linear:
            out = F.linear(x, w, b)  # type: ignore[arg-type]
        else:
            rec["kw"] = dict(
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
            )
            out = CONV[t](x, w, b, **rec["kw"])
    elif is_activation(layer):  # out of place, also for inplace=True
        if t in FROM_OUTPUT:
            out = activation_function(layer)(x)
            if keep_outputs:
                rec["s"] = out  # see _settle_activations
            else:
                rec["d"] = FROM_OUTPUT[t][0](out)
        else:
            out, rec["d"], _ = activation_derivatives(layer, x, second=False)
    elif t in MAXPOOL:
        m: Any = layer
        out, rec["idx"] = MAXPOOL[t](
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            ceil_mode=m.ceil_mode,
            return_indices=True,
        )
        if steps and is_activation(steps[-1][0]):
            rec["out_shape"] = out.shape
            steps.insert(-1, (layer, rec))
            pool_activation(steps[-1][1], rec["idx"], out)
            return out
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        (w, rec["iw"]), (b, rec["ib"]) = param("weight"), param("bias")
        mean, var = layer.running_mean, layer.running_var
        assert mean is not None and var is not None
        shape = (1, -1) + (1,) * (x.ndim - 2)
        inv = (var + layer.eps).rsqrt().view(shape)
        rec["xhat"] = (x - mean.view(shape)) * inv
        rec["scale"] = inv * w.view(shape) if w is not None else inv
        rec["shape"] = shape
        out = rec["xhat"] * (w.view(shape) if w is not None else 1.0)
        out = out + b.view(shape) if b is not None else out
    else:  # parameter-free linear layers, eval-mode dropout
        out = layer(x)
    rec["out_shape"] = out.shape
    steps.append((layer, rec))
    return out


def pool_activation(rec: dict[str, Any], idx: Tensor, pooled: Tensor) -> None:
    r"""Move an activation behind the max-pooling that follows it: :math:`P D = D_P P`.

    Its derivative is only needed at the selected entries: :math:`P\sigma'(a)` (gathered
    at the pooling indices ``idx``), or from the pooled output :math:`P s` (``pooled``).
    """
    if "s" in rec:
        rec["s"] = pooled
    else:
        rec["d"] = pool_gather(rec["d"], idx)
    rec["in_shape"] = rec["out_shape"] = pooled.shape


def pool_gather(t: Tensor, idx: Tensor) -> Tensor:
    """The entries of ``t`` (shape of a max-pooling input) that the pooling ``idx`` selects."""
    return t.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
