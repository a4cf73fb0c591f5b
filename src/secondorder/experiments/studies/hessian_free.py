r"""Seed 003: Hessian-free optimization, switch by switch, on a small MLP and on Rosenbrock.

Three problems, each run with the default :class:`~secondorder.HessianFree` and with one of its
switches turned off at a time:

* **MLP** (seed 003): ``Linear(10, 10, bias=False), ReLU, Linear(10, 10)``
  (:func:`~secondorder.experiments.models.small_mlp`) with ``MSELoss`` on one batch of 16
  uniform random inputs and targets (float32), the same batch every step so that the variants
  minimise the same function. The seed's own loop, five default steps each on a new random
  batch, is reported separately.
* **Rosenbrock, Hessian**: the module :class:`~secondorder.experiments.models.Rosenbrock`
  (parameter :math:`x \in \mathbb{R}^2`, output the value :math:`f(x) = (1 - x_0)^2 +
  100 (x_1 - x_0^2)^2`) from :math:`(-1, 3)`, ``curvature="hessian"`` (float64). Its
  "default" is the library's default with ``negative_curvature="continue"``, the rule of the
  reference implementation (PyTorchHessianFree) that its Rosenbrock example relies on; the
  library default ``"stop"`` is one of the variants.
* **Rosenbrock, GGN**: the residuals :math:`r(x) = (1 - x_0, 10 (x_1 - x_0^2))`
  (:class:`~secondorder.experiments.models.RosenbrockResiduals`) with
  ``MSELoss(reduction="sum")``, :math:`f = \lVert r \rVert^2`, ``curvature="ggn"`` (float64).

For each run the study records per step the loss, CG iterations, damping, reduction ratio,
line-search step and loss evaluations, and the path of :math:`x` on Rosenbrock. It writes
``summary.md`` (one table per problem: final :math:`f`, steps to :math:`f < 10^{-6}`, total CG
iterations, loss evaluations, time; notes on negative curvature and on the warm start),
``rosenbrock_paths.png`` (the paths over log-spaced contours), ``loss_per_step.png`` (log
scale) and ``damping_cg.png``. ``--quick`` runs 20 Rosenbrock and 15 MLP steps (a few
seconds); the full study 40 and 50.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ...optim.hessian_free import HessianFree
from ..arguments import positive_int
from ..models import Rosenbrock, RosenbrockResiduals, small_mlp, value_loss
from ..report import markdown_table, plot_panels, progress, write_markdown

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "hessian-free"
HELP = (
    "Seed 003: Hessian-free on a small MLP and on Rosenbrock (Hessian and GGN), the effect of "
    "each switch (CG backtracking, line search, preconditioner, adaptive damping, Martens stop)."
)

TARGET = 1e-6
START = (-1.0, 3.0)
OPTIMUM = (1.0, 1.0)

# variant name -> HessianFree keyword arguments on top of the problem's defaults
SWITCHES: dict[str, dict[str, Any]] = {
    "default": {},
    "no CG backtracking": {"use_cg_backtracking": False},
    "no line search": {"use_linesearch": False},
    "no preconditioner": {"preconditioner": None},
    "fixed damping": {"adapt_damping": False},
    "no Martens stop": {"martens_stop": False},
    "no warm start": {"cg_decay_x0": 0.0},
}
NEGATIVE_CURVATURE_STOP = "negative curvature: stop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options.

    Args:
        parser: The study's argument parser.
    """
    parser.add_argument(
        "--rosenbrock-steps",
        type=positive_int,
        default=None,
        help="HF steps on Rosenbrock (default: 40; --quick: 20)",
    )
    parser.add_argument(
        "--mlp-steps",
        type=positive_int,
        default=None,
        help="HF steps on the MLP (default: 50; --quick: 15)",
    )


