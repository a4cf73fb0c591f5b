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
