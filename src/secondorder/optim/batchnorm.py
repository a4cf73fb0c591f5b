r"""Recompute the running statistics of normalisation layers on a data set.

After training (or after averaging weights), the running statistics of BatchNorm layers hold an
exponential average over the last steps' batches, at parameters that changed along the way.
:func:`update_bn` replaces them by the statistics of one pass over a data set at the current
parameters, as :func:`torch.optim.swa_utils.update_bn` does, but exactly over the whole data:
per channel :math:`c`, over every sample and position the layer sees in training mode,

.. math::
    \hat\mu_c = \frac{1}{n} \sum_i x_{ic}, \qquad
    \hat\sigma^2_c = \frac{1}{n - 1} \sum_i (x_{ic} - \hat\mu_c)^2,

accumulated batch by batch in float64 (Chan et al.'s pairwise update), so unequal batch sizes
count by their samples (torch's cumulative average weighs every batch equally). An InstanceNorm
layer with ``track_running_stats=True`` gets the mean over instances of each instance's mean and
unbiased variance, which is what its running average converges to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_map

from ..curvature.model import unwrap_compiled
from ..curvature.running_stats import (
    restore_running_stats,
    running_stat_modules,
    snapshot_running_stats,
)

__all__ = ["update_bn"]


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        """Merge ``rows`` (observations x channels) into the moments."""
        rows = rows.detach().to(torch.float64)
        n_b = float(rows.shape[0])
        if n_b == 0:
            return
        mean_b = rows.mean(0)
        m2_b = ((rows - mean_b) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n


def _channels_last(x: Tensor) -> Tensor:
    """``(N, C, *spatial)`` or ``(N, C)`` -> ``(N * prod(spatial), C)``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).T if x.ndim > 2 else x


def _inputs_of(batch: Any) -> tuple[Any, ...]:
    """The model's positional inputs of a batch: ``(inputs, targets)`` or inputs alone."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("update_bn: got an empty batch; expected (inputs, targets)")
        inputs = batch[0]
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return (batch,)


def update_bn(
    data: Iterable[Any],
    model: nn.Module,
    device: torch.device | str | None = None,
) -> None:
    """Set every BatchNorm's running statistics to those of ``data`` at the current parameters.

    Every batch is passed through the model in training mode under ``torch.no_grad()``; the
    model's mode, the layers' ``momentum`` and the parameters are left as they were.

    Args:
        data: An iterable of batches (a ``DataLoader``): ``(inputs, targets)`` pairs (the model
            is called as ``model(*inputs)`` when ``inputs`` is a tuple) or inputs alone.
        model: The model (a compiled one is run through the module underneath, whose layers'
            hooks see every call).
        device: Where to move each batch's tensors first (default: leave them).

    Raises:
        ValueError: If ``data`` yields no batch while the model has layers to update.

    Example:
        >>> import torch, secondorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> X = torch.randn(10, 3)
        >>> so.update_bn([(X[:6], None), (X[6:], None)], model)
        >>> h = model[0](X)
        >>> bool(torch.allclose(model[1].running_mean, h.mean(0)))
        True
    """
    model = unwrap_compiled(model)
    layers = running_stat_modules(model, training_only=False)
    if not layers:
        return
    moments = {layer: _Moments() for layer in layers}

    def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(layer, _InstanceNorm):  # per instance: mean and variance over positions
            flat = x.detach().to(torch.float64).flatten(2 if x.ndim > 2 else 1)
            stats = torch.stack([flat.mean(-1), flat.var(-1, unbiased=True)], dim=-1)
            moments[layer].add(stats.reshape(-1, stats.shape[-2] * 2))
        else:
            moments[layer].add(_channels_last(x))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    was_training = {m: m.training for m in model.modules()}
    before = snapshot_running_stats(layers)
    count = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in data:
                inputs = _inputs_of(batch)
                if device is not None:
                    inputs = tree_map(
                        lambda t: t.to(device) if isinstance(t, Tensor) else t, inputs
                    )
                model(*inputs)
                count += 1
    except BaseException:
        restore_running_stats(before)  # a failed pass leaves the statistics as they were
        raise
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in was_training.items():
            m.training = mode
    if count == 0:
        restore_running_stats(before)
        raise ValueError("update_bn: data yielded no batch; expected at least one")
    for layer in layers:
        _write(layer, moments[layer], count)


def _write(layer: nn.Module, m: _Moments, count: int) -> None:
    """Copy the accumulated moments into the layer's running statistics."""
    assert m.mean is not None and m.m2 is not None
    mean_buf, var_buf = layer.running_mean, layer.running_var
    assert isinstance(mean_buf, Tensor) and isinstance(var_buf, Tensor)
    if isinstance(layer, _InstanceNorm):
        mean, var = m.mean.view(-1, 2).unbind(-1)
    elif isinstance(layer, _BatchNorm):
        mean = m.mean
        var = m.m2 / max(m.n - 1.0, 1.0)
    else:  # pragma: no cover - running_stat_modules lists only these
        raise TypeError(f"update_bn: unexpected layer {type(layer).__name__}")
    mean_buf.copy_(mean.to(mean_buf.dtype))
    var_buf.copy_(var.to(var_buf.dtype))
    tracked = getattr(layer, "num_batches_tracked", None)
    if isinstance(tracked, Tensor):
        tracked.fill_(count)  # as torch's update_bn: one per batch since the reset
