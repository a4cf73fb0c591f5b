"""Jobs executed on each rank by the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import secondorder as so

DT = torch.float64
N = 11  # not divisible by 2 or 3: uneven shards


def problem(loss_name="ce"):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(N, 4, generator=g, dtype=DT)
    if loss_name == "ce":
        y = torch.randint(0, 3, (N,), generator=g)
        loss_fn = nn.CrossEntropyLoss()
    else:
        y = torch.randn(N, 3, generator=g, dtype=DT)
        loss_fn = nn.MSELoss(reduction=loss_name.split("_")[1] if "_" in loss_name else "mean")
    return model, loss_fn, X, y


def shard(tensor, rank, world_size):
    return tensor.tensor_split(world_size)[rank]


OPERATORS = {
    "ggn": lambda m, l, d, **kw: so.GGN(m, l, d, **kw),
    "hessian": lambda m, l, d, **kw: so.Hessian(m, l, d, **kw),
    "fisher": lambda m, l, d, **kw: so.Fisher(m, l, d, **kw),
    "fisher_empirical": lambda m, l, d, **kw: so.Fisher(m, l, d, kind="empirical", **kw),
}


OPERATOR_CASES = [
    ("ggn", "ce"),
    ("hessian", "ce"),
    ("fisher", "ce"),
    ("fisher_empirical", "ce"),
    ("ggn", "mse_sum"),
]


def operator_job(rank, world_size):
    """Every operator case on this rank's shard: {(op, loss): (dense, gradient, loss)}."""
    out = {}
    for op_name, loss_name in OPERATOR_CASES:
        model, loss_fn, X, y = problem(loss_name)
        data = (shard(X, rank, world_size), shard(y, rank, world_size))
        op = OPERATORS[op_name](model, loss_fn, data, process_group=dist.group.WORLD)
        out[op_name, loss_name] = (op.to_dense(), op.gradient(), op.loss)
    return out


def mc_job(rank, world_size):
    model, loss_fn, X, y = problem("ce")
    data = (shard(X, rank, world_size), shard(y, rank, world_size))
    gen = torch.Generator().manual_seed(100 + rank)
    op = so.Fisher(model, loss_fn, data, kind="mc", generator=gen, process_group=dist.group.WORLD)
    return op.to_dense()


# CG solved to convergence: the steps are then well-defined functions of the data, and the
# comparison measures the data-parallel reduction, not CG's sensitivity to rounding.
CG = dict(cg_rtol=1e-10, cg_maxiter=200)
OPTIMIZERS = {
    "gauss_newton": lambda m, l, **kw: so.GaussNewton(m, l, lr=0.5, damping=0.1, **CG, **kw),
    "newton_cg_hessian": lambda m, l, **kw: so.NewtonCG(
        m, l, lr=0.5, damping=1.0, curvature="hessian", **CG, **kw
    ),
    "natural_gradient": lambda m, l, **kw: so.NaturalGradient(
        m, l, lr=0.5, damping=0.1, **CG, **kw
    ),
    "natural_gradient_empirical": lambda m, l, **kw: so.NaturalGradient(
        m, l, lr=0.5, damping=0.1, fisher="empirical", **CG, **kw
    ),
    "block_newton_ggn": lambda m, l, **kw: so.BlockDiagonalNewtonCG(
        m, l, lr=0.5, damping=0.1, curvature="ggn", cg_rtol=1e-10, cg_atol=0.0, cg_maxiter=100, **kw
    ),
    "directional": lambda m, l, **kw: so.DirectionalDampedNewton(m, l, lr=0.5, **kw),
    "block_newton_pch": lambda m, l, **kw: so.BlockDiagonalNewtonCG(
        m,
        l,
        lr=0.5,
        damping=0.1,
        curvature="pch_abs",
        cg_rtol=1e-10,
        cg_atol=0.0,
        cg_maxiter=100,
        **kw,
    ),
}


def all_optimizers_job(rank, world_size, steps):
    return {name: optimizer_job(rank, world_size, name, steps) for name in OPTIMIZERS}


def optimizer_job(rank, world_size, opt_name, steps):
    model, loss_fn, X, y = problem("ce")
    pg = dist.group.WORLD if world_size > 1 else None
    opt = OPTIMIZERS[opt_name](model, loss_fn, process_group=pg)
    losses = []
    for _ in range(steps):
        losses.append(float(opt.step(shard(X, rank, world_size), shard(y, rank, world_size))))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), losses


def checkpoint_job(rank, world_size, path, save_after, total):
    """Run `save_after` steps, rank 0 saves; or, with save_after=None, load and continue."""
    model, loss_fn, X, y = problem("ce")
    pg = dist.group.WORLD
    opt = OPTIMIZERS["gauss_newton"](model, loss_fn, process_group=pg)
    if save_after is not None:
        for _ in range(save_after):
            opt.step(shard(X, rank, world_size), shard(y, rank, world_size))
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        return None
    ckpt = torch.load(path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for _ in range(total):
        opt.step(shard(X, rank, world_size), shard(y, rank, world_size))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def failing_job(rank, world_size):
    model, loss_fn, X, y = problem("ce")
    opt = OPTIMIZERS["gauss_newton"](model, loss_fn, process_group=dist.group.WORLD)
    opt.step(shard(X, rank, world_size), shard(y, rank, world_size))
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    opt.step(shard(X, rank, world_size), shard(y, rank, world_size))
    return "finished"
