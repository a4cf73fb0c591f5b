r"""Normalisation layers: BatchNorm with running statistics (eval mode), LayerNorm, GroupNorm.

**BatchNorm (eval)** is affine per channel (dimension 1): with
:math:`s = (\hat\sigma^2 + \epsilon)^{-1/2}` and :math:`\hat x = (x - \hat\mu) s`,
:math:`y = \gamma \hat x + \beta`, so

.. math::
    dy = \gamma s\, dx + \hat x\, d\gamma + d\beta, \qquad
    dx = \gamma s\, u, \quad d\gamma \mathrel{+}= \textstyle\sum \hat x u, \quad
    d\beta \mathrel{+}= \textstyle\sum u.

**LayerNorm** normalises over the last ``D`` dimensions (:math:`m` entries): with
:math:`r = (\operatorname{var} x + \epsilon)^{-1/2}` and the mean :math:`\langle\cdot\rangle`
over those entries, the Jacobian of :math:`\hat x` is symmetric,

.. math::
    d\hat x = r\,\big(dx - \langle dx\rangle - \hat x \langle \hat x\, dx\rangle\big),

so the same map serves :math:`dx` from :math:`\gamma u` in the reverse product.
**GroupNorm** applies it over each group of channels (and the spatial dimensions).
**RMSNorm** scales without centring: with :math:`r = (\langle x^2\rangle + \epsilon)^{-1/2}`
and :math:`\hat x = x r`, :math:`d\hat x = r\,(dx - \hat x \langle \hat x\, dx\rangle)`, again
symmetric; :math:`y = \gamma \hat x`.

Residuals (second-order terms): BatchNorm (eval) is bilinear in :math:`(x, \gamma)`, so with
:math:`c = s\,\delta` (per channel :math:`s`), :math:`r_x = c\, d\gamma`,
:math:`r_\gamma = \sum c\, dx`, :math:`r_\beta = 0`.

The standardisations (LayerNorm, GroupNorm, RMSNorm, BatchNorm by batch statistics) have closed
forms (:func:`standardised_residual`). With :math:`g = \gamma\delta`,
:math:`c = \langle \hat x g\rangle`, :math:`p = g - \langle g\rangle - \hat x c`,
:math:`a = \langle \hat x\, dx\rangle` and :math:`e = dx - \langle dx\rangle - \hat x a`
(so :math:`d\hat x = r e`; RMSNorm drops the means :math:`\langle g\rangle`,
:math:`\langle dx\rangle`), differentiating :math:`J_x^\top g = r p` along :math:`dx` with
:math:`dr = -r^2 a` gives

.. math::
    r_x = -r^2\,\big(a\, p + c\, e + \hat x\, \langle e\, g\rangle\big)
    + J_{\hat x}^\top (d\gamma\, \delta), \qquad
    r_\gamma = \textstyle\sum \delta\, r e, \qquad r_\beta = 0.

BatchNorm by batch statistics and the registry's rule choosing by mode are in :mod:`.batchnorm`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, add_bias_tangent, channel_view

__all__ = ["BatchNormEvalRule", "GroupNormRule", "LayerNormRule", "RMSNormRule"]


def normalised_tangent(t: Tensor, xhat: Tensor, r: Tensor, dims: tuple[int, ...]) -> Tensor:
    r"""The derivative of standardisation over ``dims`` applied to ``t`` (forward or reverse).

    :math:`r\,(t - \bar t - \hat x\, \overline{t \hat x})` with means over ``dims``,
    :math:`\hat x` the standardised input and :math:`r` the inverse standard deviation; the
    map is symmetric, so the same expression serves jvp and vjp.
    """
    inner = (t * xhat).mean(dims, keepdim=True)
    return (t - t.mean(dims, keepdim=True)).sub_(xhat * inner).mul_(r)


def standardised_prepare(
    xhat: Tensor, g: Tensor, dims: tuple[int, ...], centre: bool = True
) -> dict[str, Tensor]:
    r"""What :func:`standardised_residual` needs at the scaled cotangent :math:`g = \gamma\delta`.

    Args:
        xhat: The standardised input.
        g: :math:`\gamma \delta` (:math:`\delta` without an affine weight), shape of ``xhat``.
        dims: The dimensions the statistics reduce over.
        centre: Whether the mean is subtracted (False: RMSNorm).

    Returns:
        ``{"g", "c", "p"}``: :math:`g`, :math:`c = \langle\hat x g\rangle`,
        :math:`p = g - \langle g\rangle - \hat x c` (module docstring).
    """
    c = (xhat * g).mean(dims, keepdim=True)
    p = g - xhat * c
    if centre:
        p = p.sub_(g.mean(dims, keepdim=True))
    return {"g": g, "c": c, "p": p}


def standardised_residual(
    dx: Tensor,
    xhat: Tensor,
    r: Tensor,
    dims: tuple[int, ...],
    rctx: Mapping[str, Tensor],
    centre: bool = True,
    need_input: bool = True,
) -> tuple[Tensor | None, Tensor]:
    r"""The input residual of :math:`\langle g, \hat x(x)\rangle` along ``dx``, and :math:`e`.

    :math:`r_x = -r^2 (a p + c e + \hat x \langle e g\rangle)` with
    :math:`a = \langle\hat x\, dx\rangle`, :math:`e = dx - \langle dx\rangle - \hat x a`
    (module docstring); :math:`r e` is :math:`d\hat x`, which the weight's residual needs.

    Args:
        dx: The input tangent (``(K, *x.shape)`` with ``dims`` counted accordingly).
        xhat: The standardised input.
        r: The inverse standard deviation (reduced dimensions kept).
        dims: The dimensions the statistics reduce over, in ``dx``'s numbering.
        rctx: :func:`standardised_prepare`'s output.
        centre: Whether the mean is subtracted (False: RMSNorm).
        need_input: Whether :math:`r_x` is computed (False: ``None``).

    Returns:
        ``(r_x, e)``.
    """
    a = (xhat * dx).mean(dims, keepdim=True)
    e = dx - xhat * a
    if centre:
        e = e.sub_(dx.mean(dims, keepdim=True))
    if not need_input:
        return None, e
    q = (e * rctx["g"]).mean(dims, keepdim=True)
    rx = (a * rctx["p"]).add_(e * rctx["c"]).add_(xhat * q).mul_(r.square().neg_())
    return rx, e


class BatchNormEvalRule(Rule):
    """Rule of ``nn.BatchNorm1d/2d/3d`` normalising by running statistics (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["dim"] == 1)  # batched input

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if ctx["dim"] != 1:
            return None
        return _per_channel(ctx["xhat"], u, names)

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        m: Any = module
        if m.training or not m.track_running_stats or m.running_mean is None:
            return "it normalises by batch statistics (training mode or no running statistics)"
        return None

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        w, b = params.get("weight"), params.get("bias")
        dim = 1 if x.ndim > 1 else 0
        inv = channel_view((m.running_var + m.eps).rsqrt(), x.ndim, dim, False)
        xhat = (x - channel_view(m.running_mean, x.ndim, dim, False)) * inv
        out = F.batch_norm(x, m.running_mean, m.running_var, w, b, False, 0.0, m.eps)
        scale = inv * channel_view(w, x.ndim, dim, False) if w is not None else inv
        return out, {"xhat": xhat, "scale": scale, "dim": dim}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        xhat, dim = ctx["xhat"], ctx["dim"]
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = dx * ctx["scale"] if dx is not None else None
        if dw is not None:
            term = xhat * channel_view(dw, xhat.ndim, dim, batched)
            out = term if out is None else out.add_(term)
        if db is not None:
            bias = channel_view(db, xhat.ndim, dim, batched)
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
        lead = 1 if batched else 0
        dims = [d for d in range(lead, u.ndim) if d != lead + ctx["dim"]]
        gw, gb = grads.get("weight"), grads.get("bias")
        if gw is not None:
            gw.add_((u * ctx["xhat"]).sum(dims))
        if gb is not None:
            gb.add_(u.sum(dims))
        return u * ctx["scale"] if need_input else None

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        m: Any = module
        if params.get("weight") is None:  # affine in x alone
            return None
        inv = channel_view((m.running_var + m.eps).rsqrt(), delta.ndim, ctx["dim"], False)
        return {"c": delta * inv}

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
        c, dim = rctx["c"], ctx["dim"]
        gw, dw = grads.get("weight"), dparams.get("weight")
        if gw is not None and dx is not None:
            lead = 1 if batched else 0
            dims = [d for d in range(lead, dx.ndim) if d != lead + dim]
            gw.add_((c * dx).sum(dims))
        if not need_input or dw is None:
            return None
        return c * channel_view(dw, c.ndim, dim, batched)


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
            out["weight"] = _sum(u * xhat, mid).transpose(0, 1)
        if "bias" in names:
            out["bias"] = _sum(u, mid).transpose(0, 1)
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
        w = ctx["w"]
        g = delta * w if w is not None else delta
        rctx = standardised_prepare(ctx["xhat"], g, ctx["dims"])
        return {**rctx, "delta": delta, "dr": delta * ctx["r"]}

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
        w = ctx["w"]
        g = delta * w if w is not None else delta
        rctx = standardised_prepare(ctx["xhat"], g, ctx["dims"], centre=False)
        return {**rctx, "delta": delta, "dr": delta * ctx["r"]}

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
        return _per_channel(ctx["xhat"].reshape(ctx["shape"]), u, names)

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


