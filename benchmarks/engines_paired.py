"""Two engines of ``GGN`` on the Sequential problems A, B, C, paired: ratios to one gradient.

Per problem, one interleaved run (``_harness.time_interleaved``, 2 threads) times one gradient,
one GGN·v per engine with the operator built beforehand ("per product") and building the operator
plus one product per engine ("build + 1"); the memory of a GGN·v (what the operator holds plus
the product's peak) is reported over a gradient's peak. Every engine's product is checked against
the first engine's before anything is timed. The last two columns are the per-product time of
each engine over the first engine's: the median of the paired per-round ratios, and the ratio
of the fastest samples (the least disturbed by other load on a shared machine).

Usage::

    .venv/bin/python benchmarks/engines_paired.py [--engines graph,autograd] [--problems A,B,C]

(It measured the graph engine against the former hand-written Sequential engine on A, B and C
before ``engine="sequential"`` became an alias of ``"graph"``; the table is in the commit that
routed ``nn.Sequential`` through the graph engine.)
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

import secondorder as so
from _harness import (
    markdown_table,
    operator_memory,
    peak_memory,
    ratio,
    set_threads,
    time_interleaved,
)
from problems import make_problem


def measure(name: str, engines: list[str], repeats: int) -> list[list[Any]]:
    """Rows of the table for problem ``name``: every engine in one interleaved run."""
    p = make_problem(name)
    model, loss_fn, data = p.model, p.loss_fn, (p.X, p.y)
    params = p.params
    v = torch.randn(p.num_params, generator=torch.Generator().manual_seed(1))

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(p.X), p.y), params)

    fns: dict[str, Callable[[], Any]] = {"gradient": gradient}
    ops = {e: so.GGN(model, loss_fn, data, engine=e) for e in engines}
    want = ops[engines[0]] @ v
    paths, memory = {}, {}
    grad_peak = peak_memory(gradient)[0].peak
    for e, op in ops.items():
        err = float(((op @ v) - want).norm() / want.norm())
        assert err < 1e-4, f"{name}: engine {e} differs from {engines[0]} by {err:.1e}"
        paths[e] = op.engine_info[0].path
        fns[f"product {e}"] = lambda op=op: op @ v
        fns[f"build+1 {e}"] = lambda e=e: so.GGN(model, loss_fn, data, engine=e) @ v
        built, applied = operator_memory(
            lambda e=e: so.GGN(model, loss_fn, data, engine=e), lambda op: op @ v
        )
        memory[e] = (built.retained + applied.peak) / grad_peak
    t = time_interleaved(fns, repeats=repeats, warmup=3)
    g = t["gradient"]
    base = t[f"product {engines[0]}"].samples
    rows = []
    for e in engines:
        paired = statistics.median(a / b for a, b in zip(t[f"product {e}"].samples, base))
        fastest = t[f"product {e}"].min / min(base)
        rows.append(
            [
                name,
                e,
                paths[e],
                f"{g.median * 1e3:.2f}",
                str(ratio(t[f"product {e}"], g)),
                str(ratio(t[f"build+1 {e}"], g)),
                f"{memory[e]:.2f}",
                f"{paired:.3f}",
                f"{fastest:.3f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="graph,autograd")
    parser.add_argument("--problems", default="A,B,C")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    set_threads(2)
    engines = args.engines.split(",")
    rows = [r for name in args.problems.split(",") for r in measure(name, engines, args.repeats)]
    header = ["problem", "engine", "path", "gradient ms", "GGN·v", "build + 1", "memory"]
    extra = [f"GGN·v / {engines[0]} (paired)", "(fastest)"]
    print(markdown_table([*header, *extra], rows))


if __name__ == "__main__":
    main()
