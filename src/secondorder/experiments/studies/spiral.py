"""Seed 000: Gauss-Newton and natural gradient against Adam on the five-arm spiral.

The seed (CoLA's notebook) trains an MLP(200) with SiLU on 5 x 100 spiral points with Adam
(lr 1e-2, 500 epochs) and with 100 iterations each of Gauss-Newton and natural gradient (damping
1e-3, CG to relative residual 1e-3 in at most 20 iterations, NG with lr 0.5), and checks the
scale of the curvature through its largest eigenvalue.

Note on scaling: the seed builds its Gauss-Newton matrix from the loss *times n_spirals*, so it
solves ``(5 G + 1e-3 I) s = g``. That is exactly ``0.2 (G + 2e-4 I)^{-1} g`` (and CG's relative
tolerance is scale free), so we run :class:`~secondorder.GaussNewton` with ``lr=0.2`` and
``damping=2e-4`` on the true GGN and report both eigenvalue scales.

Data-parallel (``torchrun --nproc-per-node N -m secondorder spiral``): every rank generates the
same 500 points and trains on its contiguous shard of them. Gauss-Newton, natural gradient and
the eigenvalue estimates pass the process group to the operators and optimizers, which
all-reduce every product, gradient and loss; Adam all-reduces its gradient by hand
(:meth:`~secondorder.experiments.distributed.DistContext.sync_gradients`). Losses are the
weighted sums of the shards' losses, so every number equals the single-process run's up to
floating-point summation order. Rank 0 computes the accuracies and writes the figures and the
summary.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from ... import GGN, Fisher, GaussNewton, NaturalGradient
from ...linalg.lanczos import eigmax
from ..arguments import positive_int
from ..data import make_spiral
from ..distributed import DistContext
from ..models import spiral_mlp
from ..report import markdown_table, plot_curves, plot_decision_boundary, progress, write_markdown

NAME = "spiral"
HELP = "Seed 000: Gauss-Newton and natural gradient vs Adam on the spiral data (MLP, SiLU)."
DISTRIBUTED = True

TARGET = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the spiral study's options.

    Args:
        parser: The study's argument parser.
    """
    parser.add_argument(
        "--iterations", type=positive_int, default=None, help="GN/NG iterations (100)"
    )
    parser.add_argument("--adam-epochs", type=positive_int, default=None, help="Adam epochs (500)")
    parser.add_argument("--width", type=positive_int, default=None, help="hidden width (200)")


