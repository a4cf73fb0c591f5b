"""Rank jobs of the data-parallel HessianFree tests (importable by spawned processes).

Every job also runs with ``world_size=1`` and no process group: the single-process reference
on the full batch, computed by the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from secondorder.curvature.diagonal import (
    empirical_fisher_diagonal,
    ggn_diagonal,
    per_sample_gradient_diagonal,
)
from secondorder.optim.hessian_free import HessianFree

DT = torch.float64
N = 11  # not divisible by 2 or 3: uneven shards
STEPS = 4


def problem(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def shard(tensor, rank, world_size):
    return tensor.tensor_split(world_size)[rank]


def _group(world_size):
    return dist.group.WORLD if world_size > 1 else None


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _record(opt, model, loss):
    d = opt.diagnostics
    keys = ("cg_iterations", "chosen_iterate", "alpha", "damping", "accepted", "cg_status")
    keys += ("cg_negative_directions", "loss_evaluations")
    return {"params": _flat(model), "loss": float(loss), **{k: d.get(k) for k in keys}}


def step_run(rank, world_size, **kw):
    """``STEPS`` calls of ``step`` on this rank's shard of one batch."""
    model, loss_fn, X, y = problem()
    opt = HessianFree(model, loss_fn, process_group=_group(world_size), **kw)
    xs, ys = shard(X, rank, world_size), shard(y, rank, world_size)
    return [_record(opt, model, opt.step(xs, ys)) for _ in range(STEPS)]


def acc_step_run(rank, world_size):
    """``acc_step`` with different loss, gradient and curvature data, each in several batches.

    The three overlap (all from one pool per step), so that the steps descend on the loss data.
    """
    model, loss_fn, _, _ = problem()
    opt = HessianFree(model, loss_fn, process_group=_group(world_size))
    out = []
    for i in range(STEPS - 1):
        _, _, X, y = problem(10 + i, 17)
        data = {}
        for name, (part, pieces) in {
            "loss": (slice(0, 17), 2),
            "grad": (slice(0, 13), 1),
            "curv": (slice(8, 17), 2),
        }.items():
            Xs, ys = shard(X[part], rank, world_size), shard(y[part], rank, world_size)
            data[name] = list(zip(Xs.tensor_split(pieces), ys.tensor_split(pieces)))
        out.append(_record(opt, model, opt.acc_step(data["loss"], data["grad"], data["curv"])))
    return out


def _sum_of_squares(output, target):
    """A loss without a likelihood (a plain callable): per_sample_gradient_diagonal's case."""
    return ((output - target) ** 2).sum() / output.shape[0]


def diagonal_run(rank, world_size):
    model, loss_fn, X, y = problem()
    pg = _group(world_size)
    data = [(shard(X, rank, world_size), shard(y, rank, world_size))]
    targets = torch.nn.functional.one_hot(shard(y, rank, world_size), 3).to(DT)
    return {
        "ggn": ggn_diagonal(model, loss_fn, data, process_group=pg),
        "empirical_fisher": empirical_fisher_diagonal(model, loss_fn, data, process_group=pg),
        "per_sample": per_sample_gradient_diagonal(
            model, _sum_of_squares, (data[0][0], targets), process_group=pg
        ),
    }


def all_job(rank, world_size):
    """Every case in one launch of the world (process start-up dominates the test time)."""
    return {
        "step": step_run(rank, world_size),
        "step_no_warm_start": step_run(rank, world_size, cg_decay_x0=0.0),
        # small damping: CG passes directions of negative curvature in every step
        "hessian_continue": step_run(
            rank, world_size, curvature="hessian", negative_curvature="continue", damping=0.01
        ),
        "acc_step": acc_step_run(rank, world_size),
        "diagonals": diagonal_run(rank, world_size),
    }
