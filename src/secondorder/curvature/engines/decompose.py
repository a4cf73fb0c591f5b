r"""Traceable forwards of torch's attention modules, so that the graph engine sees their math.

``torch.fx`` keeps torch's own modules whole; an ``nn.TransformerEncoderLayer`` would be one
node differentiated by autograd. For the exact types below (not subclasses, no hooks, no
instance-level ``forward``), :func:`decomposition` returns a forward written with ``F.linear``,
``split``, :func:`~.mha.multi_head_attention` (one attention step of the graph) and the module's
own submodules (``LayerNorm``, ``Linear``, ``Dropout``, the activation), computing what torch's
slow (composite) path computes:

- ``nn.MultiheadAttention``: self- and cross-attention, ``batch_first`` either way, unbatched
  inputs, ``attn_mask`` (2-D or 3-D, boolean or float), ``key_padding_mask``, ``is_causal``,
  ``need_weights`` (weights averaged over the heads or not), with or without biases, with
  ``kdim``/``vdim`` other than ``embed_dim``. Not decomposed (left to autograd):
  ``add_bias_kv``, ``add_zero_attn``;
- ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``: ``norm_first`` either way,
  any activation, masks and causal hints passed to their attention;
- ``nn.TransformerEncoder`` and ``nn.TransformerDecoder``: their layers, masks (a causal hint of
  ``None`` passes the mask itself, which equals the causal hint where the mask is causal) and
  final norm; ``nn.Transformer``: its encoder and decoder.

The fused evaluation paths (``torch._transformer_encoder_layer_fwd``, the nested-tensor path of
``nn.TransformerEncoder``) compute the same function up to rounding; the library evaluates
models with them turned off (:mod:`..attention`) and the graph engine checks its traced output
against the model's (:func:`~.graph.graph_linearization`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .mha import multi_head_attention

__all__ = ["DECOMPOSITIONS", "decomposition"]

torch.fx.wrap("multi_head_attention")  # one call_function node of the trace


def _mha(
    m: nn.MultiheadAttention,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, Any]:
    """``nn.MultiheadAttention.forward`` (slow path) on fx proxies."""
    E = m.embed_dim
    b = m.in_proj_bias
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        if query is key and key is value:
            qkv = F.linear(query, w, b).chunk(3, dim=-1)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif key is value:
            ws = w.split([E, 2 * E])
            bs = (None, None) if b is None else b.split([E, 2 * E])
            q = F.linear(query, ws[0], bs[0])
            kv = F.linear(key, ws[1], bs[1]).chunk(2, dim=-1)
            k, v = kv[0], kv[1]
        else:
            ws = w.chunk(3)
            bs = (None, None, None) if b is None else b.chunk(3)
            q = F.linear(query, ws[0], bs[0])
            k = F.linear(key, ws[1], bs[1])
            v = F.linear(value, ws[2], bs[2])
    else:
        bs = (None, None, None) if b is None else b.chunk(3)
        q = F.linear(query, m.q_proj_weight, bs[0])
        k = F.linear(key, m.k_proj_weight, bs[1])
        v = F.linear(value, m.v_proj_weight, bs[2])
    dropout = m.dropout if m.training else 0.0
    out = multi_head_attention(
        q,
        k,
        v,
        attn_mask,
        key_padding_mask,
        m.num_heads,
        m.batch_first,
        dropout,
        is_causal,
        need_weights,
        average_attn_weights,
    )
    weights = out[1] if need_weights else None
    return m.out_proj(out[0]), weights


def _encoder_layer(
    m: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:
    """``nn.TransformerEncoderLayer.forward`` (slow path) on fx proxies."""

    def sa(x: Any) -> Any:
        y = m.self_attn(
            x,
            x,
            x,
            attn_mask=src_mask,
            key_padding_mask=src_key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return m.dropout1(y)

    def ff(x: Any) -> Any:
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + ff(m.norm2(x))
    x = m.norm1(x + sa(x))
    return m.norm2(x + ff(x))


def _decoder_layer(
    m: nn.TransformerDecoderLayer,
    tgt: Any,
    memory: Any,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
) -> Any:
    """``nn.TransformerDecoderLayer.forward`` on fx proxies."""

    def sa(x: Any) -> Any:
        y = m.self_attn(
            x,
            x,
            x,
            attn_mask=tgt_mask,
            key_padding_mask=tgt_key_padding_mask,
            is_causal=tgt_is_causal,
            need_weights=False,
        )[0]
        return m.dropout1(y)

    def mha(x: Any) -> Any:
        y = m.multihead_attn(
            x,
            memory,
            memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            is_causal=memory_is_causal,
            need_weights=False,
        )[0]
        return m.dropout2(y)

    def ff(x: Any) -> Any:
        return m.dropout3(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = tgt
    if m.norm_first:
        x = x + sa(m.norm1(x))
        x = x + mha(m.norm2(x))
        return x + ff(m.norm3(x))
    x = m.norm1(x + sa(x))
    x = m.norm2(x + mha(x))
    return m.norm3(x + ff(x))


def _encoder(
    m: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool | None = None,
) -> Any:
    """``nn.TransformerEncoder.forward`` (slow path) on fx proxies."""
    output = src
    for mod in m.layers:
        output = mod(
            output,
            src_mask=mask,
            is_causal=is_causal,  # type: ignore[arg-type]
            src_key_padding_mask=src_key_padding_mask,
        )
    if m.norm is not None:
        output = m.norm(output)
    return output


def _decoder(
    m: nn.TransformerDecoder,
    tgt: Any,
    memory: Any,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Any:
    """``nn.TransformerDecoder.forward`` on fx proxies."""
    output = tgt
    for mod in m.layers:
        output = mod(
            output,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )
    if m.norm is not None:
        output = m.norm(output)
    return output


def _transformer(
    m: nn.Transformer,
    src: Any,
    tgt: Any,
    src_mask: Any = None,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    src_key_padding_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Any:
    """``nn.Transformer.forward`` on fx proxies (its shape checks raise in the model itself)."""
    memory = m.encoder(
        src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
    )
    return m.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )


DECOMPOSITIONS: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MultiheadAttention: _mha,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerDecoderLayer: _decoder_layer,
    nn.TransformerEncoder: _encoder,
    nn.TransformerDecoder: _decoder,
    nn.Transformer: _transformer,
}


def decomposition(m: nn.Module) -> Callable[..., Any] | None:
    """The traceable forward of ``m`` (called as ``f(m, *args, **kwargs)``), or None.

    None where the type is not exactly one of :data:`DECOMPOSITIONS`, the module has hooks or an
    instance-level ``forward``, or uses an option the decomposition does not reproduce.
    """
    f = DECOMPOSITIONS.get(type(m))
    if f is None or "forward" in vars(m):
        return None
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        return None
    if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
        return None
    return f
