r"""Every elementwise activation of the one table (:mod:`..activations`): :math:`y = \sigma(x)`.

The Jacobian is diagonal, :math:`dy = \sigma'(x) \odot dx` and :math:`dx = \sigma'(x) \odot u`.
The forward pass keeps :math:`\sigma'(x)` (closed form or autograd, from the table); for ReLU,
sigmoid and tanh, whose derivative is a function of the output :math:`s`, it keeps :math:`s`
instead (usually the next layer's stored input, so no extra memory) and the products apply
ATen's fused ``*_backward`` kernels. Modules the table refuses (hooks, unknown arguments, an
instance-level ``forward``) have no rule.

The residual (second-order term) is diagonal: :math:`r_x = \rho(\sigma''(x) \odot \delta)
\odot dx` with :math:`\rho` the identity, or the PCH's ``"clip"``/``"abs"``; the coefficient is
computed once per build (:math:`\sigma''` from the output for sigmoid and tanh, else from the
table), and it vanishes for ReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..activations import ACTIVATIONS, activation_derivatives, activation_function
from ..activations import unsupported_activation as _unsupported
from ..pch_mode import modify_residual
from .base import SECOND_DERIVATIVES, Context, Example, Params, Rule

__all__ = ["ElementwiseRule"]

# activations whose derivative is a function of the output s: g -> g * sigma'(a)
_FROM_OUTPUT: dict[type[nn.Module], Callable[[Tensor, Tensor], Tensor]] = {
    nn.ReLU: lambda g, s: torch.ops.aten.threshold_backward(g, s, 0),
    nn.Sigmoid: lambda g, s: torch.ops.aten.sigmoid_backward(g, s),
    nn.Tanh: lambda g, s: torch.ops.aten.tanh_backward(g, s),
}


class ElementwiseRule(Rule):
    """Rule of every activation in :data:`~secondorder.curvature.activations.ACTIVATIONS`."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return True  # elementwise

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        return _unsupported(module)

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        if type(module) in _FROM_OUTPUT:
            s = activation_function(module)(x)  # out of place, also for inplace=True
            return s, {"s": s}
        if SECOND_DERIVATIVES.get():  # a second-order pass follows: f'' from the same sigmoid
            out, d, d2 = activation_derivatives(module, x, second=True)
            return out, {"d": d, "d2": d2}
        out, d, _ = activation_derivatives(module, x, second=False)
        return out, {"d": d}

    @staticmethod
    def _times(module: nn.Module, ctx: Context, g: Tensor) -> Tensor:
        s = ctx.get("s")
        if s is not None:
            return _FROM_OUTPUT[type(module)](g, s)
        return g * ctx["d"]

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        return None if dx is None else self._times(module, ctx, dx)

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        return self._times(module, ctx, u) if need_input else None

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        t = type(module)
        d2: Tensor | None
        if t is nn.ReLU:
            return None
        s: Tensor = ctx["s"] if t in _FROM_OUTPUT else x
        if t is nn.Sigmoid:  # s (1 - s) (1 - 2 s)
            d1 = torch.addcmul(s, s, s, value=-1)
            d2 = torch.addcmul(d1, d1, s, value=-2)
        elif t is nn.Tanh:  # -2 s (1 - s^2)
            d2 = torch.addcmul(torch.ones_like(s), s, s, value=-1).mul_(s).mul_(-2)
        elif "d2" in ctx:
            d2 = ctx["d2"]
        else:
            d2 = activation_derivatives(module, x, second=True)[2]
        if d2 is None:
            return None
        r = d2 * delta
        return {"r": modify_residual(r, modify) if modify is not None else r}

    def residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        rctx: Context,
        dx: Tensor | None,
        dparams: Params,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        return rctx["r"] * dx if need_input and dx is not None else None


# non-default arguments where the constructor needs them or they change the function
_ARGS: dict[type[nn.Module], tuple[object, ...]] = {
    nn.Threshold: (0.1, -0.5),
    nn.LeakyReLU: (0.2,),
    nn.ELU: (0.7,),
    nn.CELU: (1.3,),
    nn.Softplus: (2.0, 0.5),
    nn.Hardtanh: (-0.5, 0.7),
}


def _example(cls: type[nn.Module]) -> Example:
    args = _ARGS.get(cls, ())
    return Example(lambda: cls(*args), (4, 5), f"act_{cls.__name__}")


EXAMPLES = [_example(cls) for cls in ACTIVATIONS]
