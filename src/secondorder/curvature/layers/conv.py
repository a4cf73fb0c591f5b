r"""``nn.Conv1d/2d/3d`` with zero padding: :math:`y = W \star x + b`, linear in ``x`` and ``W``.

Padding ``'valid'`` and ``'same'`` become numbers (``'same'`` only where it pads both sides
equally).

.. math::
    dy = W \star dx + dW \star x + db,

and the reverse products are ATen's ``convolution_backward`` (input, weight and bias gradients,
each computed only where asked). Batched input tangents and cotangents ride along the batch
dimension; batched weight tangents stack along the output channels (``groups=1``).

The map is bilinear in ``(x, W)``, so the residual at the gradient cotangent :math:`\delta` is
the input gradient of :math:`\delta` through the convolution with :math:`dW` and the weight
gradient of :math:`(dx, \delta)`: :math:`r_x = dW^\top \star \delta`,
:math:`r_W = \delta \star dx`, :math:`r_b = 0` (ATen's ``convolution_backward``; one call per
column when batched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule, add_bias_tangent, channel_view

__all__ = ["ConvRule", "conv_weight_rows", "padding", "unfold"]

PATCH_ELEMENTS = 1 << 26  # elements of unfolded input patches held at once
_SQ_ELEMENTS = 1 << 24  # per-sample rows and patches held at once by sq_param_vjp

_FUNCTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}


def _backward(
    u: Tensor, x: Tensor, w: Tensor, m: Any, mask: list[bool], bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten.convolution_backward(
        u,
        x,
        w,
        [w.shape[0]] if bias else None,
        list(m.stride),
        padding(m),
        list(m.dilation),
        False,
        [0] * (w.ndim - 2),
        m.groups,
        mask,
    )


def padding(m: Any) -> Any:
    """Numeric padding per spatial dimension (``'valid'``: 0; ``'same'``: half the span).

    None for ``'same'`` with an even effective kernel (torch pads one side more).
    """
    if not isinstance(m.padding, str):
        return list(m.padding)
    if m.padding == "valid":
        return [0] * len(m.kernel_size)
    spans = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    return None if any(s % 2 for s in spans) else [s // 2 for s in spans]


class ConvRule(Rule):
    """Rule of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (module docstring)."""

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        m: Any = module
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only 'zeros')"
        if isinstance(m.padding, str) and padding(m) is None:
            return f"padding={m.padding!r} pads asymmetrically here (an even effective kernel)"
        return None

    # per-sample hooks (Rule): sample n's weight cotangent is sum_p u_n[:, p] patches_n[:, p]^T
    # over the output positions p (Conv1d/Conv2d, groups=1, batched inputs)
    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["batch"])

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if not _per_sample_ok(module, ctx):
            return None
        return _per_sample(module, ctx["x"], u, names)

    def kronecker_shared(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        if not _per_sample_ok(module, ctx):
            return None
        K, N, out = u.shape[:3]  # patches (N, P, in k), cotangents (K, N, P, out)
        return unfold(module, ctx["x"]).transpose(1, 2), u.reshape(K, N, out, -1).transpose(2, 3)

    def sq_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        if not _per_sample_ok(module, ctx):
            return None
        x: Tensor = ctx["x"]
        K, N = u.shape[:2]
        w: Tensor = ctx["w"]
        size = K * w.numel() + w[0].numel() * u[0, 0, 0].numel()  # rows and patches per sample
        step = max(1, _SQ_ELEMENTS // size)
        sq: dict[str, Tensor] = {}
        for a in range(0, N, step):
            for k, v in _per_sample(module, x[a : a + step], u[:, a : a + step], names).items():
                part = v.square().sum((0, 1))
                sq[k] = part if k not in sq else sq[k].add_(part)
        return sq

    @staticmethod
    def _conv(m: Any, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        fn = _FUNCTIONS[type(m)]
        return fn(x, w, b, m.stride, padding(m), m.dilation, m.groups)

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        w, b = params["weight"], params.get("bias")
        assert w is not None
        out = self._conv(module, x, w, b)
        return out, {"x": x, "w": w, "batch": x.ndim == w.ndim, "out_shape": out.shape}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        m: Any = module
        x: Tensor = ctx["x"]
        dw, db = dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            if batched and ctx["batch"]:
                out = self._conv(m, dx.flatten(0, 1), ctx["w"]).unflatten(0, (dx.shape[0], -1))
            else:  # an unbatched input: the columns are the batch
                out = self._conv(m, dx, ctx["w"])
        if dw is not None:
            if not batched:
                term = self._conv(m, x, dw)
            elif m.groups == 1:
                K, c_out = dw.shape[0], dw.shape[1]
                y = self._conv(m, x, dw.flatten(0, 1))
                dim = 1 if ctx["batch"] else 0
                term = y.unflatten(dim, (K, c_out)).movedim(dim, 0)
            else:
                term = torch.stack([self._conv(m, x, dw[k]) for k in range(dw.shape[0])])
            out = term if out is None else out.add_(term)
        if db is not None:
            ndim = x.ndim
            bias = channel_view(db, ndim, 1 if ctx["batch"] else 0, batched)
            out = add_bias_tangent(out, bias, ctx["out_shape"], batched)
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
        m: Any = module
        x, w = ctx["x"], ctx["w"]
        gw, gb = grads.get("weight"), grads.get("bias")
        if not ctx["batch"]:  # unbatched (C, *spatial) input: add a batch of one
            x = x.unsqueeze(0)
            u = u.unsqueeze(1) if batched else u.unsqueeze(0)
        if not batched:
            mask = [need_input, gw is not None, gb is not None]
            gi, g_w, g_b = _backward(u, x, w, m, mask, gb is not None)
            if gw is not None:
                gw.add_(g_w)
            if gb is not None:
                gb.add_(g_b)
            out = gi if need_input else None
        else:
            K = u.shape[0]
            if gw is not None:
                for k in range(K):  # one weight gradient per column
                    gw[k].add_(_backward(u[k], x, w, m, [False, True, False], False)[1])
            if gb is not None:
                gb.add_(u.sum(dim=(1, *range(3, u.ndim))))
            out = None
            if need_input:
                xs = x.expand(K, *x.shape).flatten(0, 1)
                gi = _backward(u.flatten(0, 1), xs, w, m, [True, False, False], False)[0]
                out = gi.unflatten(0, (K, -1))
        if out is not None and not ctx["batch"]:
            out = out.squeeze(1) if batched else out.squeeze(0)
        return out

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return {"delta": delta if ctx["batch"] else delta.unsqueeze(0)}

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
        m: Any = module
        x, w, delta = ctx["x"], ctx["w"], rctx["delta"]
        gw, dw = grads.get("weight"), dparams.get("weight")
        if not ctx["batch"]:  # unbatched (C, *spatial) input: add a batch of one
            x = x.unsqueeze(0)
            if dx is not None:
                dx = dx.unsqueeze(1) if batched else dx.unsqueeze(0)
        if gw is not None and dx is not None:
            cols = range(dx.shape[0]) if batched else [None]
            for k in cols:
                dxk, gk = (dx, gw) if k is None else (dx[k], gw[k])
                gk.add_(_backward(delta, dxk, w, m, [False, True, False], False)[1])
        if not need_input or dw is None:
            return None
        if batched:
            out = torch.stack(
                [
                    _backward(delta, x, dw[k], m, [True, False, False], False)[0]
                    for k in range(len(dw))
                ]
            )
        else:
            out = _backward(delta, x, dw, m, [True, False, False], False)[0]
        if not ctx["batch"]:
            out = out.squeeze(1) if batched else out.squeeze(0)
        return out


EXAMPLES = [
    Example(lambda: nn.Conv1d(2, 3, 3, padding=1), (4, 2, 6), "conv1d"),
    Example(lambda: nn.Conv1d(4, 4, 3, stride=2, dilation=2, groups=2), (3, 4, 9), "conv1d_groups"),
    Example(lambda: nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)), (2, 2, 5, 6), "conv2d"),
    Example(lambda: nn.Conv2d(2, 2, 3, bias=False), (2, 4, 4), "conv2d_unbatched_nobias"),
    Example(lambda: nn.Conv3d(1, 2, 2), (2, 1, 3, 3, 3), "conv3d"),
    Example(lambda: nn.Conv2d(2, 3, (3, 1), padding="same"), (2, 2, 5, 4), "conv2d_same"),
    Example(lambda: nn.Conv1d(2, 2, 3, dilation=2, padding="same"), (2, 2, 7), "conv1d_same"),
    Example(lambda: nn.Conv1d(2, 3, 2, padding="valid"), (3, 2, 5), "conv1d_valid"),
]


# ----------------------------------------------------------- per-sample weight cotangents
def _per_sample_ok(module: nn.Module, ctx: Context) -> bool:
    m: Any = module
    return type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1 and bool(ctx["batch"])


def _per_sample(m: Any, x: Tensor, u: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample cotangents ``{name: (N, K, *shape)}`` from output cotangents ``(K, N, ...)``."""
    K, N, out = u.shape[:3]
    g = u.reshape(K, N, out, -1).transpose(0, 1)  # (N, K, out, P)
    result = {}
    if "weight" in names:
        result["weight"] = conv_weight_rows(m, x, g).view(N, K, *m.weight.shape)
    if "bias" in names:
        result["bias"] = g.sum(-1)
    return result


