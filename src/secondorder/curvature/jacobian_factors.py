r"""Output-Jacobian factors of an MLP: products with :math:`J` that skip the propagation.

For an ``nn.Sequential`` whose trainable layers are Linear layers on 2-D inputs, with only
elementwise activations (and identities) above the lowest of them, and outputs
:math:`z_n \in \mathbb{R}^C` per sample, the Jacobian of :math:`z_n` with respect to a Linear
layer :math:`y = W x + b` is a Kronecker product

.. math::
    \frac{\partial z_n}{\partial \operatorname{vec} W} = B_n \otimes x_n^\top, \qquad
    \frac{\partial z_n}{\partial b} = B_n, \qquad
    B_n = \frac{\partial z_n}{\partial y_n} \in \mathbb{R}^{C \times \mathrm{out}}.

With every layer's factor :math:`B` stored, shape ``(N, C, out)``,

.. math::
    (J v)_n = \sum_l B_{l,n} (dW_l\, x_{l,n} + db_l), \qquad
    J^\top u:\quad dW_l = \sum_n (B_{l,n}^\top u_n)\, x_{l,n}^\top, \quad
    db_l = \sum_n B_{l,n}^\top u_n,

so a product costs two ``(N, in, out)`` matrix products per layer and one batched contraction
with the factors each way, instead of four matrix products per hidden layer (forward mode
:math:`W\,dx + dW\,x`, reverse mode :math:`u^\top x` and :math:`u W`): about half the flops
when :math:`C` is small against the widths. The top layer, whose output is :math:`z`, has
:math:`B = I` and needs no factor. All factors sit side by side in one ``(N, C, H)`` tensor
(``H`` the summed widths of the factored layers).

Building them back-propagates the :math:`C` output directions through the network (one
``(N C, out) @ (out, in)`` matrix product per layer, about :math:`C/2` products' worth of work)
and holds :math:`N C H` numbers. They serve
:class:`~secondorder.curvature.factored.FactoredLinearization`, which ``jacobian_factors=True``
selects and which builds them at its first product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["JacobianFactors", "add_weight_cotangent", "check_jacobian_factors_option"]


def check_jacobian_factors_option(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``.

    ``"auto"`` is still accepted and means ``False``: the cost model that chose when to build
    the factors is retired; the fast path is taken only for ``True``.
    """
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"jacobian_factors must be True or False, got {value!r}")


@dataclass
class _Layer:
    """A trainable Linear layer: its step, parameter indices, input (N, in), weight (out, in)."""

    step: int
    iw: int | None
    ib: int | None
    x: Tensor
    w: Tensor
    cols: slice | None  # its columns in the factor tensor; None for the top and head layers


# a step of the network seen from the factors: ("linear", rec); ("activation", (rows, plain))
# with rows(g, out) returning g of shape (N, R, width) times the activation's derivative and
# plain(g, out) the same for g of shape (..., N, width), written into out if given (which may
# be g); ("identity", None); or (None, None) for a step the factors cannot pass
Step = tuple[str | None, Any]


