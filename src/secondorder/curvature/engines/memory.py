r"""Two rewrites of a linearised graph that save memory; the products stay exactly the same.

**An activation moved behind the max-pooling that follows it** (:func:`pool_activations`). With
:math:`P` the selection of the pooled entries and :math:`D = \operatorname{diag}(\sigma'(a))`,

.. math::
    P D = D_P P, \qquad D_P = \operatorname{diag}(P \sigma'(a)),

so only the derivative at the selected entries is kept: gathered at the pooling indices, or, for
the activations whose derivative is a function of their output :math:`s` (ReLU, sigmoid, tanh),
the pooled output :math:`P s` itself, which the next layer keeps as its input anyway. The
activation's full-size output is not held, and both products apply the derivative to the pooled
(smaller) tensors.

**Activations applied in place** (:func:`in_place_activations`): where an activation's input
tangent (or output cotangent) is a fresh tensor that only it reads, the output of a Linear or
convolution's product, :math:`\sigma' \odot g` overwrites :math:`g` (ATen's fused
``*_backward`` kernels with ``grad_input=g`` for ReLU, sigmoid and tanh) instead of allocating
a tensor of the same size beside it.

**The bottom ``Linear, activation, Linear`` of a reverse pass in column blocks**
(:class:`BottomTriple`). Where the lower Linear's input needs no cotangent (the model's input, or
no requested parameter below), its parameter cotangents are computed over two column blocks
:math:`J` of the hidden layer, with :math:`u` the cotangent of the upper Linear's output,

.. math::
    h_J = \sigma'_{:,J} \odot u W_{2,:J}, \qquad
    dW_{1,J} \mathrel{+}= h_J^\top x, \qquad db_{1,J} \mathrel{+}= \textstyle\sum_n h_{J,n},

written straight into the caller's buffers, so the hidden layer's full cotangent never coexists
with its neighbour's and the product's output buffer. Only 2-D inputs and hidden layers of at
least ``2 * MIN_BLOCK`` units are blocked: narrower blocks slow the matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..layers.conv import ConvRule
from ..layers.elementwise import ElementwiseRule
from ..layers.linear import LinearRule
from ..layers.pooling import MaxPoolRule
from .steps import Grads, RuleStep, Step

__all__ = [
    "MIN_BLOCK",
    "BottomTriple",
    "InPlaceActivationStep",
    "PooledActivationStep",
    "find_triples",
    "in_place_activations",
    "pool_activations",
    "times_derivative",
]

MIN_BLOCK = 256


def _rule_step(step: Step, rule: type) -> bool:
    return isinstance(step, RuleStep) and isinstance(step.rule, rule)


def _users(steps: Sequence[tuple[fx.Node, Step]]) -> dict[Any, list[fx.Node]]:
    users: dict[Any, list[fx.Node]] = {}
    for node, step in steps:
        for inp in step.inputs:
            users.setdefault(inp, []).append(node)
    return users


# g <- g * sigma'(a) in place from the output s, for the activations that keep s (elementwise.py)
_IN_PLACE = {
    nn.ReLU: lambda g, s: torch.ops.aten.threshold_backward.grad_input(g, s, 0, grad_input=g),
    nn.Sigmoid: lambda g, s: torch.ops.aten.sigmoid_backward.grad_input(g, s, grad_input=g),
    nn.Tanh: lambda g, s: torch.ops.aten.tanh_backward.grad_input(g, s, grad_input=g),
}


def times_derivative(act: RuleStep, ctx: dict[str, Any], g: Tensor, in_place: bool) -> Tensor:
    r""":math:`\sigma' \odot g` of an activation step with context ``ctx`` (into ``g`` if asked)."""
    if not in_place or ("s" in ctx and type(act.module) not in _IN_PLACE):
        out = act.rule.jvp(act.module, ctx, g, {}, False)
        assert out is not None
        return out
    s = ctx.get("s")
    if s is not None:
        return _IN_PLACE[type(act.module)](g, s)
    return g.mul_(ctx["d"])


class InPlaceActivationStep(Step):
    """An activation step whose product overwrites its fresh input (module docstring)."""

    kind = "activation_in_place"

    def __init__(self, act: RuleStep, jvp_in_place: bool, vjp_in_place: bool) -> None:
        self.act, self.inputs = act, act.inputs
        self.jvp_in_place, self.vjp_in_place = jvp_in_place, vjp_in_place

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        t = tin[0]
        return None if t is None else times_derivative(self.act, self.act.ctx, t, self.jvp_in_place)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        if not need[0]:
            return [None]
        return [times_derivative(self.act, self.act.ctx, u, self.vjp_in_place)]


class PooledActivationStep(Step):
    """An activation followed by max-pooling, applied as pooling then the pooled derivative."""

    kind = "pooled_activation"
    vjp_in_place = False  # set by in_place_activations

    def __init__(self, act: RuleStep, pool: RuleStep) -> None:
        self.act, self.pool, self.inputs = act, pool, pool.inputs

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        pooled = self.pool.jvp(tin, tangents, batched)  # a new tensor (a gather)
        return None if pooled is None else times_derivative(self.act, self.act.ctx, pooled, True)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        if not need[0]:
            return [None]
        g = times_derivative(self.act, self.act.ctx, u, self.vjp_in_place)
        return self.pool.vjp(g, need, grads, batched)


def pool_activations(
    steps: list[tuple[fx.Node, Step]], values: dict[fx.Node, Any], out: fx.Node
) -> list[tuple[fx.Node, Step]]:
    """The steps with every activation that only max-pooling reads moved behind it.

    Args:
        steps: ``(node, step)`` in evaluation order.
        values: Node values (the pooled outputs are read from here).
        out: The output node (its value is never folded away).

    Returns:
        The new steps: each such pair is one :class:`PooledActivationStep` at the pooling's node.
    """
    users = _users(steps)
    by_node = dict(steps)
    fused: dict[fx.Node, Step] = {}
    dropped: set[fx.Node] = set()
    for node, step in steps:
        if not _rule_step(step, MaxPoolRule) or not step.inputs:
            continue
        a = step.inputs[0]
        act = by_node.get(a)
        if act is None or not _rule_step(act, ElementwiseRule) or a is out:
            continue
        if users.get(a) != [node] or len(a.users) != 1:  # read by the pooling only
            continue
        assert isinstance(act, RuleStep) and isinstance(step, RuleStep)
        if "s" in act.ctx:  # derivative from the output: the pooled output P s
            ctx = {"s": values[node]}
        else:  # P sigma'(a), gathered at the pooling's indices
            ctx = {"d": step.rule.jvp(step.module, step.ctx, act.ctx["d"], {}, False)}
        pooled_act = RuleStep(act.module, act.rule, ctx, [node], act.params)
        pooled_act.name = act.name
        pool = RuleStep(step.module, step.rule, step.ctx, act.inputs, step.params)
        fused[node] = PooledActivationStep(pooled_act, pool)
        fused[node].name = node.name
        dropped.add(a)
    if not fused:
        return steps
    return [(n, fused.get(n, s)) for n, s in steps if n not in dropped]


class BottomTriple:
    """Steps ``lower`` (Linear), ``act`` (activation), ``upper`` (Linear) of one chain.

    Args:
        lower: The lower Linear's step (its input is 2-D).
        act: The activation's step, reading ``lower`` only.
        upper: The upper Linear's step, reading ``act`` only.
    """

    def __init__(self, lower: RuleStep, act: RuleStep, upper: RuleStep) -> None:
        self.lower, self.act, self.upper = lower, act, upper

    def applies(self, mask: dict[Any, int], requested: int, batched: bool) -> bool:
        """Whether the blocked pass serves this reverse pass (one column, no input cotangent).

        Args:
            mask: Node -> bit mask of the parameters above it.
            requested: Bit mask of the requested parameters.
            batched: Whether the cotangents carry columns.
        """
        if batched:
            return False
        lower_params = sum(1 << i for i in self.lower.params.values())
        if not lower_params & requested:
            return False
        return not any(mask[n] & requested for n in self.lower.inputs)

    def vjp(self, u: Tensor, grads: Grads) -> None:
        """Add the parameter cotangents of all three steps into ``grads`` (module docstring)."""
        self.upper.vjp(u, [False] * len(self.upper.inputs), grads, False)
        low, act = self.lower, self.act
        x, w2 = low.ctx["x"], self.upper.ctx["w"]
        gw = grads.get(low.params.get("weight", -1))
        gb = grads.get(low.params.get("bias", -1))
        for cols in _halves(w2.shape[1]):
            part = {k: v[:, cols] for k, v in act.ctx.items()}
            h = times_derivative(act, part, u @ w2[:, cols], True)
            if gw is not None:
                gw[cols].addmm_(h.T, x)
            if gb is not None:
                gb[cols].add_(h.sum(0))
            del h


def _halves(n: int) -> list[slice]:
    h = (n + 1) // 2
    return [slice(0, h), slice(h, n)] if n > 1 else [slice(0, n)]


def find_triples(
    steps: Sequence[tuple[fx.Node, Step]], out: fx.Node
) -> dict[fx.Node, BottomTriple]:
    """Every ``Linear, activation, Linear`` chain wide enough to block, keyed by its top node.

    Args:
        steps: ``(node, step)`` in evaluation order.
        out: The output node (no intermediate node of a triple may be it).

    Returns:
        The upper Linear's node -> its :class:`BottomTriple`.
    """
    users = _users(steps)
    by_node = dict(steps)
    triples: dict[fx.Node, BottomTriple] = {}
    for node, upper in steps:
        if not _rule_step(upper, LinearRule) or len(upper.inputs) != 1:
            continue
        a = upper.inputs[0]
        act = by_node.get(a)
        if isinstance(act, InPlaceActivationStep):
            act = act.act
        if act is None or not _rule_step(act, ElementwiseRule) or len(act.inputs) != 1:
            continue
        lo = act.inputs[0]
        lower = by_node.get(lo)
        if lower is None or not _rule_step(lower, LinearRule):
            continue
        if out in (a, lo) or users.get(a) != [node] or users.get(lo) != [a]:
            continue
        assert isinstance(upper, RuleStep) and isinstance(act, RuleStep)
        assert isinstance(lower, RuleStep)
        x, w2 = lower.ctx["x"], upper.ctx["w"]
        if x.ndim != 2 or upper.ctx["x"].ndim != 2 or w2.shape[1] < 2 * MIN_BLOCK:
            continue
        if not all(v.ndim == 2 for v in act.ctx.values() if isinstance(v, Tensor)):
            continue
        triples[node] = BottomTriple(lower, act, upper)
    return triples


def _fresh(step: Step | None) -> bool:
    """Whether ``step``'s products return new tensors (a Linear or a convolution)."""
    return isinstance(step, RuleStep) and isinstance(step.rule, (LinearRule, ConvRule))


