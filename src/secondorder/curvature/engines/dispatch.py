r"""The one place where an engine is chosen: :func:`select` maps a model and an option to a path.

Every product of :math:`J` and :math:`J^\top` is computed by one of these paths (the
:data:`~secondorder.curvature.vocabulary.EnginePath` vocabulary, also what
:class:`~secondorder.curvature.linearization.EngineInfo` reports):

- ``"graph"``: the model traced as a graph of nodes with one rule per layer
  (:mod:`.graph`; ``nn.Sequential`` is a chain of such nodes, and ``engine="sequential"``, the
  name of the former hand-written ``nn.Sequential`` engine, is an alias). It falls back to
  whole-model autograd on its own where it cannot trace, and its result then reports
  ``"autograd"``;
- ``"factored"``: the explicit fast path for MLPs through the output-Jacobian factors
  (:class:`~secondorder.curvature.factored.FactoredLinearization`), only for
  ``jacobian_factors=True``;
- ``"autograd"``: the whole model by double backward
  (:class:`~secondorder.curvature.linearization.AutogradLinearization`), for
  ``engine="autograd"`` and under a torch-function mode (e.g. PCH's
  ``positive_curvature_mode``), which may change a recorded graph's double backward and must
  therefore see every operation.

Callers: :func:`~secondorder.curvature.linearization.linearize`, through it :class:`~.GGN`, the
Fisher kinds (:class:`~.Fisher`) and the products every optimizer builds on them; and
:class:`~.Hessian` (``"graph"``: the second-order pass of :mod:`.second_order`, else the double
backward), through it the PCH and the block-diagonal operators on models the module-wise engine
does not serve. The structural fast paths are not engines but uses of the graph's layers: the
exact diagonals and the low-rank GGN take per-layer factors where :mod:`.factors` finds every
parameter in a layer whose rule provides them (else they fall back to per-sample ``vmap`` /
autograd), and the module-wise block-diagonal engine takes ``nn.Sequential`` chains of layers
in its registry table (``blockwise_layers.LAYERS``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..model import FunctionalModel
from ..vocabulary import Engine, EnginePath, canonical_engine

__all__ = ["select", "sequential_chain"]


def sequential_chain(fmodel: FunctionalModel, inputs: tuple[Any, ...]) -> list[Any] | None:
    """The leaf layers of an ``nn.Sequential`` called on one tensor, or None.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of one batch.

    Returns:
        ``(prefix, layer)`` pairs (:func:`~secondorder.curvature.sequential_ops.sequential_layers`)
        when the model is a chain of layers with rules on a single tensor input, else None.
    """
    from ..sequential_ops import sequential_layers

    if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
        return None
    return sequential_layers(fmodel.model)


def select(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    engine: Engine | str = "auto",
    jacobian_factors: bool | str = False,
) -> EnginePath:
    """Which path computes the products of ``fmodel`` on ``inputs``.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of one batch.
        engine: ``"auto"`` (the graph engine; whole-model autograd under a torch-function
            mode), ``"graph"``, ``"autograd"``, or ``"sequential"`` (the former hand-written
            ``nn.Sequential`` engine, now an alias of ``"graph"``).
        jacobian_factors: ``True`` selects ``"factored"`` (an ``nn.Sequential`` MLP on one
            tensor); ``False`` or the retired ``"auto"`` the reference paths.

    Returns:
        ``"graph"``, ``"factored"`` or ``"autograd"`` (``"sequential"`` is no longer a path).

    Raises:
        ValueError: For an unknown engine, or ``jacobian_factors=True`` with
            ``engine="autograd"`` or on a model that is not an ``nn.Sequential`` of supported
            layers on one tensor (``engine="graph"`` ignores the option).
    """
    engine = canonical_engine(engine)
    if jacobian_factors is True and engine != "graph":
        if engine == "autograd" or sequential_chain(fmodel, inputs) is None:
            raise ValueError(
                f"jacobian_factors=True needs an nn.Sequential MLP on one tensor input (the "
                f"factored fast path); {type(fmodel.model).__name__} with engine={engine!r} "
                "goes through the graph or autograd engine"
            )
        return "factored"
    if engine == "autograd" or (engine == "auto" and torch._C._is_torch_function_mode_enabled()):
        return "autograd"
    return "graph"  # "auto", "graph" and "sequential", its alias: nn.Sequential is a chain
