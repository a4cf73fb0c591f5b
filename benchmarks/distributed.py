"""Data-parallel Gauss-Newton: step time and communication with 1 and 2 processes.

One Gauss-Newton step (``so.GaussNewton``, exactly 20 CG iterations: ``cg_rtol=0``,
``cg_maxiter=20``) on problem C of ``problems.py`` (MLP 784-512-512-10, N=256, 669,706
float32 parameters), run by 1 process on the whole batch and by 2 gloo processes on 128
samples each (``process_group=``), every process with 1 torch thread. For each world size it
reports

- the step time: per step the slowest rank's time (steps start together after a barrier),
  median and interquartile range over ``--steps`` steps after ``--warmup`` steps; the
  parameters are restored after every step, so each step does the same work;
- the all-reduce time inside a step, measured by wrapping ``torch.distributed.all_reduce``
  (it includes waiting for the other rank, so it is communication *plus* imbalance), and its
  share of the step time;
- the same share estimated from the wire alone: the number of parameter-sized all-reduces
  in a step times the median of an isolated parameter-sized all-reduce (both ranks ready);
- the all-reduces per step and their payload (the reduced buffer's size; a ring all-reduce
  sends about twice that per rank), and the bytes per CG iteration, i.e. the payload of the
  all-reduces issued inside curvature products divided by the CG iterations, against the
  floor of one parameter-sized all-reduce (4 bytes per float32 parameter).

``--ddp`` adds a row with the model wrapped in ``DistributedDataParallel`` (see
``docs/distributed.md``: it works, but hides the ``nn.Sequential`` from the fast
linearisation engine).

Usage::

    .venv/bin/python benchmarks/distributed.py --markdown dist.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import secondorder as so
from _harness import ensure_omp_wait_policy, format_bytes, markdown_table
from problems import make_problem

CG_ITERATIONS = 20


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


class AllReduceMeter:
    """Wraps ``torch.distributed.all_reduce``: counts calls, payload bytes and wall time."""

    def __init__(self) -> None:
        self.original = dist.all_reduce
        self.in_product = False
        self._patched: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self.product_calls = 0
        self.product_bytes = 0

    def __enter__(self) -> AllReduceMeter:
        meter = self

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = meter.original(tensor, *args, **kwargs)
            meter.seconds += time.perf_counter() - start
            size = tensor.numel() * tensor.element_size()
            meter.calls += 1
            meter.bytes += size
            if meter.in_product:
                meter.product_calls += 1
                meter.product_bytes += size
            return out

        # every all-reduce issued while a curvature product runs belongs to the product
        for name in ("_accumulate", "_accumulate_flat", "_matvec", "_matmat"):
            method = so.CurvatureOperator.__dict__.get(name)
            if method is None:
                continue
            self._patched[name] = method

            def in_product(op: Any, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
                outer = meter.in_product
                meter.in_product = True
                try:
                    return _method(op, *args, **kwargs)
                finally:
                    meter.in_product = outer

            setattr(so.CurvatureOperator, name, in_product)
        dist.all_reduce = all_reduce  # the library calls torch.distributed.all_reduce
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self.original
        for name, method in self._patched.items():
            setattr(so.CurvatureOperator, name, method)


def _worker(rank: int, world: int, store: str, out_dir: str, cfg: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    distributed = world > 1 and not cfg.get("independent", False)
    if distributed:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg["timeout"]),
        )
    try:
        result = _measure(rank, world, cfg)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown (see experiments/distributed.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _measure(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    problem = make_problem("C")
    model: nn.Module = problem.model
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    parts = cfg.get("split", world)  # "split": one process on 1/split of the batch
    xs = problem.X.tensor_split(parts)[rank]
    ys = problem.y.tensor_split(parts)[rank]
    group = dist.group.WORLD if world > 1 and not cfg.get("independent", False) else None
    wrapped: nn.Module = model
    if cfg["ddp"]:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = so.GaussNewton(
        wrapped,
        problem.loss_fn,
        lr=1.0,
        damping=1e-3,
        cg_maxiter=CG_ITERATIONS,
        cg_rtol=0.0,
        process_group=group,
        adapt_damping=False,
    )
    theta0 = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, t in zip(params, theta0):
                p.copy_(t)

    steps, comm, calls, payload, product_bytes, cg_iters = [], [], [], [], [], []
    with AllReduceMeter() as meter:
        for i in range(cfg["warmup"] + cfg["steps"]):
            if group is not None:
                meter.original(torch.zeros(1), group=group)  # start together
            meter.reset()
            start = time.perf_counter()
            opt.step(xs, ys)
            elapsed = time.perf_counter() - start
            restore()
            iters = opt.diagnostics["cg_iterations"]
            if iters != CG_ITERATIONS:
                raise RuntimeError(f"CG ran {iters} iterations, expected {CG_ITERATIONS}")
            if i < cfg["warmup"]:
                continue
            steps.append(elapsed)
            comm.append(meter.seconds)
            calls.append(meter.calls)
            payload.append(meter.bytes)
            product_bytes.append(meter.product_bytes)
            cg_iters.append(iters)
    isolated: list[float] = []
    if group is not None:  # one parameter-sized all-reduce with both ranks ready
        buf = torch.zeros(n)
        for _ in range(cfg["steps"]):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buf, group=group)
            isolated.append(time.perf_counter() - start)
    return {
        "rank": rank,
        "num_params": n,
        "local_batch": len(ys),
        "step_s": steps,
        "allreduce_s": comm,
        "allreduce_calls": calls,
        "allreduce_bytes": payload,
        "product_bytes": product_bytes,
        "cg_iterations": cg_iters,
        "isolated_allreduce_s": isolated,
        "engine": "autograd" if cfg["ddp"] else "auto",
    }


def run_world(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the measurement on ``world`` processes and return every rank's record."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(world, os.path.join(tmp, "store"), tmp, cfg),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + cfg["timeout"] * 4
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} process(es) did not finish")
        records = []
        for rank in range(world):
            with open(os.path.join(tmp, f"{rank}.json")) as f:
                records.append(json.load(f))
        return records


def summarize(label: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the ranks' records into one table row."""
    world = len(records)
    n = records[0]["num_params"]
    step_max = [max(r["step_s"][i] for r in records) for i in range(len(records[0]["step_s"]))]
    q1, med, q3 = _quantiles(step_max)
    shares = [
        statistics.median([c / s for c, s in zip(r["allreduce_s"], r["step_s"])]) for r in records
    ]
    comm_med = statistics.mean(statistics.median(r["allreduce_s"]) for r in records)
    compute = statistics.mean(
        statistics.median([s - c for s, c in zip(r["step_s"], r["allreduce_s"])]) for r in records
    )
    calls = records[0]["allreduce_calls"][0]
    payload = records[0]["allreduce_bytes"][0]
    per_iter = records[0]["product_bytes"][0] / records[0]["cg_iterations"][0]
    floor = 4 * n
    communicates = calls > 0
    isolated = (
        statistics.median(x for r in records for x in r["isolated_allreduce_s"])
        if communicates
        else 0.0
    )
    wire_share = (CG_ITERATIONS + 1) * isolated / med
    return {
        "label": label,
        "world": world,
        "communicates": communicates,
        "local_batch": ", ".join(str(r["local_batch"]) for r in records),
        "step_median_s": med,
        "step_iqr_s": (q1, q3),
        "allreduce_s": comm_med,
        "compute_s": compute,
        "share": statistics.mean(shares),
        "share_per_rank": shares,
        "isolated_s": isolated,
        "wire_share": wire_share,
        "calls": calls,
        "payload": payload,
        "bytes_per_cg_iteration": per_iter,
        "floor": floor,
    }


