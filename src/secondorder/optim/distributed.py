"""The check that every rank of a process group starts from the same parameters."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_ranks_agree"]


@torch.no_grad()
def check_ranks_agree(params: Sequence[Tensor], group: Any, name: str) -> None:
    """One collective: every rank holds parameters of the same shapes and values.

    Args:
        params: This rank's parameters, in the optimizer's order.
        group: The ``torch.distributed`` process group.
        name: The optimizer's class name, for the message.

    Raises:
        ValueError: On every rank, if the shapes or a checksum of the values differ.
    """
    import torch.distributed as dist

    shapes = [tuple(p.shape) for p in params]
    signature = zlib.crc32(repr(shapes).encode())
    s1 = s2 = scale = 0.0
    for p in params:
        v = p.detach().to(torch.float64)
        s1 += float(v.sum())
        s2 += float((v * v).sum())
        scale += float(v.abs().sum())
    numel = sum(p.numel() for p in params)
    local = torch.tensor([len(shapes), numel, signature, s1, s2, scale], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        local = local.to(torch.device("cuda", torch.cuda.current_device()))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    rows = [g.cpu().tolist() for g in gathered]
    ref = rows[0]
    for rank, row in enumerate(rows[1:], start=1):
        if row[:3] != ref[:3]:
            raise ValueError(
                f"{name}: the ranks of the process group hold different "
                f"parameters: rank {rank} has {int(row[0])} parameter tensors with "
                f"{int(row[1])} entries, rank 0 has {int(ref[0])} with {int(ref[1])}"
                + (" (same counts, other shapes)" if row[:2] == ref[:2] else "")
                + "; build the same model on every rank"
            )
        tol = 1e-10 * max(row[5], ref[5], 1e-300)
        if abs(row[3] - ref[3]) > tol or abs(row[4] - ref[4]) > 1e-10 * max(row[4], ref[4]):
            raise ValueError(
                f"{name}: the ranks of the process group start from different "
                f"parameter values (checksum {row[3]!r} on rank {rank}, {ref[3]!r} on rank "
                "0); seed every rank identically or broadcast rank 0's parameters before "
                "building the optimizer"
            )
