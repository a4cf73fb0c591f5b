r"""Scaled dot-product attention as one step of the graph: closed-form products and residual.

With queries :math:`q` ``(*, H, L, d)``, keys :math:`k` ``(*, H, S, d)``, values :math:`v`
``(*, H, S, d_v)``, scale :math:`s` and an additive mask :math:`M` (a boolean mask, a causal mask
and key padding become :math:`-\infty` entries),

.. math::
    S = s\, q k^\top + M, \quad P = \operatorname{softmax}(S), \quad O = P v

(rows with every entry masked give :math:`P = 0`, as PyTorch's math kernel). Any subset of
:math:`q, k, v` and a floating-point mask may depend on the parameters:

.. math::
    dS = s\,(dq\, k^\top + q\, dk^\top) + dM, \quad dP = P \odot (dS - \operatorname{rowsum}(P
    \odot dS)), \quad dO = dP\, v + P\, dv;

    \bar v = P^\top u, \quad \bar P = u v^\top, \quad \bar S = P \odot (\bar P -
    \operatorname{rowsum}(P \odot \bar P)), \quad \bar q = s \bar S k, \quad
    \bar k = s \bar S^\top q, \quad \bar M = \bar S.

Residual at the gradient cotangent :math:`\delta` (the derivative of the pullback with
:math:`\delta` fixed): with :math:`G = \delta v^\top`, :math:`A = G - \operatorname{rowsum}(P
\odot G)`, :math:`\bar S_0 = P \odot A` and :math:`R\{\bar P\} = \delta\, dv^\top`,

.. math::
    R\{\bar S\} = dP \odot A + P \odot (R\{\bar P\} - \operatorname{rowsum}(dP \odot G + P
    \odot R\{\bar P\})),

    r_q = s\,(R\{\bar S\} k + \bar S_0\, dk), \quad r_k = s\,(R\{\bar S\}^\top q + \bar S_0^\top
    dq), \quad r_v = dP^\top \delta, \quad r_M = R\{\bar S\}.

Memory: :math:`P` ``(*, H, L, S)``, as the forward. Grouped-query attention repeats the key and
value heads (cotangents summed back per group). ``nn.MultiheadAttention``'s decomposition
(:mod:`.decompose`) calls :func:`~.mha.multi_head_attention` on the projections ``(N, L, E)`` (or
``(L, N, E)``, or unbatched ``(L, E)``); its step splits and merges the heads as views and may
also return the attention weights (optionally averaged over the heads):
:math:`\bar P` then gains the weights' cotangent. Attention with dropout is random: its node is
left to per-node autograd, which records one mask per linearisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..layers.base import sum_to
from .step_base import Grads, Step

__all__ = ["AttentionStep", "Heads", "additive_mask", "bind", "build_attention", "causal_mask"]


def _align(t: Tensor, ndim: int, batched: bool) -> Tensor:
    if not batched or t.ndim - 1 >= ndim:
        return t
    return t.view(t.shape[0], *([1] * (ndim - t.ndim + 1)), *t.shape[1:])


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _safe_softmax(s: Tensor) -> Tensor:
    p = torch.softmax(s, -1)
    dead = s.amax(-1, keepdim=True) == float("-inf")
    return p.masked_fill(dead, 0.0) if bool(dead.any()) else p


def additive_mask(mask: Tensor | None, dtype: torch.dtype, keep_true: bool) -> Tensor | None:
    """A float additive mask; a boolean one marks kept (``keep_true``) or masked entries."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    drop = ~mask if keep_true else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(drop, -math.inf)


def causal_mask(L: int, S: int, like: Tensor) -> Tensor:
    """The additive mask of ``is_causal`` (top-left aligned, as PyTorch), ``(L, S)``."""
    keep = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
    return additive_mask(keep, like.dtype, True)  # type: ignore[return-value]


