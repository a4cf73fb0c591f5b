r"""``nn.Linear`` on inputs ``(..., d_in)``: :math:`y = x W^\top + b`.

.. math::
    dy = dx\, W^\top + x\, dW^\top + db, \qquad
    dx = u W, \quad dW \mathrel{+}= u^\top x, \quad db \mathrel{+}= \textstyle\sum u,

with every leading dimension of ``x`` flattened into rows. The map is bilinear in ``(x, W)``,
so the residual at the gradient cotangent :math:`\delta` is

.. math::
    r_x = \delta\, dW, \qquad r_W = \delta^\top dx, \qquad r_b = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, add_bias_tangent

__all__ = ["LinearRule"]

_CHUNK_ELEMENTS = 2**22  # per-sample weight cotangents held at once by sq_param_vjp


class LinearRule(Rule):
    """Rule of ``nn.Linear`` (module docstring)."""

    # per-sample hooks (Rule): sample n's weight cotangent is sum_t u_{nt} x_{nt}^T over the
    # middle dimensions t of inputs (N, ..., d); an outer product for inputs (N, d)
    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["x"].ndim >= 2)

    def kronecker(self, module: nn.Module, ctx: Context) -> Tensor | None:  # noqa: D102
        x: Tensor = ctx["x"]
        return x if x.ndim == 2 else None

    def kronecker_shared(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        x: Tensor = ctx["x"]
        if x.ndim < 2:
            return None
        N = x.shape[0]
        return x.reshape(N, -1, x.shape[-1]), u.reshape(u.shape[0], N, -1, u.shape[-1])

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        x: Tensor = ctx["x"]
        if x.ndim < 2:
            return None
        return _per_sample(x, u, names)

    def sq_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        x: Tensor = ctx["x"]
        if x.ndim < 2:
            return None
        if x.ndim == 2:  # sum_{k,n} (u_kn x_n^T)^2 = (sum_k u_k^2)^T x^2
            u2 = u.square().sum(0)  # (N, out)
            out = {}
            if "weight" in names:
                out["weight"] = u2.T @ x.square()
            if "bias" in names:
                out["bias"] = u2.sum(0)
            return out
        K, N = u.shape[:2]
        sq: dict[str, Tensor] = {}
        step = max(1, _CHUNK_ELEMENTS // max(1, K * u.shape[-1] * x.shape[-1]))
        for a in range(0, N, step):
            for k, v in _per_sample(x[a : a + step], u[:, a : a + step], names).items():
                part = v.square().sum((0, 1))
                sq[k] = part if k not in sq else sq[k].add_(part)
        return sq

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        w, b = params["weight"], params.get("bias")
        assert w is not None
        return F.linear(x, w, b), {"x": x, "w": w}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        x: Tensor = ctx["x"]
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = F.linear(dx, ctx["w"]) if dx is not None else None
        if dw is not None and out is not None and not batched and out.is_contiguous():
            # x dW^T added into the new tensor out, without a temporary of its size
            out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), dw.T)
        elif dw is not None:
            if batched:  # (K, out, in) -> (K, 1.., in, out), broadcast over x's rows
                dwt = dw.transpose(-1, -2)
                term = x @ dwt.reshape(dw.shape[0], *([1] * (x.ndim - 2)), *dwt.shape[1:])
            else:
                term = F.linear(x, dw)
            out = term if out is None else out.add_(term)
        if db is not None:
            bias = db.view(db.shape[0], *([1] * (x.ndim - 1)), -1) if batched else db
            out = add_bias_tangent(out, bias, (*x.shape[:-1], db.shape[-1]), batched)
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
        x: Tensor = ctx["x"]
        gw, gb = grads.get("weight"), grads.get("bias")
        x2 = x.reshape(-1, x.shape[-1])
        if batched:
            K = u.shape[0]
            u3 = u.reshape(K, -1, u.shape[-1])
            if gw is not None:
                gw.baddbmm_(u3.transpose(1, 2), x2.expand(K, *x2.shape))
            if gb is not None:
                gb.add_(u3.sum(1))
        else:
            u2 = u.reshape(-1, u.shape[-1])
            if gw is not None:
                gw.addmm_(u2.T, x2)
            if gb is not None:
                gb.add_(u2.sum(0))
        return u @ ctx["w"] if need_input else None

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return {"delta": delta}

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
        delta: Tensor = rctx["delta"]
        d2 = delta.reshape(-1, delta.shape[-1])
        gw, dw = grads.get("weight"), dparams.get("weight")
        if gw is not None and dx is not None:
            if batched:
                dx3 = dx.reshape(dx.shape[0], -1, dx.shape[-1])
                gw.baddbmm_(d2.T.expand(dx.shape[0], *d2.T.shape), dx3)
            else:
                gw.addmm_(d2.T, dx.reshape(-1, dx.shape[-1]))
        if not need_input or dw is None:
            return None
        if batched:  # (K, rows, in) -> (K, *lead, in)
            return (d2 @ dw).reshape(dw.shape[0], *delta.shape[:-1], dw.shape[-1])
        return delta @ dw


def _per_sample(x: Tensor, u: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample cotangents ``{name: (N, K, *shape)}`` for inputs ``(N, ..., d)``."""
    K, N = u.shape[:2]
    u4 = u.reshape(K, N, -1, u.shape[-1])  # (K, N, T, out)
    out = {}
    if "weight" in names:
        out["weight"] = torch.einsum("knto,ntd->nkod", u4, x.reshape(N, -1, x.shape[-1]))
    if "bias" in names:
        out["bias"] = u4.sum(2).transpose(0, 1)
    return out


EXAMPLES = [
    Example(lambda: nn.Linear(4, 3), (5, 4), "linear"),
    Example(lambda: nn.Linear(4, 3, bias=False), (2, 3, 4), "linear_3d_nobias"),
    Example(lambda: nn.Linear(4, 3), (3, 5, 4), "linear_seq"),
    Example(lambda: nn.Linear(3, 2), (2, 3, 2, 3), "linear_4d_bias"),
]