def _in_place_capable(step: Step) -> bool:
    """An activation of one input keeping its output (ReLU, sigmoid, tanh) or its derivative."""
    if not (isinstance(step, RuleStep) and isinstance(step.rule, ElementwiseRule)):
        return False
    if len(step.inputs) != 1:
        return False
    return ("s" in step.ctx and type(step.module) in _IN_PLACE) or "d" in step.ctx


def in_place_activations(
    steps: list[tuple[fx.Node, Step]], out: fx.Node
) -> list[tuple[fx.Node, Step]]:
    """The steps with each activation applied in place where its operand is fresh and unshared.

    The input tangent qualifies when the activation is the only reader of its input and that
    input is a Linear or convolution's output; the output cotangent when the activation's only
    reader is a Linear or convolution (whose reverse product makes it). The model's output is
    never overwritten.

    Args:
        steps: ``(node, step)`` in evaluation order.
        out: The output node.

    Returns:
        The new steps.
    """
    users = _users(steps)
    by_node = dict(steps)
    new: list[tuple[fx.Node, Step]] = []
    for node, step in steps:
        reader = users.get(node, [])
        vjp_ok = node is not out and len(reader) == 1 and _fresh(by_node.get(reader[0]))
        if isinstance(step, PooledActivationStep):
            step.vjp_in_place = vjp_ok
        elif _in_place_capable(step):
            assert isinstance(step, RuleStep)
            src = step.inputs[0]
            jvp_ok = src is not out and users.get(src) == [node] and _fresh(by_node.get(src))
            if jvp_ok or vjp_ok:
                wrapped = InPlaceActivationStep(step, jvp_ok, vjp_ok)
                wrapped.name = step.name
                new.append((node, wrapped))
                continue
        new.append((node, step))
    return new
