r"""Hessian products on the graph engine: Pearlmutter's R-operator, node by node.

For a loss :math:`L(z)` of the traced model's output and each node :math:`y = f(x, \theta)` of
the graph (:mod:`.graph`), the build runs one reverse pass from :math:`\nabla_z L` that stores
the gradient cotangent :math:`\delta_y = \partial L / \partial y` where the node has a
second-order term (the rule's or step's ``prepare_residual``) and gives the gradient. A product
:math:`Hv` is the derivative of the gradient along :math:`v = d\theta`:

- forward: the tangents :math:`dy = J_x dx + J_\theta d\theta` (the engine's :math:`Jv`), and at
  every node with a residual, from its input tangents, the residual
  :math:`(r_x, r_\theta) = \nabla^2_{(x,\theta)} \langle \delta_y, f \rangle (dx, d\theta)`:
  :math:`r_\theta` is added to the result, :math:`r_x` kept for the input's cotangent;
- output: :math:`R\{\delta_z\} = \nabla_z^2 L\; dz`;
- reverse: :math:`R\{\delta_x\} = J_x^\top R\{\delta_y\} + r_x` (summed over the node's
  consumers), :math:`(Hv)_\theta \mathrel{+}= J_\theta^\top R\{\delta_y\}`.

So a product costs one :math:`Jv`, one :math:`J^\top u` and one residual per nonlinear node
(:mod:`..layers.base` for the rules, :mod:`.steps` for the other nodes), with no autograd graph
of the model. ``modify="clip"|"abs"`` gives the PCH's modified Hessian: every elementwise
activation's :math:`\delta \odot f''(a)` is replaced by :math:`\rho(\delta \odot f''(a))`,
as :func:`~secondorder.curvature.pch_mode.positive_curvature_mode` does in a double backward
(nodes differentiated by autograd are evaluated again under that mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx

from ..._checks import check_choice
from ..layers.base import SECOND_DERIVATIVES, Rule
from ..linearization import Linearization
from ..losses import LossTerms, loss_terms
from ..model import FunctionalModel
from ..vocabulary import PCH_MODIFICATIONS
from .graph import GraphLinearization, graph_linearization
from .step_base import Step, accumulate
from .steps import ProductStep, RuleStep

__all__ = ["GraphHessian", "SecondOrderGraph", "graph_hessian"]


class SecondOrderGraph(GraphLinearization):
    """A graph linearisation whose module steps keep their input and parameter values.

    :class:`GraphHessian` hands them to the rules' ``prepare_residual`` once and drops them.
    The memory rewrites are off: an activation applied in place would overwrite the values kept
    here, and the rewritten steps have no residual terms.
    """

    memory_rewrites = False

    def _add(self, node: fx.Node, step: Step, value: Any, own: int = 0) -> None:
        if isinstance(step, RuleStep):
            x_node = step.inputs[0] if step.inputs else node.args[0]
            params = {
                n: (self.leaves[step.params[n]] if n in step.params else p).detach()
                for n, p in step.module._parameters.items()
                if p is not None
            }
            step.second_order_values = (self._env[x_node], params)  # type: ignore[index]
        super()._add(node, step, value, own)


def _owns_residual(step: Step) -> bool:
    """Whether the step's residual cotangents are new tensors (explicit rules, products)."""
    if isinstance(step, RuleStep):
        return type(step.rule).residual is not Rule.residual
    return isinstance(step, ProductStep) or bool(getattr(step, "owns_residual", False))


