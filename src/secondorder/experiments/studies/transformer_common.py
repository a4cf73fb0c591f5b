"""What the ``vit`` and ``charlm`` studies share: options, methods, the run and its report.

:func:`run_comparison` takes a :class:`~secondorder.experiments.compare.Workload` and

1. sweeps AdamW's learning rate (``--adamw-lrs``) on a short budget (``--sweep-budget``) and
   keeps the one with the lowest validation loss;
2. trains every method from the same initial weights on the same minibatches for the same
   training wall-clock (``--budget``): AdamW at that learning rate, ``torch.optim.Muon`` on the
   hidden matrices with AdamW on the rest, and the library's :class:`~secondorder.GaussNewton`
   and :class:`~secondorder.NaturalGradient` (default adaptive damping; the natural gradient
   with the Monte-Carlo Fisher, since for softmax cross-entropy the exact Fisher is the GGN),
   :class:`~secondorder.HessianFree` and :class:`~secondorder.BlockDiagonalNewtonCG`; a
   method whose optimizer refuses the model is skipped with the reason recorded;
3. computes the Hessian and GGN spectra (:mod:`~secondorder.experiments.spectra`) of the
   initial model and of the AdamW-trained and the best second-order-trained models, per layer
   and for the whole model, on one fixed validation batch;
4. writes ``comparison.png``, ``spectra.png`` and ``summary.md`` and returns every number.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ... import BlockDiagonalNewtonCG, GaussNewton, HessianFree, NaturalGradient
from ..arguments import nonnegative_float, positive_float, positive_int
from ..compare import (
    Workload,
    muon_with_adamw,
    plot_comparison,
    summary_rows,
    sweep_adamw,
    train_for,
)
from ..report import markdown_table, write_markdown
from ..spectra import SpectraConfig, curvature_spectra, plot_spectra

__all__ = ["SECOND_ORDER", "add_comparison_arguments", "run_comparison"]

SECOND_ORDER = ("Gauss-Newton", "Natural gradient", "Hessian-free", "Block CG-Newton")
METHODS = ("AdamW", "Muon + AdamW", *SECOND_ORDER)

QUICK_SPECTRA = SpectraConfig(
    top_k=2, lanczos_maxiter=10, trace_matvecs=6, slq_probes=1, slq_steps=6
)
FULL_SPECTRA = SpectraConfig()


def _lrs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(positive_float(v) for v in text.split(","))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"--adamw-lrs: {err}") from err
    return values


def add_comparison_arguments(
    parser: argparse.ArgumentParser, *, budget: float, quick_budget: float, batch_size: int
) -> None:
    """Add the options every transformer study shares.

    Args:
        parser: The study's parser.
        budget: Default training seconds per method.
        quick_budget: The same under ``--quick``.
        batch_size: Default minibatch size.
    """
    parser.add_argument(
        "--budget",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help=f"training wall-clock per method ({budget:g}; --quick: {quick_budget:g})",
    )
    parser.add_argument(
        "--sweep-budget",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="training wall-clock per AdamW learning rate of the sweep (a third of --budget)",
    )
    parser.add_argument(
        "--adamw-lrs",
        type=_lrs,
        default=(1e-3, 3e-3, 1e-2),
        metavar="LR,LR,...",
        help="AdamW learning rates of the sweep (1e-3,3e-3,1e-2)",
    )
    parser.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=0.01,
        help="decoupled weight decay of AdamW and Muon (0.01)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"minibatch ({batch_size})"
    )
    parser.add_argument(
        "--max-steps", type=positive_int, default=None, help="cap on the steps of each method"
    )
    parser.add_argument(
        "--hf-cg-maxiter",
        type=positive_int,
        default=50,
        help="Hessian-free's CG iterations per step (50)",
    )
    parser.add_argument(
        "--evals", type=positive_int, default=10, help="validation evaluations per run (10)"
    )


def _factories(
    workload: Workload,
    lr: float,
    args: argparse.Namespace,
    is_hidden: Callable[[str], bool],
) -> dict[str, Callable[[nn.Module], Any]]:
    loss_fn = workload.loss_fn
    wd = args.weight_decay
    return {
        "AdamW": lambda m: [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)],
        "Muon + AdamW": lambda m: muon_with_adamw(m, lr, wd, is_hidden),
        "Gauss-Newton": lambda m: GaussNewton(m, loss_fn),
        "Natural gradient": lambda m: NaturalGradient(
            m, loss_fn, fisher="mc", generator=torch.Generator().manual_seed(args.seed)
        ),
        "Hessian-free": lambda m: HessianFree(m, loss_fn, cg_maxiter=args.hf_cg_maxiter),
        "Block CG-Newton": lambda m: BlockDiagonalNewtonCG(m, loss_fn),
    }


def _spectra_table(states: dict[str, Any]) -> str:
    rows = []
    for state, spectra in states.items():
        for layer, ops in spectra.items():
            row: dict[str, Any] = {"model": state, "layer": layer, "dim": ops["GGN"]["dim"]}
            for op_name, res in ops.items():
                row[f"{op_name} λ_max"] = res["top_eigenvalues"][0]
                row[f"{op_name} trace"] = res["trace"]
            rows.append(row)
    return markdown_table(rows, floatfmt=".3g", formats={"dim": "d"})


def run_comparison(
    args: argparse.Namespace,
    workload: Workload,
    *,
    title: str,
    metric_label: str,
    metric_scale: float,
    is_hidden: Callable[[str], bool],
    group_of: Callable[[str], str],
    spectra_batch: tuple[Tensor, Tensor],
    header: list[str],
    quick_budget: float,
    budget: float,
) -> dict[str, Any]:
    """Sweep AdamW, train every method on equal budgets, measure spectra, write the report.

    Args:
        args: The study's parsed arguments (:func:`add_comparison_arguments`).
        workload: Model, loss, batches and evaluation.
        title: Title of the figures and the summary.
        metric_label: Label of the workload's metric in tables and figures.
        metric_scale: Factor applied to the metric in tables and figures (100: percent).
        is_hidden: Whether a parameter (by name) is a hidden-block parameter (Muon's).
        group_of: A parameter's layer, for the per-layer spectra.
        spectra_batch: The fixed evaluation batch of the spectra.
        header: Lines of the summary above the tables (data, model, licence).
        quick_budget: Training seconds per method under ``--quick``.
        budget: Training seconds per method otherwise.

    Returns:
        ``{"budget_s", "sweep", "adamw_lr", "runs", "spectra", "spectra_models", "failed"}``.
    """
    budget_s = args.budget or (quick_budget if args.quick else budget)
    sweep_s = args.sweep_budget or budget_s / 3
    show = args.progress
    best_lr, sweep = sweep_adamw(
        workload,
        args.adamw_lrs,
        sweep_s,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps,
        show_progress=show,
    )
    runs: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    failed: list[str] = []
    for name, make in _factories(workload, best_lr, args, is_hidden).items():
        try:
            runs[name], models[name] = train_for(
                name,
                make,
                workload,
                budget_s,
                max_steps=args.max_steps,
                num_evals=args.evals,
                show_progress=show,
            )
        except (ValueError, TypeError, NotImplementedError) as err:  # refuses the model
            runs[name] = {"skipped": f"{type(err).__name__}: {err}"}
    for name, rec in runs.items():
        if "skipped" not in rec and (rec["diverged"] or not math.isfinite(rec["final"]["loss"])):
            failed.append(f"{name} diverged")

    def val_loss(name: str) -> float:
        loss = runs[name].get("final", {}).get("loss")
        return loss if loss is not None and math.isfinite(loss) else math.inf

    trained = [n for n in SECOND_ORDER if n in models]
    best_so = min(trained, key=val_loss) if trained else None
    states: dict[str, nn.Module] = {"start": workload.build()}
    if "AdamW" in models:
        states["AdamW, end"] = models["AdamW"]
    if best_so is not None:
        states[f"{best_so}, end"] = models[best_so]
    config = QUICK_SPECTRA if args.quick else FULL_SPECTRA
    spectra = {}
    for state, model in states.items():
        model.train()
        spectra[state] = curvature_spectra(
            model, workload.loss_fn, spectra_batch, group_of, config, seed=args.seed
        )

    out = args.out
    plot_comparison(
        runs, workload.metric, metric_label, out / "comparison.png", title=title, scale=metric_scale
    )
    plot_spectra(spectra, out / "spectra.png", title=f"{title}: Hessian and GGN spectral density")
    sweep_table = markdown_table(sweep, floatfmt=".4g", formats={"steps": "d"})
    skipped = [f"- {n}: {r['skipped']}" for n, r in runs.items() if "skipped" in r]
    cap = "" if args.max_steps is None else f", at most {args.max_steps} steps"
    summary = "\n".join(
        [
            f"# {title}",
            "",
            *header,
            "",
            f"Every method trains from the same initial weights on the same minibatches "
            f"(batch {args.batch_size}) for {budget_s:g} s of training wall-clock "
            f"(evaluations excluded){cap}. "
            "Gauss-Newton and natural gradient run with the library's defaults (lr 1, adaptive "
            "Levenberg-Marquardt damping from 1, CG to rtol 1e-3 in at most 20 iterations); "
            "natural gradient with the Monte-Carlo Fisher (one sampled target per output, "
            "seeded generator), because for softmax cross-entropy the exact Fisher equals the "
            "GGN and would repeat Gauss-Newton. Hessian-free with its "
            f"defaults and at most {args.hf_cg_maxiter} CG iterations per step; block CG-Newton "
            "with its defaults (lr 0.1, damping 1e-2, adaptive). Muon (torch.optim.Muon, "
            "adjust_lr_fn='match_rms_adamw') trains the hidden blocks' 2-d matrices, AdamW "
            "every other parameter (embeddings, output layer, biases, norms), both at AdamW's "
            f"learning rate and weight decay {args.weight_decay:g}.",
            "",
            f"## AdamW learning-rate sweep ({sweep_s:g} s each, chosen by validation loss): "
            f"lr = {best_lr:g}",
            "",
            sweep_table,
            "## Results at equal wall-clock",
            "",
            summary_rows(runs, workload.metric, metric_label, metric_scale),
            *(["Skipped:", "", *skipped, ""] if skipped else []),
            "## Curvature spectra (fixed validation batch of "
            f"{len(spectra_batch[1])}; per layer: the operator restricted to its parameters)",
            "",
            f"Lanczos: {config.top_k} largest eigenvalues in at most {config.lanczos_maxiter} "
            f"products; trace: Hutch++ with {config.trace_matvecs} products; density: "
            f"stochastic Lanczos quadrature, {config.slq_probes} probes x {config.slq_steps} "
            "steps.",
            "",
            _spectra_table(spectra),
            "Figures: `comparison.png` (validation loss and metric, minibatch loss, against "
            "wall-clock and steps), `spectra.png` (spectral densities).",
        ]
    )
    write_markdown(out / "summary.md", summary + "\n")
    print(summary)
    return {
        "budget_s": budget_s,
        "sweep_budget_s": sweep_s,
        "sweep": sweep,
        "adamw_lr": best_lr,
        "runs": runs,
        "spectra": spectra,
        "spectra_models": list(states),
        "spectra_config": asdict(config),
        "failed": failed,
    }
