"""Cost of curvature products and operator construction, in gradients.

For each problem (see ``problems.py``) this times one gradient (forward + backward with
``torch.autograd.grad``) and, round-robin with it, the construction of our ``GGN``,
``Hessian`` and ``Fisher`` operators and their products with a fixed vector (operators
built once and reused). Every time is reported as a ratio to the gradient's median from
the same run: median and interquartile range over ``--repeats`` samples. The tensor
memory a GGN·v needs (what the operator holds plus the product's own peak) is reported
relative to a gradient's peak.

Where they import (run under ``.refenv``, see README.md), the GGN·v and Hessian·v of
curvlinops, BackPACK and CoLA are timed in the same rounds. Before anything is timed,
every deterministic product is checked against an independent float64 ``torch.func``
evaluation.

Usage::

    .venv/bin/python benchmarks/operators.py                      # ours only
    .refenv/bin/python benchmarks/operators.py --markdown out.md  # ours beside references
    .refenv/bin/python benchmarks/operators.py --impl standin     # harness self-test

``--impl standin`` replaces our operators by a plain ``torch.func`` stand-in defined
here (no reuse beyond one retained backward graph), to exercise the script while
``secondorder`` has no curvature operators; its rows are labelled ``stand-in``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from _harness import (
    MemoryUsage,
    Ratio,
    Timing,
    check_peak_memory,
    ensure_omp_wait_policy,
    format_bytes,
    markdown_table,
    operator_memory,
    peak_memory,
    ratio,
    set_threads,
    time_interleaved,
)
from problems import PROBLEMS, Problem, make_problem

# Targets: (row key, threshold per problem). Ratios to one gradient, median must be <=.
TARGETS: dict[str, dict[str, float]] = {
    "GGN·v": {"A": 1.4, "B": 1.3, "C": 1.2, "T": 1.3},
    "Hessian·v": {"A": 2.5, "B": 2.5, "C": 2.5, "T": 2.0},
    "MC-Fisher·v": {"T": 1.5},
    "EF·v": {"T": 1.5},
    "construct GGN + GGN·v": {"T": 2.0},
    "construct GGN": {"A": 1.5, "B": 1.5, "C": 1.5},
    "construct Hessian": {"A": 1.5, "B": 1.5, "C": 1.5},
    "construct Fisher exact": {"A": 1.5, "B": 1.5, "C": 1.5},
    "construct Fisher mc": {"A": 1.5, "B": 1.5, "C": 1.5},
    "construct Fisher empirical": {"A": 1.5, "B": 1.5, "C": 1.5},
    "GGN·v peak memory": {"A": 1.5, "B": 1.5, "C": 1.5},
}
CHECK_RTOL = 1e-4  # float32 products must agree with torch.func to this relative error


# A torch.func stand-in with our public API ------------------------------------------


class _Functional:
    """The model as a function of a tuple of parameter tensors, and flat <-> tuple views."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]):
        self.model, self.loss_fn = model, loss_fn
        self.X, self.y = data
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = tuple(p.detach() for _, p in named)
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.shape = (self.n, self.n)
        self.dtype = self.params[0].dtype

    def f(self, *params: Tensor) -> Tensor:
        return functional_call(self.model, dict(zip(self.names, params)), (self.X,))

    def unflatten(self, v: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(p) for t, p in zip(v.split(self.sizes), self.params))

    @staticmethod
    def flatten(ts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])


