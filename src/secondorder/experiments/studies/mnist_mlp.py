r"""Seed 002: natural gradient with the empirical vs the true Fisher against SGD on MNIST.

The seed (Gebotys, "Natural Gradient Descent without the Tears") trains an MLP 784-128-10 with
ReLU on MNIST by SGD and by natural gradient, the Fisher applied matrix-free inside CG: once the
empirical Fisher (true targets) and once the true Fisher (targets from the model). We run SGD,
natural gradient with the empirical Fisher, with the true Fisher computed exactly
(:math:`J^\top(\operatorname{diag} p - pp^\top)J`) and with the true Fisher estimated from one
sampled target per example (the seed's Monte-Carlo variant), from the same initial weights and on
the same minibatches, and report test accuracy per epoch and runtime.

Data-parallel (``torchrun --nproc-per-node N -m secondorder mnist-mlp``): every rank draws the
same sequence of minibatches and trains on its contiguous shard of each; the natural-gradient
optimizers get the process group (products, gradients and losses all-reduced), SGD all-reduces
its gradient by hand, and the test accuracy is counted on shards of the test set and summed.
SGD and the exact and empirical Fisher then follow the single-process run up to summation order;
the one-sample Fisher draws its targets on each rank from its own generator (rank 0 seeded
as on one process), so it matches the single-process run in distribution only.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from ... import NaturalGradient
from ..arguments import nonnegative_float, positive_float, positive_int
from ..data import batches, load_mnist
from ..distributed import DistContext
from ..models import mnist_mlp
from ..report import draw_curves, markdown_table, plot_panels, progress, write_markdown

NAME = "mnist-mlp"
DATA = "mnist"  # reads MNIST from --data (checked by the CLI before the run)
HELP = "Seed 002: natural gradient (empirical vs true Fisher) vs SGD, MNIST MLP 784-128-10."
DISTRIBUTED = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs (5; --quick: 1)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (128)")
    parser.add_argument(
        "--sgd-lr", type=positive_float, default=0.1, help="SGD learning rate (0.1)"
    )
    parser.add_argument(
        "--ng-lr", type=positive_float, default=0.5, help="natural-gradient lr (0.5)"
    )
    parser.add_argument(
        "--damping", type=nonnegative_float, default=0.1, help="Tikhonov damping (0.1)"
    )
    parser.add_argument(
        "--mc-damping",
        type=nonnegative_float,
        default=1.0,
        help="damping of the one-sample Monte-Carlo Fisher (1.0: a rank <= batch-size estimate "
        "underestimates curvature and needs more damping)",
    )
    parser.add_argument("--cg-maxiter", type=positive_int, default=10, help="CG iterations (10)")
    parser.add_argument(
        "--cg-rtol", type=nonnegative_float, default=1e-2, help="CG tolerance (1e-2)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study and write its figures and summary to ``args.out``.

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
        train_x, train_y = train_x[:1024], train_y[:1024]
    epochs = args.epochs or (1 if args.quick else 5)
    loss_fn = nn.CrossEntropyLoss()
    ng = dict(
        lr=args.ng_lr,
        damping=args.damping,
        cg_maxiter=args.cg_maxiter,
        cg_rtol=args.cg_rtol,
        process_group=ctx.group,
        adapt_damping=False,  # seed 002's fixed damping
    )
    # rank 0 draws as a single process does; the other ranks from their own streams
    mc_seed = args.seed + 1_000_003 * ctx.rank
    methods: dict[str, Any] = {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=args.sgd_lr),
        "NG (empirical Fisher)": lambda m: NaturalGradient(m, loss_fn, fisher="empirical", **ng),
        "NG (true Fisher, exact)": lambda m: NaturalGradient(m, loss_fn, fisher="exact", **ng),
        "NG (true Fisher, 1 sample)": lambda m: NaturalGradient(
            m,
            loss_fn,
            fisher="mc",
            generator=torch.Generator().manual_seed(mc_seed),
            **{**ng, "damping": args.mc_damping},
        ),
    }
    results: dict[str, Any] = {}
    for name, make in methods.items():
        model = mnist_mlp(seed=args.seed).to(device)
        ctx.broadcast_module(model)
        opt = make(model)
        losses, accs = [], []
        start = time.perf_counter()
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            stream = batches(train_x, train_y, args.batch_size, generator=gen)
            n_batches = len(train_x) // args.batch_size
            bar = progress(
                stream, f"{name} epoch {epoch + 1}", enabled=args.progress, total=n_batches
            )
            for xb, yb in bar:
                xs, ys = ctx.shard(xb), ctx.shard(yb)  # this rank's part of the minibatch
                if isinstance(opt, torch.optim.SGD):
                    opt.zero_grad()
                    loss = loss_fn(model(xs), ys)
                    loss.backward()
                    losses.append(ctx.sync_gradients(model.parameters(), loss, len(ys) / len(yb)))
                    opt.step()
                else:
                    losses.append(float(opt.step(xs, ys)))
            accs.append(ctx.accuracy(model, test_x, test_y))
        results[name] = {
            "test_accuracy_per_epoch": accs,
            "train_loss_per_step": losses,
            "runtime_s": time.perf_counter() - start,
        }

    if not ctx.is_main:  # rank 0 writes the outputs
        return {"data": data.source, "epochs": epochs, "methods": results}
    out = args.out
    plot_panels(
        [
            lambda ax: draw_curves(
                ax,
                {
                    k: (list(range(1, epochs + 1)), [100 * a for a in v["test_accuracy_per_epoch"]])
                    for k, v in results.items()
                },
                xlabel="epoch",
                ylabel="test accuracy (%)",
                title="Test accuracy",
            ),
            lambda ax: draw_curves(
                ax,
                {k: v["train_loss_per_step"] for k, v in results.items()},
                xlabel="step",
                ylabel="minibatch loss",
                title="Training loss",
                logy=True,
            ),
        ],
        out / "accuracy_loss.png",
        ncols=2,
        panel_size=(5.5, 4.0),
        suptitle="MNIST MLP 784-128-10 (seed 002)",
    )
    rows = [
        {
            "method": k,
            "test accuracy (%)": 100 * v["test_accuracy_per_epoch"][-1],
            "after epoch 1 (%)": 100 * v["test_accuracy_per_epoch"][0],
            "runtime (s)": v["runtime_s"],
        }
        for k, v in results.items()
    ]
    summary = "\n".join(
        [
            "# MNIST MLP (seed 002)",
            "",
            f"{data.source}; {len(train_x)} training and {len(test_x)} test images, batch "
            f"{args.batch_size}, {epochs} epoch(s); natural gradient lr {args.ng_lr}, damping "
            f"{args.damping} (one-sample Monte-Carlo Fisher: {args.mc_damping}), CG <= "
            f"{args.cg_maxiter} iterations to rtol {args.cg_rtol}"
            + (f"; data-parallel on {ctx.world_size} processes." if ctx.group else "."),
            "",
            markdown_table(rows, floatfmt=".2f"),
            "",
            "Figure: `accuracy_loss.png`",
        ]
    )
    write_markdown(out / "summary.md", summary + "\n")
    print(summary)
    return {"data": data.source, "epochs": epochs, "methods": results}
