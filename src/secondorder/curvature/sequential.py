r"""Hand-written linearisation of ``nn.Sequential`` stacks: :math:`Jv`, :math:`J^\top u` by hand.

One forward pass under ``torch.no_grad()`` stores, per layer, only what its derivatives need:
the input of each linear/convolution layer (a view of the previous output, no copy), the
max-pooling indices, and for each activation either its derivative :math:`\sigma'(a)` or, for
ReLU, sigmoid and tanh, whose derivative is a function of the output :math:`s = \sigma(a)`
(:math:`1[s>0]`, :math:`s(1-s)`, :math:`1-s^2`), a reference to :math:`s` when a later layer
keeps it anyway as its input (then it costs no memory; the product applies ATen's fused
``*_backward`` kernel instead of a multiplication). An activation followed by max-pooling is
moved behind it: with :math:`P` the selection of the pooled entries and
:math:`D = \operatorname{diag}(\sigma'(a))`,

.. math::
    P D = D_P P, \qquad D_P = \operatorname{diag}(P \sigma'(a)),

so only the derivative at the selected entries is needed (the pooled output is
:math:`P s`, the next layer's input). Then

- :math:`Jv` is forward mode by hand: per linear layer :math:`W\,dx + dW\,x + db` (two matrix
  products, one for the first layer), per activation :math:`\sigma'(a) \odot dx`;
- :math:`J^\top u` is reverse mode by hand: per linear layer :math:`dW \mathrel{+}= u^\top x`,
  :math:`db \mathrel{+}= \sum u`, :math:`u \leftarrow u W`; it stops below the lowest requested
  parameter and writes the parameter blocks straight into the caller's buffer.

At the bottom of the reverse pass a pattern ``Linear, activation, Linear`` is computed in two
column blocks of the hidden layer (its cotangent is only needed block by block,
:math:`dW_{1,J} = (\sigma'_J \odot u W_{2,:J})^\top x`), so that the hidden layer's full
cotangent never coexists with its neighbour's and the product's output buffer. (The forward
pass needs no blocking: the operators allocate the output only when the reverse pass starts.)

No autograd graph is kept, so the operator holds less than a gradient's saved activations, and
no product pays the autograd engine's dispatch or the slow CPU double backward of convolutions.
Every other module goes through :class:`~secondorder.curvature.linearization.AutogradLinearization`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .activations import (
    is_activation,
)
from .jacobian_factors import add_weight_cotangent
from .model import FunctionalModel
from .sequential_ops import (
    CONV,
    FROM_OUTPUT,
    MAXPOOL,
    RESHAPES,
    conv_backward,
    conv_weight_jvp,
    halves,
    pool_gather,
    record_layer,
    sequential_layers,
)

__all__ = ["SequentialLinearization", "sequential_layers"]

# hidden layers are split in two column blocks at a product's bottom (to bound the memory) only
# if each block keeps this many units: narrower blocks slow the matrix products (BENCHMARKS.md)
_MIN_BLOCK = 256


class SequentialLinearization:
    """Linearisation of an ``nn.Sequential`` of supported layers (see the module docstring).

    The fast path through an MLP's output-Jacobian factors is a separate subclass,
    :class:`~secondorder.curvature.factored.FactoredLinearization`.

    Args:
        fmodel: The model as a function of its parameters (an ``nn.Sequential``).
        layers: Its leaf layers from :func:`sequential_layers`.
        inputs: A single input tensor in a tuple.
        leaves: Tensors holding the parameter values.
    """

    path = "sequential"  # the engine that computes the products (see EngineInfo)

    def __init__(
        self,
        fmodel: FunctionalModel,
        layers: list[tuple[str, nn.Module]],
        inputs: tuple[Any, ...],
        leaves: list[Tensor],
    ) -> None:
        self.leaves = leaves
        self._numels = fmodel.numels
        frozen = fmodel.parameter_dict(leaves)
        self._steps: list[tuple[nn.Module, dict[str, Any]]] = []
        # an in-place layer could overwrite an activation's output kept for its derivative
        # (activations are evaluated out of place; the rule stays on the safe side)
        self._keep_outputs = not any(getattr(layer, "inplace", False) for _, layer in layers)
        x = inputs[0]
        with torch.no_grad():
            for prefix, layer in layers:
                x = record_layer(
                    self._steps, self._keep_outputs, layer, prefix, x, frozen, leaves, fmodel.alias
                )
            self.z = x
            self._settle_activations()
        # the lowest step that holds each parameter: vjp stops below the requested ones
        self._lowest_step = [len(self._steps)] * len(leaves)
        for k, (_, rec) in enumerate(self._steps):
            for key in ("iw", "ib"):
                i = rec.get(key)
                if i is not None:
                    self._lowest_step[i] = min(self._lowest_step[i], k)
        # steps k starting a (2-D) Linear, activation, Linear triple: blocked at a product's bottom
        self._triples = {k for k in range(len(self._steps) - 2) if self._is_triple(k)}

    def _settle_activations(self) -> None:
        """Replace each kept activation output that no later layer stores by its derivative.

        An output shared with a stored layer input (or the model output) costs nothing to keep;
        any other would hold as much as (for ReLU four times more than) the derivative itself.
        """
        kept = {self.z.untyped_storage().data_ptr()}
        kept.update(rec["x"].untyped_storage().data_ptr() for _, rec in self._steps if "x" in rec)
        for layer, rec in self._steps:
            s = rec.get("s")
            if s is not None and s.untyped_storage().data_ptr() not in kept:
                rec["d"] = FROM_OUTPUT[type(layer)][0](s)
                del rec["s"]

    def _is_triple(self, k: int) -> bool:
        """Whether steps ``k..k+2`` are a 2-D Linear, an activation, a Linear, wide enough.

        The hidden layer must have at least ``2 * _MIN_BLOCK`` units to be split in two blocks.
        """
        (lower, rec), (act, _), (upper, _) = self._steps[k : k + 3]
        return (
            type(lower) is nn.Linear
            and is_activation(act)
            and type(upper) is nn.Linear
            and rec["x"].ndim == 2
            and rec["w"].shape[0] >= 2 * _MIN_BLOCK
        )

    # ------------------------------------------------------------------ forward
    # ------------------------------------------------------------------ J v
    def jvp(self, tangents: Sequence[Tensor | None], batched: bool = False) -> Tensor | None:
        r"""Return :math:`Jv` (shape of ``z``; ``(K, *z.shape)`` when batched), or None if zero."""
        dx: Tensor | None = None
        K = next(t.shape[0] for t in tangents if t is not None) if batched else 0
        with torch.no_grad():
            for layer, rec in self._steps:
                dx = self._jvp_layer(layer, rec, dx, tangents, K, batched)
        return dx

    @staticmethod
    def _times_derivative(
        layer: nn.Module, rec: dict[str, Any], g: Tensor, owned: bool, cols: slice | None = None
    ) -> Tensor:
        r""":math:`\sigma'(a) \odot g` for an activation step (in place if ``owned``).

        ``cols`` restricts the derivative to a column block of a 2-D activation. With the kept
        output :math:`s` ATen's fused ``*_backward`` kernel applies the derivative in one pass.
        """
        s = rec.get("s")
        if s is not None:
            fused = FROM_OUTPUT[type(layer)][1]
            return fused(g, s if cols is None else s[:, cols], g if owned else None)
        d = rec["d"] if cols is None else rec["d"][:, cols]
        return g.mul_(d) if owned else g * d

    def _jvp_layer(
        self,
        layer: nn.Module,
        rec: dict[str, Any],
        dx: Tensor | None,
        tangents: Sequence[Tensor | None],
        K: int,
        batched: bool,
    ) -> Tensor | None:
        t = type(layer)
        if t is nn.Linear or t in CONV:
            dw = tangents[rec["iw"]] if rec["iw"] is not None else None
            db = tangents[rec["ib"]] if rec["ib"] is not None else None
            out: Tensor | None = None
            if t is nn.Linear:
                # a single tangent's bias term is fused into the first matrix product
                fuse = db is not None and not batched
                fused = False
                if dx is not None:
                    out = F.linear(dx, rec["w"], db if fuse else None)
                    fused = fuse
                if dw is not None:
                    x = rec["x"]
                    if out is not None and not batched and x.ndim == 2:
                        out.addmm_(x, dw.T)  # no temporary
                    elif out is None and fuse and x.ndim == 2:
                        out = torch.addmm(db, x, dw.T)  # type: ignore[arg-type]
                        fused = True
                    else:
                        dwt = dw.transpose(-1, -2)  # (in, out), or (K, in, out) if batched
                        if batched:  # broadcast over the input's leading dimensions
                            dwt = dwt.reshape(K, *([1] * (x.ndim - 2)), *dwt.shape[1:])
                        term = x @ dwt
                        out = term if out is None else out.add_(term)
                if fused:
                    db = None  # already added
            else:
                conv, kw = CONV[t], rec["kw"]
                if dx is not None:
                    out = conv(dx.flatten(0, 1) if batched else dx, rec["w"], None, **kw)
                    if batched:
                        out = out.unflatten(0, (K, -1))
                if dw is not None:
                    term = conv_weight_jvp(conv, kw, rec["x"], dw, K, batched)
                    out = term if out is None else out.add_(term)
            if db is not None:
                shape = rec["out_shape"]
                lead = (K,) if batched else ()
                channel_dim = len(shape) - 1 if t is nn.Linear else 1
                view = [1] * len(shape)
                view[channel_dim] = -1
                bias = db.view(*lead, *view)
                out = bias.expand(*lead, *shape).clone() if out is None else out.add_(bias)
            return out
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            # scale dx + xhat dw + db: the parameter terms also without a tangent from below
            lead = (K,) if batched else ()
            shape = rec["shape"]
            dw = tangents[rec["iw"]] if rec["iw"] is not None else None
            db = tangents[rec["ib"]] if rec["ib"] is not None else None
            out = dx * rec["scale"] if dx is not None else None
            if dw is not None:
                term = rec["xhat"] * dw.view(*lead, *shape)
                out = term if out is None else out.add_(term)
            if db is not None:
                bias = db.view(*lead, *shape)
                if out is None:
                    out = bias.expand(*lead, *rec["out_shape"]).clone()
                else:
                    out = out.add_(bias)
            return out
        if dx is None:
            return None
        if is_activation(layer):
            return self._times_derivative(layer, rec, dx, True)
        if t in MAXPOOL:
            idx = rec["idx"]
            if batched:
                dx, idx = dx.flatten(0, 1), idx.repeat(K, *([1] * (idx.ndim - 1)))
            out = pool_gather(dx, idx)
            return out.unflatten(0, (K, -1)) if batched else out
        if batched:  # parameter-free linear layers act per sample
            return layer(dx.flatten(0, 1)).unflatten(0, (K, -1))
        return layer(dx)

    # ------------------------------------------------------------------ J^T u
    def vjp_into(
        self, cotangent: Tensor, out: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        r"""Add :math:`J^\top u` into ``out`` (one tensor per requested parameter) in place.

        Args:
            cotangent: ``u``, shape of ``z``.
            out: Buffers in the requested parameters' shapes, accumulated into.
            indices: Requested parameters (default all).
        """
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        target = {i: buf for i, buf in zip(idx, out)}
        stop = min((self._lowest_step[i] for i in idx), default=len(self._steps))
        u = cotangent
        owned = False  # whether u may be modified in place
        # the lowest Linear, activation, Linear triple is done in column blocks
        low = stop + 2 if stop in self._triples else -1
        with torch.no_grad():
            for k in range(len(self._steps) - 1, stop - 1, -1):
                layer, rec = self._steps[k]
                u, owned = self._vjp_layer(
                    layer, rec, u, owned, target, need_input=k > max(stop, low)
                )
                if k == low:
                    self._vjp_triple(stop, u, target)
                    break

    def _vjp_triple(self, k: int, u: Tensor, target: dict[int, Tensor]) -> None:
        r"""Add the parameter cotangents of the lower Linear of the triple at steps ``k..k+2``.

        With ``u`` the cotangent of the upper Linear's output, over two column blocks :math:`J`
        of the hidden layer

        .. math::
            h_J = \sigma'_{:,J} \odot u W_{2,:J}, \qquad
            dW_J \mathrel{+}= h_J^\top x, \qquad db_J \mathrel{+}= \textstyle\sum_n h_{J,n},

        so only half of the hidden layer's cotangent is ever held beside ``u``.
        """
        (_, lower), (act, act_rec), (_, upper) = self._steps[k : k + 3]
        gw, gb = target.get(lower["iw"]), target.get(lower["ib"])
        x, w2 = lower["x"], upper["w"]
        for cols in halves(w2.shape[1]):
            h = self._times_derivative(act, act_rec, u @ w2[:, cols], True, cols)
            if gw is not None:
                gw[cols].addmm_(h.T, x)
            if gb is not None:
                gb[cols].add_(h.sum(0))
            del h

    def vjp(
        self, cotangent: Tensor, indices: Sequence[int] | None = None, batched: bool = False
    ) -> list[Tensor]:
        r"""Return :math:`J^\top u` as new tensors in parameter shapes (``(K, ...)`` if batched).

        Args:
            cotangent: ``u``, shape of ``z`` (or ``(K, *z.shape)``).
            indices: Parameters to return (default all).
            batched: Whether ``cotangent`` carries a leading column dimension.

        Returns:
            One tensor per requested parameter.
        """
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        if not batched:
            bufs = [torch.zeros_like(self.leaves[i]) for i in idx]
            self.vjp_into(cotangent, bufs, idx)
            return bufs
        K = cotangent.shape[0]
        bufs = [self.leaves[i].new_zeros(K, *self.leaves[i].shape) for i in idx]
        target = {i: buf for i, buf in zip(idx, bufs)}
        stop = min((self._lowest_step[i] for i in idx), default=len(self._steps))
        u, owned = cotangent, False
        with torch.no_grad():
            for k in range(len(self._steps) - 1, stop - 1, -1):
                layer, rec = self._steps[k]
                u, owned = self._vjp_layer_batched(
                    layer, rec, u, owned, target, need_input=k > stop
                )
        return bufs

    def _vjp_layer_batched(
        self,
        layer: nn.Module,
        rec: dict[str, Any],
        u: Tensor,
        owned: bool,
        target: dict[int, Tensor],
        need_input: bool,
    ) -> tuple[Tensor, bool]:
        r"""One layer of the reverse pass for ``K`` cotangents at once, ``u`` of shape ``(K, ...)``.

        Each operation runs once on all columns (for a Linear layer :math:`dW_k = u_k^\top x` as
        one batched product, :math:`u_k W` as one ``(K R, out) @ (out, in)`` product) instead of
        ``K`` reverse passes.
        """
        t = type(layer)
        K = u.shape[0]
        if t is nn.Linear:
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            out_f = u.shape[-1]
            u3 = u.reshape(K, -1, out_f)  # (K, R, out), rows R = every leading input dimension
            if gw is not None:
                x = rec["x"]
                x2 = x.reshape(-1, x.shape[-1])
                gw.view(K, out_f, -1).baddbmm_(u3.transpose(1, 2), x2.expand(K, *x2.shape))
            if gb is not None:
                gb.add_(u3.sum(1))
            return (u @ rec["w"], True) if need_input else (u, owned)
        if t in CONV:
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            kw, w = rec["kw"], rec["w"]
            if gw is not None:
                for k in range(K):  # one weight gradient per column
                    gw[k].add_(conv_backward(u[k], rec["x"], w, kw, [False, True, False])[1])
            if gb is not None and rec["has_bias"]:
                gb.add_(u.sum(dim=(1, *range(3, u.ndim))))
            if not need_input:
                return u, owned
            flat = u.flatten(0, 1)  # (K N, out, *spatial): the columns ride along the batch
            x_cols = rec["x"].expand(K, *rec["x"].shape).flatten(0, 1)
            grad_input = conv_backward(flat, x_cols, w, kw, [True, False, False])[0]
            return grad_input.unflatten(0, (K, -1)), True
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            dims = [d for d in range(1, u.ndim) if d != 2]
            if gw is not None:
                gw.add_((u * rec["xhat"]).sum(dims))
            if gb is not None:
                gb.add_(u.sum(dims))
            return (u * rec["scale"], True) if need_input else (u, owned)
        if not need_input:
            return u, owned
        if is_activation(layer):
            return self._times_derivative(layer, rec, u, owned), True
        if t in MAXPOOL:
            idx = rec["idx"]
            grad = u.new_zeros(K, *rec["in_shape"])
            index = idx.flatten(2).expand(K, *idx.flatten(2).shape)
            grad.flatten(3).scatter_add_(3, index, u.flatten(3))
            return grad, True
        if isinstance(layer, RESHAPES) or isinstance(layer, nn.Dropout):
            return u.reshape(K, *rec["in_shape"]), owned
        # other parameter-free per-sample linear layers (average pooling): the columns ride
        # along the batch dimension
        with torch.enable_grad():
            shape = (K * rec["in_shape"][0], *rec["in_shape"][1:])
            probe = u.new_zeros(shape, requires_grad=True)
            (grad,) = torch.autograd.grad(layer(probe), probe, u.flatten(0, 1))
        return grad.unflatten(0, (K, -1)), True

    def _vjp_layer(
        self,
        layer: nn.Module,
        rec: dict[str, Any],
        u: Tensor,
        owned: bool,
        target: dict[int, Tensor],
        need_input: bool,
    ) -> tuple[Tensor, bool]:
        t = type(layer)
        if t is nn.Linear:
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            u2 = u.reshape(-1, u.shape[-1])
            add_weight_cotangent(gw, u2, rec["x"].reshape(-1, rec["x"].shape[-1]))
            if gb is not None:
                gb.add_(u2.sum(0))
            return (u @ rec["w"], True) if need_input else (u, owned)
        if t in CONV:
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            kw, w = rec["kw"], rec["w"]
            mask = [need_input, gw is not None, gb is not None and rec["has_bias"]]
            bias_sizes = [w.shape[0]] if rec["has_bias"] else None
            grads = conv_backward(u, rec["x"], w, kw, mask, bias_sizes)
            if gw is not None:
                gw.add_(grads[1])
            if gb is not None:
                gb.add_(grads[2])
            return (grads[0], True) if need_input else (u, owned)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            gw, gb = target.get(rec["iw"]), target.get(rec["ib"])
            dims = [d for d in range(u.ndim) if d != 1]
            if gw is not None:
                gw.add_((u * rec["xhat"]).sum(dims))
            if gb is not None:
                gb.add_(u.sum(dims))
            return (u * rec["scale"], True) if need_input else (u, owned)
        if not need_input:
            return u, owned
        if is_activation(layer):
            return self._times_derivative(layer, rec, u, owned), True
        if t in MAXPOOL:
            idx = rec["idx"]
            grad = u.new_zeros(rec["in_shape"])
            grad.flatten(2).scatter_add_(2, idx.flatten(2), u.flatten(2))
            return grad, True
        if isinstance(layer, RESHAPES) or isinstance(layer, nn.Dropout):
            return u.reshape(rec["in_shape"]), owned
        # other parameter-free linear layers (average pooling): differentiate the layer alone
        with torch.enable_grad():
            probe = u.new_zeros(rec["in_shape"], requires_grad=True)
            (grad,) = torch.autograd.grad(layer(probe), probe, u)
        return grad, True
