r"""K-FAC's view of ``nn.MultiheadAttention``: its projections as recorded Linear maps.

``nn.MultiheadAttention`` reads its projection weights directly
(``F.multi_head_attention_forward``), so no module hook sees them. For the autograd engine of
K-FAC (:mod:`.kfac_autograd`), :class:`AttentionRecorder` evaluates each such module (exact type,
the options of its decomposition :func:`~.engines.decompose.decomposition`) by the same
composite forward as the graph engine's decomposition, with every projection an ``F.linear``
whose input and output are recorded as a :class:`Piece`:

- the packed ``in_proj_weight`` ``(3E, E)`` (and ``in_proj_bias``): one piece of all ``3E``
  rows where query, key and value are one tensor (self-attention: a Linear ``E -> 3E``); rows
  ``[0, E)`` and ``[E, 3E)`` where key and value are one tensor and the query another (a
  decoder's memory attention); three pieces of ``E`` rows otherwise;
- ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (``kdim``/``vdim``): one piece each,
  with rows ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)`` of ``in_proj_bias``;
- ``out_proj``: one piece.

Each call is checked against the module's own forward (without gradients; :attr:`agrees`):
its output (values and memory layout, ``(L, N, E)`` transposed with ``batch_first``, so that
a dropout applied to it draws the same mask) and weights.

**Dropout in training mode** (``dropout > 0``): the attention between the projections is
torch's own (:func:`torch_attention`: ``F.multi_head_attention_forward`` with identity
projections), so it draws the mask the module's forward draws from the same generator state;
the check runs the module's forward from that same state (replayed), and leaves the generators
where one forward pass leaves them. The pieces are then those of the network with that fixed
mask (the one every pass on the batch draws, :mod:`.random_state`); where the check fails the
caller repeats the pass without recording (exact diagonals).
Each piece is a Linear map on the tokens, ``(N, T, d) -> (N, T, out)`` (``batch_first=False``
layouts are read as ``(T, N, .)``), so it gets the Kronecker block of a Linear layer on
sequences (:mod:`.kfac_factors`); the rows of a packed parameter form disjoint blocks. Unbatched
inputs (no sample dimension) record nothing: their parameters keep their exact diagonals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .engines.decompose import decomposition
from .engines.graph import _agrees
from .engines.mha import multi_head_attention
from .model import FunctionalModel
from .random_state import GeneratorState

__all__ = ["AttentionRecorder", "Piece", "torch_attention"]


@dataclass
class Piece:
    """One recorded projection (a row block of a parameter) of an attention module.

    Attributes:
        name: A node name, unique in the model (``"<module>.in_proj_weight[0:E]"``).
        module: The attention module.
        x: Its input, sample-major ``(N, T, d)`` (detached).
        out: Its output as computed (in the module's layout; part of the graph).
        batch_dim: The sample dimension of ``out`` (0 or 1).
        params: ``{"weight": index, "bias": index}`` of the selected parameters.
        rows: First row of the block in each parameter.
        weight: The weight rows (detached), ``(out, d)``.
    """

    name: str
    module: nn.Module
    x: Tensor
    out: Tensor
    batch_dim: int
    params: dict[str, int]
    rows: dict[str, int]
    weight: Tensor


class AttentionRecorder:
    """Within ``with``: the model's attention modules record their projections as pieces.

    Args:
        fmodel: The model; only modules holding a selected parameter are rerouted.

    Attributes:
        pieces: The pieces of the last forward pass, in call order.
        modules: ``{module prefix: module}`` of the rerouted modules.
        agrees: Whether every call reproduced the module's own output (and weights).
    """

    def __init__(self, fmodel: FunctionalModel) -> None:
        self.fmodel = fmodel
        self.pieces: list[Piece] = []
        self.agrees = True
        self.modules: dict[str, nn.MultiheadAttention] = {}
        for prefix, m in fmodel.model.named_modules():
            if not isinstance(m, nn.MultiheadAttention) or decomposition(m) is None:
                continue
            names = [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters()]
            if any(n in fmodel.alias for n in names):
                self.modules[prefix] = m

    def __enter__(self) -> AttentionRecorder:
        self.pieces, self.agrees = [], True
        for prefix, m in self.modules.items():
            m.forward = self._forward(prefix, m)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.modules.values():
            vars(m).pop("forward", None)

    def _index(self, prefix: str, name: str) -> int | None:
        return self.fmodel.alias.get(f"{prefix}.{name}" if prefix else name)

    def _forward(self, prefix: str, m: nn.MultiheadAttention) -> Any:
        """``m.forward`` (the decomposition's composite path) with recorded projections."""
        E = m.embed_dim
        dot = f"{prefix}." if prefix else ""

        def linear(
            x: Tensor,
            w_name: str,
            r0: int,
            r1: int,
            b_name: str,
            b0: int,
            node: str,
            bdim: int = 0 if m.batch_first else 1,
        ) -> Tensor:
            W, b = getattr_path(m, w_name), getattr_path(m, b_name)
            w = W if (r0, r1) == (0, W.shape[0]) else W[r0:r1]
            if b is not None and (b0, b0 + r1 - r0) != (0, b.shape[0]):
                b = b[b0 : b0 + r1 - r0]
            y = F.linear(x, w, b)
            if x.ndim != 3 or not y.requires_grad:
                return y
            params, rows = {}, {}
            for key, name, row in (("weight", w_name, r0), ("bias", b_name, b0)):
                i = self._index(prefix, name)
                if i is not None and getattr_path(m, name) is not None:
                    params[key], rows[key] = i, row
            if params:
                xs = x if bdim == 0 else x.transpose(0, 1)
                self.pieces.append(
                    Piece(dot + node, m, xs.detach(), y, bdim, params, rows, w.detach())
                )
            return y

        def forward(
            query: Tensor,
            key: Tensor,
            value: Tensor,
            key_padding_mask: Tensor | None = None,
            need_weights: bool = True,
            attn_mask: Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[Tensor, Tensor | None]:
            pw, pb = "in_proj_weight", "in_proj_bias"
            if m._qkv_same_embed_dim:
                if query is key and key is value:
                    q, k, v = linear(query, pw, 0, 3 * E, pb, 0, f"{pw}[0:{3 * E}]").chunk(3, -1)
                elif key is value:
                    q = linear(query, pw, 0, E, pb, 0, f"{pw}[0:{E}]")
                    k, v = linear(key, pw, E, 3 * E, pb, E, f"{pw}[{E}:{3 * E}]").chunk(2, -1)
                else:
                    q = linear(query, pw, 0, E, pb, 0, f"{pw}[0:{E}]")
                    k = linear(key, pw, E, 2 * E, pb, E, f"{pw}[{E}:{2 * E}]")
                    v = linear(value, pw, 2 * E, 3 * E, pb, 2 * E, f"{pw}[{2 * E}:{3 * E}]")
            else:
                q = linear(query, "q_proj_weight", 0, E, pb, 0, "q_proj_weight")
                k = linear(key, "k_proj_weight", 0, E, pb, E, "k_proj_weight")
                v = linear(value, "v_proj_weight", 0, E, pb, 2 * E, "v_proj_weight")
            start = None
            if m.training and m.dropout > 0.0:  # torch's own draws, from the state it starts at
                start = GeneratorState.now(query.device)
                out, weights = torch_attention(
                    m,
                    q,
                    k,
                    v,
                    key_padding_mask,
                    need_weights,
                    attn_mask,
                    average_attn_weights,
                    is_causal,
                )
            else:
                out, weights = multi_head_attention(
                    q,
                    k,
                    v,
                    attn_mask,
                    key_padding_mask,
                    m.num_heads,
                    m.batch_first,
                    0.0,
                    is_causal,
                    need_weights,
                    average_attn_weights,
                )
            # the output in the module's memory layout, (L, N, E) (transposed with batch_first):
            # a dropout on it draws its mask in that order
            swap = m.batch_first and out.ndim == 3
            out = (out.transpose(0, 1) if swap else out).contiguous()
            y = linear(out, "out_proj.weight", 0, E, "out_proj.bias", 0, "out_proj", 1)
            y = y.transpose(0, 1) if swap else y
            if start is not None:  # the module draws the same mask and leaves the state after it
                start.restore()
            with torch.no_grad():  # the module's own forward: the same function?
                ref = nn.MultiheadAttention.forward(
                    m,
                    query,
                    key,
                    value,
                    key_padding_mask=key_padding_mask,
                    need_weights=need_weights,
                    attn_mask=attn_mask,
                    average_attn_weights=average_attn_weights,
                    is_causal=is_causal,
                )
            same = _agrees(y.detach(), ref[0]) and _same_layout(y, ref[0])
            if need_weights:
                same = same and weights is not None and _agrees(weights.detach(), ref[1])
            self.agrees = self.agrees and same
            return y, (weights if need_weights else None)

        return forward


def torch_attention(
    m: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    r"""Torch's own attention of ``m`` in training mode on projected ``q``, ``k``, ``v``.

    ``F.multi_head_attention_forward`` (the function ``m.forward`` calls) with identity
    projections :math:`I_E` and no biases, so that its dropout draws the mask ``m``'s forward
    draws from the same generator state: the same operation in the same order (``F.dropout`` on
    the weights ``(N H, L, S)`` with ``need_weights``, else ``scaled_dot_product_attention``'s
    ``dropout_p`` with the same masks, causal hint and layouts), on inputs of the same shapes.
    An identity matrix product is exact, so the values are those of ``m`` between its
    projections.

    Args:
        m: The attention module (no ``bias_k``/``bias_v``, no ``add_zero_attn``).
        q: Projected queries in ``m``'s layout, ``(N, L, E)`` (``(L, N, E)`` without
            ``batch_first``) or ``(L, E)`` unbatched.
        k: Projected keys, likewise with ``S`` tokens.
        v: Projected values, likewise.
        key_padding_mask: As for ``m.forward``.
        need_weights: As for ``m.forward``.
        attn_mask: As for ``m.forward``.
        average_attn_weights: As for ``m.forward``.
        is_causal: As for ``m.forward``.

    Returns:
        ``(output, weights)``: the attention's output before the output projection, in the
        layout of ``q``, and the weights as ``m.forward`` returns them (None without
        ``need_weights``).
    """
    swap = m.batch_first and q.dim() == 3
    if swap:  # as m.forward: the function reads sequence-first inputs
        q, k, v = q.transpose(1, 0), k.transpose(1, 0), v.transpose(1, 0)
    E = m.embed_dim
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        E,
        m.num_heads,
        None,
        None,
        None,
        None,
        False,
        m.dropout,
        eye,
        None,
        training=True,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    return (out.transpose(1, 0) if swap else out), weights


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same strides (dimensions of size 1 aside)."""
    return all(n == 1 or s == t for n, s, t in zip(a.shape, a.stride(), b.stride()))


def getattr_path(m: nn.Module, path: str) -> Any:
    """``m.a.b`` for ``path == "a.b"``."""
    for part in path.split("."):
        m = getattr(m, part)
    return m
