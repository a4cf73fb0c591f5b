r"""Layers that only rearrange, copy or mask entries.

``nn.Flatten``, ``nn.Unflatten``, ``nn.Identity``, and ``nn.Dropout``/``nn.Dropout1d/2d/3d`` in
eval mode (or ``p = 0``): both products are the same rearrangement,
:math:`dy = \operatorname{reshape}(dx)`, :math:`dx = \operatorname{reshape}^{-1}(u)`
(row-major reshapes, the columns dimension in front).

**Dropout in training mode** (:class:`DropoutRule`): the forward pass draws one mask
:math:`m` with PyTorch's own function on a tensor of ones of the input's shape and dtype (the
same random numbers, in the same order, as the module's forward from the same generator state),
so :math:`y = x \odot m` with :math:`m \in \{0, 1/(1-p)\}` reproduces the module. The
linearisation then holds :math:`m` fixed: :math:`dy = m \odot dx`, :math:`dx = m \odot u`, no
second-order term. Every product of one linearisation uses its one mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.dropout import _DropoutNd

from .base import Context, Example, Params, Rule

__all__ = ["DropoutRule", "ReshapeRule", "dropout_module", "draws_mask"]

#: the function each dropout module's forward calls
_DROPOUT_FUNCTIONS: dict[type[nn.Module], Any] = {
    nn.Dropout: F.dropout,
    nn.Dropout1d: F.dropout1d,
    nn.Dropout2d: F.dropout2d,
    nn.Dropout3d: F.dropout3d,
}


class ReshapeRule(Rule):
    """Rule of the parameter-free reshaping layers (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        # a row-major reshape keeping the leading size keeps every row's entries in that row
        i, o = ctx["in_shape"], ctx["out_shape"]
        return len(i) >= 1 and len(o) >= 1 and i[0] == o[0]

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        out = x if isinstance(module, (_DropoutNd, nn.Identity)) else module(x)
        return out, {"in_shape": x.shape, "out_shape": out.shape}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        if dx is None:
            return None
        lead = dx.shape[:1] if batched else ()
        return dx.reshape(*lead, *ctx["out_shape"])

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        if not need_input:
            return None
        lead = u.shape[:1] if batched else ()
        return u.reshape(*lead, *ctx["in_shape"])

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return None  # linear in its input (at the selected indices): no second-order term


def draws_mask(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout layer in training mode with ``p > 0`` (it is random)."""
    m: Any = module
    return isinstance(module, _DropoutNd) and bool(module.training) and m.p > 0


class DropoutRule(ReshapeRule):
    """Rule of ``nn.Dropout`` and ``nn.Dropout1d/2d/3d``: one fixed mask per forward pass."""

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        if type(module) not in _DROPOUT_FUNCTIONS:
            return f"{type(module).__name__} is not one of the dropout modules of the rule"
        return None

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        if not draws_mask(module):
            return super().forward(module, x, params)
        fn = _DROPOUT_FUNCTIONS[type(module)]
        mask = fn(torch.ones_like(x), m.p, True)  # the module's draw: 0 or 1/(1-p)
        return x * mask, {"in_shape": x.shape, "out_shape": x.shape, "mask": mask}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        mask = ctx.get("mask")
        if mask is None or dx is None:
            return super().jvp(module, ctx, dx, dparams, batched)
        return dx * mask

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        mask = ctx.get("mask")
        if mask is None or not need_input:
            return super().vjp(module, ctx, u, need_input, grads, batched)
        return u * mask


def dropout_module(
    module_type: type[nn.Module],
) -> Any:
    """A factory ``(p=0.5, training=True) -> module`` for ``F.dropout*`` called in a forward."""

    def build(p: float = 0.5, training: bool = True) -> nn.Module:
        return module_type(p).train(training)

    return build


EXAMPLES = [
    Example(nn.Flatten, (3, 2, 4), "flatten"),
    Example(lambda: nn.Flatten(0, -1), (3, 2, 4), "flatten_all"),
    Example(lambda: nn.Unflatten(1, (2, 3)), (4, 6), "unflatten"),
    Example(nn.Identity, (3, 4), "identity"),
    Example(lambda: nn.Dropout(0.5).eval(), (3, 4), "dropout_eval"),
    Example(lambda: nn.Dropout1d(0.5).eval(), (3, 2, 4), "dropout1d_eval"),
    Example(lambda: nn.Dropout2d(0.0), (2, 3, 2, 2), "dropout2d_p0"),
    Example(lambda: nn.Dropout3d(0.5).eval(), (2, 2, 2, 2, 2), "dropout3d_eval"),
]
# training mode: the contract tests' references draw their own mask, so the rules are tested
# with a fixed random state in tests/curvature/engines/test_dropout_rule.py