# ------------------------------------------------------------------------------- problems
class _Problem:
    """A model, its loss, the batch of each step and the evaluation of the objective."""

    def __init__(
        self,
        title: str,
        make_model: Callable[[], nn.Module],
        loss_fn: Any,
        base: dict[str, Any],
        batch: Callable[[int], tuple[Any, Any]],
        evaluate: Callable[[nn.Module], float],
        variants: dict[str, dict[str, Any]],
        path: bool,
    ) -> None:
        self.title = title
        self.make_model = make_model
        self.loss_fn = loss_fn
        self.base = base
        self.batch = batch
        self.evaluate = evaluate
        self.variants = variants
        self.path = path


def _point(model: nn.Module) -> list[float]:
    """The point :math:`x` of a Rosenbrock module."""
    return [float(v) for v in model.get_parameter("x").detach()]


def _rosenbrock_problems() -> dict[str, _Problem]:
    dt = torch.float64
    dummy = torch.zeros(1, dtype=dt)
    zeros = torch.zeros(1, 2, dtype=dt)
    sum_mse = nn.MSELoss(reduction="sum")

    def value_of(model: nn.Module) -> float:
        with torch.no_grad():
            x0, x1 = _point(model)
        return (1.0 - x0) ** 2 + 100.0 * (x1 - x0 * x0) ** 2

    hessian_variants = {**SWITCHES, NEGATIVE_CURVATURE_STOP: {"negative_curvature": "stop"}}
    return {
        "rosenbrock_hessian": _Problem(
            "Rosenbrock, Hessian (value)",
            lambda: Rosenbrock(START, dtype=dt),
            value_loss,
            {"curvature": "hessian", "negative_curvature": "continue"},
            lambda _: (dummy, None),
            value_of,
            hessian_variants,
            path=True,
        ),
        "rosenbrock_ggn": _Problem(
            "Rosenbrock, GGN (residuals)",
            lambda: RosenbrockResiduals(START, dtype=dt),
            sum_mse,
            {"curvature": "ggn"},
            lambda _: (dummy, zeros),
            value_of,
            dict(SWITCHES),
            path=True,
        ),
    }


def _mlp_problem(seed: int, device: torch.device) -> _Problem:
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.rand(16, 10, generator=gen).to(device)
    y = torch.rand(16, 10, generator=gen).to(device)
    loss_fn = nn.MSELoss()

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    return _Problem(
        "MLP 10-10-10 (ReLU), MSE, one batch of 16",
        lambda: small_mlp(10, seed=seed).to(device),
        loss_fn,
        {},
        lambda _: (x, y),
        evaluate,
        dict(SWITCHES),
        path=False,
    )


def _seed_protocol(seed: int, steps: int, device: torch.device) -> list[dict[str, Any]]:
    """The seed's own loop: default HF, a new batch of 16 random samples every step."""
    gen = torch.Generator().manual_seed(seed + 103)
    model = small_mlp(10, seed=seed).to(device)
    loss_fn = nn.MSELoss()
    opt = HessianFree(model, loss_fn)
    rows = []
    for i in range(steps):
        x = torch.rand(16, 10, generator=gen).to(device)
        y = torch.rand(16, 10, generator=gen).to(device)
        before = float(opt.step(x, y))
        d = opt.diagnostics
        rows.append(
            {
                "step": i + 1,
                "loss before": before,
                "loss after": float(d["new_loss"]),
                "CG iterations": int(d["cg_iterations"]),
                "damping": float(d["damping"]),
                "rho": float(d["rho"]),
                "alpha": float(d["alpha"]),
            }
        )
    return rows


# ------------------------------------------------------------------------------------ runs
def _steps_to(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v < target), None)


