r"""BatchNorm by running statistics (eval mode) or the batch's statistics; the registry's rule.

**Eval mode** is affine per channel (dimension 1): with
:math:`s = (\hat\sigma^2 + \epsilon)^{-1/2}` and :math:`\hat x = (x - \hat\mu) s`,
:math:`y = \gamma \hat x + \beta`, so

.. math::
    dy = \gamma s\, dx + \hat x\, d\gamma + d\beta, \qquad
    dx = \gamma s\, u, \quad d\gamma \mathrel{+}= \textstyle\sum \hat x u, \quad
    d\beta \mathrel{+}= \textstyle\sum u;

it is bilinear in :math:`(x, \gamma)`, so with :math:`c = s\,\delta` the residual is
:math:`r_x = c\, d\gamma`, :math:`r_\gamma = \sum c\, dx`, :math:`r_\beta = 0`.
**By the batch's statistics** (training mode) the statistics couple the samples
(:class:`BatchNormTrainRule`). :class:`BatchNormRule` chooses per module mode between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, add_bias_tangent, channel_view
from .standardise import (
    affine_prepare,
    normalised_tangent,
    per_channel_cotangents,
    standardised_residual,
)

__all__ = ["BatchNormEvalRule", "BatchNormRule", "BatchNormTrainRule"]


class BatchNormEvalRule(Rule):
    """Rule of ``nn.BatchNorm1d/2d/3d`` normalising by running statistics (module docstring)."""

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["dim"] == 1)  # batched input

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if ctx["dim"] != 1:
            return None
        return per_channel_cotangents(ctx["xhat"], u, names)

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


def _batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises by the batch's statistics (as ``_BatchNorm.forward``)."""
    m: Any = module
    return bool(m.training or (m.running_mean is None and m.running_var is None))


class BatchNormTrainRule(Rule):
    r"""Rule of ``nn.BatchNorm1d/2d/3d`` normalising by the batch's statistics (training mode).

    The statistics couple the samples: per channel, over the ``m`` entries of every other
    dimension (samples and positions), :math:`\mu`, :math:`\sigma^2` (biased),
    :math:`r = (\sigma^2 + \epsilon)^{-1/2}`, :math:`\hat x = (x - \mu) r`,
    :math:`y = \gamma \hat x + \beta`. With :math:`\langle\cdot\rangle` the mean over those
    entries, the Jacobian of :math:`\hat x` is LayerNorm's, symmetric,

    .. math::
        d\hat x = r\,\big(dx - \langle dx\rangle - \hat x \langle \hat x\, dx\rangle\big),

    so :math:`dy = \gamma\, d\hat x + \hat x\, d\gamma + d\beta` and
    :math:`dx = r\,(g - \langle g\rangle - \hat x \langle \hat x g\rangle)` with
    :math:`g = \gamma u`. The residual is LayerNorm's closed form over these entries
    (:func:`~.standardise.standardised_residual`). The forward pass is the module's own (through
    ``functional_call``), so it updates the running statistics exactly as a plain forward does.
    """

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        if not _batch_statistics(module):
            return "it normalises by running statistics (eval mode)"
        return None

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        present = {n: p for n, p in params.items() if p is not None}
        out = torch.func.functional_call(module, present, (x,))  # running statistics updated
        m: Any = module
        dims = tuple(d for d in range(x.ndim) if d != 1)
        # xhat and 1/sigma per channel by the batch-norm kernel without affine or running
        # statistics, in x's dtype
        xhat, _, inv = torch.native_batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        r = channel_view(inv.to(x.dtype), x.ndim, 1, False)
        w = params.get("weight")
        wv = channel_view(w, x.ndim, 1, False) if w is not None else None
        return out, {"xhat": xhat, "r": r, "w": wv, "dims": dims}

    @staticmethod
    def _normalise(ctx: Context, t: Tensor, batched: bool) -> Tensor:
        dims = tuple(d + 1 for d in ctx["dims"]) if batched else ctx["dims"]
        return normalised_tangent(t, ctx["xhat"], ctx["r"], dims)

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        xhat, w = ctx["xhat"], ctx["w"]
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            out = self._normalise(ctx, dx, batched)
            if w is not None:
                out = out.mul_(w)
        if dw is not None:
            term = xhat * channel_view(dw, xhat.ndim, 1, batched)
            out = term if out is None else out.add_(term)
        if db is not None:
            bias = channel_view(db, xhat.ndim, 1, batched)
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
        dims = tuple(d + 1 for d in ctx["dims"]) if batched else ctx["dims"]
        gw, gb = grads.get("weight"), grads.get("bias")
        if gw is not None:
            gw.add_((u * xhat).sum(dims))
        if gb is not None:
            gb.add_(u.sum(dims))
        if not need_input:
            return None
        return self._normalise(ctx, u * w if w is not None else u, batched)

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
        xhat = ctx["xhat"]
        dims = tuple(d + 1 for d in ctx["dims"]) if batched else ctx["dims"]
        gw, dw = grads.get("weight"), dparams.get("weight")
        rx = None
        if dx is not None and (need_input or gw is not None):
            rx, e = standardised_residual(dx, xhat, ctx["r"], dims, rctx, True, need_input)
            if gw is not None:
                gw.add_((rctx["dr"] * e).sum(dims))
        if not need_input:
            return None
        if dw is not None:
            g = channel_view(dw, xhat.ndim, 1, batched) * rctx["delta"]
            term = self._normalise(ctx, g, batched)
            rx = term if rx is None else rx.add_(term)
        return rx


