r"""so.KFAC / so.EKFAC side by side with curvlinops' KFACLinearOperator / EKFACLinearOperator.

Two tables:

1. Agreement (float64, small models so that dense matrices fit): relative Frobenius difference
   of the dense matrices, and of the dense damped inverses, for an MLP, a CNN and a small
   transformer (hand-written attention from ``nn.Linear`` layers), ``fisher`` exact (curvlinops
   ``"type-2"``) and empirical, ``approx`` expand and reduce. curvlinops is run with
   ``separate_weight_and_bias=False`` (one Kronecker block for ``[W | b]``, as here) and
   ``use_exact_damping=True`` for its inverse; only the parameters of ``nn.Linear`` /
   ``nn.Conv2d`` layers are selected (curvlinops supports no others).
2. Timings (float32, the benchmark problems A, B, C of ``problems.py`` and a larger
   transformer): building the operator (factors, and EKFAC's second pass), one product
   ``K @ v`` and one damped inverse product (both operators' eigendecompositions cached), median
   of interleaved runs, and our inverse product in units of one gradient of the same batch.

Where the definitions differ: the Monte-Carlo variants draw different targets (not compared);
with several loss terms per sample, curvlinops back-propagates the exact loss-Hessian factor of
every row at once (cross terms between the rows of a sample), while so.KFAC keeps one set of
columns per row position; the models here have one loss row per sample, where both agree.
EKFAC with ``approx="reduce"`` on weight-sharing layers differs (1e-3..1e-1) only on layers whose
reduce factors are singular: the eigenbasis of a repeated (zero) eigenvalue is arbitrary, and the
per-sample cotangents :math:`\sum_t g_t a_t^\top` have components there (the averaged inputs span
less than the individual positions), so the corrected eigenvalues depend on the basis chosen by
each library's ``eigh``; every other combination agrees to rounding.

Usage::

    PYTHONPATH=$PWD/src /work/main/.refenv/bin/python benchmarks/kfac_peers.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import secondorder as so
from _harness import ensure_environment, markdown_table, set_threads, time_interleaved
from problems import make_problem


class Attention(nn.Module):
    """One attention block and an MLP from nn.Linear layers; outputs (N, C) from the flattened
    sequence (curvlinops needs 2-D outputs)."""

    def __init__(self, d_in: int, d: int, T: int, C: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d * T, C)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(self.d)
        h = self.ln(h + self.o(torch.softmax(scores, dim=-1) @ self.v(h)))
        h = h + self.f2(torch.tanh(self.f1(h)))
        return self.head(h.flatten(1))


def small_problems(dtype: torch.dtype) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )
    cnn = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(54, 5),
    )
    tr = Attention(4, 8, 6, 5)
    out = {
        "MLP 10-32-32-5": (mlp, torch.randn(64, 10, generator=g)),
        "CNN 2 conv + linear": (cnn, torch.randn(32, 3, 10, 10, generator=g)),
        "transformer d=8 T=6": (tr, torch.randn(32, 6, 4, generator=g)),
    }
    problems = {}
    for name, (model, X) in out.items():
        model = model.to(dtype)
        y = torch.randint(0, 5, (X.shape[0],), generator=g)
        problems[name] = (model, nn.CrossEntropyLoss(), X.to(dtype), y)
    model, X = out["MLP 10-32-32-5"]
    problems["MLP 10-32-32-5, MSE"] = (
        model.to(dtype),
        nn.MSELoss(),
        X.to(dtype),
        torch.randn(64, 5, generator=g, dtype=dtype),
    )
    return problems


def kronecker_params(model: nn.Module) -> list[torch.Tensor]:
    return [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters(recurse=False)
    ]


def peer(model, loss_fn, X, y, params, cls_name, fisher, approx):
    import curvlinops

    cls = getattr(curvlinops, f"{cls_name}LinearOperator")
    fisher_type = {"exact": "type-2", "empirical": "empirical", "mc": "mc"}[fisher]
    op = cls(
        model,
        loss_fn,
        params,
        [(X, y)],
        check_deterministic=False,
        fisher_type=fisher_type,
        kfac_approx=approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    if cls_name == "EKFAC":
        op.compute_eigenvalue_correction()
    return op


def peer_inverse(op, damping):
    from curvlinops import KFACInverseLinearOperator

    return KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)


def ours(model, loss_fn, X, y, params, cls_name, fisher, approx):
    return getattr(so, cls_name)(
        model, loss_fn, (X, y), params=params, fisher=fisher, approx=approx
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def agreement() -> list[list[object]]:
    rows = []
    damping = 1e-3
    for name, (model, loss_fn, X, y) in small_problems(torch.float64).items():
        params = kronecker_params(model)
        n = sum(p.numel() for p in params)
        eye = torch.eye(n, dtype=torch.float64)
        for cls_name in ("KFAC", "EKFAC"):
            for fisher in ("exact", "empirical"):
                for approx in ("expand", "reduce"):
                    if approx == "reduce" and "transformer" not in name and "CNN" not in name:
                        continue  # no weight sharing: reduce == expand
                    K = ours(model, loss_fn, X, y, params, cls_name, fisher, approx)
                    P = peer(model, loss_fn, X, y, params, cls_name, fisher, approx)
                    dense, pdense = K.to_dense(), P @ eye
                    inv, pinv = K.inverse(damping) @ eye, peer_inverse(P, damping) @ eye
                    rows.append(
                        [
                            name,
                            n,
                            cls_name,
                            fisher,
                            approx,
                            K.engine,
                            f"{rel(dense, pdense):.1e}",
                            f"{rel(inv, pinv):.1e}",
                        ]
                    )
                    print(rows[-1], flush=True)
    return rows


def timing_problems() -> dict[str, tuple]:
    out = {}
    for key in ("A", "B", "C"):
        p = make_problem(key)
        out[f"{key}: {p.description}"] = (p.model, p.loss_fn, p.X, p.y)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    tr = Attention(16, 64, 16, 10)
    X = torch.randn(128, 16, 16, generator=g)
    out["transformer d=64 T=16, N=128"] = (
        tr,
        nn.CrossEntropyLoss(),
        X,
        torch.randint(0, 10, (128,), generator=g),
    )
    return out


def timings(repeats: int) -> list[list[object]]:
    rows = []
    damping = 1e-3
    for name, (model, loss_fn, X, y) in timing_problems().items():
        params = kronecker_params(model)
        v = torch.randn(sum(p.numel() for p in params))
        for cls_name in ("KFAC", "EKFAC"):
            args = (model, loss_fn, X, y, params, cls_name, "mc", "expand")
            K, P = ours(*args), peer(*args)
            Ki, Pi = K.inverse(damping), peer_inverse(P, damping)
            Ki @ v, Pi @ v  # eigendecompositions cached by both
            t = time_interleaved(
                {"ours build": lambda a=args: ours(*a), "peer build": lambda a=args: peer(*a)},
                repeats=max(3, repeats // 3),
                warmup=1,
            )
            t.update(
                time_interleaved(
                    {
                        "ours Kv": lambda K=K, v=v: K @ v,
                        "peer Kv": lambda P=P, v=v: P @ v,
                        "ours inv": lambda K=Ki, v=v: K @ v,
                        "peer inv": lambda P=Pi, v=v: P @ v,
                        "gradient": lambda f=loss_fn, m=model, X=X, y=y, p=params: (
                            torch.autograd.grad(f(m(X), y), p)
                        ),
                    },
                    repeats=repeats,
                )
            )
            ms = {k: 1e3 * t[k].median for k in t}
            rows.append(
                [
                    name,
                    cls_name,
                    K.engine,
                    f"{ms['ours build']:.1f}",
                    f"{ms['peer build']:.1f}",
                    f"{ms['ours Kv']:.2f}",
                    f"{ms['peer Kv']:.2f}",
                    f"{ms['ours inv']:.2f}",
                    f"{ms['peer inv']:.2f}",
                    f"{ms['gradient']:.2f}",
                    f"{ms['ours inv'] / ms['gradient']:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    # idle OpenMP threads sleep instead of spinning (shared machine; see _harness)
    ensure_environment(
        {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}, __file__, sys.argv[1:]
    )
    set_threads(2)
    start = time.perf_counter()
    agree = [] if args.skip_agreement else agreement()
    print()
    print(
        markdown_table(
            [
                "problem",
                "n",
                "operator",
                "fisher",
                "approx",
                "our engine",
                "rel diff K",
                "rel diff (K+λI)⁻¹, λ=1e-3",
            ],
            agree,
        )
    )
    if not args.skip_timings:
        rows = timings(args.repeats)
        print()
        print(
            markdown_table(
                [
                    "problem",
                    "operator",
                    "our engine",
                    "build ms (so)",
                    "build ms (curvlinops)",
                    "K v ms (so)",
                    "K v ms (curvlinops)",
                    "inverse v ms (so)",
                    "inverse v ms (curvlinops)",
                    "gradient ms",
                    "our inverse v ÷ gradient",
                ],
                rows,
            )
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s, torch {torch.__version__}, 2 threads")


if __name__ == "__main__":
    main()
