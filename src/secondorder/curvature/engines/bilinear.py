r"""Op rules for matrix products and splits: any operand may depend on the parameters.

- ``matmul``: ``a @ b``, ``torch.matmul``/``mm``/``bmm`` and two-operand ``torch.einsum`` (a
  function :math:`f(a, b)` bilinear in its operands), times ``alpha``, plus ``beta`` times an
  added operand for ``torch.addmm``/``baddbmm``:

  .. math::
      dy = \alpha\,(f(da, b) + f(a, db)) + \beta\, ds, \qquad
      \bar a = \alpha\, \partial_a \langle u, f(a, b)\rangle, \quad
      \bar b = \alpha\, \partial_b \langle u, f(a, b)\rangle, \quad \bar s = \beta u,

  with broadcast batch dimensions summed back to each operand's shape; for matrix products of
  operands with two or more dimensions by the closed forms :math:`\bar a = u b^\top`,
  :math:`\bar b = a^\top u`, otherwise by ``torch.func.vjp`` of the partial map (linear, so its
  pullback does not depend on the point). With both ``a`` and ``b`` active the residual at the
  gradient cotangent :math:`\delta` is the bilinear cross term
  :math:`r_a = \alpha\,\partial_a \langle\delta, f(a, db)\rangle`,
  :math:`r_b = \alpha\,\partial_b \langle\delta, f(da, b)\rangle`.
- ``linear_fn``: ``F.linear(x, W, b)`` with any of ``x``, ``W``, ``b`` active, by the rule of
  ``nn.Linear`` (:mod:`..layers.linear`) with ``W`` and ``b`` as inputs of the graph.
- ``split``: ``torch.split``, ``torch.chunk``, ``Tensor.split``/``chunk``/``unbind``: tangents
  split, cotangents concatenated (zeros for pieces that received none).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..layers.base import sum_to
from ..layers.linear import LinearRule
from .step_base import Grads, Step

__all__ = ["BilinearStep", "LinearFnStep", "SplitStep", "build_bilinear", "build_split"]

MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
ADD_MATMUL_FUNCS = {torch.addmm, torch.baddbmm}
SPLIT_FUNCS = {torch.split, torch.chunk, torch.unbind}
SPLIT_METHODS = {"split", "chunk", "unbind"}
_LINEAR_RULE = LinearRule()


def _align(t: Tensor, ndim: int, batched: bool) -> Tensor:
    """View a tangent ``(K, *s)`` as ``(K, 1, ..., *s)`` with ``ndim`` dimensions after K."""
    if not batched or t.ndim - 1 >= ndim:
        return t
    return t.view(t.shape[0], *([1] * (ndim - t.ndim + 1)), *t.shape[1:])


class BilinearStep(Step):
    r""":math:`y = \alpha f(a, b) + \beta s` with :math:`f` bilinear (module docstring).

    Args:
        inputs: The active operand nodes, in the order ``a``, ``b``, ``s``.
        values: The values of ``(a, b, s)`` (``s`` may be None).
        active: Which of ``(a, b, s)`` are active.
        fn: :math:`f`, or None for the matrix product.
        alpha: The factor of :math:`f`.
        beta: The factor of ``s``.
        out_ndim: The output's number of dimensions.
    """

    kind = "matmul"
    owns_residual = True

    def __init__(
        self,
        inputs: list[Any],
        values: Sequence[Any],
        active: Sequence[bool],
        fn: Callable[[Tensor, Tensor], Tensor] | None,
        alpha: float,
        beta: float,
        out_ndim: int,
    ) -> None:
        self.inputs, self.values, self.active = inputs, list(values), list(active)
        self.alpha, self.beta, self.out_ndim = alpha, beta, out_ndim
        a, b = values[0], values[1]
        self.closed = fn is None and a.ndim >= 2 and b.ndim >= 2
        self.fn = fn if fn is not None else torch.matmul
        self.linear = not (active[0] and active[1])

    def _scale(self, t: Tensor, c: float) -> Tensor:
        return t if c == 1.0 else t * c

    def _f(self, a: Tensor, b: Tensor, batched: bool, which: int) -> Tensor:
        """:math:`f(a, b)` where operand ``which`` (0 or 1) carries the columns if ``batched``."""
        if not batched:
            return self.fn(a, b)
        if self.closed:
            if which == 0:
                return _align(a, self.out_ndim, True) @ b
            return a @ _align(b, self.out_ndim, True)
        if which == 0:
            return torch.vmap(lambda x: self.fn(x, b))(a)
        return torch.vmap(lambda x: self.fn(a, x))(b)

    def _pull(
        self, slot: int, u: Tensor, other: Tensor, batched_u: bool, batched_o: bool
    ) -> Tensor:
        r""":math:`\partial_x \langle u, f\rangle` for operand ``slot``, the other at ``other``."""
        shape = tuple(self.values[slot].shape)
        batched = batched_u or batched_o
        if self.closed:
            o = _align(other, self.out_ndim, batched_o)
            g = u @ o.mT if slot == 0 else o.mT @ u
            return sum_to(g, shape, batched)
        x0 = self.values[slot]

        def pull(uu: Tensor, oo: Tensor) -> Tensor:
            part = (lambda x: self.fn(x, oo)) if slot == 0 else (lambda x: self.fn(oo, x))
            return torch.func.vjp(part, x0)[1](uu)[0]

        if batched_u:
            return torch.vmap(pull, in_dims=(0, None))(u, other)
        if batched_o:
            return torch.vmap(pull, in_dims=(None, 0))(u, other)
        return pull(u, other)

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        it = iter(tin)
        t = [next(it) if act else None for act in self.active]
        total: Tensor | None = None
        for slot in (0, 1):
            if t[slot] is None:
                continue
            args = [self.values[0], self.values[1]]
            args[slot] = t[slot]
            term = self._scale(self._f(args[0], args[1], batched, slot), self.alpha)
            total = term if total is None else total.add_(term)
        if t[2] is not None:
            term = self._scale(_align(t[2], self.out_ndim, batched), self.beta)
            total = term if total is None else total + term
        return total

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        out: list[Any] = []
        slots = [i for i in range(3) if self.active[i]]
        for slot, n in zip(slots, need):
            if not n:
                out.append(None)
            elif slot == 2:
                out.append(sum_to(self._scale(u, self.beta), tuple(self.values[2].shape), batched))
            else:
                g = self._pull(slot, u, self.values[1 - slot], batched, False)
                out.append(self._scale(g, self.alpha))
        return out

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:  # noqa: D102
        if self.linear or delta is None:
            return None
        return delta

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
        slots = [i for i in range(3) if self.active[i]]
        for k, (slot, n) in enumerate(zip(slots, need)):
            other = tin[1 - k] if slot < 2 else None  # slots 0 and 1 are both active here
            if not n or slot == 2 or other is None:
                out.append(None)
                continue
            g = self._pull(slot, rctx, other, False, batched)
            out.append(self._scale(g, self.alpha))
        return out


class LinearFnStep(Step):
    r"""``F.linear(x, W, b)`` with any of ``x``, ``W``, ``b`` active (by the ``nn.Linear`` rule)."""

    kind = "linear_fn"
    owns_residual = True

    def __init__(self, inputs: list[Any], values: Sequence[Any], active: Sequence[bool]) -> None:
        self.inputs, self.active = inputs, list(active)
        x, w, _ = values
        self.ctx = {"x": x, "w": w}
        self.shapes: list[Any] = [v.shape if isinstance(v, Tensor) else () for v in values]
        self.linear = not (active[0] and active[1])

    def _split(self, tin: list[Any]) -> list[Any]:
        it = iter(tin)
        return [next(it) if act else None for act in self.active]

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        dx, dw, db = self._split(tin)
        dp = {"weight": dw, "bias": db}
        if dx is None and dw is None and db is None:
            return None
        return _LINEAR_RULE.jvp(None, self.ctx, dx, dp, batched)  # type: ignore[arg-type]

    def _buffers(self, u: Tensor, need: list[bool], batched: bool) -> dict[str, Tensor]:
        lead = u.shape[:1] if batched else ()
        want = dict(zip([i for i in range(3) if self.active[i]], need))
        bufs = {}
        for slot, name in ((1, "weight"), (2, "bias")):
            if want.get(slot):
                bufs[name] = u.new_zeros(*lead, *self.shapes[slot])
        return bufs

    def _collect(self, dx: Any, bufs: dict[str, Tensor], need: list[bool]) -> list[Any]:
        found = {0: dx, 1: bufs.get("weight"), 2: bufs.get("bias")}
        slots = [i for i in range(3) if self.active[i]]
        return [found[s] if n else None for s, n in zip(slots, need)]

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        want_x = self.active[0] and need[0]
        bufs = self._buffers(u, need, batched)
        dx = _LINEAR_RULE.vjp(None, self.ctx, u, want_x, bufs, batched)  # type: ignore[arg-type]
        return self._collect(dx, bufs, need)

    def prepare_residual(self, delta: Any, modify: str | None) -> Any:  # noqa: D102
        if self.linear or delta is None:
            return None
        return {"delta": delta}

    def residual(  # noqa: D102
        self,
        rctx: Any,
        tin: list[Any],
        tangents: Sequence[Tensor | None],
        need: list[bool],
        grads: Grads,
        batched: bool,
    ) -> list[Any]:
        dx, dw, _ = self._split(tin)
        delta = rctx["delta"]
        want = dict(zip([i for i in range(3) if self.active[i]], need))
        bufs: dict[str, Tensor] = {}
        if want.get(1) and dx is not None:
            lead = dx.shape[:1] if batched else ()
            bufs["weight"] = delta.new_zeros(*lead, *self.shapes[1])
        rx = _LINEAR_RULE.residual(
            None,  # type: ignore[arg-type]
            self.ctx,
            rctx,
            dx,
            {"weight": dw},
            bool(want.get(0)),
            bufs,
            batched,
        )
        return self._collect(rx, bufs, need)


class SplitStep(Step):
    """``split``/``chunk``/``unbind`` of one active input: a tuple of pieces along ``dim``."""

    linear = True
    kind = "split"

    def __init__(
        self, inputs: list[Any], sizes: list[int], dim: int, squeeze: bool, in_shape: Any
    ) -> None:
        self.inputs, self.sizes, self.dim, self.squeeze = inputs, sizes, dim, squeeze
        self.in_shape = tuple(in_shape)

    def _dim(self, batched: bool) -> int:
        return self.dim + 1 if batched else self.dim

    def jvp(self, tin: list[Any], tangents: Sequence[Tensor | None], batched: bool) -> Any:  # noqa: D102
        t = tin[0]
        if t is None:
            return None
        d = self._dim(batched)
        if self.squeeze:
            return tuple(t.unbind(d))
        return tuple(t.split(self.sizes, d))

    def vjp(self, u: Any, need: list[bool], grads: Grads, batched: bool) -> list[Any]:  # noqa: D102
        if not need[0]:
            return [None]
        ref = next(p for p in u if p is not None)
        lead = ref.shape[:1] if batched else ()
        d = self._dim(batched)
        parts = []
        for p, size in zip(u, self.sizes):
            if p is None:
                shape = list(self.in_shape)
                shape[self.dim] = size
                p = ref.new_zeros(*lead, *shape)
            elif self.squeeze:
                p = p.unsqueeze(d)
            parts.append(p)
        return [torch.cat(parts, d)]


def _einsum_fn(equation: str) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda a, b: torch.einsum(equation, a, b)


def build_bilinear(
    node: Any, env_value: Callable[[Any], Any], active: Callable[[Any], bool], value: Tensor
) -> Step | None:
    """The step of a matrix-product node (``op_kind`` ``"matmul"``), or None for autograd.

    Args:
        node: The fx node.
        env_value: The value of an argument (nodes looked up, constants as they are).
        active: Whether an argument node depends on the parameters.
        value: The node's output.

    Returns:
        A :class:`BilinearStep`, or None where the call has a form the rule does not cover.
    """
    target, args, kwargs = node.target, list(node.args), dict(node.kwargs)
    fn: Callable[[Tensor, Tensor], Tensor] | None = None
    alpha, beta = 1.0, 1.0
    s_node: Any = None
    if target is torch.einsum:
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if kwargs or len(ops) != 2 or not isinstance(args[0], str):
            return None
        fn = _einsum_fn(args[0])
        a_node, b_node = ops
    elif target in ADD_MATMUL_FUNCS:
        if len(args) != 3 or set(kwargs) - {"alpha", "beta"}:
            return None
        s_node, a_node, b_node = args
        alpha, beta = float(kwargs.get("alpha", 1.0)), float(kwargs.get("beta", 1.0))
    else:
        if kwargs or len(args) != 2:
            return None
        a_node, b_node = args
    nodes = [a_node, b_node, s_node]
    vals = [env_value(n) for n in nodes]
    if not all(isinstance(v, Tensor) for v in vals[:2]):
        return None
    acts = [active(n) for n in nodes]
    edges = [n for n, a in zip(nodes, acts) if a]
    return BilinearStep(edges, vals, acts, fn, alpha, beta, value.ndim)


def build_linear_fn(
    node: Any, env_value: Callable[[Any], Any], active: Callable[[Any], bool], value: Tensor
) -> Step | None:
    """The step of an ``F.linear`` node (``op_kind`` ``"linear_fn"``), or None for autograd."""
    args = list(node.args)
    kw = dict(node.kwargs)
    names = ("input", "weight", "bias")
    full = [args[i] if i < len(args) else kw.pop(names[i], None) for i in range(3)]
    if kw:
        return None
    vals = [env_value(n) for n in full]
    if not isinstance(vals[1], Tensor) or vals[1].ndim != 2:
        return None
    acts = [active(n) for n in full]
    edges = [n for n, a in zip(full, acts) if a]
    return LinearFnStep(edges, vals, acts)


def build_split(
    node: Any, env_value: Callable[[Any], Any], active: Callable[[Any], bool], value: Any
) -> Step | None:
    """The step of a split/chunk/unbind node (``op_kind`` ``"split"``), or None for autograd."""
    target = node.target
    x = env_value(node.args[0])
    name = target if isinstance(target, str) else target.__name__
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, Tensor) for v in value):
        return None
    kw = dict(node.kwargs)
    dim = node.args[2] if len(node.args) > 2 else kw.get("dim", 0)
    if name == "unbind":
        dim = node.args[1] if len(node.args) > 1 else kw.get("dim", 0)
    if not isinstance(dim, int):
        return None
    dim %= x.ndim
    sizes = [v.shape[dim] if name != "unbind" else 1 for v in value]
    return SplitStep([node.args[0]], sizes, dim, name == "unbind", x.shape)
