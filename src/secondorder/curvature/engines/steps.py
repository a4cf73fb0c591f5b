r"""The steps of a traced graph: one per node that depends on the parameters.

Every step was evaluated once, when the graph was linearised, and keeps what its products need.
``jvp(tin, tangents, batched)`` maps the tangents of its active inputs (``tin``, one per entry of
``inputs``, ``None`` for zero) and the parameter tangents to its output tangent;
``vjp(u, need, grads, batched)`` maps an output cotangent to one cotangent per active input
(``None`` where ``need`` is false or zero) and adds parameter cotangents into ``grads``
(parameter index -> buffer, only the requested ones). Tangents of tuple-valued nodes are tuples.

Second order (Hessian products, :mod:`.second_order`): ``prepare_residual(delta, modify)`` keeps,
once per build, what the node's residual needs at its gradient cotangent ``delta`` (``None``:
zero); ``residual(rctx, tin, tangents, need, grads, batched)`` returns the residual cotangents
:math:`r_x` of the active inputs and adds :math:`r_\theta` into ``grads``, with
:math:`(r_x, r_\theta) = \nabla^2_{(x,\theta)}\langle\delta, f\rangle\,(dx, d\theta)`
(:mod:`..layers.base`). Sums, concatenations, reshapes, linear functions, parameters and tuple
items are linear: no residual. A product :math:`a b` of two active values has
:math:`r_a = \delta\, db`, :math:`r_b = \delta\, da`; a module by its rule's residual; a node
differentiated by autograd by the double backward of that node alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import Rule, sum_to
from .autograd_step import AutogradStep, flat_tensors, rebuild
from .step_base import Grads, Step

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

    linear = True

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

    #: the module's input and parameter values, kept by a second-order linearisation until
    #: :meth:`prepare_residual` (``None`` otherwise)
    second_order_values: tuple[Tensor, dict[str, Tensor]] | None = None

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:  # noqa: D102
        values, self.second_order_values = self.second_order_values, None
        if delta is None:
            return None
        if values is None:
            raise RuntimeError("a second-order pass needs a linearisation that kept its inputs")
        x, params = values
        return self.rule.prepare_residual(self.module, self.ctx, x, params, delta, modify)

    def residual(  # noqa: D102
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        dx = tin[0] if tin else None
        dp = {name: tangents[i] for name, i in self.params.items()}
        bufs = {name: grads[i] for name, i in self.params.items() if i in grads}
        need_input = bool(need) and need[0]
        r = self.rule.residual(self.module, self.ctx, rctx, dx, dp, need_input, bufs, batched)
        return [r] if self.inputs else []


class SumStep(Step):
    """``a + b``, ``a - b``, ``-a``: signs per active input, broadcast to the output."""

    linear = True

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

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:  # noqa: D102
        return delta if all(self.active) and delta is not None else None

    def residual(  # noqa: D102
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        out: list[Any] = []
        for i, n in enumerate(need):  # both slots active: r_a = delta db, r_b = delta da
            t = tin[1 - i]
            if not n or t is None:
                out.append(None)
                continue
            ndim = max(self.values[0].ndim, self.values[1].ndim)
            g = _align(t, ndim, batched) * rctx
            out.append(sum_to(g, tuple(self.values[i].shape), batched))
        return out


class CatStep(Step):
    """``torch.cat(tensors, dim)``: tangents concatenated, cotangents split."""

    linear = True

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

    linear = True

    kind = "reshape"

    def __init__(self, inputs: list[Any], in_shape: Any, out_shape: Any) -> None:
        self.inputs, self.in_shape, self.out_shape = inputs, in_shape, out_shape

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        t = tin[0]
        return None if t is None else t.reshape(*_lead(t, batched), *self.out_shape)

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        return [u.reshape(*_lead(u, batched), *self.in_shape) if need[0] else None]


def linear_pullback(f: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[Tensor], Any]:
    r"""The pullback :math:`u \mapsto (f^\top u,)` of a function ``f`` linear in ``x``.

    A linear map's pullback does not depend on the point, so it is built at a stand-in of
    ``x``'s shape and dtype holding one stored zero (``expand``), not at ``x``: the pullback
    (which keeps its output, a view of its input for ``transpose``, indexing, ...) then keeps
    nothing of ``x`` alive. Where ``f`` cannot run on the stand-in (it writes into or ``view``\ s
    its input) the pullback is built at ``x`` itself.
    """
    stand_in = x.new_zeros(()).expand(x.shape)
    try:
        return torch.func.vjp(f, stand_in)[1]
    except RuntimeError:
        return torch.func.vjp(f, x)[1]


class LinearStep(Step):
    """A function linear in its one active input: :math:`f(dx)` and the pullback of :math:`f`.

    The pullback keeps nothing of the input's values (:func:`linear_pullback`).
    """

    linear = True

    kind = "linear"

    def __init__(self, inputs: list[Any], f: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.inputs, self.f = inputs, f
        self.pullback = linear_pullback(f, x)

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

    linear = True

    kind = "item"

    def __init__(self, inputs: list[Any], index: int, length: int) -> None:
        self.inputs, self.index, self.length = inputs, index, length

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        return None if tin[0] is None else tin[0][self.index]

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        cot: list[Any] = [None] * self.length
        cot[self.index] = u
        return [tuple(cot)]