class _StandInGGN(_Functional):
    """GGN·v = Jᵀ (∇²_z L) J v: a forward-mode J v per product, a retained backward for Jᵀ."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]):
        if not isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn.reduction != "mean":
            raise TypeError("The stand-in supports only nn.CrossEntropyLoss(reduction='mean')")
        super().__init__(model, loss_fn, data)
        self.out, self.vjp_fn = vjp(self.f, *self.params)
        self.out = self.out.detach()

    def __matmul__(self, v: Tensor) -> Tensor:
        _, jv = jvp(self.f, self.params, self.unflatten(v))
        p = self.out.softmax(dim=1)  # ∇²_z CE = (diag(p) - p pᵀ) / N per row
        hjv = p * (jv - (p * jv).sum(dim=1, keepdim=True)) / self.out.shape[0]
        return self.flatten(self.vjp_fn(hjv))


class _StandInHessian(_Functional):
    """H v by forward-over-reverse differentiation of the loss, recomputed per product."""

    def _loss(self, *params: Tensor) -> Tensor:
        return self.loss_fn(self.f(*params), self.y)

    def __matmul__(self, v: Tensor) -> Tensor:
        def g(*params: Tensor) -> tuple[Tensor, ...]:
            return grad(self._loss, argnums=tuple(range(len(params))))(*params)

        _, hv = jvp(g, self.params, self.unflatten(v))
        return self.flatten(hv)


class _StandInFisher(_StandInGGN):
    """Fisher: exact (= GGN for softmax cross-entropy), Monte-Carlo or empirical."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: tuple[Tensor, Tensor],
        kind: str = "exact",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(model, loss_fn, data)
        self.kind = kind
        if kind == "exact":
            return
        C = self.out.shape[1]
        if kind == "mc":
            p = self.out.softmax(dim=1)
            labels = torch.multinomial(p, num_samples, replacement=True, generator=generator).T
        elif kind == "empirical":
            labels = self.y[None]
        else:
            raise ValueError(f"kind must be 'exact', 'mc' or 'empirical', got {kind!r}")
        # Per-sample output gradients of the unreduced losses, (S, N, C).
        self.g = self.out.softmax(dim=1)[None] - F.one_hot(labels, C).to(self.out.dtype)

    def __matmul__(self, v: Tensor) -> Tensor:
        if self.kind == "exact":
            return super().__matmul__(v)
        _, jv = jvp(self.f, self.params, self.unflatten(v))
        S, N, _ = self.g.shape
        u = (self.g * (self.g * jv).sum(dim=2, keepdim=True)).sum(dim=0) / (S * N)
        return self.flatten(self.vjp_fn(u))


STANDIN = SimpleNamespace(GGN=_StandInGGN, Hessian=_StandInHessian, Fisher=_StandInFisher)


def _truth(problem: Problem, v: Tensor) -> dict[str, Tensor]:
    """GGN·v, Hessian·v and EF·v in float64 by plain torch.func, for the checks.

    Generic in the loss (no closed forms): ``∇²_z L`` by forward-over-reverse, the
    per-sample output gradients as ``N ∇_z L`` (mean reduction, row ``n`` of the output
    enters only loss term ``n``), ``EF = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ``.
    """
    with sdpa_kernel([SDPBackend.MATH]):  # forward mode through attention: the math kernel
        return _truth_math(problem, v)


def _truth_math(problem: Problem, v: Tensor) -> dict[str, Tensor]:
    model = copy.deepcopy(problem.model).double()
    fn = _Functional(model, problem.loss_fn, (problem.X.double(), problem.y))
    vs = fn.unflatten(v.double())

    def loss_of_output(z: Tensor) -> Tensor:
        return problem.loss_fn(z, problem.y)

    def loss(*params: Tensor) -> Tensor:
        return loss_of_output(fn.f(*params))

    out, jv = jvp(fn.f, fn.params, vs)
    _, hjv = jvp(grad(loss_of_output), (out,), (jv,))
    _, vjp_fn = vjp(fn.f, *fn.params)
    _, hv = jvp(grad(loss, argnums=tuple(range(len(vs)))), fn.params, vs)
    n = out.shape[0]
    gz = grad(loss_of_output)(out) * n
    ef_out = gz * (gz * jv).flatten(1).sum(dim=1).view(-1, *[1] * (gz.dim() - 1)) / n
    return {
        "ggn": fn.flatten(vjp_fn(hjv)),
        "hessian": fn.flatten(hv),
        "empirical": fn.flatten(vjp_fn(ef_out)),
    }


def _load_ours() -> tuple[Any, str]:
    """``secondorder`` if it has the curvature operators, else ``(None, why)``."""
    try:
        import secondorder as so
    except ImportError as err:
        return None, f"import secondorder failed: {err}"
    missing = [n for n in ("GGN", "Hessian", "Fisher") if not hasattr(so, n)]
    if missing:
        return None, f"secondorder {so.__version__} has no {', '.join(missing)} yet"
    return so, f"secondorder {so.__version__}"


# Reference libraries ------------------------------------------------------------------


