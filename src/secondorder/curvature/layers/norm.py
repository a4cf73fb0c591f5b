r"""Normalisation layers: LayerNorm, GroupNorm, RMSNorm.

**LayerNorm** normalises over the last ``D`` dimensions (:math:`m` entries): with
:math:`r = (\operatorname{var} x + \epsilon)^{-1/2}` and the mean :math:`\langle\cdot\rangle`
over those entries, the Jacobian of :math:`\hat x` is symmetric,

.. math::
    d\hat x = r\,\big(dx - \langle dx\rangle - \hat x \langle \hat x\, dx\rangle\big),

so the same map serves :math:`dx` from :math:`\gamma u` in the reverse product.
**GroupNorm** applies it over each group of channels (and the spatial dimensions).
**RMSNorm** scales without centring: with :math:`r = (\langle x^2\rangle + \epsilon)^{-1/2}`
and :math:`\hat x = x r`, :math:`d\hat x = r\,(dx - \hat x \langle \hat x\, dx\rangle)`, again
symmetric; :math:`y = \gamma \hat x`. Their residuals (second-order terms) are the closed forms
of :mod:`.standardise`. BatchNorm (both modes) is in :mod:`.batchnorm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, add_bias_tangent, channel_view
from .standardise import (
    affine_prepare,
    normalised_tangent,
    per_channel_cotangents,
    standardised_prepare,
    standardised_residual,
    sum_dims,
)

__all__ = ["GroupNormRule", "LayerNormRule", "RMSNormRule"]


class LayerNormRule(Rule):
    """Rule of ``nn.LayerNorm`` (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["xhat"].ndim > len(ctx["dims"]))  # the leading dimension not normalised

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if not self.rowwise(module, ctx):
            return None
        # gamma, beta act on the normalised dimensions: sum over the middle ones per sample
        xhat = ctx["xhat"]
        mid = tuple(range(2, 1 + xhat.ndim - len(ctx["dims"])))
        out = {}
        if "weight" in names:
            out["weight"] = sum_dims(u * xhat, mid).transpose(0, 1)
        if "bias" in names:
            out["bias"] = sum_dims(u, mid).transpose(0, 1)
        return out

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        w, b = params.get("weight"), params.get("bias")
        dims = tuple(range(-len(m.normalized_shape), 0))
        # xhat and r by the layer-norm kernel without affine (r: reduced dimensions kept), in
        # x's dtype (GPUs return float32 statistics of half inputs); the output as the module's
        xhat, _, r = torch.native_layer_norm(x, m.normalized_shape, None, None, m.eps)
        out = F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        return out, {"xhat": xhat, "r": r.to(x.dtype), "w": w, "dims": dims}

    @staticmethod
    def _normalise(ctx: Context, t: Tensor) -> Tensor:
        return normalised_tangent(t, ctx["xhat"], ctx["r"], ctx["dims"])

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        xhat, w = ctx["xhat"], ctx["w"]
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            out = self._normalise(ctx, dx)
            if w is not None:
                out = out.mul_(w)
        lead_ones = [1] * (xhat.ndim - len(ctx["dims"]))
        if dw is not None:
            view = dw.view(dw.shape[0], *lead_ones, *dw.shape[1:]) if batched else dw
            term = xhat * view
            out = term if out is None else out.add_(term)
        if db is not None:
            bias = db.view(db.shape[0], *lead_ones, *db.shape[1:]) if batched else db
            out = add_bias_tangent(out, bias, xhat.shape, batched)
        return out

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        xhat, w = ctx["xhat"], ctx["w"]
        gw, gb = grads.get("weight"), grads.get("bias")
        lead = 1 if batched else 0
        outer = tuple(range(lead, u.ndim - len(ctx["dims"])))
        if gw is not None:
            gw.add_((u * xhat).sum(outer))
        if gb is not None:
            gb.add_(u.sum(outer))
        if not need_input:
            return None
        return self._normalise(ctx, u * w if w is not None else u)

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return affine_prepare(ctx, delta)

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
        return _affine_residual(
            self._normalise, ctx, rctx, dx, dparams, need_input, grads, batched, True
        )