def _first_below(losses: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(losses) if v <= target), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study and write its figures and summary to ``args.out``.

    Args:
        args: Parsed command-line arguments.

    Returns:
        Every number of the study.
    """
    iterations = args.iterations or (15 if args.quick else 100)
    epochs = args.adam_epochs or (75 if args.quick else 500)
    width = args.width or (64 if args.quick else 200)
    device = torch.device(args.device)
    ctx: DistContext = getattr(args, "dist", None) or DistContext.single()
    group, main = ctx.group, ctx.is_main
    X_np, y_np = make_spiral(100, 5, 0.02, generator=args.seed)
    X = torch.as_tensor(X_np, device=device)
    y = torch.as_tensor(y_np, device=device)
    Xs, ys = ctx.shard(X), ctx.shard(y)  # this rank's points (all of them on one process)
    share = len(ys) / len(y)
    loss_fn = nn.CrossEntropyLoss()

    def fresh() -> nn.Module:
        model = spiral_mlp(width=width, n_classes=5, seed=args.seed).to(device)
        ctx.broadcast_module(model)
        return model

    def full_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return ctx.weighted_sum(loss_fn(model(Xs), ys), share)

    # curvature scale at the initial weights
    model = fresh()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ggn_max = eigmax(GGN(model, loss_fn, (Xs, ys), process_group=group), generator=gen)
    fisher_max = eigmax(Fisher(model, loss_fn, (Xs, ys), process_group=group), generator=gen)
    n_params = sum(p.numel() for p in model.parameters())

    histories: dict[str, list[float]] = {}
    times: dict[str, float] = {}
    models: dict[str, nn.Module] = {}

    # Adam baseline
    model = fresh()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    start = time.perf_counter()
    for _ in progress(range(epochs), "Adam", enabled=args.progress):
        adam.zero_grad()
        loss = loss_fn(model(Xs), ys)
        loss.backward()
        losses.append(ctx.sync_gradients(model.parameters(), loss, share))
        adam.step()
    times["Adam"] = (time.perf_counter() - start) / epochs
    histories["Adam"], models["Adam"] = losses, model

    # seed 000's fixed damping (no adaptation)
    cg = dict(cg_maxiter=20, cg_rtol=1e-3, process_group=group, adapt_damping=False)
    optimizers = {
        "Gauss-Newton": lambda m: GaussNewton(m, loss_fn, lr=0.2, damping=2e-4, **cg),
        "Natural gradient": lambda m: NaturalGradient(
            m, loss_fn, lr=0.5, damping=1e-3, fisher="exact", **cg
        ),
    }
    cg_iters: dict[str, float] = {}
    for name, make in optimizers.items():
        model = fresh()
        opt = make(model)
        losses, iters = [], []
        start = time.perf_counter()
        for _ in progress(range(iterations), name, enabled=args.progress):
            opt.step(Xs, ys)
            iters.append(opt.diagnostics.get("cg_iterations", 0))
            losses.append(full_loss(model))
        times[name] = (time.perf_counter() - start) / iterations
        histories[name], models[name] = losses, model
        cg_iters[name] = sum(iters) / len(iters)

    results: dict[str, Any] = {
        "config": {"iterations": iterations, "adam_epochs": epochs, "width": width},
        "num_parameters": n_params,
        "world_size": ctx.world_size,
        "eigmax": {"ggn": ggn_max, "seed_gn_x5": 5 * ggn_max, "fisher": fisher_max},
        "losses": histories,
        "time_per_iteration_s": times,
        "mean_cg_iterations": cg_iters,
        "first_below_target": {k: _first_below(v, TARGET) for k, v in histories.items()},
    }
    if not main:  # rank 0 evaluates and writes the outputs
        return results

    # figures
    out = args.out
    plot_curves(
        histories,
        out / "loss.png",
        xlabel="iteration (Adam: epoch)",
        ylabel="training loss",
        title=f"Spiral: MLP({width}), SiLU",
        logy=True,
    )
    boundaries = {}
    for name, model in models.items():
        model.eval()

        def predict(points: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            with torch.no_grad():
                return model(points.to(device)).argmax(1).cpu()

        slug = name.lower().replace(" ", "_").replace("-", "_")
        path = plot_decision_boundary(
            predict,
            X.cpu(),
            y.cpu(),
            out / f"decision_boundary_{slug}.png",
            title=f"Decision boundaries: {name}",
        )
        with torch.no_grad():
            acc = (models[name](X).argmax(1) == y).float().mean().item()
        boundaries[name] = {"figure": path.name, "train_accuracy": acc}

    rows = [
        {
            "method": name,
            "final loss": histories[name][-1],
            f"first iteration <= {TARGET}": _first_below(histories[name], TARGET),
            "ms / iteration": times[name] * 1e3,
            "mean CG iterations": cg_iters.get(name),
            "train accuracy": boundaries[name]["train_accuracy"],
        }
        for name in histories
    ]
    summary = "\n".join(
        [
            "# Spiral (seed 000)",
            "",
            f"MLP(2-{width}-{width}-5, SiLU), {n_params} parameters, {len(y)} points; "
            f"Adam {epochs} epochs, Gauss-Newton and natural gradient {iterations} iterations"
            + (f"; data-parallel on {ctx.world_size} processes." if group is not None else "."),
            "",
            markdown_table(rows),
            "",
            f"Largest eigenvalue at the initial weights: GGN {ggn_max:.4g} (the seed's "
            f"GN matrix, built from the loss x 5: {5 * ggn_max:.4g}), Fisher {fisher_max:.4g}.",
            "",
            "Figures: `loss.png`, " + ", ".join(f"`{b['figure']}`" for b in boundaries.values()),
        ]
    )
    write_markdown(out / "summary.md", summary + "\n")
    print(summary)
    results["decision_boundaries"] = boundaries
    return results
