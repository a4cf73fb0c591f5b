"""A character-level GPT on the Python reference: second-order methods against AdamW and Muon.

Text: the prose of CPython's documentation topics, ``pydoc_data.topics`` (the Python Language
and Library Reference pages that ``help()`` prints; about 465,000 characters of English written
by people, with code examples), shipped with every CPython -- no download, no extra package.
Licence: Python Software Foundation License Version 2 (see :mod:`~secondorder.experiments.text`).
The text is cut into contiguous blocks of 2,048 characters, split 8:1:1 into training,
validation and test blocks spread over the whole reference.

The model (:class:`~secondorder.experiments.transformer_models.CharGPT`): character embedding
and learned positions, 2 pre-norm blocks of causal self-attention
(``F.scaled_dot_product_attention(is_causal=True)``, 4 heads) and a GELU MLP, a final
``LayerNorm`` and an output layer tied to the embedding. Loss: cross-entropy over every
position of every window. Minibatches: random windows of the training text from a
``DataLoader`` shuffled by a ``torch.Generator`` seeded with ``--seed``, the same for every
method. Evaluation: bits per character (cross-entropy in nats / ln 2) over non-overlapping
windows of the validation (curves) and test (final) text.

Every method gets the same training wall-clock (see
:mod:`~secondorder.experiments.studies.transformer_common`), with the same report as the
``vit`` study: curves against wall-clock and steps, the AdamW sweep, and the Hessian and GGN
spectra per layer at the start and at the end of training.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..compare import Workload, stream
from ..text import LICENCE, SOURCE, Windows, eval_windows, load_text
from ..transformer_models import char_gpt, sequence_loss
from .transformer_common import add_comparison_arguments, run_comparison

NAME = "charlm"
HELP = (
    "A character-level GPT on the Python reference text: Gauss-Newton, NG, HF, block CG vs "
    "AdamW and Muon."
)
REQUIRES = ("matplotlib",)

BUDGET, QUICK_BUDGET = 60.0, 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    add_comparison_arguments(parser, budget=BUDGET, quick_budget=QUICK_BUDGET, batch_size=16)
    parser.add_argument("--context", type=int, default=None, help="window length (64; quick 32)")
    parser.add_argument("--dim", type=int, default=64, help="width of the residual stream (64)")
    parser.add_argument("--depth", type=int, default=2, help="blocks (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")


def _group_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"block {parts[1]}"
    if parts[0] in ("tok", "pos"):
        return "embedding (tied)"
    return "final norm"


def _evaluator(splits: dict[str, tuple[Tensor, Tensor]], loss_fn: nn.Module) -> Any:
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        x, y = splits[split]
        total = sum(
            float(loss_fn(model(x[i : i + 256]), y[i : i + 256])) * len(y[i : i + 256])
            for i in range(0, len(y), 256)
        )
        loss = total / len(y)
        return {"loss": loss, "bits_per_char": loss / math.log(2)}

    return evaluate


def make_workload(
    *,
    seed: int = 0,
    quick: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    context: int | None = None,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
) -> tuple[Workload, dict[str, Any]]:
    """Build the study's workload (also for benchmarks that train on it).

    Args:
        seed: Seed of the initial weights and the minibatch order.
        quick: Context 32 (unless given) and 64 evaluation windows per split.
        batch_size: Windows per minibatch.
        device: Where the model and the data live.
        context: Window length (default 64; quick 32).
        dim: Width of the residual stream.
        depth: Blocks.
        heads: Attention heads.

    Returns:
        ``(workload, info)``; ``info`` holds ``spectra_batch`` (fixed validation windows),
        ``header`` (summary lines), ``data`` (source, licence, sizes) and ``model``.
    """
    device = torch.device(device)
    context = context or (32 if quick else 64)
    text = load_text()
    max_windows = 64 if quick else None
    val = tuple(t.to(device) for t in eval_windows(text.val, context, max_windows))
    test = tuple(t.to(device) for t in eval_windows(text.test, context, max_windows))
    loss_fn = sequence_loss()
    config = dict(dim=dim, depth=depth, heads=heads)
    vocab = len(text.vocab)

    def build() -> nn.Module:
        return char_gpt(vocab, context, seed=seed, **config).to(device)

    def batches() -> Any:
        loader = DataLoader(
            Windows(text.train, context),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return stream(loader, device)

    workload = Workload(
        build,
        loss_fn,
        batches,
        _evaluator({"val": val, "test": test}, loss_fn),  # type: ignore[dict-item]
        "bits_per_char",
        False,
    )
    n_spectra = 4 if quick else 16
    params = sum(p.numel() for p in build().parameters())
    header = [
        f"Text: {text.source}. Source: {SOURCE}, shipped with every CPython; licence: "
        f"{LICENCE}. SHA-256 {text.sha256[:16]}...; {len(text.train)} training, "
        f"{len(text.val)} validation, {len(text.test)} test characters; evaluation on "
        f"{len(val[1])} validation and {len(test[1])} test windows of {context}.",
        f"Model: character-level GPT, vocabulary {vocab}, context {context}, {depth} "
        f"pre-norm blocks (causal scaled_dot_product_attention, {heads} heads, GELU MLP), "
        f"width {dim}, learned positions, output layer tied to the embedding; "
        f"{params} parameters. Uniform guessing would cost log2({vocab}) = "
        f"{math.log2(vocab):.2f} bits per character.",
    ]
    data = {
        "source": text.source,
        "licence": text.licence,
        "num_chars": text.num_chars,
        "sha256": text.sha256,
        "vocab": text.vocab,
        "split_chars": {"train": len(text.train), "val": len(text.val), "test": len(text.test)},
    }
    info = {
        "spectra_batch": (val[0][:n_spectra], val[1][:n_spectra]),
        "header": header,
        "data": data,
        "model": {**config, "context": context, "parameters": params},
    }
    return workload, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study and write its figures and summary to ``args.out``.

    Args:
        args: Parsed command-line arguments.

    Returns:
        Every number of the study.
    """
    workload, info = make_workload(
        seed=args.seed,
        quick=args.quick,
        batch_size=args.batch_size,
        device=args.device,
        context=args.context,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
    )
    results = run_comparison(
        args,
        workload,
        title="Character-level GPT on the Python reference",
        metric_label="bits per character",
        metric_scale=1.0,
        is_hidden=lambda name: name.startswith("blocks."),
        group_of=_group_of,
        spectra_batch=info["spectra_batch"],
        header=info["header"],
        quick_budget=QUICK_BUDGET,
        budget=BUDGET,
    )
    return {"data": info["data"], "model": info["model"], **results}
