r"""Layers that only rearrange or copy entries.

``nn.Flatten``, ``nn.Unflatten``, ``nn.Identity``, ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` in
eval mode (or ``p = 0``).
Both products are the same rearrangement:
:math:`dy = \operatorname{reshape}(dx)`, :math:`dx = \operatorname{reshape}^{-1}(u)`
(row-major reshapes, the columns dimension in front).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .base import Context, Example, Params, Rule

__all__ = ["ReshapeRule"]


class ReshapeRule(Rule):
    """Rule of the parameter-free reshaping layers (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        # a row-major reshape keeping the leading size keeps every row's entries in that row
        i, o = ctx["in_shape"], ctx["out_shape"]
        return len(i) >= 1 and len(o) >= 1 and i[0] == o[0]

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        m: Any = module
        if isinstance(module, _DropoutNd) and module.training and m.p > 0:
            return "Dropout in training mode is random"
        return None

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