def _affine_residual(
    jac: Callable[[Context, Tensor], Tensor],
    ctx: Context,
    rctx: Context,
    dx: Tensor | None,
    dparams: Params,
    need_input: bool,
    grads: Mapping[str, Tensor],
    batched: bool,
    centre: bool,
) -> Tensor | None:
    """LayerNorm's and RMSNorm's residual (module docstring); ``jac`` is the Jacobian of xhat."""
    xhat, r, dims = ctx["xhat"], ctx["r"], ctx["dims"]
    gw, dw = grads.get("weight"), dparams.get("weight")
    rx = None
    if dx is not None and (need_input or gw is not None):
        rx, e = standardised_residual(dx, xhat, r, dims, rctx, centre, need_input)
        if gw is not None:
            lead = 1 if batched else 0
            gw.add_((rctx["dr"] * e).sum(tuple(range(lead, dx.ndim - len(dims)))))
    if not need_input:
        return None
    if dw is not None:
        lead_ones = [1] * (xhat.ndim - len(dims))
        view = dw.view(dw.shape[0], *lead_ones, *dw.shape[1:]) if batched else dw
        term = jac(ctx, view * rctx["delta"])
        rx = term if rx is None else rx.add_(term)
    return rx


class RMSNormRule(Rule):
    """Rule of ``nn.RMSNorm`` (module docstring); factor hooks as LayerNorm's."""

    rowwise = LayerNormRule.rowwise
    per_sample_param_vjp = LayerNormRule.per_sample_param_vjp

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        w = params.get("weight")
        dims = tuple(range(-len(m.normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if m.eps is None else m.eps
        r = (x.square().mean(dims, keepdim=True) + eps).rsqrt()
        out = F.rms_norm(x, m.normalized_shape, w, m.eps)
        return out, {"xhat": x * r, "r": r, "w": w, "dims": dims}

    @staticmethod
    def _scaled(ctx: Context, t: Tensor) -> Tensor:
        """``r (t - xhat <xhat t>)``: the derivative of ``x -> x r(x)`` (symmetric)."""
        xhat, dims = ctx["xhat"], ctx["dims"]
        inner = (t * xhat).mean(dims, keepdim=True)
        return (t - xhat * inner).mul_(ctx["r"])

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        xhat, w = ctx["xhat"], ctx["w"]
        dw = dparams.get("weight")
        out = None
        if dx is not None:
            out = self._scaled(ctx, dx)
            if w is not None:
                out = out.mul_(w)
        if dw is not None:
            lead_ones = [1] * (xhat.ndim - len(ctx["dims"]))
            view = dw.view(dw.shape[0], *lead_ones, *dw.shape[1:]) if batched else dw
            term = xhat * view
            out = term if out is None else out.add_(term)
        return out

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        xhat, w = ctx["xhat"], ctx["w"]
        gw = grads.get("weight")
        if gw is not None:
            lead = 1 if batched else 0
            gw.add_((u * xhat).sum(tuple(range(lead, u.ndim - len(ctx["dims"])))))
        if not need_input:
            return None
        return self._scaled(ctx, u * w if w is not None else u)

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return affine_prepare(ctx, delta, centre=False)

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
        return _affine_residual(
            self._scaled, ctx, rctx, dx, dparams, need_input, grads, batched, False
        )


class GroupNormRule(Rule):
    r"""Rule of ``nn.GroupNorm``: LayerNorm's map over each group of channels, affine per channel.

    With :math:`x` of shape ``(N, C, *S)`` viewed as ``(N, G, C/G * prod(S))``, :math:`\hat x`
    normalises the last dimension; :math:`y = \gamma_c \hat x + \beta_c`.
    """

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return True  # inputs (N, C, *S), each sample normalised alone

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        return per_channel_cotangents(ctx["xhat"].reshape(ctx["shape"]), u, names)

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        w, b = params.get("weight"), params.get("bias")
        n, c, g = x.shape[0], x.shape[1], m.num_groups
        # xhat and r (N, G) by the group-norm kernel without affine, in x's dtype
        xhat, _, r = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), g, m.eps)
        xhat, r = xhat.reshape(n, g, -1), r.to(x.dtype).unsqueeze(-1)
        ctx = {"xhat": xhat, "r": r, "dims": (-1,), "shape": x.shape, "w": w}
        return F.group_norm(x, m.num_groups, w, b, m.eps), ctx

    @staticmethod
    def _grouped(ctx: Context, t: Tensor, batched: bool) -> Tensor:
        """``r (t - <t> - xhat <xhat t>)`` per group, ``t`` in the input's shape."""
        xhat = ctx["xhat"]
        lead = t.shape[:1] if batched else ()
        tg = t.reshape(*lead, *xhat.shape)
        return LayerNormRule._normalise(ctx, tg).reshape(*lead, *ctx["shape"])

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        shape, w = ctx["shape"], ctx["w"]
        xhat = ctx["xhat"].reshape(shape)
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            out = self._grouped(ctx, dx, batched)
            if w is not None:
                out = out.mul_(channel_view(w, len(shape), 1, False))
        if dw is not None:
            term = xhat * channel_view(dw, len(shape), 1, batched)
            out = term if out is None else out.add_(term)
        if db is not None:
            bias = channel_view(db, len(shape), 1, batched)
            out = add_bias_tangent(out, bias, shape, batched)
        return out

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        shape, w = ctx["shape"], ctx["w"]
        lead = 1 if batched else 0
        dims = [d for d in range(lead, u.ndim) if d != lead + 1]
        gw, gb = grads.get("weight"), grads.get("bias")
        if gw is not None:
            gw.add_((u * ctx["xhat"].reshape(shape)).sum(dims))
        if gb is not None:
            gb.add_(u.sum(dims))
        if not need_input:
            return None
        g = u * channel_view(w, len(shape), 1, False) if w is not None else u
        return self._grouped(ctx, g, batched)

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        xhat, w, r = ctx["xhat"], ctx["w"], ctx["r"]
        g = delta * channel_view(w, delta.ndim, 1, False) if w is not None else delta
        rctx = standardised_prepare(xhat, g.reshape(xhat.shape), ctx["dims"])
        dr = (delta.reshape(xhat.shape) * r).reshape(delta.shape)
        return {**rctx, "delta": delta, "dr": dr}

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
        xhat, shape = ctx["xhat"], ctx["shape"]
        gw, dw = grads.get("weight"), dparams.get("weight")
        lead = dx.shape[:1] if batched and dx is not None else ()
        rx = None
        if dx is not None and (need_input or gw is not None):
            dxg = dx.reshape(*lead, *xhat.shape)
            rxg, eg = standardised_residual(dxg, xhat, ctx["r"], (-1,), rctx, True, need_input)
            if gw is not None:
                n = len(lead)
                dims = [d for d in range(n, dx.ndim) if d != n + 1]
                gw.add_((rctx["dr"] * eg.reshape(*lead, *shape)).sum(dims))
            rx = None if rxg is None else rxg.reshape(*lead, *shape)
        if not need_input:
            return None
        if dw is not None:
            g = channel_view(dw, len(shape), 1, batched) * rctx["delta"]
            term = self._grouped(ctx, g, batched)
            rx = term if rx is None else rx.add_(term)
        return rx


def _ln(m: Any) -> Any:
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    return m


EXAMPLES = [
    Example(lambda: _ln(nn.LayerNorm(5)), (3, 5), "layernorm"),
    Example(lambda: _ln(nn.LayerNorm((3, 4))), (2, 5, 3, 4), "layernorm_2d"),
    Example(lambda: _ln(nn.LayerNorm(4, bias=False)), (3, 2, 4), "layernorm_nobias"),
    Example(lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4), "layernorm_plain"),
    Example(lambda: _ln(nn.GroupNorm(2, 4)), (3, 4, 5), "groupnorm1d"),
    Example(lambda: _ln(nn.GroupNorm(3, 6)), (2, 6, 2, 3), "groupnorm2d"),
    Example(lambda: nn.GroupNorm(1, 2, affine=False), (3, 2, 4), "groupnorm_plain"),
    Example(lambda: _ln(nn.RMSNorm(5)), (3, 5), "rmsnorm"),
    Example(lambda: _ln(nn.RMSNorm((3, 4), eps=1e-3)), (2, 5, 3, 4), "rmsnorm_2d"),
    Example(lambda: nn.RMSNorm(4, elementwise_affine=False), (3, 2, 4), "rmsnorm_plain"),
]
