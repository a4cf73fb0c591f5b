r"""The one table of elementwise activations every hand-written curvature engine serves.

Each entry maps an activation class to its out-of-place function with every argument of the
module (``negative_slope``, ``alpha``, ``beta`` and ``threshold``, ``approximate``, bounds,
...), and optionally a closed form of :math:`\sigma(a)`, :math:`\sigma'(a)`,
:math:`\sigma''(a)`. :func:`activation_derivatives` returns those three for a module and its
input :math:`a`: in closed form where the table has one, else by two backward passes through
the out-of-place function alone (exact, since the Jacobian is diagonal). In-place modules
(``inplace=True``) are evaluated out of place: the derivative is always taken at the input,
and no tensor the engines keep is overwritten.

:func:`unsupported_activation` decides for every engine whether a module is in the table with
arguments it honours: the exact class (a subclass may change ``forward``), no instance-level
``forward``, no hooks, and no public attribute the entry does not read (an argument a later
torch version adds is refused rather than ignored). Engines send a refused module down their
autograd path or raise. Used by the graph engine's elementwise rule (:mod:`.layers.elementwise`,
with the second derivative of the Hessian's residual), the factored MLP path
(:mod:`.sequential_ops`), the block-diagonal engine (:mod:`.blockwise`) and the probed forward
passes of the Kronecker paths (:mod:`.probes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_derivatives",
    "activation_function",
    "is_activation",
    "unsupported_activation",
]

Derivatives = tuple[Tensor, Tensor, Tensor | None]
Closed = Callable[[nn.Module, Tensor, bool], Derivatives]


@dataclass(frozen=True)
class Activation:
    """One table entry.

    Attributes:
        function: ``(module, a) -> sigma(a)``, out of place, with every argument in ``reads``.
        reads: The module's arguments ``function`` (and ``closed``) honour, ``inplace`` aside.
        closed: ``(module, a, second) -> (sigma, sigma', sigma'' or None)`` in closed form, or
            ``None`` for derivatives by autograd through ``function``.
    """

    function: Callable[[nn.Module, Tensor], Tensor]
    reads: tuple[str, ...] = ()
    closed: Closed | None = None


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


def _elu(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    # alpha (e^a - 1) for a <= 0: derivative alpha e^a there (torch's convention at a = 0)
    alpha = float(m.alpha)  # type: ignore[arg-type]
    neg = a <= 0
    e = torch.where(neg, torch.exp(torch.where(neg, a, 0.0)) * alpha, 0.0)  # alpha e^a or 0
    d1 = torch.where(neg, e, 1.0)
    return F.elu(a, alpha), d1, (e if second else None)


def _softplus(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    # log(1 + e^{beta a}) / beta, and the identity where beta a > threshold
    beta, threshold = float(m.beta), float(m.threshold)  # type: ignore[arg-type]
    za = a * beta
    linear = za > threshold
    s = torch.sigmoid(za)
    d1 = torch.where(linear, 1.0, s)
    d2 = torch.where(linear, 0.0, s * (1 - s) * beta) if second else None
    return F.softplus(a, beta, threshold), d1, d2


def _hardsigmoid_function(m: nn.Module, a: Tensor) -> Tensor:
    # bit for bit F.hardsigmoid, whose backward kernel multiplies by a float32 1/6 (a relative
    # error of 3e-8 in float64) and has no double backward
    return F.hardtanh(a + 3, 0.0, 6.0) / 6


def _hardsigmoid(m: nn.Module, a: Tensor, second: bool) -> Derivatives:
    d1 = ((a > -3) & (a < 3)).to(a.dtype) / 6
    return _hardsigmoid_function(m, a), d1, None


def _plain(fn: Callable[[Tensor], Tensor]) -> Callable[[nn.Module, Tensor], Tensor]:
    return lambda m, a: fn(a)


def _hardtanh(m: nn.Module, a: Tensor) -> Tensor:
    return F.hardtanh(a, m.min_val, m.max_val)  # type: ignore[arg-type]


ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.Sigmoid: Activation(_plain(torch.sigmoid), closed=_sigmoid),
    nn.Tanh: Activation(_plain(torch.tanh), closed=_tanh),
    nn.ReLU: Activation(_plain(torch.relu), closed=_relu),
    nn.LeakyReLU: Activation(
        lambda m, a: F.leaky_relu(a, m.negative_slope),  # type: ignore[arg-type]
        ("negative_slope",),
        _leaky_relu,
    ),
    nn.SiLU: Activation(_plain(F.silu), closed=_silu),
    nn.ELU: Activation(lambda m, a: F.elu(a, m.alpha), ("alpha",), _elu),  # type: ignore[arg-type]
    nn.CELU: Activation(lambda m, a: F.celu(a, m.alpha), ("alpha",)),  # type: ignore[arg-type]
    nn.SELU: Activation(_plain(F.selu)),
    nn.GELU: Activation(
        lambda m, a: F.gelu(a, approximate=m.approximate),  # type: ignore[arg-type]
        ("approximate",),
    ),
    nn.Softplus: Activation(
        lambda m, a: F.softplus(a, m.beta, m.threshold),  # type: ignore[arg-type]
        ("beta", "threshold"),
        _softplus,
    ),
    nn.Mish: Activation(_plain(F.mish)),
    nn.Softsign: Activation(_plain(F.softsign)),
    nn.Hardtanh: Activation(_hardtanh, ("min_val", "max_val")),
    nn.ReLU6: Activation(_hardtanh, ("min_val", "max_val")),
    nn.Hardsigmoid: Activation(_hardsigmoid_function, closed=_hardsigmoid),
    nn.Hardswish: Activation(_plain(F.hardswish)),
    nn.LogSigmoid: Activation(_plain(F.logsigmoid)),
    nn.Threshold: Activation(
        lambda m, a: F.threshold(a, m.threshold, m.value),  # type: ignore[arg-type]
        ("threshold", "value"),
    ),
    nn.Tanhshrink: Activation(_plain(F.tanhshrink)),
    nn.Softshrink: Activation(lambda m, a: F.softshrink(a, m.lambd), ("lambd",)),  # type: ignore[arg-type]
    nn.Hardshrink: Activation(lambda m, a: F.hardshrink(a, m.lambd), ("lambd",)),  # type: ignore[arg-type]
}

# public attributes every module has, besides its arguments
_MODULE_ATTRIBUTES = frozenset({"training", "inplace"})


def is_activation(module: nn.Module) -> bool:
    """Whether ``module``'s exact type is in :data:`ACTIVATIONS` (supported or not)."""
    return type(module) in ACTIVATIONS


def unsupported_activation(module: nn.Module) -> str | None:
    """Why the table cannot serve ``module`` exactly, or ``None`` if it can.

    Args:
        module: Any module.

    Returns:
        ``None`` for a table activation whose every argument the entry honours; else a reason
        (not in the table, an instance-level ``forward``, hooks, or an attribute the entry does
        not read).
    """
    entry = ACTIVATIONS.get(type(module))
    if entry is None:
        return f"{type(module).__name__} is not an elementwise activation of the table"
    if "forward" in vars(module):
        return "it has an instance-level forward"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "it has hooks"
    if module._parameters or module._buffers or module._modules:
        return "it holds parameters, buffers or submodules"
    unknown = sorted(
        k
        for k in vars(module)
        if not k.startswith("_") and k not in _MODULE_ATTRIBUTES and k not in entry.reads
    )
    if unknown:
        return f"its attributes {unknown} are not honoured by the curvature engines"
    return None


def activation_function(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The out-of-place function ``a -> sigma(a)`` of a table activation, with its arguments."""
    fn = ACTIVATIONS[type(module)].function
    return lambda a: fn(module, a)


def activation_derivatives(layer: nn.Module, a: Tensor, second: bool = True) -> Derivatives:
    r""":math:`\sigma(a)`, :math:`\sigma'(a)` and :math:`\sigma''(a)` of a table activation.

    Args:
        layer: The activation module (see :func:`unsupported_activation`).
        a: Its input (never modified, also for ``inplace=True``).
        second: Whether :math:`\sigma''` is needed (``None`` is returned otherwise).

    Returns:
        ``(output, first, second)``, each of ``a``'s shape; ``second`` is ``None`` where it is
        zero (piecewise linear activations) or not asked for.
    """
    entry = ACTIVATIONS[type(layer)]
    if entry.closed is not None:
        return entry.closed(layer, a, second)
    with torch.enable_grad():
        x = a.detach().requires_grad_(True)
        out = entry.function(layer, x)
        (d1,) = torch.autograd.grad(out.sum(), x, create_graph=second)
        d2 = None
        if second and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), x)
    return out.detach(), d1.detach(), d2
