"""GGN·v through an MLP's output-Jacobian factors against the usual hand-written products.

For the MLP problems A and C (``problems.py``), in one interleaved run: the damped product
``(G + λI) v`` without factors and with them (built beforehand), the time to build the factors
and the factors' memory. A Gauss-Newton step of 20 CG iterations with ``jacobian_factors=True``
(the explicit fast path) against the same step with ``False`` (the optimizers' default) shows
the effect on a whole step.

Usage::

    .venv/bin/python benchmarks/jacobian_factors.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy

import torch

import secondorder as so
from _harness import markdown_table, set_threads, time_interleaved
from problems import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    set_threads(2)
    rows = [measure(name, args.repeats) for name in ("A", "C")]
    print(
        markdown_table(
            [
                "problem",
                "(G+λI)v ms",
                "with factors ms",
                "ratio",
                "build ms",
                "factors MiB",
                "GN step ms: False / True (ratio)",
                "rel. diff",
            ],
            rows,
        )
    )


def measure(name: str, repeats: int) -> list[str]:
    """One row of the table for problem ``name``."""
    p = make_problem(name)
    data = (p.X, p.y)
    plain = so.GGN(p.model, p.loss_fn, data) + 2e-4 * so.linalg.Identity(
        sum(q.numel() for q in p.params)
    )
    op = so.GGN(p.model, p.loss_fn, data, jacobian_factors=True)
    factored = op + 2e-4 * so.linalg.Identity(op.shape[0])
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    factored @ v  # builds the factors
    factors = op._states[0][0].lin.factors  # type: ignore[index]
    diff = float((plain @ v - factored @ v).norm() / (plain @ v).norm())

    def step(option: object, model: torch.nn.Module = p.model) -> None:
        m = copy.deepcopy(model)
        so.GaussNewton(
            m,
            p.loss_fn,
            lr=0.2,
            damping=2e-4,
            cg_maxiter=20,
            cg_rtol=1e-3,
            adapt_damping=False,
            jacobian_factors=option,
        ).step(p.X, p.y)

    t = time_interleaved(
        {
            "plain": lambda: plain @ v,
            "factored": lambda: factored @ v,
            "build": factors.build,
            "step plain": lambda: step(False),
            "step True": lambda: step(True),
        },
        repeats=repeats,
    )
    ms = {k: 1e3 * timing.median for k, timing in t.items()}
    return [
        f"{name}: {p.description}",
        f"{ms['plain']:.3f}",
        f"{ms['factored']:.3f}",
        f"{ms['factored'] / ms['plain']:.2f}",
        f"{ms['build']:.2f} ({ms['build'] / ms['plain']:.1f} products)",
        f"{factors.nbytes / 2**20:.1f}",
        f"{ms['step plain']:.1f} / {ms['step True']:.1f} "
        f"({ms['step True'] / ms['step plain']:.2f})",
        f"{diff:.1e}",
    ]


if __name__ == "__main__":
    main()