def _pool(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate the per-step lists of several runs, rank by rank."""
    pooled = []
    for rank_records in zip(*runs):
        merged = dict(rank_records[0])
        for key, value in merged.items():
            if isinstance(value, list):
                merged[key] = [x for rec in rank_records for x in rec[key]]
        pooled.append(merged)
    return pooled


def report(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """The markdown report."""
    base = rows[0]["step_median_s"]
    header = [
        "processes",
        "samples / rank",
        "GN step (20 CG), median [IQR]",
        "speed-up",
        "compute / rank",
        "all-reduce / step",
        "comm. share",
        "wire-only share",
        "all-reduces / step",
        "payload / step",
        "bytes / CG iteration (floor)",
    ]
    table = []
    for r in rows:
        q1, q3 = r["step_iqr_s"]
        dist_row = r["communicates"]
        table.append(
            [
                r["label"],
                r["local_batch"],
                f"{r['step_median_s'] * 1e3:.0f} ms [{q1 * 1e3:.0f}–{q3 * 1e3:.0f}]",
                f"{base / r['step_median_s']:.2f}×",
                f"{r['compute_s'] * 1e3:.0f} ms",
                f"{r['allreduce_s'] * 1e3:.1f} ms" if dist_row else "–",
                f"{100 * r['share']:.1f} %" if dist_row else "–",
                f"{100 * r['wire_share']:.1f} %" if dist_row else "–",
                r["calls"] if dist_row else 0,
                format_bytes(r["payload"]) if dist_row else "–",
                (
                    f"{format_bytes(r['bytes_per_cg_iteration'])} "
                    f"({r['bytes_per_cg_iteration'] / r['floor']:.3f}× "
                    f"of {format_bytes(r['floor'])})"
                    if dist_row
                    else "–"
                ),
            ]
        )
    iso = [r for r in rows if r["communicates"]]
    lines = [
        "## Data-parallel Gauss-Newton step (problem C)",
        "",
        f"Problem C (MLP 784-512-512-10 ReLU, N=256, {rows[0]['floor'] // 4:,} float32 "
        f"parameters), `so.GaussNewton` with exactly {CG_ITERATIONS} CG iterations "
        "(`cg_rtol=0`), gloo on localhost, 1 torch thread per process; "
        f"{cfg['rounds']} interleaved runs per row of {cfg['steps']} timed steps after "
        f"{cfg['warmup']} warm-up steps, pooled. "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average before the run {cfg['load']:.2f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        "",
        markdown_table(header, table),
        "",
        "- *GN step*: per step the slowest rank's wall time; median and interquartile range. "
        "The half-batch row is one process on 128 samples, without a process group: the "
        "compute each of the 2 processes does, i.e. the 2-process step without communication. "
        "The independent row runs two such processes at the same time, without a process "
        "group: what running two processes at once costs on this machine.",
        "- *compute / rank*: step time minus the time inside all-reduces (median over steps, "
        "mean over ranks).",
        "- *all-reduce / step*, *comm. share*: wall time inside `torch.distributed.all_reduce` "
        "during a step (mean over ranks of the median), and its share of the rank's step time; "
        "it includes waiting for the other rank.",
        "- *wire-only share*: (CG iterations + 1) parameter-sized all-reduces × the median "
        "isolated parameter-sized all-reduce with both ranks ready"
        + (" (" + ", ".join(f"{r['isolated_s'] * 1e3:.2f} ms" for r in iso) + ")" if iso else "")
        + ", over the step time.",
        "- *payload*: the size of the reduced buffers (a ring all-reduce moves about twice "
        "that per rank); *bytes / CG iteration*: payload of the all-reduces inside curvature "
        "products per CG iteration, against the floor of one parameter-sized all-reduce.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps (>= 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved runs per configuration, pooled"
    )
    parser.add_argument("--ddp", action="store_true", help="add a DDP-wrapped 2-process row")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    parser.add_argument("--markdown", default=None, help="also write the report to this file")
    parser.add_argument(
        "--omp-wait-policy", default="passive", choices=("passive", "active", "inherit")
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "inherit":
        ensure_omp_wait_policy(args.omp_wait_policy, __file__, sys.argv[1:])
    if args.steps < 10:
        print(f"warning: --steps {args.steps} < 10: medians will be noisy", file=sys.stderr)
    cfg = {
        "steps": args.steps,
        "warmup": args.warmup,
        "timeout": args.timeout,
        "ddp": False,
        "rounds": args.rounds,
        "load": os.getloadavg()[0],
    }
    configs: list[tuple[str, int, dict[str, Any]]] = [
        ("1", 1, {}),
        ("1, half batch (reference)", 1, {"split": 2}),
        ("2 independent, no communication (reference)", 2, {"independent": True}),
        ("2", 2, {}),
    ]
    if args.ddp:
        configs.append(("2, DDP-wrapped", 2, {"ddp": True}))
    pooled: dict[str, list[list[dict[str, Any]]]] = {label: [] for label, _, _ in configs}
    for round_ in range(args.rounds):  # interleaved, so that machine load hits all alike
        for label, world, extra in configs:
            records = run_world(world, {**cfg, **extra})
            pooled[label].append(records)
            steps = [max(v) for v in zip(*(r["step_s"] for r in records))]
            print(
                f"round {round_ + 1}: {label} process(es): median step "
                f"{statistics.median(steps) * 1e3:.0f} ms",
                file=sys.stderr,
            )
    rows = [summarize(label, _pool(pooled[label])) for label, _, _ in configs]
    text = report(rows, cfg)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