def _run(problem: _Problem, kwargs: dict[str, Any], steps: int) -> dict[str, Any]:
    """Run HF for ``steps`` steps and record every step's diagnostics."""
    model = problem.make_model()
    opt = HessianFree(model, problem.loss_fn, **{**problem.base, **kwargs})
    record: dict[str, list[Any]] = {
        key: []
        for key in (
            "f",
            "batch_loss",
            "cg_iterations",
            "damping",
            "rho",
            "alpha",
            "loss_evaluations",
            "chosen_iterate",
            "cg_status",
        )
    }
    path = [_point(model)] if problem.path else None
    f0 = problem.evaluate(model)
    start = time.perf_counter()
    for i in range(steps):
        inputs, targets = problem.batch(i)
        record["batch_loss"].append(float(opt.step(inputs, targets)))
        d = opt.diagnostics
        record["f"].append(problem.evaluate(model))
        record["cg_iterations"].append(int(d.get("cg_iterations", 0)))
        record["damping"].append(float(d["damping"]))
        record["rho"].append(float(d.get("rho", math.nan)))
        record["alpha"].append(float(d.get("alpha", math.nan)))
        record["loss_evaluations"].append(int(d.get("loss_evaluations", 0)))
        record["chosen_iterate"].append(d.get("chosen_iterate"))
        record["cg_status"].append(d.get("cg_status"))
        if path is not None:
            path.append(_point(model))
    elapsed = time.perf_counter() - start
    return {
        "settings": {**problem.base, **kwargs},
        "f0": f0,
        **record,
        "path": path,
        "final_f": record["f"][-1],
        "steps_to_1e-6": _steps_to(record["f"], TARGET),
        "total_cg_iterations": sum(record["cg_iterations"]),
        "total_loss_evaluations": sum(record["loss_evaluations"]),
        "time_s": elapsed,
    }


# --------------------------------------------------------------------------------- figures
def _rosenbrock_value(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return (1.0 - x0) ** 2 + 100.0 * (x1 - x0**2) ** 2


def _draw_paths(ax: Axes, paths: dict[str, list[list[float]]]) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import LogLocator

    pts = np.array([p for path in paths.values() for p in path])
    lo = np.minimum(pts.min(axis=0), [-1.5, -0.5]) - 0.25
    hi = np.maximum(pts.max(axis=0), [1.5, 3.5]) + 0.25
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 400))
    values = _rosenbrock_value(g0, g1)
    top = math.ceil(math.log10(values.max()))
    levels = np.logspace(-3, top, 4 * (top + 3) + 1)  # four levels per decade
    clipped = np.clip(values, levels[0], None)
    filled = ax.contourf(g0, g1, clipped, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55)
    ax.contour(g0, g1, clipped, levels=levels[::4], norm=LogNorm(), colors="0.35", linewidths=0.5)
    bar = ax.figure.colorbar(filled, ax=ax, ticks=LogLocator(base=10.0))
    bar.set_label("f(x), log-spaced contour levels")
    markers = ["o", "s", "^", "v", "D", "P"]
    for (label, path), marker in zip(paths.items(), markers):
        xy = np.array(path)
        ax.plot(
            xy[:, 0],
            xy[:, 1],
            marker=marker,
            ms=3.5,
            lw=1.3,
            label=label,
        )
    ax.plot(*START, marker="*", color="black", ms=15, ls="none", label="start (-1, 3), f = 404")
    ax.plot(*OPTIMUM, marker="*", color="red", ms=16, ls="none", label="optimum (1, 1), f = 0")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("$x_0$")
    ax.set_ylabel("$x_1$")
    ax.set_title("Hessian-free on the Rosenbrock function from (-1, 3)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)


def _positive(values: list[float]) -> list[float]:
    """Zeros (exact optima) cannot be drawn on a log axis: show them as NaN (left out)."""
    return [v if v > 0 else math.nan for v in values]


_STYLES = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]


