r"""The attention of ``nn.MultiheadAttention`` between its projections, as one graph node.

The decomposition of ``nn.MultiheadAttention`` (:mod:`.decompose`) calls
:func:`multi_head_attention` on the projected queries, keys and values; eagerly it computes what
``F.multi_head_attention_forward`` computes between the input and the output projections, and
the graph engine replaces it by an :class:`~.sdpa.AttentionStep` that splits and merges the
heads as views (:func:`build_mha`), unless ``dropout_p > 0`` (random: per-node autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .sdpa import AttentionStep, Heads, additive_mask, bind, causal_mask
from .step_base import Step

__all__ = ["build_mha", "mha_mask", "multi_head_attention"]

_MHA_ARGS = (
    *("q", "k", "v", "attn_mask", "key_padding_mask", "num_heads", "batch_first", "dropout_p"),
    *("is_causal", "need_weights", "average_weights"),
)


def mha_mask(
    qh: Tensor,
    kh: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    num_heads: int,
    is_causal: bool,
    need_weights: bool,
) -> Tensor | None:
    """The additive mask of ``nn.MultiheadAttention``'s slow path, broadcast to the scores.

    ``qh``, ``kh``: the canonical queries and keys ``(N, H, L, d)`` (``(H, L, d)`` unbatched).
    As ``F.multi_head_attention_forward``: boolean entries ``True`` are masked; ``is_causal`` is
    honoured only without key padding and weights (else ``attn_mask`` is used, and must exist).

    Raises:
        RuntimeError: ``is_causal`` without ``attn_mask``, as PyTorch.
    """
    batched = qh.ndim == 4
    L, S = qh.shape[-2], kh.shape[-2]
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint")
    kpm = additive_mask(key_padding_mask, qh.dtype, False)
    if is_causal and kpm is None and not need_weights:
        mask: Tensor | None = causal_mask(L, S, qh)
    else:
        mask = additive_mask(attn_mask, qh.dtype, False)
    if mask is not None and mask.ndim == 3:
        mask = mask.view(-1, num_heads, L, S) if batched else mask.view(num_heads, L, S)
    if kpm is not None:
        kpm = kpm.view(-1, 1, 1, S) if batched else kpm.view(1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def multi_head_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    num_heads: int,
    batch_first: bool,
    dropout_p: float,
    is_causal: bool,
    need_weights: bool,
    average_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """The attention of ``nn.MultiheadAttention`` on projected ``q``, ``k``, ``v`` (eager).

    Computes what ``F.multi_head_attention_forward`` computes between the input and the output
    projections (heads split and merged, masks merged, dropout on the weights); the graph engine
    replaces it by an :class:`AttentionStep` unless ``dropout_p > 0``.

    Returns:
        ``(output, weights)``: the output in the layout of ``q``; the weights ``(N, H, L, S)``
        (averaged over the heads if ``average_weights``) or None without ``need_weights``.
    """
    layout = Heads(num_heads, swap=not batch_first and q.ndim == 3)
    qh, kh, vh = layout.split(q), layout.split(k), layout.split(v)
    mask = mha_mask(qh, kh, attn_mask, key_padding_mask, num_heads, is_causal, need_weights)
    if not need_weights:
        out = F.scaled_dot_product_attention(qh, kh, vh, mask, dropout_p)
        return layout.merge(out), None
    s = (qh * math.sqrt(1.0 / qh.shape[-1])) @ kh.mT
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, -1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    w = p.mean(-3) if average_weights else p
    return layout.merge(p @ vh), w


def build_mha(
    node: Any, env_value: Callable[[Any], Any], active: Callable[[Any], bool], value: Any
) -> Step | None:
    """The step of a :func:`multi_head_attention` node, or None for autograd.

    Args:
        node: The fx node.
        env_value: The value of an argument (nodes looked up, constants as they are).
        active: Whether an argument node depends on the parameters.
        value: Unused (the step computes the output).

    Returns:
        An :class:`~.sdpa.AttentionStep`, or None (dropout, a mask that depends on the
        parameters, inputs that are not ``(L, E)`` or ``(N, L, E)``).
    """
    a = bind(node, _MHA_ARGS, {})
    if a is None or len(a) != len(_MHA_ARGS):
        return None
    c = {n: env_value(x) for n, x in a.items()}  # the values (constants or tensors)
    if c["dropout_p"] > 0.0 or active(a["key_padding_mask"]) or active(a["attn_mask"]):
        return None
    q, k, v = c["q"], c["k"], c["v"]
    if q.ndim not in (2, 3) or k.ndim != q.ndim or v.ndim != q.ndim:
        return None
    layout = Heads(c["num_heads"], swap=not c["batch_first"] and q.ndim == 3)
    qh, kh, vh = layout.split(q), layout.split(k), layout.split(v)
    mask = mha_mask(
        qh,
        kh,
        c["attn_mask"],
        c["key_padding_mask"],
        c["num_heads"],
        bool(c["is_causal"]),
        bool(c["need_weights"]),
    )
    weights = "none"
    if c["need_weights"]:
        weights = "mean" if c["average_weights"] else "all"
    acts = [active(a[n]) for n in ("q", "k", "v")] + [False]
    edges = [a[n] for n, x in zip(("q", "k", "v"), acts) if x]
    scale = 1.0 / math.sqrt(qh.shape[-1])
    return AttentionStep(edges, acts, qh, kh, vh, mask, scale, layout, weights)