@dataclass
class Reference:
    """A reference product: ``build()`` makes its state once, ``apply(state)`` multiplies."""

    label: str
    build: Callable[[], Any]
    apply: Callable[[Any], Tensor]
    matrix: str  # "ggn" or "hessian": what it must agree with


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _references(problem: Problem, v: Tensor, notes: list[str]) -> list[Reference]:
    """The reference products that import in this interpreter."""
    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    params = problem.params
    fn = _Functional(model, loss_fn, (X, y))
    v_list = list(fn.unflatten(v))
    refs: list[Reference] = []

    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError as err:
        notes.append(f"curvlinops not importable ({err}); its rows are skipped")
    else:
        data = [(X, y)]
        refs.append(
            Reference(
                "curvlinops GGN·v",
                lambda: GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False),
                lambda op: op @ v,
                "ggn",
            )
        )
        refs.append(
            Reference(
                "curvlinops Hessian·v",
                lambda: HessianLinearOperator(
                    model, loss_fn, params, data, check_deterministic=False
                ),
                lambda op: op @ v,
                "hessian",
            )
        )

    try:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product
    except ImportError as err:
        notes.append(f"BackPACK not importable ({err}); its rows are skipped")
    else:

        def forward() -> tuple[Tensor, Tensor]:
            out = model(X)
            return loss_fn(out, y), out

        refs.append(
            Reference(
                "BackPACK GGN·v",
                forward,
                lambda s: fn.flatten(ggn_vector_product_from_plist(s[0], s[1], params, v_list)),
                "ggn",
            )
        )
        refs.append(
            Reference(
                "BackPACK Hessian·v",
                forward,
                lambda s: fn.flatten(hessian_vector_product(s[0], params, v_list)),
                "hessian",
            )
        )

    try:
        import cola
    except ImportError as err:
        notes.append(f"CoLA not importable ({err}); its rows are skipped")
    else:
        # Seed 000's recipe: G = Jᵀ H J with cola.ops.Jacobian and cola.ops.Hessian.
        def cola_build() -> Any:
            p0 = fn.flatten(fn.params).clone()

            def flat_out(p: Tensor) -> Tensor:
                return fn.f(*fn.unflatten(p)).reshape(-1)

            out_shape = fn.f(*fn.params).shape
            J = cola.ops.Jacobian(flat_out, p0)
            H = cola.ops.Hessian(lambda z: loss_fn(z.reshape(out_shape), y), flat_out(p0))
            return J.T @ H @ J

        refs.append(Reference("CoLA GGN·v", cola_build, lambda op: op @ v, "ggn"))
    return refs


# One problem ------------------------------------------------------------------------


@dataclass
class ProblemResult:
    """Everything measured on one problem."""

    problem: Problem
    gradient: Timing
    gradient_memory: MemoryUsage
    ratios: dict[str, Ratio] = field(default_factory=dict)
    # label -> (bytes the operator holds, peak bytes of one product on top of that)
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)

    def memory_ratio(self, key: str) -> float:
        """Footprint of a product (held + product peak) over the gradient's peak."""
        held, peak = self.memory[key]
        return (held + peak) / self.gradient_memory.peak

    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# What each product row multiplies with, and the float64 product it must match.
PRODUCTS: dict[str, tuple[str, str | None]] = {
    "GGN·v": ("GGN", "ggn"),
    "Hessian·v": ("Hessian", "hessian"),
    "MC-Fisher·v": ("Fisher mc", None),  # random: no exact reference
    "EF·v": ("Fisher empirical", "empirical"),
    "exact-Fisher·v": ("Fisher exact", "ggn"),  # = GGN for softmax cross-entropy; not timed
}


def _our_callables(
    problem: Problem,
    impl: Any,
    v: Tensor,
    truth: dict[str, Tensor],
    errors: dict[str, float],
    failures: list[str],
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]]]:
    """Our constructions and products that work, checked against ``truth`` first.

    Returns ``(builds, products)``; what raises is left out and described in ``failures``.
    """
    model, loss_fn, data = problem.model, problem.loss_fn, (problem.X, problem.y)
    n = problem.num_params

    def fisher(kind: str) -> Callable[[], Any]:
        if kind != "mc":
            return lambda: impl.Fisher(model, loss_fn, data, kind=kind)
        gen = torch.Generator().manual_seed(0)
        return lambda: impl.Fisher(model, loss_fn, data, kind="mc", num_samples=1, generator=gen)

    builds: dict[str, Callable[[], Any]] = {
        "GGN": lambda: impl.GGN(model, loss_fn, data),
        "Hessian": lambda: impl.Hessian(model, loss_fn, data),
        "Fisher exact": fisher("exact"),
        "Fisher mc": fisher("mc"),
        "Fisher empirical": fisher("empirical"),
    }
    ops: dict[str, Any] = {}
    for name, build in list(builds.items()):
        try:
            op = build()
            if tuple(op.shape) != (n, n) or op.dtype != v.dtype:
                raise RuntimeError(f"shape {tuple(op.shape)}, dtype {op.dtype}; expected {(n, n)}")
            ops[name] = op
        except Exception as err:
            failures.append(f"{name} on {problem.name}: {type(err).__name__}: {err}")
            del builds[name]
    products: dict[str, Callable[[], Any]] = {}
    for row, (name, matrix) in PRODUCTS.items():
        if name not in ops:
            continue
        op = ops[name]
        try:
            out = op @ v
            if out.shape != v.shape or out.dtype != v.dtype:
                raise RuntimeError(f"returned {tuple(out.shape)}/{out.dtype} for {tuple(v.shape)}")
        except Exception as err:
            failures.append(f"{row} on {problem.name}: {type(err).__name__}: {err}")
            continue
        if matrix is not None:
            errors[row] = _relative_error(out, truth[matrix])
        if row != "exact-Fisher·v":
            products[row] = lambda op=op: op @ v
    if "GGN" in builds:
        products["construct GGN + GGN·v"] = lambda build=builds["GGN"]: build() @ v
    return builds, products