def unfold(layer: Any, x: Tensor) -> Tensor:
    r"""The input patches :math:`\tilde x_n` of a Conv1d/Conv2d layer (numeric padding).

    A Conv1d input ``(N, in, L)`` is treated as ``(N, in, 1, L)`` with a ``(1, k)`` kernel.

    Args:
        layer: The convolution (its kernel size, dilation, padding and stride).
        x: Its input, shape ``(N, in, *spatial)``.

    Returns:
        Shape ``(N, in * k, P)``, rows ordered as the flattened weight ``(in, *kernel)``.
    """
    if type(layer) is nn.Conv1d:
        return F.unfold(
            x.unsqueeze(2),
            (1, *layer.kernel_size),
            dilation=(1, *layer.dilation),
            padding=(0, *padding(layer)),
            stride=(1, *layer.stride),
        )
    return F.unfold(
        x, layer.kernel_size, dilation=layer.dilation, padding=padding(layer), stride=layer.stride
    )


def conv_weight_rows(layer: Any, x: Tensor, g: Tensor) -> Tensor:
    r"""Per-sample products :math:`\sum_p g_{nk}[:, p] \otimes \tilde x_n[:, p]` of a conv layer.

    One batched matmul ``(N, K out, P) @ (N, P, in k)`` per chunk of samples, the chunks
    bounding the unfolded patches to ``PATCH_ELEMENTS`` elements.

    Args:
        layer: The convolution (Conv1d/Conv2d, ``groups=1``, numeric padding).
        x: Its input, shape ``(N, in, *spatial)``.
        g: Output cotangents, shape ``(N, K, out, P)``.

    Returns:
        Shape ``(N, K, out * in * k)`` (flattened like the weight ``(out, in, *kernel)``).
    """
    N, K, out, P = g.shape
    ink = layer.weight.numel() // out
    rows = g.new_empty(N, K * out, ink)
    gm = g.reshape(N, K * out, P)
    step = max(1, PATCH_ELEMENTS // max(1, ink * P))
    for s in range(0, N, step):
        patches = unfold(layer, x[s : s + step])  # (n, in k, P)
        torch.bmm(gm[s : s + step], patches.transpose(1, 2), out=rows[s : s + step])
    return rows.view(N, K, out * ink)
