r"""The torch.optim habits of a step: ``.grad``, clipping, momentum and weight decay.

:class:`GradientHabits` is a mixin of :class:`~secondorder.optim.base.CurvatureOptimizer`
placed before the non-finite guard: once the guard has found the loss and the gradient finite,

- every trained parameter's ``.grad`` gets the batch gradient (as after ``loss.backward()``);
- the flat gradient the direction is computed from is scaled, per param group, to at most the
  group's ``max_grad_norm``;

the direction :math:`d` computed from it becomes :math:`v = d + \mu_g v_{\text{prev}}`
(heavy-ball momentum, the group's ``momentum`` :math:`\mu_g`, default 0; the buffer is the
last applied :math:`v`, kept in ``state["momentum_buffer"]``, left alone by a rejected step);
and once the step is known to be applied, each group's parameters decay by
:math:`1 - \mathrm{lr}_g \lambda_g` (decoupled weight decay, as ``AdamW``) before
:math:`\theta \mathrel{+}= \mathrm{lr}\, v`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..curvature.model import FunctionalModel

__all__ = ["GradientHabits"]


class GradientHabits:
    """Mixin: ``.grad``, ``max_grad_norm``, ``momentum`` and ``weight_decay`` (module docstring)."""

    fmodel: FunctionalModel
    param_groups: list[dict[str, Any]]
    diagnostics: dict[str, Any]
    _group_slices: list[list[tuple[int, int]]]

    @property
    def global_state(self) -> dict[str, Any]:
        """State shared by all parameters (the optimizer's)."""
        raise NotImplementedError

    def _group_vector(self, key: str) -> float | Tensor:
        raise NotImplementedError

    def _with_momentum(self, direction: Tensor, norm: float) -> tuple[Tensor, float]:
        r"""The direction with momentum, :math:`d + \mu v_{prev}`, and its norm."""
        if all(not g.get("momentum", 0.0) for g in self.param_groups):
            return direction, norm
        previous = self.global_state.get("momentum_buffer")
        if not isinstance(previous, Tensor) or previous.shape != direction.shape:
            return direction, norm  # the first step, or the parameters changed
        mu = self._group_vector("momentum")
        out = direction + previous * mu
        return out, float(torch.linalg.vector_norm(out))

    def _after_update(self, direction: Tensor) -> None:
        if any(g.get("momentum", 0.0) for g in self.param_groups):
            self.global_state["momentum_buffer"] = direction.detach().clone()

    def _check_loss_and_gradient(self, loss: Tensor, grad: Tensor) -> bool:
        """The guard's check; then ``.grad`` gets the batch gradient and ``grad`` is clipped.

        ``grad`` (flat) is scaled in place per param group to at most its ``max_grad_norm``;
        ``diagnostics["grad_clip"]`` is the smallest factor applied (1.0: none).
        """
        if not super()._check_loss_and_gradient(loss, grad):  # type: ignore[misc]
            return False
        with torch.no_grad():
            for p, g in zip(self.fmodel.params, self.fmodel.unflatten(grad)):
                if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                    p.grad = g.detach().to(p.dtype, copy=True)  # a float32 gradient rounded
                else:
                    p.grad.copy_(g)
            clip = 1.0
            for group, slices in zip(self.param_groups, self._group_slices):
                limit = group.get("max_grad_norm")
                if limit is None or not slices:
                    continue
                parts = [grad[a:b] for a, b in slices]
                norm = float(torch.linalg.vector_norm(torch.cat(parts)))
                if norm > limit:
                    scale = limit / norm
                    for part in parts:
                        part.mul_(scale)
                    clip = min(clip, scale)
        self.diagnostics["grad_clip"] = clip
        return True

    def _before_update(self) -> None:
        r"""Decoupled weight decay, :math:`\theta_g \leftarrow (1 - lr_g \lambda_g) \theta_g`.

        Called once the step is known to be applied, before :math:`\theta \mathrel{+}= lr\, d`.
        """
        for group in self.param_groups:
            rate = float(group["lr"]) * float(group.get("weight_decay", 0.0))
            params = [p for p in group["params"] if p.requires_grad]
            if rate and params:
                torch._foreach_mul_(params, 1.0 - rate)