def run_problem(
    problem: Problem,
    impl: Any,
    *,
    with_refs: bool,
    repeats: int,
    warmup: int,
    notes: list[str],
    failures: list[str],
) -> ProblemResult:
    """Time, check and measure the memory of everything on one problem.

    Reference libraries that fail are described in ``notes``, our operators that fail
    in ``failures``.
    """
    start = time.perf_counter()
    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    params = problem.params
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(1234))

    def gradient() -> tuple[Tensor, ...]:
        return torch.autograd.grad(loss_fn(model(X), y), params)

    truth = _truth(problem, v)
    fns: dict[str, Callable[[], Any]] = {"gradient": gradient}
    result_errors: dict[str, float] = {}
    builds: dict[str, Callable[[], Any]] = {}
    products: dict[str, Callable[[], Any]] = {}
    if impl is not None:
        builds, products = _our_callables(problem, impl, v, truth, result_errors, failures)
        fns.update({f"construct {name}": build for name, build in builds.items()})
        fns.update(products)

    refs = _references(problem, v, notes) if with_refs else []
    working = []
    for ref in refs:
        try:
            state = ref.build()
            product = ref.apply(state)
        except Exception as err:  # a reference that cannot run this model is reported
            notes.append(f"{ref.label} fails on {problem.name}: {type(err).__name__}: {err}")
            continue
        working.append(ref)
        result_errors[ref.label] = _relative_error(product, truth[ref.matrix])
        fns[ref.label] = lambda ref=ref, state=state: ref.apply(state)
    refs = working

    timings = time_interleaved(fns, repeats=repeats, warmup=warmup)
    grad_timing = timings.pop("gradient")
    grad_mem, _ = peak_memory(gradient)
    res = ProblemResult(problem, grad_timing, grad_mem, errors=result_errors)
    for key, t in timings.items():
        res.ratios[key] = ratio(t, grad_timing)

    def footprint(label: str, build: Callable[[], Any], apply: Callable[[Any], Any]) -> None:
        built, applied = operator_memory(build, apply)
        res.memory[label] = (built.retained, applied.peak)

    if "GGN·v" in products:
        footprint("GGN·v peak memory", builds["GGN"], lambda op: op @ v)
    for ref in refs:
        if ref.matrix == "ggn":
            footprint(f"{ref.label} peak memory", ref.build, ref.apply)
    res.seconds = time.perf_counter() - start
    return res


# Report -----------------------------------------------------------------------------


def _mark(key: str, problem: str, value: float) -> str:
    target = TARGETS.get(key, {}).get(problem)
    if target is None:
        return ""
    return " ✓" if value <= target else " ✗"