def _bn_stats(m: Any) -> Any:
    with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _ln(m: Any) -> Any:
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    return m


def _per_channel(xhat: Tensor, u: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample cotangents ``(N, K, C)`` of a per-channel affine map on ``(N, C, *S)``."""
    spatial = tuple(range(3, u.ndim))
    out = {}
    if "weight" in names:
        out["weight"] = _sum(u * xhat, spatial).transpose(0, 1)
    if "bias" in names:
        out["bias"] = _sum(u, spatial).transpose(0, 1)
    return out


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``dims`` (none: ``t`` itself, where ``Tensor.sum(())`` sums all)."""
    return t.sum(dims) if dims else t


EXAMPLES = [
    Example(lambda: _bn_stats(nn.BatchNorm1d(3)), (4, 3), "batchnorm1d"),
    Example(lambda: _bn_stats(nn.BatchNorm1d(3)), (4, 3, 5), "batchnorm1d_seq"),
    Example(lambda: _bn_stats(nn.BatchNorm2d(2)), (3, 2, 3, 4), "batchnorm2d"),
    Example(lambda: _bn_stats(nn.BatchNorm2d(2, affine=False)), (3, 2, 2, 2), "batchnorm2d_plain"),
    Example(lambda: _bn_stats(nn.BatchNorm3d(2)), (2, 2, 2, 2, 2), "batchnorm3d"),
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