class GraphHessian:
    """One batch's Hessian products (or the PCH-modified ones) on the graph engine.

    Args:
        lin: The batch's :class:`SecondOrderGraph`.
        terms: The loss at its outputs (:func:`~secondorder.curvature.losses.loss_terms`).
        modify: ``None`` (the Hessian), ``"clip"`` or ``"abs"`` (module docstring).

    Attributes:
        loss: The batch's loss value.
        gradient: Its gradient, one tensor per parameter.
    """

    path = "graph"

    def __init__(self, lin: SecondOrderGraph, terms: LossTerms, modify: str | None = None) -> None:
        if modify is not None:
            check_choice("modify", modify, PCH_MODIFICATIONS)
        self.lin, self.terms, self.modify = lin, terms, modify
        self.loss = terms.value
        grads = {i: torch.zeros_like(leaf.detach()) for i, leaf in enumerate(lin.leaves)}
        self._rctx: list[Any] = [None] * len(lin.steps)
        self._owns = [False] * len(lin.steps)
        cots: dict[fx.Node, Any] = {lin.output_node: terms.grad_output}
        with torch.no_grad():
            for k in range(len(lin.steps) - 1, -1, -1):
                node, step = lin.steps[k]
                u = cots.pop(node, None)
                self._rctx[k] = step.prepare_residual(u, modify)
                self._owns[k] = _owns_residual(step)
                if u is None:
                    continue
                for n, g in zip(step.inputs, step.vjp(u, [True] * len(step.inputs), grads, False)):
                    if g is not None:
                        cots[n] = accumulate(cots.get(n), g)
        self.gradient = [grads[i] for i in range(len(lin.leaves))]

    def _product(
        self, tangents: Sequence[Tensor | None], grads: dict[int, Tensor], batched: bool
    ) -> None:
        """Add :math:`Hv` (blocks in ``grads``, by parameter index) into ``grads``."""
        lin = self.lin
        requested = 0
        for i in grads:
            requested |= 1 << i
        env: dict[fx.Node, Any] = {}
        inject: dict[fx.Node, Any] = {}  # r_x per node, added to its cotangent
        owned: set[fx.Node] = set()  # nodes whose r_x is a new tensor (added into in place)
        with torch.no_grad():
            for k, (node, step) in enumerate(lin.steps):
                tin = [env.get(n) for n in step.inputs]
                rctx = self._rctx[k]
                if rctx is not None and lin._mask[node] & requested:
                    need = [bool(lin._mask[n] & requested) for n in step.inputs]
                    res = step.residual(rctx, tin, tangents, need, grads, batched)
                    for n, r in zip(step.inputs, res):
                        if r is None:
                            continue
                        if n in inject:
                            inject[n] = accumulate(inject[n], r)
                            owned.add(n)
                        else:
                            inject[n] = r
                            if self._owns[k]:
                                owned.add(n)
                env[node] = step.jvp(tin, tangents, batched)
                for n in lin._last_use.get(k, ()):
                    env.pop(n, None)
            dz = env.pop(lin.output_node, None)
            env.clear()
            cots: dict[fx.Node, Any] = {}
            if dz is not None:
                cots[lin.output_node] = self.terms.hessian_matmat(dz)
            for node, step in reversed(lin.steps):
                u, r = cots.pop(node, None), inject.pop(node, None)
                if node in owned and isinstance(u, Tensor) and u.shape == r.shape:
                    u = r.add_(u)
                else:
                    u = accumulate(u, r)
                if u is None or not (lin._mask[node] & requested):
                    continue
                need = [bool(lin._mask[n] & requested) for n in step.inputs]
                for n, g in zip(step.inputs, step.vjp(u, need, grads, batched)):
                    if g is not None:
                        cots[n] = accumulate(cots.get(n), g)

    def hvp(
        self,
        tangents: Sequence[Tensor | None],
        indices: Sequence[int] | None = None,
        batched: bool = False,
    ) -> list[Tensor]:
        """:math:`Hv` in parameter shapes (``(K, *shape)`` if batched), blocks ``indices``.

        Args:
            tangents: :math:`v`, one tensor (or ``None`` for zero) per parameter.
            indices: The blocks of the result (default all).
            batched: Whether the tangents carry a leading column dimension ``K``.

        Returns:
            One tensor per requested block.
        """
        idx = list(range(len(self.lin.leaves))) if indices is None else list(indices)
        lead = next(t.shape[:1] for t in tangents if t is not None) if batched else ()
        bufs = {i: self.lin.leaves[i].new_zeros(*lead, *self.lin.leaves[i].shape) for i in idx}
        self._product(tangents, bufs, batched)
        return [bufs[i] for i in idx]

    def hvp_into(
        self,
        tangents: Sequence[Tensor | None],
        out: Sequence[Tensor],
        indices: Sequence[int] | None = None,
    ) -> None:
        """Add :math:`Hv` (blocks ``indices``, default all) into the buffers ``out`` in place."""
        idx = list(range(len(self.lin.leaves))) if indices is None else list(indices)
        self._product(tangents, dict(zip(idx, out)), False)


def graph_hessian(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    targets: Any,
    loss_fn: Any,
    modify: str | None = None,
) -> GraphHessian | Linearization | None:
    """One batch's Hessian (``modify=None``) or PCH-modified products on the graph engine.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of the batch.
        targets: Its targets.
        loss_fn: The loss.
        modify: ``None``, ``"clip"`` or ``"abs"`` (module docstring).

    Returns:
        A :class:`GraphHessian`; where the model cannot be traced, the whole-model autograd
        linearisation the graph engine fell back to (its ``fallback_reason`` says why), or
        ``None`` where the model does not return one tensor.
    """
    try:
        token = SECOND_DERIVATIVES.set(True)  # rules compute f'' with f' in the forward pass
        try:
            lin = graph_linearization(fmodel, inputs, fmodel.leaves(), cls=SecondOrderGraph)
        finally:
            SECOND_DERIVATIVES.reset(token)
    except TypeError:  # the autograd fallback refuses outputs that are not one tensor
        return None
    if not isinstance(lin, SecondOrderGraph):
        return lin
    return GraphHessian(lin, loss_terms(loss_fn, lin.z, targets), modify)
