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


class TinyLM(torch.nn.Module):
    """Embedding (padding 0) -> encoder layer -> head: attention and 1-D K-FAC factors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(13, 4, padding_idx=0)
        self.enc = torch.nn.TransformerEncoderLayer(4, 2, 6, 0.0, batch_first=True)
        self.head = torch.nn.Linear(4, 13)

    def forward(self, x):
        return self.head(self.enc(self.emb(x))).transpose(1, 2)  # (N, V, T)


def lm_problem():
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 13, (8, 3), generator=g)
    X[1, 2] = 0
    return model, torch.nn.CrossEntropyLoss(), X, torch.randint(0, 13, (8, 3), generator=g)


def lm_kfac(data_of, pg=None):
    """{class: dense K-FAC / EKFAC} of the tiny LM, and three optimizer steps' parameters."""
    model, loss_fn, X, y = lm_problem()
    out = {
        cls: getattr(so, cls)(
            model, loss_fn, data_of(X, y), fisher="exact", process_group=pg
        ).to_dense()
        for cls in ("KFAC", "EKFAC")
    }
    opt = so.KFACOptimizer(model, loss_fn, fisher="exact", damping_every=2, process_group=pg)
    for _ in range(3):
        opt.step(*data_of(X, y))
    out["theta"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def lm_kfac_job(rank, world_size):
    def data_of(X, y):
        return shard(X, rank, world_size), shard(y, rank, world_size)

    return lm_kfac(data_of, dist.group.WORLD)


def kfac_optimizer_cholesky_job(rank, world_size):
    """As ``kfac_optimizer_job`` with ``inverse="cholesky"``."""

    def data_of(X, y):
        return shard(X, rank, world_size), shard(y, rank, world_size)

    return kfac_optimizer_run(data_of, dist.group.WORLD, inverse="cholesky")
