r"""The steps of a traced graph: one per node that depends on the parameters.

Every step was evaluated once, when the graph was linearised, and keeps what its products need.
``jvp(tin, tangents, batched)`` maps the tangents of its active inputs (``tin``, one per entry of
``inputs``, ``None`` for zero) and the parameter tangents to its output tangent;
``vjp(u, need, grads, batched)`` maps an output cotangent to one cotangent per active input
(``None`` where ``need`` is false or zero) and adds parameter cotangents into ``grads``
(parameter index -> buffer, only the requested ones). Tangents of tuple-valued nodes are tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import Rule, sum_to
from ..linearization import batched_grad

__all__ = [
    "AutogradStep",
    "CatStep",
    "LinearStep",
    "ParamStep",
    "ProductStep",
    "ReshapeStep",
    "RuleStep",
    "Step",
    "SumStep",
    "TupleItemStep",
    "flat_tensors",
    "rebuild",
]

Grads = dict[int, Tensor]


class Step:
    """Base class (module docstring)."""

    inputs: list[Any]  # active input nodes, one per edge
    name: str = ""
    kind: str = ""

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:
        """Output tangent from the input and parameter tangents."""
        raise NotImplementedError

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:
        """Input cotangents from the output cotangent; parameter cotangents into ``grads``."""
        raise NotImplementedError


def _lead(t: Tensor, batched: bool) -> tuple[int, ...]:
    return (t.shape[0],) if batched else ()


def _align(t: Tensor, ndim: int, batched: bool) -> Tensor:
    """View a column-batched tangent ``(K, *s)`` as ``(K, 1, ..., *s)`` with ``ndim`` dims after K.

    Broadcasting aligns trailing dimensions, so the column dimension must not meet the
    operand's own leading ones.
    """
    if not batched or t.ndim - 1 >= ndim:
        return t
    return t.view(t.shape[0], *([1] * (ndim - t.ndim + 1)), *t.shape[1:])


class ParamStep(Step):
    """A trainable parameter read by ``get_attr``."""

    kind = "param"

    def __init__(self, index: int) -> None:
        self.inputs, self.index = [], index

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        return tangents[self.index]

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        buf = grads.get(self.index)
        if buf is not None:
            buf.add_(u)
        return []


class RuleStep(Step):
    """A module call served by its layer rule."""

    kind = "rule"

    def __init__(
        self,
        module: nn.Module,
        rule: Rule,
        ctx: dict[str, Any],
        inputs: list[Any],
        params: dict[str, int],
    ) -> None:
        self.module, self.rule, self.ctx, self.inputs, self.params = (
            module,
            rule,
            ctx,
            inputs,
            params,
        )

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        dx = tin[0] if tin else None
        dp = {name: tangents[i] for name, i in self.params.items()}
        return self.rule.jvp(self.module, self.ctx, dx, dp, batched)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        bufs = {name: grads[i] for name, i in self.params.items() if i in grads}
        need_input = bool(need) and need[0]
        dx = self.rule.vjp(self.module, self.ctx, u, need_input, bufs, batched)
        return [dx] if self.inputs else []


class SumStep(Step):
    """``a + b``, ``a - b``, ``-a``: signs per active input, broadcast to the output."""

    kind = "sum"

    def __init__(self, inputs: list[Any], signs: list[float], shapes: list[Any], out: Any):
        self.inputs, self.signs, self.shapes, self.out = inputs, signs, shapes, out

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        total: Tensor | None = None
        for s, t in zip(self.signs, tin):
            if t is not None:
                t = _align(t, len(self.out), batched)
                term = t if s == 1.0 else -t
                total = term if total is None else total + term
        if total is None:
            return None
        full = (*_lead(total, batched), *self.out)
        return total if tuple(total.shape) == full else total.expand(full)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        out = []
        for s, shape, n in zip(self.signs, self.shapes, need):
            g = sum_to(u, tuple(shape), batched) if n else None
            out.append(g if g is None or s == 1.0 else -g)
        return out


class ProductStep(Step):
    """``a * b`` (either or both active) or ``a / c`` (``c`` constant): the product rule."""

    kind = "product"

    def __init__(
        self, inputs: list[Any], values: list[Any], active: list[bool], divide: bool
    ) -> None:
        self.inputs, self.values, self.active, self.divide = inputs, values, active, divide

    def _other(self, i: int) -> Any:
        return self.values[1 - i]

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        total = None
        slots = [i for i in range(2) if self.active[i]]
        for i, t in zip(slots, tin):
            if t is None:
                continue
            other = self._other(i)
            ndim = max(
                self.values[0].ndim if isinstance(self.values[0], Tensor) else 0,
                self.values[1].ndim if isinstance(self.values[1], Tensor) else 0,
            )
            t = _align(t, ndim, batched)
            term = t / other if self.divide else t * other
            total = term if total is None else total + term
        return total

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        out: list[Any] = []
        slots = [i for i in range(2) if self.active[i]]
        for i, n in zip(slots, need):
            if not n:
                out.append(None)
                continue
            other = self._other(i)
            g = u / other if self.divide else u * other
            out.append(sum_to(g, tuple(self.values[i].shape), batched))
        return out


class CatStep(Step):
    """``torch.cat(tensors, dim)``: tangents concatenated, cotangents split."""

    kind = "cat"

    def __init__(
        self, inputs: list[Any], active: list[bool], shapes: list[Any], dim: int, dtype: Any
    ) -> None:
        self.inputs, self.active, self.shapes, self.dim = inputs, active, shapes, dim
        self.dtype = dtype

    def _dim(self, batched: bool) -> int:
        return self.dim + 1 if batched and self.dim >= 0 else self.dim

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        if all(t is None for t in tin):
            return None
        ref = next(t for t in tin if t is not None)
        lead = _lead(ref, batched)
        it = iter(tin)
        parts = []
        for act, shape in zip(self.active, self.shapes):
            t = next(it) if act else None
            parts.append(t if t is not None else ref.new_zeros(*lead, *shape))
        return torch.cat(parts, self._dim(batched))

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        sizes = [s[self.dim] for s in self.shapes]
        pieces = u.split(sizes, self._dim(batched))
        need_it = iter(need)
        return [p if next(need_it) else None for p, a in zip(pieces, self.active) if a]


class ReshapeStep(Step):
    """``view``, ``reshape``, ``flatten``, ``(un)squeeze``, ``contiguous`` of one active input."""

    kind = "reshape"

    def __init__(self, inputs: list[Any], in_shape: Any, out_shape: Any) -> None:
        self.inputs, self.in_shape, self.out_shape = inputs, in_shape, out_shape

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        t = tin[0]
        return None if t is None else t.reshape(*_lead(t, batched), *self.out_shape)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        return [u.reshape(*_lead(u, batched), *self.in_shape) if need[0] else None]


class LinearStep(Step):
    """A function linear in its one active input: :math:`f(dx)` and the pullback of :math:`f`."""

    kind = "linear"

    def __init__(self, inputs: list[Any], f: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.inputs, self.f = inputs, f
        self.pullback = torch.func.vjp(f, x)[1]

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        t = tin[0]
        if t is None:
            return None
        return torch.vmap(self.f)(t) if batched else self.f(t)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        if not need[0]:
            return [None]
        return [torch.vmap(self.pullback)(u)[0] if batched else self.pullback(u)[0]]


class TupleItemStep(Step):
    """``value[i]`` of a tuple-valued node (a module that returns several outputs)."""

    kind = "item"

    def __init__(self, inputs: list[Any], index: int, length: int) -> None:
        self.inputs, self.index, self.length = inputs, index, length

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        return None if tin[0] is None else tin[0][self.index]

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        cot: list[Any] = [None] * self.length
        cot[self.index] = u
        return [tuple(cot)]


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
        result: list[Any] = [None] * len(self.inputs)
        if not outs:
            return result
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