class JacobianFactors:
    r"""The factors :math:`B_l` of an MLP's Linear layers and products with them.

    Build one with :meth:`plan` (which checks that the network qualifies); :meth:`build`
    computes them.

    Args:
        steps: The network's steps, bottom to top (see :data:`Step`).
        z: The outputs, shape ``(N, C)``.
        lowest: Index of the lowest step holding a trainable parameter.
    """

    def __init__(self, steps: list[Step], z: Tensor, lowest: int) -> None:
        self._steps = steps
        self._lowest = lowest
        self.num_samples, self.num_outputs = (int(s) for s in z.shape)
        N, C = self.num_samples, self.num_outputs
        top = len(steps) - 1
        self.layers: list[_Layer] = []
        self.top: _Layer | None = None  # the trainable top layer (B = I)
        self.head: _Layer | None = None  # the trainable layer feeding the top one
        self._top_w: Tensor | None = steps[top][1]["w"] if steps[top][0] == "linear" else None
        self._head_acts: list[Any] = []  # activations between head and top, bottom to top
        head_step = self._find_head(steps, top, lowest)
        width = 0
        for k in range(top, lowest - 1, -1):
            kind, rec = steps[k]
            if kind != "linear":
                continue
            out_f = rec["w"].shape[0]
            if rec["iw"] is None and rec["ib"] is None:
                continue
            layer = _Layer(k, rec["iw"], rec["ib"], rec["x"], rec["w"], None)
            if k == top and self._top_w is not None:
                self.top = layer
            elif k == head_step:
                self.head = layer  # through the top layer: (N, out) x (out, C) each way
            else:
                layer.cols = slice(width, width + out_f)
                width += out_f
                self.layers.append(layer)
        self.layers.reverse()  # bottom to top
        self.width = width
        self.nbytes = N * C * width * z.element_size()  # what build() will hold
        self._z = z
        self.B: Tensor | None = None

    def _find_head(self, steps: list[Step], top: int, lowest: int) -> int | None:
        r"""The step of the Linear layer below the top one with only activations between.

        Its factor :math:`B = W_{top} \operatorname{diag}(\sigma')` is never stored: products
        go through the top layer's weight instead, which reads less than the factor would.
        """
        if self._top_w is None:
            return None
        acts: list[Any] = []
        for j in range(top - 1, lowest - 1, -1):
            kind, info = steps[j]
            if kind == "linear":
                rec = info
                if rec["iw"] is None and rec["ib"] is None:
                    return None
                self._head_acts = acts[::-1]
                return j
            if kind == "activation":
                acts.append(info[1])
        return None

    @classmethod
    def plan(cls, steps: list[Step] | None, z: Tensor, lowest: int) -> JacobianFactors | None:
        """The factors of a qualifying network (unbuilt), or ``None``.

        The network qualifies if ``z`` is 2-D, every step from the lowest trainable one up is
        a Linear layer on 2-D input, an elementwise activation or an identity, and at least
        one trainable layer is not the top one.
        """
        if steps is None or z.ndim != 2 or lowest >= len(steps):
            return None
        if any(kind is None for kind, _ in steps[lowest:]):
            return None
        factors = cls(steps, z, lowest)
        trainable = factors.layers or factors.head is not None or factors.top is not None
        return factors if trainable else None

    # ------------------------------------------------------------------ build
    @torch.no_grad()
    def build(self) -> None:
        r"""Back-propagate the :math:`C` output directions and keep :math:`B_l` for each layer.

        Each activation writes its product straight into the factor of the layer it feeds, and
        the next propagation reads it from there: one temporary per layer, no copies.
        """
        N, C = self.num_samples, self.num_outputs
        z, steps = self._z, self._steps
        B = z.new_empty(N, C, self.width)
        by_step = {layer.step: layer for layer in self.layers}

        def factor_fed_by(k: int) -> Tensor | None:
            """The factor slice of the layer that step ``k``'s output feeds, if any."""
            j = k - 1
            while j >= self._lowest and steps[j][0] == "identity":
                j -= 1
            layer = by_step.get(j)
            return B[:, :, layer.cols] if layer is not None else None

        # cotangents of the current step's output: (N, C, width), shared by all samples
        # (C, width), or None for the identity
        U: Tensor | None = None
        owned = False  # whether U may be overwritten
        for k in range(len(steps) - 1, self._lowest - 1, -1):
            kind, info = steps[k]
            if kind == "linear":
                layer = by_step.get(k)
                if layer is not None:
                    assert U is not None
                    dest = B[:, :, layer.cols]
                    if U.data_ptr() != dest.data_ptr():
                        dest.copy_(U)
                    U, owned = dest, False
                if k > self._lowest:
                    w = info["w"]
                    if U is None:
                        U, owned = w, False
                    elif U.ndim == 2:
                        U, owned = U @ w, True
                    else:
                        U, owned = (U.reshape(N * C, -1) @ w).view(N, C, -1), True
            elif kind == "activation":
                if U is None:
                    U = torch.eye(C, dtype=z.dtype, device=z.device).expand(N, C, C)
                elif U.ndim == 2:
                    U = U.expand(N, *U.shape)
                fed = factor_fed_by(k)
                U = info[0](U, fed if fed is not None else (U if owned else None))
                owned = fed is None
        self.B = B

    # ------------------------------------------------------------------ J v
    def jvp(self, tangents: Sequence[Tensor | None], batched: bool = False) -> Tensor | None:
        r""":math:`Jv`, shape ``(N, C)`` (``(K, N, C)`` if batched), or None if it is zero."""
        assert self.B is not None
        return self._jvp_batched(tangents) if batched else self._jvp_single(tangents)

    def _jvp_single(self, tangents: Sequence[Tensor | None]) -> Tensor | None:
        assert self.B is not None
        N = self.num_samples
        out = _linear_tangent(self.top, tangents) if self.top is not None else None
        if self.head is not None:
            v = _linear_tangent(self.head, tangents)
            if v is not None:  # through the activations and the top layer
                for act in self._head_acts:
                    v = act(v, v)
                w_t = self._top_w.T  # type: ignore[union-attr]
                out = v @ w_t if out is None else out.addmm_(v, w_t)
        Y: Tensor | None = None
        missing: list[slice] = []
        for layer in self.layers:
            dw, db = _tangent(tangents, layer.iw), _tangent(tangents, layer.ib)
            if dw is None and db is None:
                assert layer.cols is not None
                missing.append(layer.cols)
                continue
            if Y is None:
                Y = self.B.new_empty(N, self.width)
            y = Y[:, layer.cols]
            if dw is not None and db is not None:
                torch.addmm(db, layer.x, dw.T, out=y)
            elif dw is not None:
                torch.mm(layer.x, dw.T, out=y)
            else:
                y.copy_(db.expand(N, -1))  # type: ignore[union-attr]
        if Y is None:
            return out
        for cols in missing:
            Y[:, cols].zero_()
        if out is None:
            return torch.bmm(Y.unsqueeze(1), self.B.transpose(1, 2)).squeeze(1)
        out.unsqueeze(1).baddbmm_(Y.unsqueeze(1), self.B.transpose(1, 2))
        return out

    def _jvp_batched(self, tangents: Sequence[Tensor | None]) -> Tensor | None:
        assert self.B is not None
        N = self.num_samples
        K = next(t.shape[0] for t in tangents if t is not None)
        out: Tensor | None = None
        if self.top is not None:
            dw, db = _tangent(tangents, self.top.iw), _tangent(tangents, self.top.ib)
            if dw is not None:
                out = self.top.x @ dw.transpose(1, 2)  # (K, N, C)
            if db is not None:
                out = (
                    db.unsqueeze(1).expand(K, N, -1).clone()
                    if out is None
                    else out.add_(db.unsqueeze(1))
                )
        head = self.head
        if head is not None:
            dw, db = _tangent(tangents, head.iw), _tangent(tangents, head.ib)
            v = head.x @ dw.transpose(1, 2) if dw is not None else None  # (K, N, out)
            if db is not None:
                v = db.unsqueeze(1).expand(K, N, -1).clone() if v is None else v.add_(db[:, None])
            if v is not None:  # through the activations and the top layer
                for act in self._head_acts:
                    v = act(v, v)
                part = v @ self._top_w.T  # type: ignore[union-attr]
                out = part if out is None else out.add_(part)
        Y: Tensor | None = None  # (N, K, H)
        for layer in self.layers:
            dw, db = _tangent(tangents, layer.iw), _tangent(tangents, layer.ib)
            if dw is None and db is None:
                continue
            if Y is None:
                Y = self.B.new_zeros(N, K, self.width)
            y = Y[:, :, layer.cols]
            if dw is not None:
                y.copy_((layer.x @ dw.reshape(-1, dw.shape[-1]).T).view(N, K, -1))
            if db is not None:
                y.add_(db)
        if Y is None:
            return out
        part = torch.bmm(Y, self.B.transpose(1, 2)).transpose(0, 1)  # (K, N, C)
        return part.contiguous() if out is None else out.add_(part)

    # ------------------------------------------------------------------ J^T u
    @staticmethod
    def _wanted(layer: _Layer, target: Mapping[Any, Tensor]) -> bool:
        """Whether ``target`` has a buffer for the layer's weight or bias."""
        return target.get(layer.iw) is not None or target.get(layer.ib) is not None

    def _head_cotangent(self, u: Tensor) -> Tensor:
        """The cotangent at the head's output for ``u`` of shape ``(..., C)``.

        ``u`` goes back through the top weight and the activations between head and top.
        """
        g = u @ self._top_w  # type: ignore[operator]
        for act in reversed(self._head_acts):
            g = act(g, g)
        return g

    def vjp_into(
        self, u: Tensor, out: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        r"""Add :math:`J^\top u` (``u`` of shape ``(N, C)``) into ``out``, one per parameter."""
        assert self.B is not None
        idx = range(len(out)) if indices is None else indices
        target: dict[int | None, Tensor] = dict(zip(idx, out))
        if self.top is not None:
            add_weight_cotangent(target.get(self.top.iw), u, self.top.x)
            gb = target.get(self.top.ib)
            if gb is not None:
                gb.add_(u.sum(0))
        head = self.head
        if head is not None and self._wanted(head, target):
            g = self._head_cotangent(u)
            add_weight_cotangent(target.get(head.iw), g, head.x)
            gb = target.get(head.ib)
            if gb is not None:
                gb.add_(g.sum(0))
        wanted = [layer for layer in self.layers if self._wanted(layer, target)]
        if not wanted:
            return
        u3 = u.unsqueeze(1)
        full = len(wanted) == len(self.layers)
        G = torch.bmm(u3, self.B).squeeze(1) if full else None  # (N, H)
        for layer in wanted:
            g = G[:, layer.cols] if G is not None else torch.bmm(u3, self.B[:, :, layer.cols])[:, 0]
            add_weight_cotangent(target.get(layer.iw), g, layer.x)
            gb = target.get(layer.ib)
            if gb is not None:
                gb.add_(g.sum(0))

    def vjp_batched(self, u: Tensor, out: dict[Any, Tensor]) -> None:
        r"""Add :math:`J^\top u_k` for ``u`` of shape ``(K, N, C)`` into ``out``.

        ``out`` maps parameter indices to ``(K, *shape)`` buffers; parameters without one are
        skipped.
        """
        assert self.B is not None
        K, N = u.shape[0], self.num_samples
        if self.top is not None:
            gw, gb = out.get(self.top.iw), out.get(self.top.ib)
            if gw is not None:
                gw.baddbmm_(u.transpose(1, 2), self.top.x.expand(K, *self.top.x.shape))
            if gb is not None:
                gb.add_(u.sum(1))
        head = self.head
        if head is not None and self._wanted(head, out):
            g = self._head_cotangent(u)
            gw, gb = out.get(head.iw), out.get(head.ib)
            if gw is not None:
                gw.baddbmm_(g.transpose(1, 2), head.x.expand(K, *head.x.shape))
            if gb is not None:
                gb.add_(g.sum(1))
        wanted = [layer for layer in self.layers if self._wanted(layer, out)]
        if not wanted:
            return
        G = torch.bmm(u.transpose(0, 1).contiguous(), self.B)  # (N, K, H)
        for layer in wanted:
            g = G[:, :, layer.cols]  # (N, K, out)
            gw, gb = out.get(layer.iw), out.get(layer.ib)
            if gw is not None:
                out_f = g.shape[-1]
                gw.view(K * out_f, -1).addmm_(g.reshape(N, K * out_f).T, layer.x)
            if gb is not None:
                gb.add_(g.sum(0))


def _tangent(tangents: Sequence[Tensor | None], i: int | None) -> Tensor | None:
    return tangents[i] if i is not None else None


def _linear_tangent(layer: _Layer, tangents: Sequence[Tensor | None]) -> Tensor | None:
    """``x dWᵀ + db`` of one layer for one tangent, or None if both are zero."""
    dw, db = _tangent(tangents, layer.iw), _tangent(tangents, layer.ib)
    if dw is not None:
        return torch.addmm(db, layer.x, dw.T) if db is not None else layer.x @ dw.T
    if db is not None:
        return db.expand(layer.x.shape[0], -1).clone()
    return None


# a Linear layer with at most this many input features gets its weight cotangent as (x^T g)^T:
# with the reduction dimension long and the output narrow, MKL's g^T x is the slow order
_NARROW_INPUT = 8


def add_weight_cotangent(gw: Tensor | None, g: Tensor, x: Tensor) -> None:
    """``gw += gᵀ x`` for a Linear layer (``g``: (R, out), ``x``: (R, in)), if ``gw`` is given."""
    if gw is None:
        return
    if x.shape[1] <= _NARROW_INPUT:
        gw.add_((x.T @ g).T)
    else:
        gw.addmm_(g.T, x)
