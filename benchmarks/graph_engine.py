"""engine="graph" against "autograd" (and "sequential") on custom modules: ratios to one gradient.

Problems (float32, eval mode, ``CrossEntropyLoss``):

- ``resnet``: a residual CNN with BatchNorm written as a custom module (two basic blocks,
  widths 24/52, 48,386 parameters), N = 64 MNIST-sized inputs 1x28x28;
- ``mlp``: the MLP 784-512-512-10 of problem C, N = 256, written as a custom module (a
  ``ModuleList`` and ``torch.relu``) and as ``nn.Sequential`` (same parameters), both timed in
  the same interleaved run.

Per problem and engine, in one interleaved run (``_harness.time_interleaved``, 2 threads):
one GGN·v with the operator built beforehand ("per product") and building the operator plus
one product ("build + 1"), each as a ratio to the median of one gradient (forward, loss and
backward of the same batch, of the problem's first model), and the memory of a GGN·v (what the
operator holds plus the product's peak) over a gradient's peak. A second table gives one
Hessian·v per product (``so.Hessian``: the graph engine's R-operator and the whole-model double
backward ``"autograd"``), timed in the same interleaved run. All products are checked equal to
the autograd engine's first.

Usage::

    .venv/bin/python benchmarks/graph_engine.py [--repeats 20] [--problems resnet,mlp]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import secondorder as so
from _harness import (
    markdown_table,
    operator_memory,
    peak_memory,
    ratio,
    set_threads,
    time_interleaved,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "curvature" / "engines"))
from graph_models import MLP, ResNet, randomize_batchnorm

PROBLEMS = ("resnet", "mlp")
Variant = tuple[str, nn.Module, tuple[str, ...]]


#: engines of the Hessian·v rows
HESSIAN_ENGINES = ("graph", "autograd")


def make(name: str) -> tuple[list[Variant], torch.Tensor, torch.Tensor]:
    """The model variants (label, model, engines), inputs and targets of problem ``name``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "resnet":
        model: nn.Module = randomize_batchnorm(ResNet((24, 52)))
        X = torch.randn(64, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        return [("resnet (custom)", model, ("graph", "autograd"))], X, y
    X = torch.randn(256, 784, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    custom = MLP((784, 512, 512, 10))
    seq = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    seq.load_state_dict(dict(zip(seq.state_dict(), custom.state_dict().values())))  # same MLP
    return (
        [
            ("mlp (custom)", custom, ("graph", "autograd")),
            ("mlp (Sequential)", seq, ("sequential", "graph", "autograd")),
        ],
        X,
        y,
    )


def measure(name: str, repeats: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Rows of both tables for one problem: every variant and engine in one interleaved run.

    Ratios are to the gradient of the problem's first variant (the same function for every
    variant of a problem).
    """
    variants, X, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    fns: dict[str, Callable[[], Any]] = {}
    info: list[tuple[str, int, str, str]] = []
    memory: dict[str, float] = {}  # footprint of a GGN·v (operator + product) / a gradient's
    hessian_info: list[tuple[str, str, str]] = []
    for label, model, engines in variants:
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        v = torch.randn(n, generator=torch.Generator().manual_seed(1))

        def gradient(model: nn.Module = model, params: list[torch.Tensor] = params) -> None:
            for p in params:
                p.grad = None
            loss_fn(model(X), y).backward()

        fns[f"gradient {label}"] = gradient
        grad_peak = peak_memory(gradient)[0].peak
        ops = {e: so.GGN(model, loss_fn, (X, y), engine=e) for e in engines}
        want = ops["autograd"] @ v
        for e, op in ops.items():
            err = float(((op @ v) - want).norm() / want.norm())
            assert err < 1e-4, f"{label}: engine {e} differs from autograd by {err:.1e}"
            path = getattr(op._states[0][0].lin, "path", e)
            fns[f"product {label} {e}"] = lambda op=op, v=v: op @ v
            fns[f"build+1 {label} {e}"] = lambda e=e, model=model, v=v: (
                so.GGN(model, loss_fn, (X, y), engine=e) @ v
            )
            info.append((label, n, e, path))
            built, applied = operator_memory(
                lambda e=e, model=model: so.GGN(model, loss_fn, (X, y), engine=e),
                lambda op, v=v: op @ v,
            )
            memory[f"{label} {e}"] = (built.retained + applied.peak) / grad_peak
        hessians = {e: so.Hessian(model, loss_fn, (X, y), engine=e) for e in HESSIAN_ENGINES}
        want = hessians["autograd"] @ v
        for e, op in hessians.items():
            err = float(((op @ v) - want).norm() / want.norm())
            assert err < 1e-4, f"{label}: Hessian engine {e} differs from autograd by {err:.1e}"
            fns[f"hessian {label} {e}"] = lambda op=op, v=v: op @ v
            hessian_info.append((label, e, op.engine_info[0].path))
    t = time_interleaved(fns, repeats=repeats, warmup=2)
    g = t[f"gradient {variants[0][0]}"]
    hessian_rows = [
        [label, e, path, str(ratio(t[f"hessian {label} {e}"], g))]
        for label, e, path in hessian_info
    ]
    ggn_rows = [
        [
            label,
            f"{n:,}",
            e,
            path,
            f"{t[f'gradient {label}'].median * 1e3:.1f}",
            str(ratio(t[f"product {label} {e}"], g)),
            str(ratio(t[f"build+1 {label} {e}"], g)),
            f"{memory[f'{label} {e}']:.2f}",
        ]
        for label, n, e, path in info
    ]
    return ggn_rows, hessian_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    args = parser.parse_args()
    set_threads(2)
    tables = [measure(name, args.repeats) for name in args.problems.split(",")]
    rows = [row for ggn_rows, _ in tables for row in ggn_rows]
    header = [
        *("problem", "params", "engine", "path", "gradient ms"),
        *("GGN·v", "build + 1", "memory"),
    ]
    print(markdown_table(header, rows))
    print(
        "\nGGN·v and build + 1: median (IQR) in gradients; 2 threads, paired and interleaved. "
        "memory: tensor bytes held by the operator plus the peak of one product, over the peak "
        "of one gradient."
    )
    print()
    hessian_rows = [row for _, h in tables for row in h]
    print(markdown_table(["problem", "engine", "path", "Hessian·v"], hessian_rows))
    print("\nHessian·v: median (IQR) in gradients, in the same interleaved run as the GGN·v.")


if __name__ == "__main__":
    main()