def _draw_variants(
    ax: Axes,
    curves: dict[str, list[float]],
    *,
    ylabel: str,
    title: str,
    logy: bool = False,
    integer: bool = False,
    first_step: int = 1,
    target: float | None = None,
) -> None:
    """Plot one curve per variant against the step; the default thick and on top.

    Variants whose curve equals the default's exactly are not drawn but named in the legend,
    so that no line hides another.
    """
    from matplotlib.ticker import MaxNLocator

    default = curves["default"]
    steps = list(range(first_step, first_step + len(default)))
    same = [name for name, v in curves.items() if name != "default" and v == default]
    others = [name for name in curves if name != "default" and name not in same]
    for i, name in enumerate(others):
        ax.plot(
            steps,
            curves[name],
            ls=_STYLES[i % len(_STYLES)],
            lw=1.5,
            color=f"C{i + 1}",
            label=name,
            drawstyle="steps-mid" if integer else "default",
        )
    label = "default"
    if same:
        label += "\n" + textwrap.fill("= " + ", ".join(same), width=34, subsequent_indent="   ")
    ax.plot(
        steps,
        default,
        color="black",
        lw=2.4,
        alpha=0.8,
        label=label,
        zorder=5,
        drawstyle="steps-mid" if integer else "default",
    )
    if target is not None:
        ax.axhline(target, color="0.4", lw=0.8, ls=":", label=f"f = {target:g}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max(max(v) for v in curves.values())
        ax.set_ylim(0, top + max(1, 0.08 * top))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _warm_start_note(r: dict[str, Any], steps: int) -> str:
    """Explain the stall without warm start from its records (GGN on the residuals)."""
    chosen = [k for k in r["chosen_iterate"] if k is not None]
    first = sum(1 for k in chosen if k == 1)
    rho = [v for v, k in zip(r["rho"], r["chosen_iterate"]) if k == 1 and math.isfinite(v)]
    mean_rho = sum(rho) / len(rho) if rho else math.nan
    return (
        f"Without the warm start (`cg_decay_x0=0`) HF crawls: GGN on the residuals ends at "
        f"f = {r['final_f']:.3g} after {steps} steps. CG from zero gives the Cauchy point as its "
        "first iterate and the damped Gauss-Newton step as its second; in the curved valley the "
        f"second overshoots, so CG backtracking chose iterate 1 in {first} of {len(chosen)} "
        f"steps. The reduction ratio of that short step is close to 1 (mean {mean_rho:.3g}), so "
        "the Levenberg-Marquardt rule keeps lowering the damping, which lengthens the "
        "overshooting second iterate further: a steepest-descent crawl. Started from the "
        "previous solution (the default), CG's iterates are not this pair and HF converges."
    )


# ------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study and write its figures and summary to ``args.out``.

    Args:
        args: Parsed command-line arguments.

    Returns:
        Every number of the study: per problem and variant the settings, the per-step
        records and the totals.
    """
    rosen_steps = args.rosenbrock_steps or (20 if args.quick else 40)
    mlp_steps = args.mlp_steps or (15 if args.quick else 50)
    device = torch.device(args.device)
    problems = _rosenbrock_problems()
    problems["mlp"] = _mlp_problem(args.seed, device)
    steps = {"rosenbrock_hessian": rosen_steps, "rosenbrock_ggn": rosen_steps, "mlp": mlp_steps}

    jobs = [(key, name) for key, problem in problems.items() for name in problem.variants]
    results: dict[str, dict[str, Any]] = {key: {} for key in problems}
    for key, name in progress(jobs, "HF variants", enabled=args.progress):
        problem = problems[key]
        results[key][name] = _run(problem, problem.variants[name], steps[key])
    seed_rows = _seed_protocol(args.seed, 5, device)

    out = args.out
    # figure 1: paths over the contours
    shown = {
        "Hessian, continue (study default)": results["rosenbrock_hessian"]["default"],
        "Hessian, stop at negative curvature": results["rosenbrock_hessian"][
            NEGATIVE_CURVATURE_STOP
        ],
        "GGN on residuals (default)": results["rosenbrock_ggn"]["default"],
        "GGN, no line search": results["rosenbrock_ggn"]["no line search"],
    }
    paths = {
        f"{label}: f < 1e-6 "
        + (f"at step {r['steps_to_1e-6']}" if r["steps_to_1e-6"] else f"not in {rosen_steps}"): r[
            "path"
        ]
        for label, r in shown.items()
    }
    plot_panels(
        [partial(_draw_paths, paths=paths)],
        out / "rosenbrock_paths.png",
        ncols=1,
        panel_size=(8.0, 7.0),
    )

    # figure 2: f per step, log scale
    panels = []
    for key, problem in problems.items():
        ylabel = "f(x)" if problem.path else "training loss (MSE)"
        curves = {name: _positive([r["f0"], *r["f"]]) for name, r in results[key].items()}
        panels.append(
            partial(
                _draw_variants,
                curves=curves,
                ylabel=ylabel,
                title=problem.title,
                logy=True,
                first_step=0,
                target=TARGET if problem.path else None,
            )
        )
    plot_panels(
        panels,
        out / "loss_per_step.png",
        ncols=3,
        panel_size=(5.4, 4.4),
        suptitle="Loss per Hessian-free step (step 0: the start), one switch off at a time",
    )

    # figure 3: damping and CG iterations per step
    panels = []
    for key, problem in problems.items():
        damping = {name: r["damping"] for name, r in results[key].items()}
        panels.append(
            partial(
                _draw_variants,
                curves=damping,
                ylabel="damping λ used in the step",
                title=problem.title,
                logy=True,
            )
        )
    for key, problem in problems.items():
        cg_its = {name: r["cg_iterations"] for name, r in results[key].items()}
        panels.append(
            partial(
                _draw_variants,
                curves=cg_its,
                ylabel="CG iterations",
                title=problem.title,
                integer=True,
            )
        )
    plot_panels(
        panels,
        out / "damping_cg.png",
        ncols=3,
        panel_size=(5.4, 4.2),
        suptitle="Damping (top) and CG iterations (bottom) per step",
    )

    # summary
    sections = [
        "# Hessian-free (seed 003)",
        "",
        "Each row turns one switch of `HessianFree` off (all others at their defaults). "
        f"Rosenbrock: {rosen_steps} steps from (-1, 3), float64. MLP: {mlp_steps} steps on one "
        "fixed batch of 16 uniform random inputs and targets (float32), so that the variants "
        "minimise the same function; the seed's own loop, a new batch every step, is the last "
        "table. Loss evaluations: forward passes of CG backtracking and the line search; time: "
        "wall clock of all steps.",
        "",
    ]
    for key, problem in problems.items():
        rows = [
            {
                "variant": name,
                "final f": r["final_f"],
                "steps to f < 1e-6": r["steps_to_1e-6"]
                if r["steps_to_1e-6"] is not None
                else f"> {steps[key]}",
                "total CG iterations": r["total_cg_iterations"],
                "loss evaluations": r["total_loss_evaluations"],
                "time (s)": r["time_s"],
            }
            for name, r in results[key].items()
        ]
        sections += [f"## {problem.title}", "", markdown_table(rows, formats={"time (s)": ".3f"})]
    hess = results["rosenbrock_hessian"]
    sections += [
        "## Negative curvature on Rosenbrock",
        "",
        "At (-1, 3) the Hessian [[2, 400], [400, 200]] is indefinite. CG's first direction has "
        'positive curvature, its second negative. With `negative_curvature="stop"` (the '
        "library default, as in Martens' own CG) the first step ends at f = "
        f'{hess[NEGATIVE_CURVATURE_STOP]["f"][0]:.4g}; with `"continue"` (the rule of the '
        "PyTorchHessianFree reference implementation) CG reaches the damped Newton step, the "
        f"saddle of the damped model, at f = {hess['default']['f'][0]:.4g} in the valley, and "
        "the rest of the walk along the valley takes about as many steps either way. "
        "The reference's own Rosenbrock example (float32) goes 404 -> 4.01 -> ... -> 3.9e-8 in "
        "20 steps.",
        "",
        "## Warm start on Rosenbrock",
        "",
        _warm_start_note(results["rosenbrock_ggn"]["no warm start"], rosen_steps),
        "",
        "## The seed's loop (MLP, default HF, a new random batch every step)",
        "",
        markdown_table(seed_rows),
        "Figures: `rosenbrock_paths.png`, `loss_per_step.png`, `damping_cg.png`.",
    ]
    summary = "\n".join(sections)
    write_markdown(out / "summary.md", summary + "\n")
    print(summary)
    return {
        "config": {"rosenbrock_steps": rosen_steps, "mlp_steps": mlp_steps, "target": TARGET},
        "problems": {key: problem.title for key, problem in problems.items()},
        "results": results,
        "seed_protocol": seed_rows,
        "steps_to_1e-6": {
            key: {name: r["steps_to_1e-6"] for name, r in res.items()}
            for key, res in results.items()
        },
    }
