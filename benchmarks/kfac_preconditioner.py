"""K-FAC's damped inverse as the preconditioner of CG on the damped Gauss-Newton system.

On the benchmark problems A, B, C (``problems.py``), at the initial weights and optionally
after a few Gauss-Newton steps (seed 000's settings, as ``solvers.py``), ``so.cg`` solves
``(G + λI) x = g`` (``G = so.GGN``, ``g`` the gradient, ``λ = 1e-3``) to relative residual
``1e-3`` with

* no preconditioner,
* ``so.JacobiPreconditioner`` from the exact GGN diagonal (``so.ggn_diagonal``),
* ``so.NystromPreconditioner`` of rank 25 and 50 (sketched from ``G``),
* ``so.KFAC(..., fisher="exact" | "mc").inverse(μ)`` and ``so.EKFAC(..., fisher="exact")
  .inverse(μ)``: :math:`M^{-1} = (K + \\mu I)^{-1}`, with the system's damping ``μ = λ`` and
  with a heavier ``μ = 10λ, 100λ`` (the preconditioner's own damping),

and reports iterations, the preconditioner's construction time, the solve time (products with
``G`` included) and their sum, median of ``--repeats`` runs each (interleaved by method).

Usage::

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/kfac_preconditioner.py [--trained-steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import secondorder as so
from _harness import ensure_environment, markdown_table, set_threads
from problems import make_problem

DAMPING = 1e-3
RTOL = 1e-3
MAXITER = 500
TRAIN_SETTINGS = dict(lr=0.2, damping=2e-4, cg_maxiter=20, cg_rtol=1e-3, adapt_damping=False)


def methods(model: Any, loss_fn: Any, data: Any, G: Any) -> dict[str, Callable[[], Any]]:
    def nystrom(rank: int) -> Any:
        return so.NystromPreconditioner(
            G, rank, DAMPING, generator=torch.Generator().manual_seed(0)
        )

    def kfac(cls: Any, fisher: str, mu: float = DAMPING) -> Any:
        gen = torch.Generator().manual_seed(0)
        return cls(model, loss_fn, data, fisher=fisher, generator=gen).inverse(mu)

    return {
        "none": lambda: None,
        "Jacobi (exact GGN diagonal)": lambda: so.JacobiPreconditioner(
            so.ggn_diagonal(model, loss_fn, data), damping=DAMPING
        ),
        "Nyström r=25": lambda: nystrom(25),
        "Nyström r=50": lambda: nystrom(50),
        "K-FAC exact": lambda: kfac(so.KFAC, "exact"),
        "K-FAC mc": lambda: kfac(so.KFAC, "mc"),
        "EKFAC exact": lambda: kfac(so.EKFAC, "exact"),
        "K-FAC exact, μ=10λ": lambda: kfac(so.KFAC, "exact", 10 * DAMPING),
        "K-FAC exact, μ=100λ": lambda: kfac(so.KFAC, "exact", 100 * DAMPING),
        "EKFAC exact, μ=100λ": lambda: kfac(so.EKFAC, "exact", 100 * DAMPING),
    }


def run_point(problem: Any, label: str, repeats: int) -> list[list[object]]:
    data = (problem.X, problem.y)
    G = so.GGN(problem.model, problem.loss_fn, data)
    b = G.gradient()
    A = G + DAMPING * so.Identity(G.shape[0], dtype=G.dtype, device=G.device)
    builds = methods(problem.model, problem.loss_fn, data, G)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in builds}
    iters: dict[str, int] = {}
    for r in range(repeats):
        names = list(builds)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            t0 = time.perf_counter()
            M = builds[name]()
            t1 = time.perf_counter()
            _, info = so.cg(A, b, rtol=RTOL, maxiter=MAXITER, M=M)
            t2 = time.perf_counter()
            times[name].append((t1 - t0, t2 - t1))
            iters[name] = (
                info.iterations if info.status == so.SolverStatus.CONVERGED else -info.iterations
            )
    rows = []
    base = statistics.median(a + s for a, s in times["none"])
    for name, ts in times.items():
        build = statistics.median(a for a, _ in ts)
        solve = statistics.median(s for _, s in ts)
        total = statistics.median(a + s for a, s in ts)
        it = iters[name]
        rows.append(
            [
                problem.name,
                label,
                name,
                it if it >= 0 else f">{-it} (no conv.)",
                f"{1e3 * build:.0f}",
                f"{1e3 * solve:.0f}",
                f"{1e3 * total:.0f}",
                f"{total / base:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="A,B,C")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trained-steps", type=int, default=0)
    args = parser.parse_args()
    # idle OpenMP threads sleep instead of spinning (shared machine; see _harness)
    ensure_environment(
        {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}, __file__, sys.argv[1:]
    )
    set_threads(2)
    rows = []
    for key in args.problems.split(","):
        problem = make_problem(key)
        rows += run_point(problem, "init", args.repeats)
        if args.trained_steps:
            opt = so.GaussNewton(problem.model, problem.loss_fn, **TRAIN_SETTINGS)
            for _ in range(args.trained_steps):
                opt.step(problem.X, problem.y)
            rows += run_point(problem, f"after {args.trained_steps} GN steps", args.repeats)
    print()
    print(
        markdown_table(
            [
                "problem",
                "weights",
                "preconditioner",
                "CG iterations",
                "build ms",
                "solve ms",
                "total ms",
                "total ÷ none",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
