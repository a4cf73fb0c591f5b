r"""Twice-differentiable stand-ins for functions whose backward has no derivative in PyTorch.

``torch.nn.functional.hardsigmoid`` has a first derivative but no rule for its backward
(``aten::hardsigmoid_backward``), so a double backward through it (GGN products through the
graph of :math:`J^\top w`, Hessian products) fails. The same function,

.. math::
    \operatorname{hardsigmoid}(x) = \min\!\big(\max(x / 6 + 1/2,\ 0),\ 1\big),

written with ``clamp`` has derivatives of every order (zero second derivative almost
everywhere, as the original). :class:`TwiceDifferentiable` is a ``TorchFunctionMode`` that
substitutes it while a curvature computation calls the model;
:meth:`~secondorder.curvature.model.FunctionalModel.__call__` enters it only for models that
hold such a module (a mode intercepts every torch call, which costs time on small models).
Calls of ``F.hardsigmoid`` written directly in a custom ``forward`` are covered too while the
mode is active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["TwiceDifferentiable", "needs_twice_differentiable"]


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    out = torch.clamp(input / 6 + 0.5, 0.0, 1.0)
    return input.copy_(out) if inplace else out


_REPLACEMENTS: dict[Callable[..., Any], Callable[..., Any]] = {F.hardsigmoid: _hardsigmoid}
_MODULES: tuple[type[nn.Module], ...] = (nn.Hardsigmoid,)


def needs_twice_differentiable(model: nn.Module) -> bool:
    """Whether ``model`` holds a module whose function needs a stand-in (see module docstring).

    Args:
        model: Any module.

    Returns:
        True if some submodule is an ``nn.Hardsigmoid`` (or a subclass).
    """
    return any(isinstance(m, _MODULES) for m in model.modules())


class TwiceDifferentiable(TorchFunctionMode):
    """Replace ``F.hardsigmoid`` by its ``clamp`` form (same values, every derivative)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        replacement = _REPLACEMENTS.get(func)
        return (replacement or func)(*args, **(kwargs or {}))
