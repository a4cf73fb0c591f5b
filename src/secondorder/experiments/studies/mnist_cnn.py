"""Seed 001: block-diagonal CG-Newton (GGN, Hessian, PCH) against SGD on a sigmoid CNN.

BackPACK's example trains a CNN with many sigmoids (hard for gradient descent: vanishing
gradients) on MNIST with a Newton-CG step per parameter tensor on the diagonal block of a
curvature matrix: batch 64, lr 0.1, damping 1e-2, CG to rtol 0.1 / atol 1e-6 in at most 20
iterations, 50 steps. We run the GGN, the Hessian and the positive-curvature Hessian (PCH, with
the residual terms' negative curvature clipped or made absolute) beside SGD at five learning
rates, all from the same initial weights on the same minibatches, and report the minibatch loss
and accuracy per step and the held-out test accuracy.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from ... import BlockDiagonalNewtonCG
from ..arguments import nonnegative_float, positive_float, positive_int
from ..data import batches, load_mnist
from ..distributed import DistContext
from ..models import sigmoid_cnn
from ..report import draw_curves, markdown_table, plot_panels, progress, write_markdown

DISTRIBUTED = True
NAME = "mnist-cnn"
DATA = "mnist"  # reads MNIST from --data (checked by the CLI before the run)
HELP = "Seed 001: block-diagonal CG-Newton (GGN, Hessian, PCH) vs SGD on a sigmoid CNN, MNIST."

CURVATURES = {"GGN": "ggn", "Hessian": "hessian", "PCH-abs": "pch_abs", "PCH-clip": "pch_clip"}
SGD_LRS = (10.0, 1.0, 0.1, 0.01, 0.001)
# second-order runs in saturated colours, SGD in a sequential palette (light = small lr)
COLOURS = {
    "GGN": "tab:blue",
    "Hessian": "tab:red",
    "PCH-abs": "tab:green",
    "PCH-clip": "tab:purple",
}
SGD_COLOURS = ("#08306b", "#2171b5", "#6baed6", "#9ecae1", "#c6dbef")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (50; --quick: 25 steps of GGN, Hessian, PCH-clip and SGD lr 0.1)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (64)")
    parser.add_argument("--lr", type=positive_float, default=0.1, help="CG-Newton lr (0.1)")
    parser.add_argument("--damping", type=nonnegative_float, default=1e-2, help="damping (1e-2)")
    parser.add_argument("--cg-maxiter", type=positive_int, default=20, help="CG iterations (20)")
    parser.add_argument("--cg-rtol", type=nonnegative_float, default=0.1, help="CG rtol (0.1)")
    parser.add_argument("--cg-atol", type=nonnegative_float, default=1e-6, help="CG atol (1e-6)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method and write the figures and summary to ``args.out``.

    Args:
        args: Parsed command-line arguments.

    Returns:
        Every number of the study.
    """
    device = torch.device(args.device)
    ctx: DistContext = getattr(args, "dist", None) or DistContext.single()
    data = load_mnist(args.data, seed=args.seed)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    if args.quick:
        test_x, test_y = test_x[:500], test_y[:500]
    steps = args.steps or (25 if args.quick else 50)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(train_x, train_y, args.batch_size, generator=gen, epochs=None)
    minibatches = [next(stream) for _ in range(steps)]  # the same batches for every method

    methods: dict[str, Any] = {
        name: (
            lambda m, c=curv: BlockDiagonalNewtonCG(
                m,
                loss_fn,
                lr=args.lr,
                damping=args.damping,
                curvature=c,
                cg_maxiter=args.cg_maxiter,
                cg_rtol=args.cg_rtol,
                cg_atol=args.cg_atol,
                process_group=ctx.group,
                adapt_damping=False,  # seed 001's fixed damping
            )
        )
        for name, curv in CURVATURES.items()
    }
    for lr in SGD_LRS:
        methods[f"SGD lr={lr:g}"] = lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr)
    if args.quick:
        methods = {k: methods[k] for k in ("GGN", "Hessian", "PCH-clip", "SGD lr=0.1")}

    runs: dict[str, Any] = {}
    for name, make in methods.items():
        model = sigmoid_cnn(seed=args.seed).to(device)
        ctx.broadcast_module(model)
        opt = make(model)
        losses, accs, times, cg_iters = [], [], [], []
        for xb, yb in progress(minibatches, name, enabled=args.progress):
            start = time.perf_counter()
            accs.append(ctx.accuracy(model, xb, yb))
            xs, ys = ctx.shard(xb), ctx.shard(yb)  # this rank's part of the minibatch
            if isinstance(opt, torch.optim.SGD):
                opt.zero_grad()
                loss = loss_fn(model(xs), ys)
                loss.backward()
                losses.append(ctx.sync_gradients(model.parameters(), loss, len(ys) / len(yb)))
                opt.step()
            else:
                losses.append(float(opt.step(xs, ys)))
                cg_iters.append(opt.diagnostics.get("cg_iterations", 0))
            times.append(time.perf_counter() - start)
        runs[name] = {
            "losses": losses,
            "accuracies": accs,
            "test_accuracy": ctx.accuracy(model, test_x, test_y),
            "median_step_ms": 1e3 * sorted(times)[len(times) // 2],
            "mean_cg_iterations": sum(cg_iters) / len(cg_iters) if cg_iters else None,
        }

    if not ctx.is_main:  # rank 0 writes the outputs
        return {"steps": steps, "data": data.source, "runs": runs}
    colours = dict(COLOURS)
    colours.update({f"SGD lr={lr:g}": c for lr, c in zip(SGD_LRS, SGD_COLOURS)})

    def panel(key: str, ylabel: str, title: str, logy: bool = False) -> Any:
        def draw(ax: Any) -> None:
            draw_curves(
                ax,
                {k: v[key] for k, v in runs.items()},
                xlabel="iteration",
                ylabel=ylabel,
                title=title,
                logy=logy,
            )
            for line in ax.get_lines():
                line.set_color(colours.get(line.get_label(), "gray"))
                if line.get_label().startswith("SGD"):
                    line.set_linestyle("--")
            ax.legend(fontsize=7, ncol=2)

        return draw

    out = args.out
    plot_panels(
        [
            panel("losses", "minibatch loss", "Loss"),
            panel("accuracies", "minibatch accuracy", "Accuracy"),
        ],
        out / "loss_accuracy.png",
        ncols=2,
        panel_size=(6.0, 4.2),
        suptitle=f"Sigmoid CNN on MNIST (seed 001), batch {args.batch_size}",
    )
    rows = [
        {
            "method": k,
            "final minibatch loss": v["losses"][-1],
            "test accuracy (%)": 100 * v["test_accuracy"],
            "median ms / step": v["median_step_ms"],
            "mean CG iterations": v["mean_cg_iterations"],
        }
        for k, v in runs.items()
    ]
    summary = "\n".join(
        [
            "# Sigmoid CNN on MNIST (seed 001)",
            "",
            f"{data.source}; {steps} steps of batch {args.batch_size} (the same batches for every "
            f"method), test accuracy on {len(test_y)} held-out digits. Block CG-Newton: lr "
            f"{args.lr}, damping {args.damping}, CG rtol {args.cg_rtol}, atol {args.cg_atol}, "
            f"<= {args.cg_maxiter} iterations per block.",
            "",
            markdown_table(rows, floatfmt=".3g"),
            "",
            "Figure: `loss_accuracy.png`",
        ]
    )
    write_markdown(out / "summary.md", summary + "\n")
    print(summary)
    return {"steps": steps, "data": data.source, "runs": runs}