class Heads:
    """Maps between a node's layout and the canonical ``(*, H, L, d)``.

    ``heads=None``: the node's tensors are canonical already. Otherwise the last dimension holds
    ``heads`` heads, and for ``batch_first=False`` the first two of ``(L, N, E)`` are swapped.
    """

    def __init__(self, heads: int | None, swap: bool) -> None:
        self.heads, self.swap = heads, swap

    def split(self, t: Tensor) -> Tensor:
        """``(.., L, E)`` -> ``(.., H, L, d)`` (a view)."""
        if self.heads is None:
            return t
        if self.swap:
            t = t.transpose(-3, -2)
        return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def merge(self, t: Tensor) -> Tensor:
        """``(.., H, L, d)`` -> ``(.., L, E)``."""
        if self.heads is None:
            return t
        t = t.transpose(-3, -2).flatten(-2)
        return t.transpose(-3, -2) if self.swap else t


class AttentionStep(Step):
    """Attention of active queries, keys, values and/or float mask (module docstring).

    Args:
        inputs: The active nodes among ``(q, k, v, mask)``, in that order.
        active: Which of ``(q, k, v, mask)`` are active.
        q, k, v: Canonical values ``(*, H, L, d)`` (keys and values with their own heads).
        mask: The additive float mask (broadcast to the scores) or None.
        scale: The factor of the scores.
        layout: The node's layout (:class:`Heads`).
        weights: ``None`` (the node returns the output), ``"all"`` or ``"mean"`` (the node
            returns ``(output, weights)``, the weights per head or averaged over the heads);
            ``"none"``: ``(output, None)``.
        mask_shape: The shape of the mask node's value (for its cotangent), if active.
    """

    kind = "attention"
    owns_residual = True

    def __init__(
        self,
        inputs: list[Any],
        active: Sequence[bool],
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scale: float,
        layout: Heads,
        weights: str | None = None,
        mask_shape: Any = None,
    ) -> None:
        self.inputs, self.active = inputs, list(active)
        self.layout, self.weights, self.mask_shape = layout, weights, mask_shape
        self.groups = q.shape[-3] // k.shape[-3] if q.ndim >= 3 and k.ndim >= 3 else 1
        self.k_heads_shape = tuple(k.shape)
        self.v_shape = tuple(v.shape)
        k, v = self._repeat(k), self._repeat(v)
        self.q, self.k, self.v, self.scale = q, k, v, scale
        s = (q @ k.mT).mul_(scale)
        if mask is not None:
            s = s + mask
        self.p = _safe_softmax(s)
        self.out = self.p @ v
        self.linear = not (active[0] or active[1] or active[3])
        self._kept_dp: tuple[bool, list[Any], Tensor | None] | None = None

    def value(self) -> Any:
        """The node's output (with the weights for MHA's ``need_weights``)."""
        out = self.layout.merge(self.out)
        if self.weights is None:
            return out
        return (out, self._weights_out(self.p))

    # -------------------------------------------------------------- helpers
    def _repeat(self, t: Tensor) -> Tensor:
        return t if self.groups == 1 else t.repeat_interleave(self.groups, dim=-3)

    def _unrepeat(self, t: Tensor) -> Tensor:
        if self.groups == 1:
            return t
        return t.unflatten(-3, (-1, self.groups)).sum(-3)

    def _weights_out(self, p: Tensor | None) -> Tensor | None:
        if p is None or self.weights == "none":
            return None
        return p.mean(-3) if self.weights == "mean" else p

    def _weights_in(self, u: Tensor | None) -> Tensor | None:
        if u is None or self.weights == "none":
            return None
        return u.unsqueeze(-3) / self.p.shape[-3] if self.weights == "mean" else u

    def _tangents(self, tin: list[Any], batched: bool) -> list[Tensor | None]:
        it = iter(tin)
        t = [next(it) if a else None for a in self.active]
        for i in range(3):
            if t[i] is not None:
                t[i] = self.layout.split(t[i])  # type: ignore[arg-type]
                if i > 0:
                    t[i] = self._repeat(t[i])  # type: ignore[arg-type]
        if t[3] is not None:
            t[3] = _align(t[3], self.p.ndim, batched)
        return t

    def _dp(self, dq: Tensor | None, dk: Tensor | None, dm: Tensor | None) -> Tensor | None:
        """:math:`dP` (a new tensor) from the tangents of the scores' inputs."""
        ds: Tensor | None = None
        if dq is not None:
            ds = dq @ self.k.mT
        if dk is not None:
            term = self.q @ dk.mT
            ds = term if ds is None else ds.add_(term)
        if ds is not None and self.scale != 1.0:
            ds = ds.mul_(self.scale)
        if dm is not None:  # a new tensor of the scores' shape either way
            ds = dm + self.p.new_zeros(()).expand(self.p.shape) if ds is None else ds.add_(dm)
        if ds is None:
            return None
        return self._softmax_pullback(ds)

    def _softmax_pullback(self, g: Tensor) -> Tensor:
        r""":math:`P \odot (g - \operatorname{rowsum}(P \odot g))`, overwriting ``g``."""
        p = self.p
        return g.sub_((p * g).sum(-1, keepdim=True)).mul_(p)

    def _cotangents(
        self, gq: Any, gk: Any, gv: Any, gm: Any, need: list[bool], batched: bool
    ) -> list[Any]:
        found = []
        for i, g in enumerate((gq, gk, gv)):
            if g is not None:
                g = self.layout.merge(self._unrepeat(g) if i > 0 else g)
            found.append(g)
        if gm is not None:
            gm = sum_to(gm, tuple(self.mask_shape), batched)
        found.append(gm)
        slots = [i for i in range(4) if self.active[i]]
        return [found[s] if n else None for s, n in zip(slots, need)]

    # -------------------------------------------------------------- products
    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        dq, dk, dv, dm = self._tangents(tin, batched)
        kept, self._kept_dp = self._kept_dp, None
        if kept is not None and kept[0] == batched and _same(kept[1], tin):
            dp = kept[2]  # computed by the residual just before, from the same tangents
        else:
            dp = self._dp(dq, dk, dm)
        do = dp @ self.v if dp is not None else None
        if dv is not None:
            term = self.p @ dv
            do = term if do is None else do.add_(term)
        out = None if do is None else self.layout.merge(do)
        if self.weights is None:
            return out
        return (out, self._weights_out(dp))

    def _grad_p(self, u: Any) -> tuple[Tensor | None, Tensor | None]:
        """The output cotangent (canonical) and the cotangent of P."""
        uo, uw = (u, None) if self.weights is None else u
        go = None if uo is None else self.layout.split(uo)
        gp = None if go is None else go @ self.v.mT
        extra = self._weights_in(uw)
        if extra is not None:
            gp = extra.clone() if gp is None else gp.add_(extra)
        return go, gp

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        want = dict(zip([i for i in range(4) if self.active[i]], need))
        go, gp = self._grad_p(u)
        gv = self.p.mT @ go if want.get(2) and go is not None else None
        gq = gk = gs = None
        if gp is not None and (want.get(0) or want.get(1) or want.get(3)):
            gs = self._softmax_pullback(gp)
            if want.get(0):
                gq = (gs @ self.k).mul_(self.scale)
            if want.get(1):
                gk = (gs.mT @ self.q).mul_(self.scale)
        return self._cotangents(gq, gk, gv, gs if want.get(3) else None, need, batched)

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:  # noqa: D102
        if self.linear or delta is None:
            return None
        go, gp = self._grad_p(delta)
        if gp is None:
            return None
        p = self.p
        a = gp - (p * gp).sum(-1, keepdim=True)
        return {"go": go, "gp": gp, "a": a, "gs": p * a}

    def residual(  # noqa: D102
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        want = dict(zip([i for i in range(4) if self.active[i]], need))
        dq, dk, dv, dm = self._tangents(tin, batched)
        go: Tensor | None = rctx["go"]
        p, gs0 = self.p, rctx["gs"]
        dp = self._dp(dq, dk, dm)
        self._kept_dp = (batched, list(tin), dp)  # for the jvp of the same tangents that follows
        rgp = go @ dv.mT if dv is not None and go is not None else None
        rgs = None
        if dp is not None or rgp is not None:
            if dp is not None:
                inner = dp * rctx["gp"]
                if rgp is not None:
                    inner.addcmul_(p, rgp)
            else:
                inner = p * rgp  # type: ignore[operator]
            rowsum = inner.sum(-1, keepdim=True)
            rgs = rgp.sub_(rowsum).mul_(p) if rgp is not None else p * rowsum.neg_()
            if dp is not None:
                rgs.addcmul_(dp, rctx["a"])
        rq = rk = rv = None
        if want.get(0):
            if rgs is not None:
                rq = rgs @ self.k
            if dk is not None:
                rq = gs0 @ dk if rq is None else rq.add_(gs0 @ dk)
            rq = None if rq is None else rq.mul_(self.scale)
        if want.get(1):
            if rgs is not None:
                rk = rgs.mT @ self.q
            if dq is not None:
                rk = gs0.mT @ dq if rk is None else rk.add_(gs0.mT @ dq)
            rk = None if rk is None else rk.mul_(self.scale)
        if want.get(2) and dp is not None and go is not None:
            rv = dp.mT @ go
        return self._cotangents(rq, rk, rv, rgs if want.get(3) else None, need, batched)


# ----------------------------------------------------------------- builders
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def bind(node: Any, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """A node's arguments by name (``defaults`` for those not given), or None if unknown."""
    args = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names or k in args:
            return None
        args[k] = v
    return {**defaults, **args}


def build_attention(
    node: Any, env_value: Callable[[Any], Any], active: Callable[[Any], bool], value: Any
) -> Step | None:
    """The step of an ``F.scaled_dot_product_attention`` node, or None for autograd.

    Args:
        node: An fx node calling ``F.scaled_dot_product_attention``.
        env_value: The value of an argument (nodes looked up, constants as they are).
        active: Whether an argument node depends on the parameters.
        value: The node's output (its shape is checked against the step's).

    Returns:
        An :class:`AttentionStep`, or None (dropout, an active boolean mask, shapes the step does
        not cover).
    """
    a = bind(
        node,
        _SDPA_ARGS,
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None},
    )
    if a is None:
        return None
    c = {n: env_value(x) for n, x in a.items()}
    if c["dropout_p"] != 0.0:
        return None
    q, k, v, m = c["query"], c["key"], c["value"], c["attn_mask"]
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or q.ndim < 2:
        return None
    if m is not None and not isinstance(m, Tensor):
        return None
    gqa = bool(c.get("enable_gqa", False))
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return None
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        if not gqa or q.shape[-3] % k.shape[-3]:
            return None
    if c["is_causal"] and m is not None:
        return None  # PyTorch refuses it: autograd raises the same error
    mask_active = isinstance(m, Tensor) and active(a["attn_mask"])
    if mask_active and not m.is_floating_point():  # type: ignore[union-attr]
        return None
    mask = additive_mask(m, q.dtype, True)
    if c["is_causal"]:
        mask = causal_mask(q.shape[-2], k.shape[-2], q)
    scale = c["scale"] if c["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    acts = [active(a[n]) for n in ("query", "key", "value")] + [mask_active]
    edges = [a[n] for n, x in zip(("query", "key", "value", "attn_mask"), acts) if x]
    return AttentionStep(
        edges,
        acts,
        q,
        k,
        v,
        mask,
        float(scale),
        Heads(None, False),
        None,
        m.shape if isinstance(m, Tensor) and mask_active else None,
    )