class BatchNormRule(Rule):
    """The registry's rule of ``nn.BatchNorm1d/2d/3d``: by the statistics the module uses.

    Running statistics (eval mode): :class:`BatchNormEvalRule`; the batch's (training mode, or
    no running statistics): :class:`BatchNormTrainRule`. The context records which one built
    it, so the products follow the forward pass even if the module's mode changes later.
    """

    def __init__(self) -> None:
        self.eval_rule, self.train_rule = BatchNormEvalRule(), BatchNormTrainRule()

    def pick(self, module: nn.Module) -> Rule:
        """The rule of ``module``'s current mode."""
        return self.train_rule if _batch_statistics(module) else self.eval_rule

    # per-sample hooks (Rule): those of the rule that built the context (none in training mode)
    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return ctx["rule"].rowwise(module, ctx)

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        return ctx["rule"].per_sample_param_vjp(module, ctx, u, names)

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        return self.pick(module).unsupported(module)

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        rule = self.pick(module)
        out, ctx = rule.forward(module, x, params)
        return out, {**ctx, "rule": rule}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        return ctx["rule"].jvp(module, ctx, dx, dparams, batched)

    def vjp(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        u: Tensor,
        need_input: bool,
        grads: Mapping[str, Tensor],
        batched: bool,
    ) -> Tensor | None:
        return ctx["rule"].vjp(module, ctx, u, need_input, grads, batched)

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        rctx = ctx["rule"].prepare_residual(module, ctx, x, params, delta, modify)
        return None if rctx is None else {**rctx, "rule": ctx["rule"]}

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
        return rctx["rule"].residual(module, ctx, rctx, dx, dparams, need_input, grads, batched)


def _bn_train(m: Any) -> Any:
    return _bn_stats(m).train()


def _bn_stats(m: Any) -> Any:
    with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return m.eval()


EXAMPLES = [
    Example(lambda: _bn_stats(nn.BatchNorm1d(3)), (4, 3), "batchnorm1d"),
    Example(lambda: _bn_stats(nn.BatchNorm1d(3)), (4, 3, 5), "batchnorm1d_seq"),
    Example(lambda: _bn_stats(nn.BatchNorm2d(2)), (3, 2, 3, 4), "batchnorm2d"),
    Example(lambda: _bn_stats(nn.BatchNorm2d(2, affine=False)), (3, 2, 2, 2), "batchnorm2d_plain"),
    Example(lambda: _bn_stats(nn.BatchNorm3d(2)), (2, 2, 2, 2, 2), "batchnorm3d"),
    Example(lambda: _bn_train(nn.BatchNorm1d(3)), (4, 3), "batchnorm1d_train"),
    Example(lambda: _bn_train(nn.BatchNorm1d(3)), (4, 3, 5), "batchnorm1d_seq_train"),
    Example(lambda: _bn_train(nn.BatchNorm2d(2)), (3, 2, 3, 4), "batchnorm2d_train"),
    Example(
        lambda: _bn_train(nn.BatchNorm2d(2, affine=False)), (3, 2, 2, 2), "batchnorm2d_plain_train"
    ),
    Example(lambda: _bn_train(nn.BatchNorm3d(2, momentum=None)), (2, 2, 2, 2, 2), "bn3d_train"),
    Example(
        lambda: nn.BatchNorm2d(2, track_running_stats=False).eval(), (3, 2, 2, 2), "bn_no_stats"
    ),
]
