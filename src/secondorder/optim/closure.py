"""Read the batch a training loop evaluates: ``opt.step(closure)`` and the preconditioner mode.

A curvature method needs the batch itself (it evaluates the model many times, at other
parameters and with tangents), not only a loss value. :class:`BatchRecorder` learns it from
what the loop calls, through forward hooks: the inputs of the model's last call with gradients
enabled, and the targets of the loss applied to that call's output (the loss must then be an
``nn.Module``, e.g. ``nn.CrossEntropyLoss()``, whose calls can be seen).

``opt.step(closure)`` accepts two forms; in both the closure calls the optimizer's ``model``
exactly once:

- it returns ``loss_fn(model(x), y)``, as torch.optim closures do (``backward`` inside is
  allowed and not needed)::

      def closure():
          opt.zero_grad()
          loss = loss_fn(model(x), y)
          loss.backward()
          return loss

- or it returns ``(outputs, targets)``, the model's output and the targets (any ``loss_fn``)::

      opt.step(lambda: (model(x), y))

Whatever the closure's own forward pass does to BatchNorm running statistics is undone; the step
updates them once, as it does for ``step(inputs, targets)``. The random generators are set back
to where the closure's model call started, so the step's passes draw the closure's dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.model import Batch
from ..curvature.random_state import GeneratorState
from ..curvature.running_stats import (
    restore_running_stats,
    running_stat_modules,
    snapshot_running_stats,
)

__all__ = ["FORMS", "MISSING", "BatchRecorder", "batch_of", "record_closure"]

MISSING: Any = object()
"""Default of ``step``'s arguments: called without a batch."""


def batch_of(inputs: Any, targets: Any) -> Batch:
    """The batch ``(inputs, targets)``; the model is called as ``model(*inputs)`` for a tuple."""
    return Batch(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), targets)


FORMS = (
    "opt.step(inputs, targets), or opt.step(closure) with a closure that calls the optimizer's "
    "model once and returns loss_fn(outputs, targets) (loss_fn an nn.Module) or "
    "(outputs, targets)"
)


class BatchRecorder:
    """Hooks on the model (and on the loss, if a module) that remember the last batch.

    Only calls with gradients enabled count, so an evaluation under ``torch.no_grad()`` does not
    replace the training batch.

    Args:
        model: The model.
        loss_fn: The loss.
    """

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.calls = 0
        self.inputs: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        self.output: Any = None
        self.random_state: GeneratorState | None = None  # at the start of the last call
        self.losses: list[tuple[Any, Any]] = []  # (outputs, targets) of each loss call
        self._handles: list[Any] = []

    def attach(self) -> BatchRecorder:
        """Register the hooks (and forget what was recorded)."""
        self.detach()
        self.calls, self.inputs, self.kwargs, self.output, self.losses = 0, None, {}, None, []
        self._register()
        return self

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Switch the hooks off inside; what was recorded is kept.

        The library's own passes are not the loop's calls, and a model without hooks can be
        traced by the graph engine.

        Yields:
            Nothing; the hooks are registered again on exit if they were.
        """
        attached = bool(self._handles)
        self.detach()
        try:
            yield
        finally:
            if attached:
                self._register()

    def _register(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.model.register_forward_hook(self._on_output, with_kwargs=True),
        ]
        if isinstance(self.loss_fn, nn.Module):
            self._handles.append(self.loss_fn.register_forward_pre_hook(self._on_loss))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            self.calls += 1
            self.inputs, self.kwargs, self.losses = tuple(args), dict(kwargs), []
            # where this pass's random numbers (dropout masks) start, to replay them
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
            self.random_state = GeneratorState.now(device)

    def _on_output(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            self.output = out

    def _on_loss(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.losses.append((args[0], args[1] if len(args) > 1 else None))

    def batch(self, how: str) -> Batch:
        """The batch of the model's last call and the loss applied to its output.

        Args:
            how: What the caller should do instead, for the error messages.

        Raises:
            ValueError: If no call was recorded, the model was called with keyword arguments,
                or the loss of that call's output was not seen once.
        """
        if self.inputs is None:
            raise ValueError(f"no forward pass of the model with gradients enabled was seen; {how}")
        if self.kwargs:
            raise ValueError(
                f"the model was called with keyword arguments {sorted(self.kwargs)}; it is called "
                f"as model(*inputs): pass them positionally, or {how}"
            )
        matching = [t for o, t in self.losses if o is self.output]
        if len(matching) != 1:
            if not isinstance(self.loss_fn, nn.Module):
                what = (
                    f"loss_fn ({type(self.loss_fn).__name__}) is not an nn.Module, so its "
                    "call cannot be seen"
                )
            elif matching:
                what = f"the loss_fn was called {len(matching)} times on the model's output"
            elif self.losses:
                what = (
                    "the loss_fn was called, but not on the model's output (the curvature is "
                    "that of loss_fn(model(*inputs), targets))"
                )
            else:
                what = "the loss_fn was not called on the model's output"
            raise ValueError(f"{what}; {how}")
        return Batch(self.inputs, matching[0])


def record_closure(model: nn.Module, loss_fn: Any, closure: Callable[[], Any]) -> Batch:
    """Call ``closure`` once and return the batch it evaluated (see the module docstring).

    Args:
        model: The optimizer's model.
        loss_fn: The optimizer's loss.
        closure: The closure.

    Returns:
        The batch: the inputs of the model call and the targets of the loss.

    Raises:
        ValueError: If the closure does not call the model exactly once, passes keyword
            arguments to it, or returns something else than ``loss_fn`` of that call's output
            or ``(outputs, targets)``.
    """
    recorder = BatchRecorder(model, loss_fn).attach()
    norms = running_stat_modules(model)
    before = snapshot_running_stats(norms) if norms else None
    try:
        with torch.enable_grad():
            result = closure()
    finally:
        recorder.detach()
        if before is not None:
            restore_running_stats(before)
    if recorder.calls == 1 and recorder.random_state is not None:
        # the step's first pass on this batch draws what the closure's pass drew (dropout)
        recorder.random_state.restore()
    use = f"use {FORMS}"
    if recorder.calls != 1:
        compiled = (
            " (with torch.compile: the closure must call the module given to the optimizer, "
            "compiled or not; hooks on the other one do not see the call)"
            if recorder.calls == 0
            else ""
        )
        raise ValueError(
            f"step(closure): the closure called the optimizer's model {recorder.calls} times; "
            f"expected exactly once{compiled}. Use {FORMS}"
        )
    if isinstance(result, (tuple, list)) and len(result) == 2:
        returned, targets = result
        if returned is not recorder.output:
            raise ValueError(
                "step(closure): the closure returned a pair whose first element is not the "
                f"model's output; expected (outputs, targets). Use {FORMS}"
            )
        recorder.losses = [(recorder.output, targets)]
    elif not isinstance(result, Tensor):
        raise ValueError(
            f"step(closure): the closure returned {type(result).__name__}; expected a loss "
            f"tensor or (outputs, targets). Use {FORMS}"
        )
    try:
        return recorder.batch("return (outputs, targets) from the closure, or " + use)
    except ValueError as err:
        raise ValueError(f"step(closure): {err}") from None
