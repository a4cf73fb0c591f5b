r"""``nn.Embedding``: rows of the weight picked by integer indices, :math:`y_i = W_{x_i}`.

With indices ``x`` of any shape ``S`` and :math:`W` of shape ``(V, D)``, the output has shape
``(*S, D)``. The map is linear in :math:`W` and the indices are not differentiable, so

.. math::
    dy_i = dW_{x_i}, \qquad dW_v \mathrel{+}= \textstyle\sum_{i:\, x_i = v} u_i,

(a gather forward, an ``index_add`` backward) and the residual vanishes. As in PyTorch's
backward, positions holding ``padding_idx`` give the weight no gradient: the row is a constant,
so its tangent is zero there too (:math:`J` and :math:`J^\top` stay transposes of each other;
``torch.func.jvp`` of ``F.embedding`` ignores ``padding_idx``, its ``vjp`` does not).

Refused (the module goes to autograd): ``max_norm`` (renormalises the weight in place during the
forward) and ``sparse=True`` (sparse gradients); ``scale_grad_by_freq`` (a backward that is not
the transposed Jacobian).

Per-sample hooks (inputs ``(N, ...)``): sample :math:`n`'s weight cotangent scatters its own
rows, :math:`G_{n,v} = \sum_{t:\, x_{nt} = v} u_{nt}`; its squares are summed without forming
``(N, V, D)`` (one row per distinct ``(n, v)`` pair). K-FAC's form
(:meth:`~.base.Rule.kronecker_indices`): the map is :math:`y_{nt} = W^\top e_{x_{nt}}`, a
bias-free Linear map of the one-hot rows (zero rows at ``padding_idx``), so the input factor is
diagonal (token counts) and never formed as ``V x V``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Context, Example, Params, Rule

__all__ = ["EmbeddingRule"]


class EmbeddingRule(Rule):
    """Rule of ``nn.Embedding`` (module docstring); the input is an index tensor."""

    float_input = False  # the graph engine hands it integer inputs

    def unsupported(self, module: nn.Module) -> str | None:  # noqa: D102
        m: Any = module
        if m.max_norm is not None:
            return "Embedding with max_norm renormalises its weight in place"
        if m.sparse:
            return "Embedding with sparse=True has sparse gradients"
        if m.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq scales its backward by batch counts"
        return None

    def rowwise(self, module: nn.Module, ctx: Context) -> bool:  # noqa: D102
        return bool(ctx["idx"].ndim >= 1)

    def kronecker_indices(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor
    ) -> tuple[Tensor, int, Tensor] | None:
        idx: Tensor = ctx["idx"]
        if idx.ndim < 1:
            return None
        N, pad = idx.shape[0], ctx["pad"]
        index = idx.reshape(N, -1)
        if pad is not None:
            index = index.masked_fill(index == pad, -1)
        return index, int(ctx["num"]), u.reshape(u.shape[0], N, -1, u.shape[-1])

    def per_sample_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        idx: Tensor = ctx["idx"]
        if idx.ndim < 1 or "weight" not in names:
            return None if idx.ndim < 1 else {}
        K, N, V = u.shape[0], idx.shape[0], ctx["num"]
        D = u.shape[-1]
        rows = _rows(idx, ctx["pad"], V)  # (N*T,) index into N*V, or -1
        keep = rows >= 0
        out = u.new_zeros(K, N * V, D)
        out.index_add_(1, rows[keep], u.reshape(K, -1, D)[:, keep])
        return {"weight": out.view(K, N, V, D).transpose(0, 1)}

    def sq_param_vjp(  # noqa: D102
        self, module: nn.Module, ctx: Context, u: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor] | None:
        idx: Tensor = ctx["idx"]
        if idx.ndim < 1:
            return None
        if "weight" not in names:
            return {}
        V, D = ctx["num"], u.shape[-1]
        rows = _rows(idx, ctx["pad"], V)
        keep = rows >= 0
        pairs, inverse = torch.unique(rows[keep], return_inverse=True)  # distinct (n, v)
        acc = u.new_zeros(u.shape[0], pairs.numel(), D)
        acc.index_add_(1, inverse, u.reshape(u.shape[0], -1, D)[:, keep])
        out = u.new_zeros(V, D)
        out.index_add_(0, pairs % V, acc.square().sum(0))
        return {"weight": out}

    def forward(self, module: nn.Module, x: Tensor, params: Params) -> tuple[Tensor, Context]:  # noqa: D102
        m: Any = module
        w = params["weight"]
        assert w is not None
        out = F.embedding(x, w, m.padding_idx)
        return out, {"idx": x, "pad": m.padding_idx, "num": w.shape[0]}

    def jvp(  # noqa: D102
        self, module: nn.Module, ctx: Context, dx: Tensor | None, dparams: Params, batched: bool
    ) -> Tensor | None:
        dw = dparams.get("weight")
        if dw is None:
            return None
        idx, pad = ctx["idx"], ctx["pad"]
        out = dw[:, idx] if batched else dw[idx]
        if pad is not None:
            out = out.masked_fill_((idx == pad).unsqueeze(-1), 0.0)
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
        gw = grads.get("weight")
        if gw is None:
            return None
        idx, pad = ctx["idx"].reshape(-1), ctx["pad"]
        D = u.shape[-1]
        if pad is not None:
            keep = idx != pad
            idx = idx[keep]
        if batched:
            ub = u.reshape(u.shape[0], -1, D)
            gw.index_add_(1, idx, ub if pad is None else ub[:, keep])
        else:
            ub = u.reshape(-1, D)
            gw.index_add_(0, idx, ub if pad is None else ub[keep])
        return None

    def prepare_residual(  # noqa: D102
        self,
        module: nn.Module,
        ctx: Context,
        x: Tensor,
        params: Params,
        delta: Tensor,
        modify: str | None = None,
    ) -> Context | None:
        return None  # linear in the weight, the indices are constants


def _rows(idx: Tensor, pad: int | None, V: int) -> Tensor:
    """``n * V + x_nt`` for every position (sample-major), ``-1`` at padding positions."""
    n = torch.arange(idx.shape[0], device=idx.device).view(-1, *([1] * (idx.ndim - 1)))
    rows = (n * V + idx).reshape(-1)
    if pad is not None:
        rows = rows.masked_fill(idx.reshape(-1) == pad, -1)
    return rows


def _emb(*args: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return nn.Embedding(*args, **kwargs)


EXAMPLES = [
    Example(lambda: _emb(7, 3), (5,), "embedding", {"indices": 7}),
    Example(lambda: _emb(6, 4), (3, 5), "embedding_seq", {"indices": 6}),
]
