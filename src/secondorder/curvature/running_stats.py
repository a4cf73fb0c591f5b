r"""Running statistics of normalisation layers, kept out of the passes a computation adds.

A BatchNorm (or InstanceNorm with ``track_running_stats=True``) layer in training mode updates
its buffers on every forward call,

.. math::
    \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_{\mathrm{batch}}, \qquad
    \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\sigma^2_{\mathrm{batch}}, \qquad
    t \leftarrow t + 1,

(``running_mean``, ``running_var``, ``num_batches_tracked``). A curvature computation calls the
model many times per training step, some calls at perturbed parameters (trial points of a line
search), so the buffers would move several times per step and partly towards statistics of
parameters that were never taken. The tools here snapshot and restore those buffers:

- :func:`running_stat_modules` lists the layers whose forward updates running statistics;
- :func:`snapshot_running_stats` / :func:`restore_running_stats` copy them out and back in;
- :func:`frozen_running_stats` is a context manager: every forward inside it leaves them as
  they were on entry.

A training step that should update the statistics exactly as one plain forward pass at its
starting parameters would (as one step of a first-order optimizer does) runs that pass once, takes
a snapshot, runs its computation, and restores the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "RunningStats",
    "frozen_running_stats",
    "restore_running_stats",
    "running_stat_modules",
    "snapshot_running_stats",
]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

RunningStats = list[tuple[nn.Module, dict[str, Tensor]]]
"""A snapshot: each layer with copies of its running-statistics buffers."""


def running_stat_modules(model: nn.Module, *, training_only: bool = True) -> list[nn.Module]:
    """The normalisation layers of ``model`` that keep running statistics.

    Args:
        model: Any module.
        training_only: List only layers in training mode (those whose forward updates them).

    Returns:
        The layers (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats=True``
        and their subclasses), in ``model.modules()`` order.
    """
    return [
        m
        for m in model.modules()
        if isinstance(m, _NormBase)
        and m.track_running_stats
        and getattr(m, "running_mean", None) is not None
        and (m.training or not training_only)
    ]


def snapshot_running_stats(modules: list[nn.Module]) -> RunningStats:
    """Copy the running-statistics buffers of ``modules``.

    Args:
        modules: Layers from :func:`running_stat_modules`.

    Returns:
        The snapshot, for :func:`restore_running_stats`.
    """
    out: RunningStats = []
    for m in modules:
        saved = {}
        for name in _BUFFERS:
            buf = getattr(m, name, None)
            if isinstance(buf, Tensor):
                saved[name] = buf.detach().clone()
        out.append((m, saved))
    return out


@torch.no_grad()
def restore_running_stats(snapshot: RunningStats) -> None:
    """Write a snapshot back into its layers' buffers, in place.

    Args:
        snapshot: From :func:`snapshot_running_stats`.
    """
    for m, saved in snapshot:
        for name, value in saved.items():
            buf = getattr(m, name, None)
            if isinstance(buf, Tensor) and buf.shape == value.shape:
                buf.copy_(value)
            else:  # replaced by the forward (e.g. a re-registered buffer): put ours back
                setattr(m, name, value.clone())


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[RunningStats]:
    """Every forward pass inside leaves the running statistics of ``model`` as on entry.

    The buffers of the layers in training mode are copied on entry and written back on exit
    (also when the block raises). The forward passes themselves are unchanged: in training mode
    a normalisation layer normalises by the batch's statistics, not the running ones.

    Args:
        model: Any module.

    Yields:
        The snapshot taken on entry.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = net[1].running_mean.clone()
        >>> with frozen_running_stats(net):
        ...     _ = net(torch.randn(8, 3))
        >>> torch.equal(net[1].running_mean, before)
        True
    """
    snapshot = snapshot_running_stats(running_stat_modules(model))
    try:
        yield snapshot
    finally:
        restore_running_stats(snapshot)
