r"""A node without a rule, differentiated by autograd on its own; nested tuples of values."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..linearization import batched_grad
from ..pch_mode import positive_curvature_mode
from .step_base import Grads, Step

__all__ = ["AutogradStep", "flat_like", "flat_tensors", "rebuild"]


def flat_tensors(value: Any) -> list[Any]:
    """The leaves of nested tuples and lists, in order."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in flat_tensors(v)]
    return [value]


def rebuild(template: Any, leaves: Any) -> Any:
    """Nested tuples shaped as ``template`` from an iterator of leaves."""
    if isinstance(template, (tuple, list)):
        return tuple(rebuild(v, leaves) for v in template)
    return next(leaves)


def flat_like(template: Any, value: Any) -> list[Any]:
    """The leaves of ``value`` as ``template`` nests them (``None`` for every leaf of a None)."""
    if isinstance(template, (tuple, list)):
        if value is None:
            return [None] * len(flat_tensors(template))
        return [leaf for t, v in zip(template, value) for leaf in flat_like(t, v)]
    return [value]


def _differentiable(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class AutogradStep(Step):
    r"""A node without a rule, differentiated by autograd on its own.

    The node's function is evaluated once on leaf copies of its active inputs and of the
    trainable parameters it reads. :math:`J^\top u` is a retained backward of that graph;
    :math:`J v` differentiates the graph of :math:`w \mapsto J^\top w` (built at the first
    product, as :class:`~secondorder.curvature.linearization.AutogradLinearization` does for a
    whole model) with respect to :math:`w`.
    """

    kind = "autograd"
    batched_products = "vmap"

    def __init__(
        self,
        inputs: list[Any],
        call: Callable[[list[Any], list[Tensor]], Any],
        values: list[Any],
        params: list[tuple[int, Tensor]],
    ) -> None:
        self.inputs = inputs
        self.param_index = [i for i, _ in params]
        self._in_templates = values
        with torch.enable_grad():
            leaf_values = []
            self._in_leaves: list[list[Tensor | None]] = []
            for v in values:
                leaves = [
                    t.detach().requires_grad_(True) if _differentiable(t) else t
                    for t in flat_tensors(v)
                ]
                self._in_leaves.append([t if _differentiable(t) else None for t in leaves])
                leaf_values.append(rebuild(v, iter(leaves)))
            self._p_leaves = [p.detach().requires_grad_(True) for _, p in params]
            out = call(leaf_values, self._p_leaves)
        self._call, self._leaf_values = call, leaf_values
        self._template = out
        outs = flat_tensors(out)
        self._out_mask = [isinstance(o, Tensor) and o.requires_grad for o in outs]
        self._outs = [o for o, m in zip(outs, self._out_mask) if m]
        self.value = rebuild(out, iter([o.detach() if isinstance(o, Tensor) else o for o in outs]))
        self._wrt = [t for ls in self._in_leaves for t in ls if t is not None] + self._p_leaves
        self._w: list[Tensor] | None = None
        self._jtw: list[Tensor | None] = []

    def _build_jtw(self) -> None:
        with torch.enable_grad():
            self._w = [torch.zeros_like(o, requires_grad=True) for o in self._outs]
            jtw = torch.autograd.grad(
                self._outs, self._wrt, self._w, create_graph=True, allow_unused=True
            )
        self._jtw = list(jtw)

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        flat_t: list[Tensor | None] = []
        for leaves, template, t in zip(self._in_leaves, self._in_templates, tin):
            ts = flat_like(template, t)
            flat_t.extend(tt for tt, leaf in zip(ts, leaves) if leaf is not None)
        flat_t.extend(tangents[i] for i in self.param_index)
        if self._w is None:
            self._build_jtw()
        outs, tans = [], []
        for g, t in zip(self._jtw, flat_t):
            if g is not None and t is not None and g.requires_grad:
                outs.append(g)
                tans.append(t)
        if not outs:
            return None
        assert self._w is not None
        jv = batched_grad(self, outs, self._w, tans, batched)
        it = iter(jv)
        leaves = [next(it) if m else None for m in self._out_mask]
        return rebuild(self._template, iter(leaves))

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        cots = flat_like(self._template, u)
        outs, cs = [], []
        for o, c in zip(self._outs, [c for c, m in zip(cots, self._out_mask) if m]):
            if c is not None:
                outs.append(o)
                cs.append(c)
        if not outs:
            return [None] * len(self.inputs)
        return self._backward(outs, cs, need, grads, batched)

    def _backward(
        self, outs: list[Tensor], cs: list[Any], need: list[bool], grads: Grads, batched: bool
    ) -> list[Any]:
        """Differentiate ``outs`` against ``cs`` into the needed inputs and into ``grads``."""
        result: list[Any] = [None] * len(self.inputs)
        wrt: list[Tensor] = []
        for leaves, n in zip(self._in_leaves, need):
            wrt.extend(t for t in leaves if t is not None and n)
        p_slots = [k for k, i in enumerate(self.param_index) if i in grads]
        wrt.extend(self._p_leaves[k] for k in p_slots)
        if not wrt:
            return result
        got = iter(batched_grad(self, outs, wrt, cs, batched))
        for j, (leaves, n) in enumerate(zip(self._in_leaves, need)):
            if not n:
                continue
            parts = [next(got) if t is not None else None for t in leaves]
            if len(parts) == 1:
                result[j] = parts[0]
            else:
                result[j] = tuple(parts)
        for k in p_slots:
            g = next(got)
            if g is not None:
                grads[self.param_index[k]].add_(g)
        return result

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:
        r"""The graph of :math:`g = \nabla_{(x,\theta)} \langle \delta, f \rangle`, kept.

        With ``modify``, the node is evaluated again under
        :func:`~secondorder.curvature.pch_mode.positive_curvature_mode`, so the activations it
        calls get the PCH's modified second derivative (as the modified double backward).
        """
        if delta is None:
            return None
        outs_all = self._outs
        cots = [c for c, m in zip(flat_like(self._template, delta), self._out_mask) if m]
        with torch.enable_grad():
            if modify is not None:
                with positive_curvature_mode(modify):
                    out = self._call(self._leaf_values, self._p_leaves)
                outs_all = [o for o, m in zip(flat_tensors(out), self._out_mask) if m]
            pairs = [(o, c) for o, c in zip(outs_all, cots) if c is not None]
            if not pairs:
                return None
            g = torch.autograd.grad(
                [o for o, _ in pairs],
                self._wrt,
                [c for _, c in pairs],
                create_graph=True,
                allow_unused=True,
            )
        if not any(gi is not None and gi.requires_grad for gi in g):
            return None  # linear in every input and parameter
        return list(g)

    def residual(  # noqa: D102
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        flat_t: list[Tensor | None] = []
        for leaves, template, t in zip(self._in_leaves, self._in_templates, tin):
            ts = flat_like(template, t)
            flat_t.extend(tt for tt, leaf in zip(ts, leaves) if leaf is not None)
        flat_t.extend(tangents[i] for i in self.param_index)
        outs, tans = [], []
        for g, t in zip(rctx, flat_t):
            if g is not None and t is not None and g.requires_grad:
                outs.append(g)
                tans.append(t)
        if not outs:  # the symmetric Hessian of <delta, f> applied to (dx, dtheta)
            return [None] * len(self.inputs)
        return self._backward(outs, tans, need, grads, batched)
