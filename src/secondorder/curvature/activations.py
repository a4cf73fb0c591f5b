r"""Output, first and second derivative of elementwise activations, for the curvature engines.

:func:`activation_derivatives` returns :math:`\sigma(a)`, :math:`\sigma'(a)` and (when asked)
:math:`\sigma''(a)` for an activation module applied to its input :math:`a`: in closed form
for the common ones (few fused operations), by two backward passes through the activation
alone for every other elementwise one (exact, since the Jacobian is diagonal). Shared by the
block-diagonal engine (:mod:`.blockwise`) and the MLP Hessian (:mod:`.mlp_hessian`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AUTOGRAD_ELEMENTWISE", "CLOSED_FORM", "activation_derivatives"]

Derivatives = tuple[Tensor, Tensor, Tensor | None]


def _sigmoid(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    s = torch.sigmoid(a)
    d1 = torch.addcmul(s, s, s, value=-1)  # s (1 - s)
    return s, d1, (torch.addcmul(d1, d1, s, value=-2) if second else None)  # d1 (1 - 2 s)


def _tanh(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    s = torch.tanh(a)
    d1 = torch.addcmul(torch.ones_like(s), s, s, value=-1)  # 1 - s^2
    return s, d1, (d1.mul(s).mul_(-2) if second else None)


def _relu(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    return torch.relu(a), (a > 0).to(a.dtype), None


def _leaky_relu(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    slope = float(m.negative_slope)  # type: ignore[arg-type]
    return F.leaky_relu(a, slope), (a > 0).to(a.dtype) * (1.0 - slope) + slope, None


def _silu(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    s = torch.sigmoid(a)
    t = torch.addcmul(s, s, s, value=-1)  # s (1 - s)
    d1 = torch.addcmul(s, a, t)  # s + a s (1 - s)
    # s (1 - s) (2 + a (1 - 2 s))
    d2 = torch.addcmul(a, a, s, value=-2).add_(2).mul_(t) if second else None
    return a * s, d1, d2


# output, first and second derivative (None: zero or not asked) from the module and its input
CLOSED_FORM: dict[type[nn.Module], Callable[[nn.Module, Tensor, bool], Derivatives]] = {
    nn.Sigmoid: _sigmoid,
    nn.Tanh: _tanh,
    nn.ReLU: _relu,
    nn.LeakyReLU: _leaky_relu,
    nn.SiLU: _silu,
}
# elementwise activations whose derivatives come from autograd (two backward passes)
AUTOGRAD_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.Softplus,
    nn.Mish,
    nn.Softsign,
    nn.Hardtanh,  # includes ReLU6
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
)


def activation_derivatives(layer: nn.Module, a: Tensor, second: bool = True) -> Derivatives:
    r""":math:`\sigma(a)`, :math:`\sigma'(a)` and :math:`\sigma''(a)` of an elementwise activation.

    Args:
        layer: The activation module.
        a: Its input.
        second: Whether :math:`\sigma''` is needed (``None`` is returned otherwise).

    Returns:
        ``(output, first, second)``, each of ``a``'s shape; ``second`` is ``None`` where it is
        zero (piecewise linear activations) or not asked for.
    """
    closed = CLOSED_FORM.get(type(layer))
    if closed is not None:
        return closed(layer, a, second)
    with torch.enable_grad():
        x = a.detach().requires_grad_(True)
        out = layer(x)
        (d1,) = torch.autograd.grad(out.sum(), x, create_graph=second)
        d2 = None
        if second and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x)
    return out.detach(), d1.detach(), d2
