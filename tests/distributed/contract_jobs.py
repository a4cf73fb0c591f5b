"""Jobs of test_distributed_contracts.py (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import secondorder as so

DT = torch.float64

CLASSES = {
    "NewtonCG": lambda m, l, **kw: so.NewtonCG(m, l, **kw),
    "GaussNewton": lambda m, l, **kw: so.GaussNewton(m, l, **kw),
    "NaturalGradient": lambda m, l, **kw: so.NaturalGradient(m, l, **kw),
    "HessianFree": lambda m, l, **kw: so.HessianFree(m, l, **kw),
    "BlockDiagonalNewtonCG": lambda m, l, **kw: so.BlockDiagonalNewtonCG(m, l, **kw),
    "DirectionalDampedNewton": lambda m, l, **kw: so.DirectionalDampedNewton(m, l, **kw),
}


def model_for(rank, case):
    """The rank's model: the same everywhere for "same", else rank 1 differs."""
    width = 6 if case == "width" and rank == 1 else 5
    layers = 3 if case == "depth" and rank == 1 else 2
    torch.manual_seed(1 if case == "weights" and rank == 1 else 0)
    mods = [nn.Linear(4, width), nn.Tanh()]
    for _ in range(layers - 2):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, 3))
    return nn.Sequential(*mods).to(DT)


def construct_job(rank, world_size, case):
    """Construct every optimizer on the rank's model; return each one's error (or None)."""
    out = {}
    for name, build in CLASSES.items():
        model = model_for(rank, case)
        try:
            build(model, nn.CrossEntropyLoss(), process_group=dist.group.WORLD)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    # the process group still works after the refusals: every rank got here
    flag = torch.ones(1)
    dist.all_reduce(flag)
    out["alive"] = int(flag.item())
    return out
