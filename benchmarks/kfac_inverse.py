"""K-FAC's damped inverse applied to a vector, in gradients: eigen, factored explicit, the floor.

Issue 17's target: ``so.KFAC(...).inverse(damping) @ v`` in at most 0.3 gradients of the same
batch on problem C (MLP 784-512-512-10 ReLU, N = 256). Also the seed-002 MLP of
``training.py`` (784-128-10, N = 128), where the optimizer's per-step target needs the
preconditioner's application alone to cost well under 0.3 AdamW steps.

Timed, interleaved (``_harness.time_interleaved``), 1 thread, medians:

- ``gradient``: ``torch.autograd.grad`` of the loss on the batch (the unit);
- ``eigen``: ``K.inverse(damping) @ v`` (the exact damped inverse, eigendecompositions cached:
  four matrix products per layer);
- ``cholesky``: ``K.inverse(damping, method="cholesky") @ v`` (factored Tikhonov damping,
  explicit inverses cached: two products per layer);
- ``floor``: just the two products ``Gi @ V @ Ai`` per layer on prepared matrices (no gather,
  no scatter, no dtype handling);
- per inversion: every factor's ``eigh`` against its damped Cholesky inverse.

The floor in flops: a layer ``(out, d~)`` costs ``2 out d~ (out + d~)`` against the gradient's
``2 N out d~`` per pass (forward, weight gradient, and the input gradient except at the first
layer), so the ratio is about ``(out + d~) / (3 N)``: below 0.3 only for batches
``N >= (out + d~) / 0.9``.

Usage::

    .venv/bin/python benchmarks/kfac_inverse.py [--repeats 15] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import secondorder as so
from _harness import ensure_environment, markdown_table, set_threads, time_interleaved
from problems import make_problem
from secondorder.curvature.kron_inverse import damped_inverse, factored_damping
from secondorder.experiments.models import mnist_mlp


def cases() -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]]:
    """Problem C and the seed-002 MLP shapes (random inputs: only the shapes matter here)."""
    p = make_problem("C")
    g = torch.Generator().manual_seed(0)
    mlp = mnist_mlp(seed=0)
    X, y = torch.rand(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    return {
        "C (784-512-512-10, N=256)": (p.model, p.loss_fn, p.X, p.y),
        "seed-002 MLP (784-128-10, N=128)": (mlp, nn.CrossEntropyLoss(), X, y),
    }


def flops(K: so.KFAC, n: int) -> tuple[float, float]:
    """(floor flops of the two products per layer, flops of one gradient's matmuls)."""
    floor = grad = 0.0
    for k, b in enumerate(sorted(K.blocks.values(), key=lambda b: b.weight or 0)):
        out, d = b.G.shape[0], b.A.shape[0]
        floor += 2.0 * out * d * (out + d)
        grad += 2.0 * n * out * d * (2 if k == 0 else 3)
    return floor, grad


def run(repeats: int, damping: float) -> list[list[object]]:
    """Rows: case, item, ms, ÷ gradient, flops ÷ gradient flops."""
    rows: list[list[object]] = []
    for name, (model, loss_fn, X, y) in cases().items():
        params = [p for p in model.parameters() if p.requires_grad]
        K = so.KFAC(model, loss_fn, (X, y))
        v = torch.randn(K.shape[0])
        eig, chol = K.inverse(damping), K.inverse(damping, method="cholesky")
        eig @ v, chol @ v  # decompositions and inverses cached
        mats = []
        for b in K.blocks.values():
            dg, da = factored_damping(b.A, b.G, damping)
            gi, ai = damped_inverse(b.G, dg)[0], damped_inverse(b.A, da)[0]
            mats.append((gi, torch.randn(b.G.shape[0], b.A.shape[0]), ai))

        def floor(mats: list = mats) -> None:
            for gi, V, ai in mats:
                gi @ V @ ai

        def eighs(K: so.KFAC = K) -> None:
            for b in K.blocks.values():
                torch.linalg.eigh(b.G), torch.linalg.eigh(b.A)

        def inverses(K: so.KFAC = K) -> None:
            K._factored_inverses(damping)

        t = time_interleaved(
            {
                "gradient": lambda f=loss_fn, m=model, X=X, y=y, p=params: torch.autograd.grad(
                    f(m(X), y), p
                ),
                "eigen inverse @ v": lambda e=eig, v=v: e @ v,
                "cholesky inverse @ v": lambda c=chol, v=v: c @ v,
                "floor: Gi @ V @ Ai": floor,
                "per inversion: eigh of every factor": eighs,
                "per inversion: damped Cholesky inverses": inverses,
            },
            repeats=repeats,
        )
        f_floor, f_grad = flops(K, X.shape[0])
        ref = t["gradient"].median
        for item, timing in t.items():
            fl = {"floor: Gi @ V @ Ai": f"{f_floor / f_grad:.2f}", "gradient": "1.00"}
            q1, q3 = timing.q1 / ref, timing.q3 / ref
            rows.append(
                [
                    name,
                    item,
                    f"{timing.median * 1e3:.2f}",
                    f"{timing.median / ref:.2f} ({q1:.2f}–{q3:.2f})",
                    fl.get(item, ""),
                ]
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    """Run and print the table (optionally to a markdown file)."""
    ensure_environment(
        {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, sys.argv[0], sys.argv[1:]
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    set_threads(1)
    rows = run(args.repeats, args.damping)
    header = ["case", "item", "ms", "÷ gradient (IQR)", "flops ÷ gradient's"]
    text = f"torch {torch.__version__}, 1 thread\n\n" + markdown_table(header, rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
