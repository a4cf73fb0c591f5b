"""``opt.step(closure)``: read the batch a torch.optim-style closure evaluates.

A curvature optimizer needs the batch itself (it evaluates the model many times, at other
parameters and with tangents), not only a loss value. A closure reveals it by what it calls.
Two forms are accepted; in both the closure calls the optimizer's ``model`` exactly once:

- it returns the loss computed by the optimizer's ``loss_fn`` (an ``nn.Module``, e.g.
  ``nn.CrossEntropyLoss()``) on that call's output, as torch.optim closures do::

      def closure():
          opt.zero_grad()
          loss = loss_fn(model(x), y)
          loss.backward()        # optional: the optimizer computes its own gradient
          return loss

- or it returns ``(outputs, targets)``, the model's output and the targets (any ``loss_fn``)::

      opt.step(lambda: (model(x), y))

The inputs are taken from the model call and the targets from the loss call (or the returned
pair). Whatever the closure's own forward pass does to BatchNorm running statistics is undone;
the step updates them once, as it does for ``step(inputs, targets)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.model import Batch
from ..curvature.running_stats import (
    restore_running_stats,
    running_stat_modules,
    snapshot_running_stats,
)

__all__ = ["FORMS", "record_closure"]

FORMS = (
    "opt.step(inputs, targets), or opt.step(closure) with a closure that calls the optimizer's "
    "model once and returns loss_fn(outputs, targets) (loss_fn an nn.Module) or "
    "(outputs, targets)"
)


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
            arguments to it, or computes a loss that is not ``loss_fn`` of that call's output.
    """
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    outputs: list[Any] = []
    losses: list[tuple[Any, Any]] = []

    def on_model(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))

    def on_model_output(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        outputs.append(out)

    def on_loss(module: nn.Module, args: tuple[Any, ...]) -> None:
        losses.append((args[0], args[1] if len(args) > 1 else None))

    handles = [
        model.register_forward_pre_hook(on_model, with_kwargs=True),
        model.register_forward_hook(on_model_output, with_kwargs=True),
    ]
    if isinstance(loss_fn, nn.Module):
        handles.append(loss_fn.register_forward_pre_hook(on_loss))
    norms = running_stat_modules(model)
    before = snapshot_running_stats(norms) if norms else None
    try:
        with torch.enable_grad():
            result = closure()
    finally:
        for handle in handles:
            handle.remove()
        if before is not None:
            restore_running_stats(before)
    if len(calls) != 1:
        raise ValueError(
            f"step(closure): the closure called the optimizer's model {len(calls)} times; "
            f"expected exactly once. Use {FORMS}"
        )
    (args, kwargs), (out,) = calls[0], outputs
    if kwargs:
        raise ValueError(
            f"step(closure): the model was called with keyword arguments {sorted(kwargs)}; the "
            "optimizer calls it as model(*inputs): pass them positionally"
        )
    if isinstance(result, (tuple, list)) and len(result) == 2:
        returned, targets = result
        if returned is not out:
            raise ValueError(
                "step(closure): the closure returned a pair whose first element is not the "
                f"model's output; expected (outputs, targets). Use {FORMS}"
            )
        return Batch(tuple(args), targets)
    if not isinstance(result, Tensor):
        raise ValueError(
            f"step(closure): the closure returned {type(result).__name__}; expected a loss "
            f"tensor or (outputs, targets). Use {FORMS}"
        )
    matching = [t for o, t in losses if o is out]
    if len(losses) != 1 or not matching:
        what = (
            f"loss_fn ({type(loss_fn).__name__}) is not an nn.Module, so its call cannot be "
            "seen; return (outputs, targets) instead"
            if not isinstance(loss_fn, nn.Module)
            else f"the optimizer's loss_fn was called {len(losses)} times"
            + ("" if len(losses) != 1 else ", not on the model's output")
        )
        raise ValueError(f"step(closure): {what}. Use {FORMS}")
    return Batch(tuple(args), matching[0])
