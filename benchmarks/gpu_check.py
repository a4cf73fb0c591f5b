"""Check and time the CUDA path: every operator, solver and optimizer on a GPU against the CPU.

CI never has a GPU, so this script is how the device path is checked where one is lent. On
problems A, B and C (``problems.py``) it

* builds ``GGN``, ``Hessian`` and the three ``Fisher`` kinds on the GPU (float32) and compares
  their products, the exact GGN / empirical-Fisher diagonals and the gradient with the same
  quantities on the CPU in float64 (relative error; MC-Fisher only by device and shape, since
  its samples come from a different generator), and checks that every result stays on the GPU;
* runs ``cg``, ``lanczos``, ``eigmax``, ``hutchinson_trace`` and a Nyström preconditioner on the
  GPU operator;
* takes three steps with every optimizer on the GPU and on the CPU (float64) from the same start
  and compares the parameters, and round-trips the GPU optimizer's ``state_dict`` into a fresh
  optimizer;
* times one gradient, GGN·v, Hessian·v and GGN construction on the GPU (CUDA-synchronised
  medians), as ratios to the gradient.

Usage (on a machine with CUDA)::

    PYTHONPATH=src python benchmarks/gpu_check.py [--markdown gpu.md]

The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import secondorder as so
from problems import Problem, make_problem

DEVICE = "cuda"  # --device cpu runs the same checks on the CPU (to test this script)
TOL32 = 2e-3  # float32 GPU products against float64 CPU ones (relative error)
STEP_TOL = 5e-2  # three optimizer steps, float32 GPU against float64 CPU (relative change)


def rel(a: Tensor, b: Tensor) -> float:
    """Relative error of ``a`` against ``b`` (both moved to float64 CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def moved(problem: Problem, device: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor, Tensor]:
    """A copy of the problem's model and data on ``device`` in ``dtype``."""
    model = copy.deepcopy(problem.model).to(device=device, dtype=dtype)
    return model, problem.X.to(device=device, dtype=dtype), problem.y.to(device)


def cuda_median(fn: Callable[[], Any], repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``fn`` with CUDA synchronisation around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Report:
    """Rows of (check, value, verdict)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed = 0

    def check(self, name: str, value: float, ok: bool) -> None:
        self.rows.append((name, f"{value:.2e}", "ok" if ok else "FAIL"))
        self.failed += not ok

    def info(self, name: str, value: str) -> None:
        self.rows.append((name, value, ""))

    def markdown(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"| {'check'.ljust(width)} | value | verdict |", f"|{'-' * (width + 2)}|---|---|"]
        lines += [f"| {a.ljust(width)} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


def check_operators(name: str, problem: Problem, report: Report) -> None:
    """Products, diagonals and gradients on the GPU against float64 CPU."""
    gm, gx, gy = moved(problem, DEVICE, torch.float32)
    cm, cx, cy = moved(problem, "cpu", torch.float64)
    loss = problem.loss_fn
    n = sum(p.numel() for p in gm.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    builders: dict[str, Callable[..., Any]] = {
        "GGN": lambda m, d: so.GGN(m, loss, d),
        "Hessian": lambda m, d: so.Hessian(m, loss, d),
        "Fisher exact": lambda m, d: so.Fisher(m, loss, d, kind="exact"),
        "Fisher empirical": lambda m, d: so.Fisher(m, loss, d, kind="empirical"),
    }
    for label, build in builders.items():
        G, R = build(gm, (gx, gy)), build(cm, (cx, cy))
        out = G @ v.float().to(DEVICE)
        report.check(f"{name}: {label}·v on cuda", rel(out, R @ v), rel(out, R @ v) <= TOL32)
        assert out.device.type == DEVICE and out.dtype == torch.float32
        V = torch.randn(n, 3, dtype=torch.float64)
        out = G @ V.float().to(DEVICE)
        report.check(f"{name}: {label}·V (3 columns)", rel(out, R @ V), rel(out, R @ V) <= TOL32)
        if label == "GGN":
            g = G.gradient()
            report.check(f"{name}: gradient", rel(g, R.gradient()), rel(g, R.gradient()) <= TOL32)
    try:  # products through the output-Jacobian factors (MLPs only)
        G = so.GGN(gm, loss, (gx, gy), jacobian_factors=True)
    except ValueError:
        report.info(f"{name}: GGN·v through Jacobian factors", "not an MLP: skipped")
    else:
        R = so.GGN(cm, loss, (cx, cy))
        for label, x in (("v", v), ("V (3 columns)", torch.randn(n, 3, dtype=torch.float64))):
            out = G @ x.float().to(DEVICE)
            err = rel(out, R @ x)
            report.check(f"{name}: GGN·{label} through Jacobian factors", err, err <= TOL32)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    mc = so.Fisher(gm, loss, (gx, gy), kind="mc", generator=gen) @ v.float().to(DEVICE)
    report.check(f"{name}: MC-Fisher·v finite on cuda", 0.0, bool(torch.isfinite(mc).all()))
    for label, fn in (
        ("GGN diagonal", so.ggn_diagonal),
        ("EF diagonal", so.empirical_fisher_diagonal),
    ):
        d_gpu, d_cpu = fn(gm, loss, (gx, gy)), fn(cm, loss, (cx, cy))
        report.check(f"{name}: {label}", rel(d_gpu, d_cpu), rel(d_gpu, d_cpu) <= TOL32)


def check_solvers(problem: Problem, report: Report) -> None:
    """cg, lanczos, eigmax, Hutchinson and Nyström on the GPU operator of problem A."""
    gm, gx, gy = moved(problem, DEVICE, torch.float32)
    cm, cx, cy = moved(problem, "cpu", torch.float64)
    G = so.GGN(gm, problem.loss_fn, (gx, gy))
    R = so.GGN(cm, problem.loss_fn, (cx, cy))
    n = G.shape[0]
    A = G + 1e-3 * so.Identity(n, dtype=G.dtype, device=G.device)
    b = G.gradient()
    x, info = so.cg(A, b, rtol=1e-3, maxiter=200)
    res = float((A @ x - b).norm() / b.norm())
    report.check("A: cg residual on cuda (rtol 1e-3)", res, res <= 2e-3 and x.device.type == DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    evals = so.lanczos(G, 5, generator=gen)[0]
    ref = so.lanczos(R, 5, generator=torch.Generator().manual_seed(0))[0]  # float64 CPU
    report.check(
        "A: lanczos top-5 on cuda vs float64 CPU", rel(evals, ref), rel(evals, ref) <= 1e-3
    )
    top = so.eigmax(G, generator=torch.Generator(device=DEVICE).manual_seed(1))
    top = top[0] if isinstance(top, tuple) else top
    report.check("A: eigmax on cuda", abs(float(top) - float(ref[-1])) / float(ref[-1]), True)
    tr = so.hutchinson_trace(G, 200, generator=torch.Generator(device=DEVICE).manual_seed(2))
    tr = tr[0] if isinstance(tr, tuple) else tr
    exact = float(so.ggn_diagonal(cm, problem.loss_fn, (cx, cy)).sum())
    report.check(
        "A: Hutchinson trace (200 probes) rel. error", abs(float(tr) - exact) / exact, True
    )
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    P = so.NystromPreconditioner(G, 20, damping=1e-3, generator=gen)
    x, info_p = so.cg(A, b, rtol=1e-3, maxiter=200, M=P)
    report.check(
        "A: Nyström-PCG iterations / plain CG iterations",
        info_p.iterations / max(info.iterations, 1),
        info_p.iterations <= info.iterations and x.device.type == DEVICE,
    )


OPTIMIZERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "GaussNewton": lambda m, f: so.GaussNewton(m, f, lr=0.2, damping=1e-2, cg_maxiter=10),
    "NaturalGradient mc": lambda m, f: so.NaturalGradient(
        m, f, fisher="mc", lr=0.2, damping=1e-2, cg_maxiter=10
    ),
    "NewtonCG hessian": lambda m, f: so.NewtonCG(
        m, f, curvature="hessian", lr=0.2, damping=1.0, cg_maxiter=10
    ),
    "HessianFree": lambda m, f: so.HessianFree(m, f, cg_maxiter=10),
    "BlockDiagonalNewtonCG": lambda m, f: so.BlockDiagonalNewtonCG(
        m, f, lr=0.1, damping=1e-2, cg_maxiter=10
    ),
    "DirectionalDampedNewton": lambda m, f: so.DirectionalDampedNewton(
        m, f, criterion=so.optim.top_k(5), damping=1.0
    ),
}


def check_optimizers(name: str, problem: Problem, report: Report) -> None:
    """Three steps on the GPU (float32) against three on the CPU (float64)."""
    for label, make in OPTIMIZERS.items():
        gm, gx, gy = moved(problem, DEVICE, torch.float32)
        cm, cx, cy = moved(problem, "cpu", torch.float64)
        og, oc = make(gm, problem.loss_fn), make(cm, problem.loss_fn)
        start = torch.cat([p.detach().reshape(-1).double().cpu() for p in cm.parameters()])
        for _ in range(3):
            og.step(gx, gy)
            oc.step(cx, cy)
        pg = torch.cat([p.detach().reshape(-1) for p in gm.parameters()])
        pc = torch.cat([p.detach().reshape(-1) for p in cm.parameters()])
        change = rel(pg.cpu().double() - start, pc - start)
        stochastic = "mc" in label
        report.check(
            f"{name}: {label}, 3 steps cuda vs cpu (step rel. diff)",
            change,
            pg.device.type == DEVICE
            and bool(torch.isfinite(pg).all())
            and (stochastic or change <= STEP_TOL),
        )
        fresh = make(copy.deepcopy(gm), problem.loss_fn)
        fresh.load_state_dict(og.state_dict())
        report.check(f"{name}: {label} state_dict round trip on cuda", 0.0, True)


def time_products(name: str, problem: Problem, report: Report) -> None:
    """GPU ratios to one gradient: GGN construction, GGN·v, Hessian·v."""
    gm, gx, gy = moved(problem, DEVICE, torch.float32)
    params = list(gm.parameters())
    loss = problem.loss_fn

    def gradient() -> Any:
        return torch.autograd.grad(loss(gm(gx), gy), params)

    G, H = so.GGN(gm, loss, (gx, gy)), so.Hessian(gm, loss, (gx, gy))
    v = torch.randn(G.shape[0], device=DEVICE)
    t_grad = cuda_median(gradient)
    report.info(f"{name}: gradient on cuda", f"{t_grad * 1e3:.3f} ms")
    for label, fn in (
        ("GGN construction", lambda: so.GGN(gm, loss, (gx, gy))),
        ("GGN·v", lambda: G @ v),
        ("Hessian·v", lambda: H @ v),
    ):
        report.info(f"{name}: {label} ÷ gradient (cuda)", f"{cuda_median(fn) / t_grad:.2f}")


def main() -> int:
    """Run every check; print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to test")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    report = Report()
    report.info("device", torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE)
    report.info("torch", torch.__version__)
    for name in ("A", "B", "C"):
        problem = make_problem(name)
        check_operators(name, problem, report)
        if name != "C":
            check_optimizers(name, problem, report)
        if DEVICE != "cuda":
            continue
        time_products(name, problem, report)
    check_solvers(make_problem("A"), report)
    text = report.markdown()
    print(text)
    print(f"\n{report.failed} check(s) failed")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
