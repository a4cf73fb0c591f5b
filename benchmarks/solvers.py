"""Preconditioned CG and Lanczos on problem A's damped Gauss-Newton system.

The system is seed 000's: ``(G + 1e-3 I) x = g`` with ``G = so.GGN(model, loss_fn, (X, y))``
and ``g`` the gradient, on problem A (``problems.py``: the MLP 2-200-200-5 with SiLU on the
5-arm spiral, 41,805 parameters). ``so.cg`` solves it to relative residual ``1e-3``

* without a preconditioner,
* with ``so.JacobiPreconditioner`` built from the exact GGN diagonal (``so.ggn_diagonal``),
* with ``so.NystromPreconditioner`` of several ranks,
* with ``so.PivotedCholeskyPreconditioner`` (its diagonal again from ``so.ggn_diagonal``),

and every preconditioner's construction is timed as part of the solve. Beside them,
``so.lanczos`` (top 5) and ``so.eigmax`` run against scipy's ARPACK ``eigsh`` on the same
operator (through ``A.to_scipy()``), at the same tolerance and with a fixed start vector.

All times of one point come from one interleaved run (``_harness.time_interleaved``), so
the ratios are measured under the same machine load. The same tables are repeated, unless
``--trained-steps 0``, at the weights reached after a few Gauss-Newton steps with seed
000's settings, where the GGN has many more significant eigenvalues.

Usage::

    .venv/bin/python benchmarks/solvers.py
    .venv/bin/python benchmarks/solvers.py --nystrom-ranks 10,25,50 --markdown solvers.md

Targets (on problem A at its initial weights): at least one preconditioner halves the CG
iterations *and* cuts the total time (construction + solve) by at least 1.3x against no
preconditioner at the same tolerance; ``so.lanczos`` top-5 is at least as fast as ``eigsh``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from _harness import (
    Timing,
    ensure_environment,
    markdown_table,
    set_threads,
    time_interleaved,
)
from problems import Problem, make_problem

DAMPING = 1e-3  # the system's Tikhonov damping (seed 000)
RTOL = 1e-3  # CG's relative residual tolerance
MAXITER = 5000  # far more than any solve here needs; a solve that hits it is reported
ITERATION_FACTOR = 0.5  # target: iterations <= 0.5 x those without preconditioner
SPEEDUP = 1.3  # target: total time (construction + solve) >= 1.3x faster
TOP_K = 5
# Seed 000's Gauss-Newton settings on the true GGN (see experiments/studies/spiral.py):
# the seed solves (5 G + 1e-3 I) s = g, i.e. lr 0.2 and damping 2e-4 on G.
TRAIN_SETTINGS = dict(lr=0.2, damping=2e-4, cg_maxiter=20, cg_rtol=1e-3, adapt_damping=False)


def _load_so() -> Any:
    import secondorder as so

    return so


class _Counting:
    """Factory for a LinearOperator that forwards to ``op`` and counts the columns it sees."""

    @staticmethod
    def wrap(so: Any, op: Any) -> Any:
        """Return a counting wrapper of ``op`` (a ``so.LinearOperator``)."""

        class Counting(so.LinearOperator):
            SELF_ADJOINT = True
            IS_PSD = True

            def __init__(self) -> None:
                super().__init__(op.shape, op.dtype, op.device)
                self.columns = 0

            def _matvec(self, x: Tensor) -> Tensor:
                self.columns += 1
                return op._matvec(x)

            def _matmat(self, X: Tensor) -> Tensor:
                self.columns += X.shape[1]
                return op._matmat(X)

        return Counting()


@dataclass
class Method:
    """A preconditioner: how to build it (``None``: plain CG) and what one build gave."""

    label: str
    build: Callable[[], Any] | None
    build_counted: Callable[[Any], Any] | None = None  # build on a given (counting) operator
    rank: int | None = None  # the rank asked for
    build_products: int | None = None  # operator columns one construction needs
    detail: str = ""  # e.g. the rank actually reached
    iterations: int = 0
    products: int = 0  # products with A in the CG solve
    status: str = ""
    residual: float = math.nan  # true ||b - A x|| / ||b|| of the returned x


@dataclass
class EigenRow:
    """One eigenproblem solved by us and by ``eigsh``."""

    label: str
    ours_key: str
    scipy_key: str
    ours_products: int = 0
    scipy_products: int = 0
    max_rel_diff: float = math.nan  # between our and eigsh's eigenvalues
    converged: bool = True


@dataclass
class PointResult:
    """Everything measured at one point (weights) of problem A."""

    title: str
    problem: Problem
    damping: float
    methods: list[Method]
    eig_rows: list[EigenRow]
    timings: dict[str, Timing]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def t(self, key: str) -> float:
        """Median seconds of a timed callable."""
        return self.timings[key].median


# Building the point --------------------------------------------------------------------


def _train(so: Any, problem: Problem, steps: int) -> float:
    """Take ``steps`` Gauss-Newton steps (seed 000's settings); returns the final loss."""
    opt = so.GaussNewton(problem.model, problem.loss_fn, **TRAIN_SETTINGS)
    loss = math.nan
    for _ in range(steps):
        loss = float(opt.step(problem.X, problem.y))
    with torch.no_grad():
        return float(problem.loss_fn(problem.model(problem.X), problem.y)) if steps else loss


def _methods(
    so: Any, problem: Problem, G: Any, damping: float, nystrom: list[int], pchol: list[int]
) -> list[Method]:
    """The preconditioners to compare, each with a build callable (and a counting one)."""
    data = (problem.X, problem.y)
    model, loss_fn = problem.model, problem.loss_fn

    def jacobi() -> Any:
        return so.JacobiPreconditioner(so.ggn_diagonal(model, loss_fn, data), damping=damping)

    def nystrom_build(rank: int, op: Any) -> Any:
        gen = torch.Generator().manual_seed(0)
        return so.NystromPreconditioner(op, rank, damping, generator=gen)

    def pchol_build(rank: int, op: Any) -> Any:
        d = so.ggn_diagonal(model, loss_fn, data)
        return so.PivotedCholeskyPreconditioner(op, rank, damping, diagonal=d)

    out = [Method("none", None, build_products=0), Method("Jacobi (exact GGN diagonal)", jacobi)]
    for r in nystrom:
        out.append(
            Method(
                f"Nyström r={r}",
                lambda r=r: nystrom_build(r, G),
                build_counted=lambda op, r=r: nystrom_build(r, op),
                rank=r,
            )
        )
    for r in pchol:
        out.append(
            Method(
                f"pivoted Cholesky r={r}",
                lambda r=r: pchol_build(r, G),
                build_counted=lambda op, r=r: pchol_build(r, op),
                rank=r,
            )
        )
    return out


def run_point(
    so: Any,
    title: str,
    trained_steps: int,
    damping: float,
    nystrom: list[int],
    pchol: list[int],
    eig_tol: float,
    eigmax_tol: float,
    repeats: int,
    warmup: int,
) -> PointResult:
    """Build problem A (after ``trained_steps`` Gauss-Newton steps), check and time it all."""
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import eigsh

    start = time.perf_counter()
    problem = make_problem("A")
    notes: list[str] = []
    errors: list[str] = []
    if trained_steps:
        loss = _train(so, problem, trained_steps)
        notes.append(
            f"weights after {trained_steps} so.GaussNewton steps with {TRAIN_SETTINGS} "
            f"(seed 000's settings on the true GGN); loss {loss:.4f}"
        )
    data = (problem.X, problem.y)
    G = so.GGN(problem.model, problem.loss_fn, data)
    g = G.gradient()
    n = G.shape[0]
    identity = so.Identity(n, dtype=G.dtype, device=G.device)
    A = G + identity * damping
    v = torch.randn(n, generator=torch.Generator().manual_seed(1234))
    params = problem.params

    def gradient() -> tuple[Tensor, ...]:
        return torch.autograd.grad(problem.loss_fn(problem.model(problem.X), problem.y), params)

    fns: dict[str, Callable[[], Any]] = {"gradient": gradient, "GGN·v": lambda: G @ v}

    # Preconditioners: build once (counting products), solve once, then time both parts.
    methods = _methods(so, problem, G, damping, nystrom, pchol)
    g_norm = float(g.norm())
    working: list[Method] = []
    for m in methods:
        try:
            M = None
            if m.build is not None:
                if m.build_counted is not None:
                    wrapper = _Counting.wrap(so, G)
                    m.build_counted(wrapper)
                    m.build_products = wrapper.columns
                M = m.build()
                if m.rank is not None and M.rank != m.rank:
                    m.detail = f"rank {M.rank} reached"
            x, info = so.cg(A, g, rtol=RTOL, maxiter=MAXITER, M=M)
        except Exception as err:  # reported, the others go on
            errors.append(f"{m.label}: {type(err).__name__}: {err}")
            continue
        m.iterations, m.products, m.status = info.iterations, info.num_matvecs, info.status.name
        m.residual = float((g - A @ x).norm()) / g_norm
        if info.status.name != "CONVERGED":
            errors.append(f"{m.label}: CG stopped with {info.status.name}: {info.message}")
        working.append(m)
        if m.build is None:
            fns[f"{m.label} solve"] = lambda: so.cg(A, g, rtol=RTOL, maxiter=MAXITER)
        else:
            fns[f"{m.label} build"] = m.build
            fns[f"{m.label} solve"] = lambda M=M: so.cg(A, g, rtol=RTOL, maxiter=MAXITER, M=M)

    # Eigen-solvers: ours and ARPACK on the same operator, same tolerance, fixed starts.
    S = A.to_scipy()
    v0 = np.random.default_rng(0).standard_normal(n).astype(S.dtype)
    lgen = torch.Generator().manual_seed(0)

    def ours_top() -> Any:
        return so.lanczos(A, TOP_K, "largest", tol=eig_tol, generator=lgen.manual_seed(0))

    def scipy_top(op: Any = S) -> Any:
        return eigsh(op, k=TOP_K, which="LA", tol=eig_tol, v0=v0)

    def ours_max() -> float:
        return so.eigmax(A, tol=eigmax_tol, generator=lgen.manual_seed(0))

    def scipy_max(op: Any = S) -> Any:
        return eigsh(op, k=1, which="LA", tol=eigmax_tol, v0=v0, return_eigenvectors=False)

    eig_rows = [
        EigenRow(f"top-{TOP_K} eigenpairs (tol {eig_tol:g})", "lanczos top-k", "eigsh top-k"),
        EigenRow(f"eigmax (tol {eigmax_tol:g})", "eigmax", "eigsh k=1"),
    ]
    for row, ours, theirs, k, tol in (
        (eig_rows[0], ours_top, scipy_top, TOP_K, eig_tol),
        (eig_rows[1], ours_max, scipy_max, 1, eigmax_tol),
    ):
        try:
            count = [0]

            def counted_matvec(x: Any, count: list[int] = count) -> Any:
                count[0] += 1
                return S.matvec(x)

            out = theirs(ScipyOperator(S.shape, counted_matvec, dtype=S.dtype))
            theirs_vals = np.sort(np.atleast_1d(out[0] if k > 1 else out)).astype(np.float64)
            row.scipy_products = count[0]
            evals, _, info = so.lanczos(
                A, k, "largest", tol=tol, generator=lgen.manual_seed(0), return_info=True
            )
            row.ours_products = info.num_matvecs
            row.converged = bool(info.converged)
            ours_vals = np.sort(evals.double().cpu().numpy())
            row.max_rel_diff = float(np.max(np.abs(ours_vals - theirs_vals) / np.abs(theirs_vals)))
            if not row.converged:
                errors.append(f"{row.label}: so.lanczos did not converge: {info.message}")
            if row.max_rel_diff > max(10 * tol, 1e-5):
                errors.append(
                    f"{row.label}: eigenvalues differ from eigsh by {row.max_rel_diff:.1e}"
                )
        except Exception as err:
            errors.append(f"{row.label}: {type(err).__name__}: {err}")
            continue
        fns[row.ours_key] = ours
        fns[row.scipy_key] = theirs
    eig_rows = [r for r in eig_rows if r.ours_key in fns]

    timings = time_interleaved(fns, repeats=repeats, warmup=warmup)
    point = PointResult(title, problem, damping, working, eig_rows, timings, notes, errors)
    point.seconds = time.perf_counter() - start
    return point


# Report ------------------------------------------------------------------------------


def _s(t: Timing) -> str:
    return f"{t.median:.3f} ({t.q1:.3f}–{t.q3:.3f})"


def _pass(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def report_point(p: PointResult) -> tuple[str, bool, bool]:
    """Markdown for one point; returns it with (preconditioner target met, Lanczos target met)."""
    none = next(m for m in p.methods if m.build is None)
    t_none = p.t(f"{none.label} solve")
    t_mv = p.t("GGN·v")
    header = [
        "preconditioner",
        "CG its",
        "true rel. residual",
        "products build + CG",
        "construction s (IQR)",
        "construction ÷ GGN·v",
        "solve s (IQR)",
        "total s",
        "speedup vs none",
        "product-count speedup",
        "its ≤ ½",
        "speedup ≥ 1.3",
        "pays off after",
    ]
    rows = []
    any_ok = False
    for m in p.methods:
        solve = p.timings[f"{m.label} solve"]
        build = p.timings.get(f"{m.label} build")
        total = solve.median + (build.median if build else 0.0)
        speedup = t_none / total
        its_ok = m.iterations <= ITERATION_FACTOR * none.iterations
        fast_ok = speedup >= SPEEDUP
        label = m.label + (f" ({m.detail})" if m.detail else "")
        if build is None:
            rows.append(
                [
                    label,
                    m.iterations,
                    f"{m.residual:.1e}",
                    f"0 + {m.products}",
                    "—",
                    "—",
                    _s(solve),
                    f"{total:.3f}",
                    "1.00",
                    "1.00",
                    "—",
                    "—",
                    "—",
                ]
            )
            continue
        any_ok = any_ok or (its_ok and fast_ok)
        if m.build_products is None:  # Jacobi: the diagonal needs no products with G
            bp, count_speedup = "—", "—"
        else:
            bp = str(m.build_products)
            count_speedup = f"{none.products / (m.build_products + m.products):.2f}"
        gain = t_none - solve.median
        payoff = f"{math.ceil(build.median / gain)} solve(s)" if gain > 0 else "never"
        rows.append(
            [
                label,
                m.iterations,
                f"{m.residual:.1e}",
                f"{bp} + {m.products}",
                _s(build),
                f"{build.median / t_mv:.0f}",
                _s(solve),
                f"{total:.3f}",
                f"{speedup:.2f}",
                count_speedup,
                "✓" if its_ok else "✗",
                "✓" if fast_ok else "✗",
                payoff,
            ]
        )
    lines = [f"### {p.title}", ""]
    lines += [f"note: {n}" for n in p.notes]
    lines += [
        f"one gradient {p.t('gradient') * 1e3:.2f} ms, one GGN·v {t_mv * 1e3:.2f} ms "
        f"({t_mv / p.t('gradient'):.2f} gradients); system (GGN + {p.damping:g}·I) x = g, "
        f"CG to relative residual {RTOL:g}.",
        "",
        markdown_table(header, rows),
        "",
        "'true rel. residual': ||g − A x|| / ||g|| of the returned x, recomputed (every solve "
        f"stops on the same rule, ||r|| ≤ {RTOL:g} ||g||, for the unpreconditioned residual). "
        "Construction includes everything the preconditioner needs (the exact GGN diagonal "
        "for Jacobi and pivoted Cholesky); 'construction ÷ GGN·v' is its median time in units "
        "of one GGN·v, to compare with the products it needs. 'product-count speedup': plain "
        "CG's products over the preconditioned solve's (construction + CG), i.e. the speedup "
        "if nothing but products cost time. 'pays off after': the number of solves with the "
        "same operator after which building the preconditioner once beats plain CG.",
        "",
    ]

    eig_header = [
        "eigenproblem",
        "ours s (IQR)",
        "ours products",
        "eigsh s (IQR)",
        "eigsh products",
        "ours / eigsh",
        "max rel. eigenvalue diff",
    ]
    eig_rows = []
    lanczos_ok = False
    for r in p.eig_rows:
        ours, theirs = p.timings[r.ours_key], p.timings[r.scipy_key]
        rel = ours.median / theirs.median
        if r.ours_key == "lanczos top-k":
            lanczos_ok = rel <= 1.0
        eig_rows.append(
            [
                r.label,
                _s(ours),
                r.ours_products,
                _s(theirs),
                r.scipy_products,
                f"{rel:.2f}" + (" ✓" if rel <= 1.0 else " ✗")
                if r.ours_key == "lanczos top-k"
                else f"{rel:.2f}",
                f"{r.max_rel_diff:.1e}",
            ]
        )
    lines += [
        f"so.lanczos / so.eigmax beside scipy.sparse.linalg.eigsh (ARPACK, which='LA', fixed "
        f"v0) on the same operator GGN + {p.damping:g}·I through A.to_scipy():",
        "",
        markdown_table(eig_header, eig_rows),
        "",
    ]
    return "\n".join(lines), any_ok, lanczos_ok


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 if one of our solvers raised or disagrees, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nystrom-ranks", default="5,10,20,25,50,100,200")
    parser.add_argument("--pchol-ranks", default="10,50,100")
    parser.add_argument(
        "--trained-steps",
        type=int,
        default=10,
        help="also measure after this many Gauss-Newton steps (0: none)",
    )
    parser.add_argument(
        "--damping",
        type=float,
        default=DAMPING,
        help="the system's damping (the target is on 1e-3)",
    )
    parser.add_argument("--eig-tol", type=float, default=1e-6, help="tolerance of top-k")
    parser.add_argument("--eigmax-tol", type=float, default=1e-3, help="tolerance of eigmax")
    parser.add_argument("--repeats", type=int, default=20, help="samples per quantity")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY to re-run under (default passive: robust on a shared machine)",
    )
    parser.add_argument(
        "--openblas-threads",
        default="1",
        help="OPENBLAS_NUM_THREADS to re-run under, for scipy's OpenBLAS ('inherit': keep)",
    )
    args = parser.parse_args(argv)
    env = {}
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.openblas_threads != "inherit":
        env["OPENBLAS_NUM_THREADS"] = args.openblas_threads
    ensure_environment(env, os.path.abspath(__file__), sys.argv[1:] if argv is None else argv)
    nystrom = [int(r) for r in args.nystrom_ranks.split(",") if r.strip()]
    pchol = [int(r) for r in args.pchol_ranks.split(",") if r.strip()]
    set_threads(args.threads)
    so = _load_so()
    load_before = os.getloadavg()

    points = [("Problem A (seed 000's spiral MLP) at its initial weights", 0)]
    if args.trained_steps:
        points.append(
            (f"Problem A after {args.trained_steps} Gauss-Newton steps", args.trained_steps)
        )
    results = []
    for title, steps in points:
        res = run_point(
            so,
            title,
            steps,
            args.damping,
            nystrom,
            pchol,
            args.eig_tol,
            args.eigmax_tol,
            args.repeats,
            args.warmup,
        )
        print(f"{title}: {res.seconds:.1f} s", file=sys.stderr)
        results.append(res)

    load_after = os.getloadavg()
    sections, verdicts = [], []
    for res in results:
        text, pre_ok, lz_ok = report_point(res)
        sections.append(text)
        verdicts.append((res.title, pre_ok, lz_ok))
    _, pre_ok, lz_ok = verdicts[0]
    target_rows = [
        [
            "a preconditioner halves the CG iterations and is ≥ 1.3× faster in total",
            _pass(pre_ok),
        ]
        + [_pass(v[1]) for v in verdicts[1:]],
        ["so.lanczos top-5 at least as fast as eigsh", _pass(lz_ok)]
        + [_pass(v[2]) for v in verdicts[1:]],
    ]
    target_header = ["target", "A, initial weights (the target)"] + [
        f"{v[0][len('Problem ') :]} (investigation)" for v in verdicts[1:]
    ]
    errors = [f"{r.title}: {e}" for r in results for e in r.errors]
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"python {platform.python_version()}, {args.repeats} samples per quantity, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; "
        "cells: median (IQR) in seconds, all from one interleaved run per point.",
        *[f"ERROR: {e}" for e in errors],
        "",
        "Targets:",
        "",
        markdown_table(target_header, target_rows),
        "",
        *sections,
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
