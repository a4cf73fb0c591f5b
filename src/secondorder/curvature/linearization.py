r"""The network linearised at a point, on one batch: :math:`Jv` and :math:`J^\top u`.

:math:`J = \partial z / \partial \theta` is the Jacobian of the outputs ``z`` (all samples) with
respect to the parameters. One forward pass builds a linearisation; every product reuses it.
The engines (chosen by :func:`~secondorder.curvature.engines.dispatch.select`):

- :class:`AutogradLinearization` works for any module. The forward graph is kept, and a backward
  with ``create_graph=True`` against a dummy cotangent :math:`w` builds the graph of the linear
  map :math:`w \mapsto J^\top w` once. :math:`J^\top u` is a retained backward of the forward
  graph; :math:`Jv` is the derivative of :math:`v^\top J^\top w` with respect to :math:`w`,
  a backward of that second graph (no forward pass is repeated).
- :class:`~secondorder.curvature.engines.graph.GraphLinearization` follows the traced model node
  by node with one rule per layer, without an autograd graph (``nn.Sequential`` included).
- :class:`~secondorder.curvature.factored.FactoredLinearization`, the explicit fast path for
  ``nn.Sequential`` MLPs through their output-Jacobian factors.

Tangents are lists with one entry per parameter (``None`` for a zero block); with ``batched=True``
every entry and every output-space tensor carries a leading column dimension ``K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .factored import FactoredLinearization
from .model import FunctionalModel
from .sequential_ops import sequential_layers

__all__ = [
    "AutogradLinearization",
    "EngineInfo",
    "backward_into",
    "batched_grad",
    "grad_columns",
    "linearize",
    "sequential_layers",
]

Tangents = Sequence[Tensor | None]


@dataclass(frozen=True)
class EngineInfo:
    """Which engine computed one batch's curvature products.

    Attributes:
        path: ``"graph"`` (the traced model, node by node; ``nn.Sequential`` included),
            ``"factored"`` (the output-Jacobian-factor fast path for MLPs), ``"autograd"``
            (whole-model autograd) or ``"mlp_hessian"`` (the hand-written R-operator of
            :class:`~secondorder.Hessian` on MLPs): :data:`~.vocabulary.EnginePath`.
        fallback_reason: Why the graph engine fell back to whole-model autograd (else None).
        autograd_nodes: Nodes of the traced graph differentiated by autograd on their own.
    """

    path: str
    fallback_reason: str | None = None
    autograd_nodes: tuple[str, ...] = ()

    @classmethod
    def of(cls, lin: Any) -> EngineInfo:
        """Describe a linearisation (any engine's).

        Args:
            lin: A linearisation built by :func:`linearize`.

        Returns:
            Its engine, fallback reason and per-node autograd fallbacks.
        """
        return cls(
            getattr(lin, "path", type(lin).__name__),
            getattr(lin, "fallback_reason", None),
            tuple(getattr(lin, "autograd_nodes", ())),
        )


class Linearization:
    """Common interface: outputs ``z`` and products with ``J`` and ``J^T``."""

    z: Tensor
    leaves: list[Tensor]
    _z_graph: Tensor
    #: ``"vmap"`` (batched products in one backward) or ``"loop"`` (one backward per column,
    #: after a batched backward without a batching rule raised)
    batched_products: str = "vmap"

    def jvp(self, tangents: Tangents, batched: bool = False) -> Tensor | None:
        """Return :math:`Jv` (shape of ``z``, or ``(K, *z.shape)`` when batched)."""
        raise NotImplementedError

    def vjp(
        self, cotangent: Tensor, indices: Sequence[int] | None = None, batched: bool = False
    ) -> list[Tensor]:
        r"""Return :math:`J^\top u` as tensors in parameter shapes (``(K, *shape)`` if batched).

        Args:
            cotangent: ``u``, shape of ``z`` (or ``(K, *z.shape)``).
            indices: Parameters to return (default all); the others are not computed.
            batched: Whether ``cotangent`` carries a leading column dimension.

        Returns:
            One tensor per requested parameter.
        """
        idx = range(len(self.leaves)) if indices is None else indices
        wrt = [self.leaves[i] for i in idx]
        grads = batched_grad(self, [self._z_graph], wrt, [cotangent], batched)
        lead = cotangent.shape[:1] if batched else ()
        return [
            g if g is not None else torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)
            for g, p in zip(grads, wrt)
        ]

    def vjp_into(
        self, cotangent: Tensor, out: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        r"""Add :math:`J^\top u` into the tensors ``out`` (parameter shapes) in place.

        Autograd accumulates straight into ``out`` (set as the leaves' ``.grad``), so no
        parameter-sized result is allocated and copied.

        Args:
            cotangent: ``u``, shape of ``z``.
            out: One tensor per requested parameter, accumulated into.
            indices: Parameters to compute (default all).
        """
        wrt = self.leaves if indices is None else [self.leaves[i] for i in indices]
        backward_into(self._z_graph, cotangent, wrt, out)


def grad_columns(
    outputs: Sequence[Tensor], wrt: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Tensor | None]:
    """``torch.autograd.grad(..., is_grads_batched=True)`` computed one column at a time.

    The fallback for backward passes without a batching rule (e.g. GroupNorm's double
    backward).

    Args:
        outputs: Tensors to differentiate (graphs retained).
        wrt: Tensors to differentiate with respect to.
        cotangents: One per output, each with a leading column dimension ``K``.

    Returns:
        One ``(K, *shape)`` tensor per entry of ``wrt`` (``None`` where unused).
    """
    K = cotangents[0].shape[0]
    columns = [
        torch.autograd.grad(
            outputs, wrt, [c[k] for c in cotangents], retain_graph=True, allow_unused=True
        )
        for k in range(K)
    ]
    stacked: list[Tensor | None] = []
    for i in range(len(wrt)):
        parts = [col[i] for col in columns]
        stacked.append(None if any(p is None for p in parts) else torch.stack(parts))  # type: ignore[misc]
    return stacked


def batched_grad(
    owner: Any,
    outputs: Sequence[Tensor],
    wrt: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    batched: bool,
) -> Sequence[Tensor | None]:
    """A retained ``torch.autograd.grad``; batched columns fall back to a loop where needed.

    A batched call that raises (no batching rule for a backward) is repeated one column at a
    time, and ``owner.batched_products`` is set to ``"loop"`` so later calls loop at once.

    Args:
        owner: Object carrying the ``batched_products`` flag (``"vmap"`` or ``"loop"``).
        outputs: Tensors to differentiate.
        wrt: Tensors to differentiate with respect to.
        cotangents: One per output (with a leading column dimension when ``batched``).
        batched: Whether the cotangents carry a column dimension.

    Returns:
        The gradients (``None`` where unused).
    """
    if batched and getattr(owner, "batched_products", "vmap") == "loop":
        return grad_columns(outputs, wrt, cotangents)
    try:
        return torch.autograd.grad(
            outputs, wrt, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
    except RuntimeError:
        if not batched:
            raise
        grads = grad_columns(outputs, wrt, cotangents)
        owner.batched_products = "loop"
        return grads


def backward_into(
    outputs: Tensor | Sequence[Tensor],
    cotangents: Tensor | Sequence[Tensor],
    leaves: Sequence[Tensor],
    out: Sequence[Tensor],
) -> None:
    """Run a retained backward pass that accumulates the leaves' gradients into ``out``.

    Args:
        outputs: Tensors to differentiate.
        cotangents: Their cotangents.
        leaves: Leaf tensors (``requires_grad``) to differentiate with respect to.
        out: Buffers in the leaves' shapes; the gradients are added to them in place.
    """
    saved = [leaf.grad for leaf in leaves]
    try:
        for leaf, buf in zip(leaves, out):
            leaf.grad = buf
        with torch.no_grad():  # grad mode off: AccumulateGrad adds in place
            torch.autograd.backward(outputs, cotangents, retain_graph=True, inputs=list(leaves))
    finally:
        for leaf, grad in zip(leaves, saved):
            leaf.grad = grad


class AutogradLinearization(Linearization):
    """Linearisation of any module by autograd (see the module docstring).

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of the batch.
        leaves: Leaf tensors holding the parameter values (``requires_grad=True``).
    """

    path = "autograd"
    fallback_reason: str | None = None

    def __init__(self, fmodel: FunctionalModel, inputs: tuple[Any, ...], leaves: list[Tensor]):
        self.leaves = leaves
        with torch.enable_grad():
            z = fmodel(leaves, inputs)
            if not isinstance(z, Tensor):
                raise TypeError(
                    f"the model must return a tensor, got {type(z).__name__}; wrap it in a "
                    "module whose forward returns the outputs the loss takes"
                )
            self._z_graph = z
            self.z = z.detach()
            self._w = torch.zeros_like(self.z, requires_grad=True)
            jtw = torch.autograd.grad(z, leaves, self._w, create_graph=True, allow_unused=True)
        self._jtw = list(jtw)

    def jvp(self, tangents: Tangents, batched: bool = False) -> Tensor | None:  # noqa: D102
        outs, tans = [], []
        for g, t in zip(self._jtw, tangents):
            if g is not None and t is not None and g.requires_grad:
                outs.append(g)
                tans.append(t)
        if not outs:
            return None
        (jv,) = batched_grad(self, outs, [self._w], tans, batched)
        return jv


def linearize(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    leaves: list[Tensor],
    engine: str = "auto",
    jacobian_factors: bool | str = False,
) -> Linearization | FactoredLinearization:
    """Linearise ``fmodel`` at ``leaves`` on ``inputs`` with the engine that ``select`` chooses.

    :func:`~secondorder.curvature.engines.dispatch.select` is the one place of that choice.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of one batch.
        leaves: Leaf tensors holding the parameter values.
        engine: ``"auto"`` (the graph engine, :mod:`.engines.graph`: node by node on the
            traced model, whole-model autograd where it cannot trace; autograd under a
            torch-function mode), ``"graph"``, ``"sequential"`` (an alias of ``"graph"``, the
            name of the former hand-written ``nn.Sequential`` engine) or ``"autograd"``.
        jacobian_factors: ``True`` selects the fast path for MLPs,
            :class:`~secondorder.curvature.factored.FactoredLinearization` (products through
            the output-Jacobian factors); ``False`` (or the retired ``"auto"``) the reference.

    Returns:
        The linearisation.

    Raises:
        ValueError: For an unknown engine, or ``jacobian_factors=True`` on a model the
            factored fast path does not serve.
    """
    from .engines.dispatch import select, sequential_chain
    from .engines.graph import graph_linearization

    path = select(fmodel, inputs, engine, jacobian_factors)
    if path == "graph":
        return graph_linearization(fmodel, inputs, leaves)
    if path == "factored":
        layers = sequential_chain(fmodel, inputs)
        assert layers is not None
        return FactoredLinearization(fmodel, layers, inputs, leaves)
    return AutogradLinearization(fmodel, inputs, leaves)
