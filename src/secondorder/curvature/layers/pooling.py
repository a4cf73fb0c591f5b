r"""Pooling layers, each linear in its input (max-pooling piecewise, at fixed indices).

**Max-pooling** selects entries: with :math:`P` the selection the forward pass found,
:math:`dy = P\,dx` (a gather) and :math:`dx = P^\top u` (a scatter-add).
**Average pooling** (``AvgPool``, ``AdaptiveAvgPool``) is a fixed linear map :math:`A`:
:math:`dy = A\,dx` applies the layer, :math:`dx = A^\top u` is its backward at a zero probe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, per_sample

__all__ = ["AveragePoolRule", "MaxPoolRule"]

_MAXPOOL: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MaxPool1d: F.max_pool1d,
    nn.MaxPool2d: F.max_pool2d,
    nn.MaxPool3d: F.max_pool3d,
}

_SPATIAL: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


class MaxPoolRule(Rule):
    """Rule of ``nn.MaxPool1d/2d/3d`` (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["lead"] == 2)  # batched input: pools each (sample, channel) alone

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        return "return_indices=True" if getattr(module, "return_indices", False) else None

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        out, idx = _MAXPOOL[type(module)](
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        # indices into the flattened spatial dimensions of each (sample, channel)
        lead = x.ndim - _SPATIAL[type(module)]  # 1 (unbatched) or 2
        return out, {"idx": idx.flatten(lead), "lead": lead, "in_shape": x.shape, "out": out.shape}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        if dx is None:
            return None
        idx, lead = ctx["idx"], ctx["lead"] + (1 if batched else 0)
        flat = dx.flatten(lead)
        index = idx.expand(*flat.shape[:lead], idx.shape[-1])
        pre = dx.shape[:1] if batched else ()
        return flat.gather(lead, index).view(*pre, *ctx["out"])

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
        idx, lead = ctx["idx"], ctx["lead"] + (1 if batched else 0)
        pre = u.shape[:1] if batched else ()
        grad = u.new_zeros(*pre, *ctx["in_shape"])
        flat_u = u.flatten(lead)
        grad.flatten(lead).scatter_add_(lead, idx.expand(*flat_u.shape), flat_u)
        return grad

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


class AveragePoolRule(Rule):
    """Rule of ``nn.AvgPool1d/2d/3d`` and ``nn.AdaptiveAvgPool1d/2d/3d`` (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        spatial = int(type(module).__name__[-2])  # ...Pool1d/2d/3d
        return len(ctx["in_shape"]) == spatial + 2  # batched input

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        return module(x), {"in_shape": x.shape}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        return None if dx is None else per_sample(module, dx, batched)

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
        shape = ctx["in_shape"]
        if batched:
            shape = (u.shape[0] * shape[0], *shape[1:])
        with torch.enable_grad():
            probe = u.new_zeros(shape, requires_grad=True)
            (grad,) = torch.autograd.grad(module(probe), probe, u.flatten(0, 1) if batched else u)
        return grad.unflatten(0, (u.shape[0], -1)) if batched else grad

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
    Example(lambda: nn.MaxPool1d(2), (3, 2, 5), "maxpool1d"),
    Example(lambda: nn.MaxPool2d(2, stride=1, padding=1), (2, 2, 4, 4), "maxpool2d"),
    Example(lambda: nn.MaxPool2d((2, 3), ceil_mode=True), (2, 5, 7), "maxpool2d_unbatched"),
    Example(lambda: nn.MaxPool3d(2), (2, 1, 4, 4, 4), "maxpool3d"),
    Example(lambda: nn.AvgPool1d(2, stride=1), (3, 2, 5), "avgpool1d"),
    Example(lambda: nn.AvgPool2d(2, padding=1, count_include_pad=False), (2, 2, 5, 4), "avgpool2d"),
    Example(lambda: nn.AvgPool3d(2), (2, 1, 4, 4, 4), "avgpool3d"),
    Example(lambda: nn.AdaptiveAvgPool1d(3), (2, 2, 7), "adaptive1d"),
    Example(lambda: nn.AdaptiveAvgPool2d((2, 1)), (2, 3, 5, 4), "adaptive2d"),
    Example(lambda: nn.AdaptiveAvgPool3d(1), (2, 2, 3, 3, 3), "adaptive3d"),
]
