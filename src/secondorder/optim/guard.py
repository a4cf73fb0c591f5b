"""The non-finite guard of the optimizers: a NaN/Inf never reaches the parameters.

A step whose loss, gradient, warm start, direction or scaled step ``lr * d`` is not finite is
rejected: the parameters stay unchanged, the warm start is dropped, and the optimizer warns
(``on_nonfinite="skip"``) or raises :class:`~secondorder.linalg.errors.NonFiniteError`
(``"raise"``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..curvature.model import FunctionalModel
from ..linalg.errors import NonFiniteError
from .warn import warn_at_caller

__all__ = ["NonFiniteError", "NonFiniteGuard", "NonFiniteStepWarning", "all_finite", "vector_norm"]


class NonFiniteStepWarning(UserWarning):
    """A step met a NaN/Inf; it was rejected and the parameters were left unchanged."""


def vector_norm(t: Tensor) -> float:
    """The Euclidean norm of a flat vector, through one BLAS dot product.

    NaN and Inf entries give a NaN or Inf norm (as ``t.norm()``); so do squares beyond the
    dtype's range.
    """
    return float(torch.dot(t, t)) ** 0.5


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, at the cost of one reduction.

    A finite sum proves it (NaN and Inf propagate through a sum); only a non-finite sum, which
    may also be an overflow of finite entries, is confirmed entry by entry.
    """
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


class NonFiniteGuard:
    """Mixin of :class:`~secondorder.optim.base.CurvatureOptimizer`: checks and rejection."""

    _WARM_START_KEYS: ClassVar[tuple[str, ...]] = ()
    diagnostics: dict[str, Any]
    on_nonfinite: str
    fmodel: FunctionalModel
    _param_list: list[Tensor]

    @property
    def global_state(self) -> dict[str, Any]:
        """State shared by all parameters (defined by the optimizer)."""
        raise NotImplementedError

    def _group_vector(self, key: str) -> float | Tensor:
        raise NotImplementedError

    def _compute_direction(self, batches: list[Any], **kw: Any) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _step_body(self, batches: list[Any], **kw: Any) -> Tensor:
        """Compute the direction, then apply it if it and the scaled step are finite."""
        loss, direction = self._compute_direction(batches, **kw)
        diag = self.diagnostics
        if "loss" not in diag:  # _check_loss_and_gradient has read it already
            diag["loss"] = float(loss)
        if diag.get("accepted", True) and direction is not None:
            # a finite norm proves every entry finite (one reduction for the check and the
            # step norm); an infinite one may be an overflow of finite entries
            norm = vector_norm(direction)
            if not math.isfinite(norm) and not all_finite(direction):
                self._reject("the step direction is not finite")
            else:
                direction, norm = self._with_momentum(direction, norm)
                applied = self._apply_direction(direction, norm)
                if applied is not None:
                    diag["step_norm"] = applied
                    self._after_update(direction)
        if not diag.get("accepted", True):
            diag["step_norm"] = 0.0
        return loss

    @torch.no_grad()
    def _apply_direction(self, direction: Tensor, direction_norm: float) -> float | None:
        """``theta_g += lr_g * d_g`` for every group; returns the norm of the applied step.

        The scaled step is checked, not only ``d``: if ``lr * d`` is not finite in the
        parameters' dtype the step is rejected, the parameters untouched, and None returned.
        """
        lr = self._group_vector("lr")
        if isinstance(lr, Tensor):
            scaled_lr = direction * lr
            step: Tensor | None = scaled_lr
            norm = vector_norm(scaled_lr)
        else:
            step, norm = None, abs(lr) * direction_norm
        if not (math.isfinite(norm) and norm <= torch.finfo(direction.dtype).max):
            # maybe an overflow of lr * d (or only of the norm): look at the entries
            scaled = step if step is not None else direction * lr
            if not all_finite(scaled):
                self._reject("the scaled step lr * d is not finite")
                return None
        self._before_update()
        low = self.fmodel.param_dtype != self.fmodel.dtype  # the update is rounded when applied
        before = [p.detach().clone() for p in self._param_list] if low else None
        if step is not None:
            torch._foreach_add_(self._param_list, self.fmodel.unflatten(step))  # type: ignore[arg-type]
        else:
            assert not isinstance(lr, Tensor)
            torch._foreach_add_(self._param_list, self.fmodel.unflatten(direction), alpha=lr)
        if before is not None:
            moved = self.fmodel.flatten([(p != b) for p, b in zip(self._param_list, before)])
            asked = (step if step is not None else direction) != 0
            count = int(asked.sum())
            self.diagnostics["stalled_fraction"] = (
                float((asked & ~moved).sum()) / count if count else 0.0
            )
        return norm

    def _with_momentum(self, direction: Tensor, norm: float) -> tuple[Tensor, float]:
        """The direction to apply and its norm (a hook: heavy-ball momentum)."""
        return direction, norm

    def _after_update(self, direction: Tensor) -> None:
        """Called after ``direction`` was applied (a hook)."""

    def _before_update(self) -> None:
        """Called once the step is known to be applied, before ``theta += lr * d`` (a hook)."""

    def _reject(self, reason: str) -> None:
        """Mark the step rejected for a non-finite value; warn (every time) or raise.

        The warm start the step could have poisoned is dropped (the next step starts CG from
        zero); ``state["rejections"]`` counts the rejected steps and trials of the run.
        """
        self.global_state["rejections"] = int(self.global_state.get("rejections", 0)) + 1
        self.diagnostics["accepted"] = False
        self.diagnostics["rejected_reason"] = reason
        for key in self._WARM_START_KEYS:
            self.global_state.pop(key, None)
        self._on_reject(reason)
        message = (
            f"{type(self).__name__}: step {self.global_state.get('step', 0)} rejected: {reason}; "
            "the parameters were left unchanged"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        warn_at_caller(message, NonFiniteStepWarning)

    def _on_reject(self, reason: str) -> None:
        """Hook: react to a rejected step (e.g. raise the damping)."""

    def _check_warm_start(self, key: str) -> Tensor | None:
        """The warm start ``state[key]``, or None after rejecting the step if it is not finite."""
        x0 = self.global_state.get(key)
        if x0 is None or all_finite(x0):
            return x0
        self._reject(
            f"the CG warm start {key!r} (from an earlier step or a loaded state) is not finite; "
            "it was reset"
        )
        return None

    def _check_loss_and_gradient(self, loss: Tensor, grad: Tensor) -> bool:
        """Record loss and gradient norm; reject and return False if either is non-finite."""
        grad_norm = vector_norm(grad)
        loss_f = float(loss)
        self.diagnostics.update(loss=loss_f, grad_norm=grad_norm)
        if not math.isfinite(loss_f):
            self._reject("the loss is not finite")
            return False
        # a finite norm proves every entry finite; an infinite one may be an overflow
        if not math.isfinite(grad_norm) and not bool(torch.isfinite(grad).all()):
            self._reject("the gradient is not finite")
            return False
        return True
