"""The loss of a curvature optimizer's model at other parameter values (trial points).

:class:`TrialLosses` is a mixin of :class:`~.base.CurvatureOptimizer`: it reads the
optimizer's ``fmodel``, ``loss_fn``, ``process_group`` and ``_param_list`` (the trainable
parameters, in flat-vector order). Losses on several batches are weighted as the curvature
operators weight them (:mod:`~secondorder.curvature.weighting`) and summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..curvature.base import allreduce_sum
from ..curvature.model import Batch, FunctionalModel
from ..curvature.weighting import batch_weights

__all__ = ["TrialLosses"]


class TrialLosses:
    """``loss_at`` and ``loss_along``: the loss at a flat point or along a direction."""

    fmodel: FunctionalModel
    loss_fn: Any
    process_group: Any
    _param_list: list[Tensor]

    @torch.no_grad()
    def loss_at(self, theta: Tensor, batches: Sequence[Batch]) -> Tensor:
        """The loss at the flat parameters ``theta`` on ``batches`` (weighted as the operators).

        Args:
            theta: Flat parameter vector (the model's parameters are not modified).
            batches: The data.

        Returns:
            The loss (a 0-dim tensor).
        """
        return self._loss_of(self.fmodel.unflatten(theta), batches)

    @torch.no_grad()
    def loss_along(self, direction: Tensor, scale: float, batches: Sequence[Batch]) -> Tensor:
        r"""The loss at :math:`\theta + \mathrm{scale} \cdot d` on ``batches``.

        :math:`\theta` are the current parameters, which are not modified. The trial point
        is built parameter by parameter (one batched add), without a flat copy of
        :math:`\theta`.

        Args:
            direction: Flat direction :math:`d`, shape ``(dim,)``.
            scale: The step length along it.
            batches: The data.

        Returns:
            The loss (a 0-dim tensor).
        """
        point = torch._foreach_add(
            self._param_list,  # type: ignore[arg-type]
            self.fmodel.unflatten(direction),
            alpha=scale,
        )
        if self.fmodel.mixed:  # the point the parameters would hold: rounded to their dtype
            point = tuple(t.to(p.dtype) for t, p in zip(point, self._param_list))
        return self._loss_of(point, batches)

    def _loss_of(self, tensors: Sequence[Tensor], batches: Sequence[Batch]) -> Tensor:
        """The loss at the parameter values ``tensors`` (in parameter shapes) on ``batches``."""
        weighting = batch_weights(self.loss_fn, batches, self.fmodel, self.process_group)
        loss: Tensor | None = None
        for b, w in zip(batches, weighting.weights(batches)):
            if w == 0.0:  # every target ignored (its own mean is 0/0)
                continue
            value = self.loss_fn(self.fmodel(tensors, b.inputs), b.targets)
            value = value * w if w != 1.0 else value
            loss = value if loss is None else loss + value
        if loss is None:  # every batch of this rank has weight 0
            loss = torch.zeros((), dtype=self.fmodel.dtype, device=self.fmodel.device)
        return self._allreduce_sum(loss.detach())

    def _allreduce_sum(self, value: Tensor) -> Tensor:
        """Sum a tensor over the process group (identity with one process)."""
        return allreduce_sum([value], self.process_group)[0]

    # ----------------------------------------------------------------------- step