def report(results: list[ProblemResult], prefix: str, ours_rows: bool) -> str:
    """The markdown tables: quantities by problems, then targets, then checks."""
    names = [r.problem.name for r in results]
    header = ["quantity", *[f"{r.problem.name}: {r.problem.description}" for r in results]]
    rows: list[list[str]] = [
        ["parameters", *[f"{r.problem.num_params:,}" for r in results]],
        [
            "gradient, ms (IQR)",
            *[
                f"{r.gradient.median * 1e3:.2f} ({r.gradient.q1 * 1e3:.2f}–"
                f"{r.gradient.q3 * 1e3:.2f})"
                for r in results
            ],
        ],
        ["gradient peak memory", *[format_bytes(r.gradient_memory.peak) for r in results]],
    ]
    keys: list[str] = []
    for r in results:
        keys += [k for k in [*r.ratios, *r.memory] if k not in keys]
    ours = [k for k in keys if k in TARGETS or k in ("MC-Fisher·v", "EF·v")]
    theirs = [k for k in keys if k not in ours]
    for key in ours + theirs:
        cells = []
        for r in results:
            if key in r.ratios:
                cells.append(f"{r.ratios[key]}{_mark(key, r.problem.name, r.ratios[key].median)}")
            elif key in r.memory:
                held, peak = r.memory[key]
                rel = r.memory_ratio(key)
                cells.append(
                    f"{rel:.2f} ({format_bytes(held)} held + {format_bytes(peak)})"
                    f"{_mark(key, r.problem.name, rel)}"
                )
            else:
                cells.append("—")
        label = f"{prefix}{key}" if key in ours else key
        rows.append([f"{label} (× gradient)", *cells])
    out = [markdown_table(header, rows)]
    if not ours_rows:
        out.append("\n(our rows skipped: see the notes)")

    if ours_rows:
        target_rows = []
        for key, per in TARGETS.items():
            cells = []
            for r in results:
                target = per.get(r.problem.name)
                if target is None:
                    cells.append("—")
                    continue
                if key in r.ratios:
                    value = r.ratios[key].median
                elif key in r.memory:
                    value = r.memory_ratio(key)
                else:
                    cells.append(f"≤ {target}: not measured")
                    continue
                cells.append(f"≤ {target}: {value:.2f} {'pass' if value <= target else 'FAIL'}")
            target_rows.append([f"{prefix}{key}", *cells])
        out += ["", "Targets (median ratio to one gradient):", ""]
        out.append(markdown_table(["target", *names], target_rows))

    err_keys: list[str] = []
    for r in results:
        err_keys += [k for k in r.errors if k not in err_keys]
    if err_keys:
        err_rows = []
        for key in err_keys:
            cells = []
            for r in results:
                e = r.errors.get(key)
                cells.append("—" if e is None else f"{e:.1e}{'' if e <= CHECK_RTOL else ' ✗'}")
            err_rows.append([key if key in theirs else f"{prefix}{key}", *cells])
        out += [
            "",
            "Checks: relative error of each float32 product against a float64 torch.func one:",
            "",
        ]
        out.append(markdown_table(["product", *names], err_rows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 if one of ours raised or a product is wrong, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="A,B,C", help="comma-separated, of A,B,C,T")
    parser.add_argument("--repeats", type=int, default=30, help="samples per quantity")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--impl", choices=["secondorder", "standin"], default="secondorder")
    parser.add_argument("--no-refs", action="store_true", help="skip the reference libraries")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY to re-run under (default passive: robust on a shared machine)",
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "inherit":
        argv = sys.argv[1:] if argv is None else argv
        ensure_omp_wait_policy(args.omp_wait_policy, os.path.abspath(__file__), argv)
    if args.repeats < 30:
        print(f"warning: --repeats {args.repeats} < 30; spreads will be rough", file=sys.stderr)
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    for p in problems:
        if p not in PROBLEMS:
            parser.error(f"unknown problem {p!r}; choose from {','.join(PROBLEMS)}")

    set_threads(args.threads)
    check_peak_memory()
    notes: list[str] = []
    failures: list[str] = []
    if args.impl == "standin":
        impl, prefix = STANDIN, "stand-in "
        notes.append("our rows use the torch.func stand-in in operators.py, NOT secondorder")
    else:
        impl, why = _load_ours()
        prefix = ""
        notes.append(why if impl is None else f"ours: {why}")
        if impl is None:
            print(f"note: {why}; our rows are skipped (try --impl standin)", file=sys.stderr)

    results = []
    for name in problems:
        problem_notes: list[str] = []
        res = run_problem(
            make_problem(name),
            impl,
            with_refs=not args.no_refs,
            repeats=args.repeats,
            warmup=args.warmup,
            notes=problem_notes,
            failures=failures,
        )
        notes += [n for n in problem_notes if n not in notes]
        print(f"problem {name}: {res.seconds:.1f} s", file=sys.stderr)
        results.append(res)

    refs = ", ".join(
        f"{d} {_version(d)}"
        for d in ("curvlinops-for-pytorch", "backpack-for-pytorch", "cola-ml")
        if _version(d) != "?" and not args.no_refs
    )
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"python {platform.python_version()}, {args.repeats} samples per quantity; "
        "cells: median (IQR) as multiples of the gradient's median.",
        f"references: {refs or 'none'}",
        *[f"note: {n}" for n in notes],
        *[f"FAILED: {prefix}{f}" for f in failures],
        "",
        report(results, prefix, impl is not None),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    bad = sorted({k for r in results for k, e in r.errors.items() if e > CHECK_RTOL})
    if bad:
        print(f"error: products disagree with torch.func: {bad}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} of our operators or products raised", file=sys.stderr)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
