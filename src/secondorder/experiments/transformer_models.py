r"""Transformers of the experiments: a small vision transformer and a character-level GPT.

* :class:`ViT` -- patch embedding (a ``Conv2d`` with stride = kernel = patch size), learned
  positions, a class token, pre-norm ``nn.TransformerEncoderLayer`` blocks
  (``batch_first=True, norm_first=True, activation="gelu"``), a final ``LayerNorm`` and a linear
  head: images ``(N, C, H, W)`` -> logits ``(N, classes)``.
* :class:`CharGPT` -- token and learned position embeddings, pre-norm blocks of causal
  self-attention (:class:`CausalBlock`, ``F.scaled_dot_product_attention`` with
  ``is_causal=True``) and a GELU MLP, a final ``LayerNorm`` and an output layer tied to the
  token embedding (:math:`z = h E^\top`): tokens ``(N, T)`` -> logits ``(N, T, V)``, for
  :class:`~secondorder.SequenceCrossEntropyLoss` (:func:`sequence_loss`).

Builders take a ``seed`` (int or ``torch.Generator``) and initialize inside
``torch.random.fork_rng`` (as :mod:`.models`), so the weights depend only on the seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.sequence_loss import SequenceCrossEntropyLoss
from .models import _seeded

__all__ = [
    "CausalBlock",
    "CharGPT",
    "ViT",
    "char_gpt",
    "sequence_loss",
    "vit",
]


def sequence_loss() -> nn.Module:
    """Return the cross-entropy over every position of ``(N, T, V)`` logits (mean over tokens)."""
    return SequenceCrossEntropyLoss()


class ViT(nn.Module):
    """A small vision transformer (class token, pre-norm encoder blocks).

    Args:
        image_size: Height and width of the square input images.
        patch: Patch size; must divide ``image_size``.
        channels: Input channels.
        classes: Number of output logits.
        dim: Width of the residual stream.
        depth: Number of encoder blocks.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: Feed-forward width as a multiple of ``dim``.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch: int = 7,
        channels: int = 1,
        classes: int = 10,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                dim_feedforward=mlp_ratio * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(N, C, H, W)`` to logits ``(N, classes)``."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, d)
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class CausalBlock(nn.Module):
    """Pre-norm block: ``h + attn(LN(h))`` then ``h + MLP(LN(h))`` with causal attention.

    Args:
        dim: Width of the residual stream.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: Feed-forward width as a multiple of ``dim``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        """Map ``(N, T, d)`` to ``(N, T, d)``; position t attends to positions <= t."""
        n, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return h + self.out(self.act(self.fc(self.ln2(h))))


class CharGPT(nn.Module):
    """A character-level GPT with learned positions and tied input/output embeddings.

    Args:
        vocab: Number of characters.
        context: Longest input sequence (number of learned positions).
        dim: Width of the residual stream.
        depth: Number of blocks.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: Feed-forward width as a multiple of ``dim``.
    """

    def __init__(
        self,
        vocab: int,
        context: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.pos = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for name, p in self.blocks.named_parameters():  # GPT-2's scaled residual projections
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: Tensor) -> Tensor:
        """Map tokens ``(N, T)`` to logits ``(N, T, V)``."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = self.tok(idx) + self.pos[:, :t]
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.tok.weight)  # tied: z = h E^T


def vit(*, seed: int | torch.Generator = 0, **kwargs: int) -> ViT:
    """Build a :class:`ViT` initialized from ``seed``.

    Args:
        seed: Seed of the initialization.
        **kwargs: :class:`ViT` options (``dim``, ``depth``, ``heads``, ``patch``, ...).

    Returns:
        The model, on the CPU.
    """
    with _seeded(seed):
        return ViT(**kwargs)


def char_gpt(
    vocab: int, context: int, *, seed: int | torch.Generator = 0, **kwargs: int
) -> CharGPT:
    """Build a :class:`CharGPT` initialized from ``seed``.

    Args:
        vocab: Number of characters.
        context: Longest input sequence.
        seed: Seed of the initialization.
        **kwargs: :class:`CharGPT` options (``dim``, ``depth``, ``heads``, ``mlp_ratio``).

    Returns:
        The model, on the CPU.
    """
    with _seeded(seed):
        return CharGPT(vocab, context, **kwargs)
