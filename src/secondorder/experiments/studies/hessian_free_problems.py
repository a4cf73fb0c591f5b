"""Seed 003's problems and runs: Rosenbrock (Hessian, GGN) and the small MLP, one run per variant.

:data:`SWITCHES` names the variants (one :class:`~secondorder.HessianFree` switch off at a
time); :func:`run_variant` runs one and records every step's diagnostics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...optim.hessian_free import HessianFree
from ..models import Rosenbrock, RosenbrockResiduals, small_mlp, value_loss

__all__ = [
    "NEGATIVE_CURVATURE_STOP",
    "OPTIMUM",
    "START",
    "SWITCHES",
    "TARGET",
    "Problem",
    "mlp_problem",
    "rosenbrock_problems",
    "run_variant",
    "seed_protocol",
]

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


# ------------------------------------------------------------------------------- problems
class Problem:
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


def rosenbrock_problems() -> dict[str, Problem]:
    """Rosenbrock from :data:`START` with the Hessian of the value and the GGN of the residuals."""
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
        "rosenbrock_hessian": Problem(
            "Rosenbrock, Hessian (value)",
            lambda: Rosenbrock(START, dtype=dt),
            value_loss,
            {"curvature": "hessian", "negative_curvature": "continue"},
            lambda _: (dummy, None),
            value_of,
            hessian_variants,
            path=True,
        ),
        "rosenbrock_ggn": Problem(
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


def mlp_problem(seed: int, device: torch.device) -> Problem:
    """The seed's small MLP with MSE on one fixed batch of 16 uniform random samples."""
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.rand(16, 10, generator=gen).to(device)
    y = torch.rand(16, 10, generator=gen).to(device)
    loss_fn = nn.MSELoss()

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    return Problem(
        "MLP 10-10-10 (ReLU), MSE, one batch of 16",
        lambda: small_mlp(10, seed=seed).to(device),
        loss_fn,
        {},
        lambda _: (x, y),
        evaluate,
        dict(SWITCHES),
        path=False,
    )


def seed_protocol(seed: int, steps: int, device: torch.device) -> list[dict[str, Any]]:
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


def run_variant(problem: Problem, kwargs: dict[str, Any], steps: int) -> dict[str, Any]:
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
