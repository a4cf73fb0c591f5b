"""Optimizers compared on equal wall-clock budgets (the transformer studies).

A :class:`Workload` holds what every method shares: a builder of the model (the same initial
weights each time), the loss, a fresh stream of minibatches (a ``DataLoader`` whose sampler
draws from a ``torch.Generator`` seeded the same for every method, so every method sees the
same sequence of batches) and an evaluation of a model on held-out data.

:func:`train_for` trains one method until its *training* clock (the time spent in steps:
forward, backward, curvature products, solves, updates; evaluations excluded) reaches the
budget, records the minibatch loss of every step (before the update) with the clock, and
evaluates the model at ``num_evals`` equally spaced moments of the clock. A run stops early
when its loss turns non-finite (``diverged``).

Methods are factories ``make(model) -> optimizer``: a :class:`~secondorder.optim.base.
CurvatureOptimizer` (stepped with ``opt.step(inputs, targets)``) or a list of ``torch.optim``
optimizers stepped together after one ``loss.backward()`` (AdamW; Muon on the hidden
matrices with AdamW on the rest, :func:`muon_with_adamw`). :func:`sweep_adamw` picks AdamW's
learning rate by the validation loss after a short budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .progress import progress
from .report_figures import draw_curves, plot_panels
from .report_tables import markdown_table

__all__ = [
    "Workload",
    "muon_with_adamw",
    "plot_comparison",
    "stream",
    "summary_rows",
    "sweep_adamw",
    "train_for",
]

Batch = tuple[Tensor, Tensor]
Factory = Callable[[nn.Module], Any]


@dataclass
class Workload:
    """What every method of one comparison shares.

    Attributes:
        build: Returns a fresh model with the same initial weights, on the device.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        batches: Returns a fresh iterator over the same infinite sequence of batches.
        evaluate: ``evaluate(model, split) -> {"loss": ..., <metric>: ...}`` with ``split``
            ``"val"`` or ``"test"``; called under ``torch.no_grad()``.
        metric: The metric's key in the evaluation (``"accuracy"``, ``"bits_per_char"``).
        higher_is_better: Whether a larger metric is better.
    """

    build: Callable[[], nn.Module]
    loss_fn: nn.Module
    batches: Callable[[], Iterator[Batch]]
    evaluate: Callable[[nn.Module, str], dict[str, float]]
    metric: str
    higher_is_better: bool


def stream(loader: Any, device: torch.device) -> Iterator[Batch]:
    """Iterate over a ``DataLoader`` forever (a new epoch each pass), moving batches.

    Args:
        loader: A re-iterable of ``(inputs, targets)`` batches.
        device: Where the batches go.

    Yields:
        ``(inputs, targets)`` on ``device``.
    """
    while True:
        for x, y in loader:
            yield x.to(device), y.to(device)


def muon_with_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    is_hidden: Callable[[str], bool],
) -> list[torch.optim.Optimizer]:
    """Muon on the hidden 2-d weight matrices, AdamW on every other parameter.

    As Muon's documentation recommends: Muon orthogonalizes the update of the hidden layers'
    matrices only; embeddings, the output layer, biases and norms are trained by AdamW. Muon
    uses ``adjust_lr_fn="match_rms_adamw"``, which scales its update to AdamW's RMS so that it
    reuses AdamW's learning rate and weight decay.

    Args:
        model: The model.
        lr: Learning rate of both optimizers.
        weight_decay: Decoupled weight decay of both.
        is_hidden: ``is_hidden(name)`` for the parameters inside the hidden blocks.

    Returns:
        ``[Muon, AdamW]``.

    Raises:
        NotImplementedError: If this torch has no ``torch.optim.Muon`` (added in torch 2.9).
    """
    if not hasattr(torch.optim, "Muon"):
        raise NotImplementedError(
            f"torch.optim.Muon needs torch >= 2.9, this is torch {torch.__version__}"
        )
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (hidden if p.ndim == 2 and is_hidden(name) else rest).append(p)
    muon = torch.optim.Muon(
        hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return [muon, torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay)]


def _torch_step(
    optimizers: Sequence[torch.optim.Optimizer], model: nn.Module, loss_fn: nn.Module, batch: Batch
) -> float:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch[0]), batch[1])
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def _clock(budget_s: float, max_steps: int | None, elapsed: list[float]) -> Iterator[int]:
    step = 0
    while elapsed[0] < budget_s and (max_steps is None or step < max_steps):
        yield step
        step += 1


def train_for(
    name: str,
    make: Factory,
    workload: Workload,
    budget_s: float,
    *,
    max_steps: int | None = None,
    num_evals: int = 10,
    show_progress: bool | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train a fresh model with one method until its training clock reaches ``budget_s``.

    Args:
        name: The method's name (progress lines).
        make: ``make(model)``: a curvature optimizer or a list of ``torch.optim`` optimizers.
        workload: The shared model, loss, batches and evaluation.
        budget_s: Seconds of training (evaluations excluded).
        max_steps: Optional cap on the number of steps.
        num_evals: Evaluations on the validation data, equally spaced on the clock (plus one
            before the first step).
        show_progress: As :func:`~secondorder.experiments.progress.progress`'s ``enabled``.

    Returns:
        ``(record, model)``: the record (``train_loss``, ``train_time``, ``evals`` with
        ``step``, ``time`` and the metrics, ``final`` and ``test`` evaluations, for a
        curvature optimizer its per-step ``diagnostics`` (damping, CG iterations, accepted,
        rejected trials) with the totals ``rejected_trials`` and ``skipped_steps``,
        ``warnings``, ``diverged``) and the trained model.
    """
    model = workload.build()
    model.train()
    opt = make(model)
    torch_opts = opt if isinstance(opt, list) else None
    batches = workload.batches()
    elapsed = [0.0]
    losses: list[float] = []
    times: list[float] = []
    diag: dict[str, list[Any]] = {
        "damping": [],
        "cg_iterations": [],
        "accepted": [],
        "rejections": [],
    }
    evals: dict[str, list[float]] = {"step": [], "time": []}

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            result = workload.evaluate(model, "val")
        model.train()
        evals["step"].append(step)
        evals["time"].append(elapsed[0])
        for key, value in result.items():
            evals.setdefault(key, []).append(value)

    evaluate(0)
    next_eval = budget_s / num_evals
    diverged = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in progress(_clock(budget_s, max_steps, elapsed), name, enabled=show_progress):
            batch = next(batches)
            start = time.perf_counter()
            if torch_opts is not None:
                loss = _torch_step(torch_opts, model, workload.loss_fn, batch)
            else:
                loss = float(opt.step(*batch))
            elapsed[0] += time.perf_counter() - start
            losses.append(loss)
            times.append(elapsed[0])
            if torch_opts is None:
                for key in diag:
                    diag[key].append(opt.diagnostics.get(key))
            if not math.isfinite(loss):
                diverged = True
                break
            if elapsed[0] >= next_eval and elapsed[0] < budget_s:
                evaluate(step + 1)
                next_eval += budget_s / num_evals
    evaluate(len(losses))
    model.eval()
    with torch.no_grad():
        test = workload.evaluate(model, "test")
    model.train()
    step_ms = sorted(b - a for a, b in zip([0.0, *times[:-1]], times))
    record: dict[str, Any] = {
        "steps": len(losses),
        "train_time_s": elapsed[0],
        "median_step_ms": 1e3 * step_ms[len(step_ms) // 2] if step_ms else None,
        "train_loss": losses,
        "train_time": times,
        "evals": evals,
        "final": {key: values[-1] for key, values in evals.items()},
        "test": test,
        "diverged": diverged,
        "warnings": {
            "count": len(caught),
            "first": [str(w.message) for w in caught[:3]],
        },
    }
    if torch_opts is None:
        record["diagnostics"] = diag
        record["skipped_steps"] = sum(1 for a in diag["accepted"] if a is False)
        record["rejected_trials"] = sum(int(r or 0) for r in diag["rejections"])
    return record, model


def _validation_loss(record: Mapping[str, Any]) -> float:
    value = record["final"].get("loss")
    return float(value) if value is not None and math.isfinite(value) else math.inf


def sweep_adamw(
    workload: Workload,
    lrs: Sequence[float],
    budget_s: float,
    *,
    weight_decay: float,
    max_steps: int | None = None,
    show_progress: bool | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Pick AdamW's learning rate by the validation loss after a short budget.

    Args:
        workload: The comparison's workload.
        lrs: Candidate learning rates.
        budget_s: Training seconds per candidate.
        weight_decay: AdamW's decoupled weight decay.
        max_steps: Optional cap on the steps per candidate.
        show_progress: As in :func:`train_for`.

    Returns:
        ``(best_lr, sweep)``: the learning rate with the lowest final validation loss (a
        diverged run counts as infinite) and one row per candidate.
    """
    sweep = []

    def adamw(lr: float) -> Factory:
        return lambda m: [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)]

    for lr in lrs:
        record, _ = train_for(
            f"AdamW sweep lr={lr:g}",
            adamw(lr),
            workload,
            budget_s,
            max_steps=max_steps,
            num_evals=1,
            show_progress=show_progress,
        )
        sweep.append(
            {
                "lr": lr,
                "steps": record["steps"],
                "val_loss": _validation_loss(record),
                f"val_{workload.metric}": record["final"].get(workload.metric),
                "diverged": record["diverged"],
            }
        )
    best = min(sweep, key=lambda row: row["val_loss"])
    return float(best["lr"]), sweep


def summary_rows(
    runs: Mapping[str, Mapping[str, Any]], metric: str, label: str, scale: float = 1.0
) -> str:
    """A markdown table of every run's steps, step time and final metrics.

    Args:
        runs: Method name -> record of :func:`train_for` (or ``{"skipped": reason}``).
        metric: The metric's key.
        label: Column title of the metric.
        scale: Factor applied to the metric (e.g. 100 for percent).

    Returns:
        The table.
    """
    rows: list[dict[str, Any]] = []
    for name, rec in runs.items():
        if "skipped" in rec:
            rows.append({"method": name, "note": f"skipped: {rec['skipped']}"})
            continue
        final, test = rec["final"], rec["test"]
        notes = ["diverged"] if rec["diverged"] else []
        if rec.get("rejected_trials"):
            notes.append(f"{rec['rejected_trials']} rejected trials")
        if rec.get("skipped_steps"):
            notes.append(f"{rec['skipped_steps']} skipped steps")
        note = ", ".join(notes)
        diag = rec.get("diagnostics") or {}
        cg = [c for c in diag.get("cg_iterations", []) if isinstance(c, (int, float))]
        damping = [d for d in diag.get("damping", []) if isinstance(d, (int, float))]
        rows.append(
            {
                "method": name,
                "steps": rec["steps"],
                "median ms / step": rec["median_step_ms"],
                "mean CG iterations": sum(cg) / len(cg) if cg else None,
                "last damping": damping[-1] if damping else None,
                "val loss": final.get("loss"),
                f"val {label}": None if final.get(metric) is None else scale * final[metric],
                f"test {label}": None if test.get(metric) is None else scale * test[metric],
                "note": note,
            }
        )
    return markdown_table(rows, floatfmt=".4g", formats={"steps": "d"})


def plot_comparison(
    runs: Mapping[str, Mapping[str, Any]],
    metric: str,
    label: str,
    path: Any,
    *,
    title: str,
    scale: float = 1.0,
    logy_metric: bool = False,
) -> Any:
    """Plot loss and metric against wall-clock and against steps (four panels).

    Args:
        runs: Method name -> record of :func:`train_for`; skipped methods are left out.
        metric: The metric's key in the evaluations.
        label: Axis label of the metric.
        path: Destination PNG file.
        title: Title of the figure.
        scale: Factor applied to the metric.
        logy_metric: Whether the metric's axis is logarithmic.

    Returns:
        The path written.
    """
    done = {k: v for k, v in runs.items() if "skipped" not in v}

    def curves(x_key: str, y_key: str, factor: float = 1.0) -> dict[str, Any]:
        out = {}
        for name, rec in done.items():
            ev = rec["evals"]
            out[name] = (ev[x_key], [None if v is None else factor * v for v in ev[y_key]])
        return out

    def train_curves(x_key: str) -> dict[str, Any]:
        return {
            name: (
                rec["train_time"] if x_key == "time" else list(range(1, rec["steps"] + 1)),
                rec["train_loss"],
            )
            for name, rec in done.items()
        }

    def panel(data: dict[str, Any], xlabel: str, ylabel: str, logy: bool = False) -> Any:
        def draw(ax: Any) -> None:
            draw_curves(ax, data, xlabel=xlabel, ylabel=ylabel, logy=logy)
            if xlabel == "step":  # second-order methods take few steps: a log axis from 1
                ax.set_xscale("symlog", linthresh=1.0)
                ax.set_xlim(left=0.0)
            ax.legend(fontsize=7)

        return draw

    panels = [
        panel(curves("time", "loss"), "training wall-clock (s)", "validation loss", True),
        panel(curves("step", "loss"), "step", "validation loss", True),
        panel(curves("time", metric, scale), "training wall-clock (s)", label, logy_metric),
        panel(curves("step", metric, scale), "step", label, logy_metric),
        panel(train_curves("time"), "training wall-clock (s)", "minibatch loss", True),
        panel(train_curves("step"), "step", "minibatch loss", True),
    ]
    return plot_panels(panels, path, ncols=2, panel_size=(5.5, 3.6), suptitle=title)
