"""K-FAC jobs executed on each rank by the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_jobs import problem, shard

import secondorder as so

CASES = [
    (cls, fisher, loss_name, approx)
    for cls in ("KFAC", "EKFAC")
    for fisher, loss_name, approx in (
        ("exact", "ce", "expand"),
        ("empirical", "mse_sum", "reduce"),
        ("exact", "mse", "expand"),
    )
]


def build(cls, fisher, loss_name, approx, data_of, **kw):
    model, loss_fn, X, y = problem(loss_name)
    op = getattr(so, cls)
    return op(model, loss_fn, data_of(X, y), fisher=fisher, approx=approx, **kw)


def kfac_job(rank, world_size):
    """Every case on this rank's shard (two batches each): {case: dense matrix}."""
    out = {}
    for case in CASES:

        def data_of(X, y):
            Xs, ys = shard(X, rank, world_size), shard(y, rank, world_size)
            return [(Xs[:2], ys[:2]), (Xs[2:], ys[2:])]

        op = build(*case, data_of, process_group=dist.group.WORLD)
        out[case] = op.to_dense()
    return out


def kfac_mc_job(rank, world_size):
    """MC K-FAC with a different generator per rank: the all-reduced operator is shared."""
    model, loss_fn, X, y = problem("ce")
    data = (shard(X, rank, world_size), shard(y, rank, world_size))
    gen = torch.Generator().manual_seed(100 + rank)
    op = so.EKFAC(model, loss_fn, data, generator=gen, process_group=dist.group.WORLD)
    v = torch.ones(op.shape[0], dtype=op.dtype)
    return op.to_dense(), op.inverse(1e-2) @ v


def kfac_optimizer_run(data_of, pg=None, fisher="exact", inverse="eigen"):
    """Three KFACOptimizer steps (adaptive damping, momentum) and a preconditioner step."""
    model, loss_fn, X, y = problem("ce")
    opt = so.KFACOptimizer(
        model,
        loss_fn,
        fisher=fisher,
        damping_every=2,
        momentum=0.5,
        process_group=pg,
        inverse=inverse,
    )
    for _ in range(3):
        opt.step(*data_of(X, y))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    pre = so.KFACPreconditioner(model, loss_fn, fisher=fisher, process_group=pg, inverse=inverse)
    Xs, ys = data_of(X, y)
    opt.zero_grad()  # the optimizer left the batch gradient in .grad
    loss = loss_fn(model(Xs), ys) * (len(Xs) / len(X))  # this rank's share of the mean
    loss.backward()
    for p in model.parameters():
        if pg is not None:
            dist.all_reduce(p.grad, group=pg)
    pre.step(Xs, ys)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return theta, grad


def kfac_optimizer_job(rank, world_size):
    """The optimizer on this rank's shard: (parameters after 3 steps, preconditioned grad)."""

    def data_of(X, y):
        return shard(X, rank, world_size), shard(y, rank, world_size)

    return kfac_optimizer_run(data_of, dist.group.WORLD)


def kfac_optimizer_cholesky_job(rank, world_size):
    """As ``kfac_optimizer_job`` with ``inverse="cholesky"``."""

    def data_of(X, y):
        return shard(X, rank, world_size), shard(y, rank, world_size)

    return kfac_optimizer_run(data_of, dist.group.WORLD, inverse="cholesky")
