"""Peak memory of a GGN·v against a gradient on a tiny GPT with a 32k vocabulary (issue 15).

The model: token and position embeddings (d 64), 2 pre-LayerNorm blocks (4 heads, causal
``F.scaled_dot_product_attention``, GELU feed-forward 4d), a final LayerNorm and a vocabulary
head (32,000) tied to the token embedding or untied; N 8 sequences of T 64 tokens, float32, the
last 8 tokens of every sequence padding (``ignore_index=-100``). Three losses:

- ``seq``: ``so.SequenceCrossEntropyLoss()`` on the class-last logits (the output Hessian in
  closed form, keeping the probabilities);
- ``seq_chunked``: ``so.SequenceCrossEntropyLoss(chunk_size=--chunk)``, the fused head path
  (``curvature/fused_head.py``), which keeps nothing of ``N T V`` entries;
- ``torch``: ``nn.CrossEntropyLoss()`` on ``logits.transpose(1, 2)``.

Measured (each with ``_harness.peak_memory``: torch's profiler replays every CPU tensor
allocation and free, the peak of the live tensor bytes on top of what was alive before; no
allocator slack, no Python objects):

- **gradient**: ``loss_fn(model(x), y).backward()`` into fresh ``.grad`` (they count);
- **build**: ``so.GGN(model, loss_fn, (x, y))`` (after a first build that traces the model);
  its peak and what it retains;
- **product**: one ``G @ v`` with that operator; its footprint is what the operator retains plus
  the product's own peak (the linearisation reused);
- **build + product**: the larger of the build's peak and the product's footprint.

Ratios are to the gradient's peak. The target: product footprint <= 1.5. Times (median of
``--repeats`` interleaved samples, ``_harness.time_interleaved``) are per product with the
operator built, against ``torch.autograd.grad`` of the loss.
``python benchmarks/sequence_memory.py [--vocab 32000] [--tied both] [--loss all] [--chunk 128]``.
"""

from __future__ import annotations

import argparse
import gc
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from _harness import (  # type: ignore[import-not-found]
    markdown_table,
    peak_memory,
    time_interleaved,
)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        N, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(N, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Embeddings, blocks, LayerNorm and a vocabulary head (tied or not)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, T: int, tied: bool) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class Transposed(nn.Module):
    """The GPT with its logits transposed to ``(N, V, T)`` for ``nn.CrossEntropyLoss``."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: Tensor) -> Tensor:
        return self.gpt(idx).transpose(1, 2)


def _problem(args: Any, tied: bool, loss: str) -> tuple[nn.Module, Any, Tensor, Tensor]:
    torch.manual_seed(0)
    gpt = TinyGPT(args.vocab, args.d, args.heads, args.layers, args.T, tied)
    x = torch.randint(0, args.vocab, (args.N, args.T))
    y = torch.randint(0, args.vocab, (args.N, args.T))
    y[:, -8:] = -100
    if loss == "torch":
        return Transposed(gpt), nn.CrossEntropyLoss(), x, y
    chunk = args.chunk if loss == "seq_chunked" else None
    return gpt, so.SequenceCrossEntropyLoss(chunk_size=chunk), x, y


def _mb(n: int) -> float:
    return n / 2**20


def measure(args: Any, tied: bool, loss: str) -> dict[str, Any]:
    """One row of the table: peaks in MiB and ratios to the gradient."""
    model, loss_fn, x, y = _problem(args, tied, loss)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        loss_fn(model(x), y).backward()

    grad_usage, _ = peak_memory(gradient)
    for p in params:
        p.grad = None
    so.GGN(model, loss_fn, (x, y))  # first build: traces and checks the model
    gc.collect()
    build_usage, G = peak_memory(lambda: so.GGN(model, loss_fn, (x, y)))
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(1))
    prod_usage, Gv = peak_memory(lambda: G @ v)

    def grad_only() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    times = time_interleaved(
        {"gradient": grad_only, "product": lambda: G @ v}, repeats=args.repeats, warmup=1
    )
    t_grad, t_prod = times["gradient"].quantile(0.5), times["product"].quantile(0.5)
    footprint = build_usage.retained + prod_usage.peak
    g = grad_usage.peak
    ntv = args.N * args.T * args.vocab * 4
    return {
        "tied": tied,
        "loss": loss,
        "gradient MiB": _mb(g),
        "N·T·V float32 MiB": _mb(ntv),
        "build peak MiB": _mb(build_usage.peak),
        "retained MiB": _mb(build_usage.retained),
        "product peak MiB": _mb(prod_usage.peak),
        "GGN·v / gradient": footprint / g,
        "build+product / gradient": max(build_usage.peak, footprint) / g,
        "time GGN·v / gradient (median)": t_prod / t_grad,
        "finite": bool(torch.isfinite(Gv).all()) and math.isfinite(float(Gv.norm())),
    }


def main() -> None:
    """Print the table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--N", type=int, default=8)
    parser.add_argument("--tied", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--loss", choices=("seq", "seq_chunked", "torch", "all"), default="all")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per chunk (seq_chunked)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timing samples per quantity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ties = {"yes": [True], "no": [False], "both": [True, False]}[args.tied]
    losses = ["seq", "seq_chunked", "torch"] if args.loss == "all" else [args.loss]
    rows = [measure(args, tied, loss) for tied in ties for loss in losses]
    headers = list(rows[0])
    cells = [
        [f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows
    ]
    print(markdown_table(headers, cells))


if __name__ == "__main__":
    main()
