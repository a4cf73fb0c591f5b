r"""Hand-written Hessian-vector products for multilayer perceptrons (Pearlmutter's R-operator).

For an ``nn.Sequential`` of ``nn.Linear`` layers, elementwise activations and reshapes,
:math:`a_l = W_l x_{l-1} + b_l`, :math:`x_l = \sigma_l(a_l)`, with the loss :math:`L(z)` of the
output :math:`z`, the gradient pass stores the cotangents :math:`\delta a_l = \partial L /
\partial a_l` of every Linear output and :math:`\delta x_l` of every activation output. A
product :math:`Hv` with :math:`v = (V_l, c_l)` is then the derivative of the gradient along
:math:`v` (the R-operator, Pearlmutter 1994):

- forward: :math:`R a_l = W_l\, R x_{l-1} + V_l x_{l-1} + c_l`,
  :math:`R x_l = \sigma_l'(a_l) \odot R a_l` (:math:`R x_0 = 0`);
- output: :math:`R\,\delta z = \nabla_z^2 L\; R z`;
- backward: :math:`R\,\delta a_l = \sigma_l''(a_l) \odot R a_l \odot \delta x_l
  + \sigma_l'(a_l) \odot R\,\delta x_l` at an activation,
  :math:`R\,\delta x_{l-1} = W_l^\top R\,\delta a_l + V_l^\top \delta a_l` at a Linear layer,
  whose blocks of :math:`Hv` are

.. math::
    (Hv)_{W_l} = R\,\delta a_l\; x_{l-1}^\top + \delta a_l\, (R x_{l-1})^\top, \qquad
    (Hv)_{b_l} = \textstyle\sum R\,\delta a_l.

Per hidden Linear layer that is six matrix products (two forward, four backward) against a
gradient's three, with no autograd graph; the double backward it replaces also differentiates
every activation's backward formula through autograd. Used by :class:`~.hessian.Hessian` for
such models; any other model keeps the autograd route.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .activations import activation_derivatives, is_activation, unsupported_activation
from .losses import LossTerms, loss_terms
from .model import FunctionalModel

__all__ = ["MLPHessian", "mlp_layers"]

_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


def mlp_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf layers of a (nested) ``nn.Sequential`` MLP with their prefixes, else ``None``.

    Supported: ``nn.Linear``, the elementwise activations of
    :data:`~.activations.ACTIVATIONS` (any arguments, in place or not), ``nn.Flatten``,
    ``nn.Unflatten``, ``nn.Identity`` and ``nn.Dropout`` in eval mode; no hooks.
    """
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> bool:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            return all(
                visit(child, f"{prefix}{name}.")
                for name, child in module._modules.items()
                if child is not None
            )
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return False
        if "forward" in vars(module):  # an instance-level forward replaces the class's
            return False
        t = type(module)  # exact types: a subclass may change forward
        m: Any = module
        ok = bool(
            t is nn.Linear
            or (is_activation(module) and unsupported_activation(module) is None)
            or t in _RESHAPES
            or (t is nn.Dropout and (not m.training or m.p == 0))
        )
        if ok:
            layers.append((prefix, module))
        return ok

    if not visit(model, "") or not any(type(m) is nn.Linear for _, m in layers):
        return None
    return layers


class MLPHessian:
    """The R-operator state of one batch: the gradient pass's cotangents and derivatives.

    Args:
        fmodel: The model as a function of its parameters.
        layers: Its leaf layers from :func:`mlp_layers`.
        inputs: A single input tensor in a tuple.
        targets: The batch's targets.
        loss_fn: The loss callable.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        layers: list[tuple[str, nn.Module]],
        inputs: tuple[Any, ...],
        targets: Any,
        loss_fn: Any,
    ) -> None:
        self.fmodel = fmodel
        detached = [p.detach() for p in fmodel.params]
        frozen = fmodel.parameter_dict(detached)

        def value(name: str) -> Tensor | None:  # tied names share one trainable tensor
            i = fmodel.alias.get(name)
            return detached[i] if i is not None else frozen.get(name)

        self._steps: list[tuple[nn.Module, dict[str, Any]]] = []
        x = inputs[0]
        with torch.no_grad():
            for prefix, layer in layers:
                rec: dict[str, Any] = {"in_shape": x.shape}
                if type(layer) is nn.Linear:
                    rec["x"], rec["w"] = x, value(prefix + "weight")
                    rec["iw"] = fmodel.alias.get(prefix + "weight")
                    rec["ib"] = fmodel.alias.get(prefix + "bias")
                    x = F.linear(x, rec["w"], value(prefix + "bias"))
                elif isinstance(layer, _RESHAPES) or isinstance(layer, nn.Dropout):
                    x = layer(x) if isinstance(layer, _RESHAPES) else x
                else:
                    x, rec["d1"], rec["d2"] = activation_derivatives(layer, x)
                self._steps.append((layer, rec))
        self.z = x
        self.terms: LossTerms = loss_terms(loss_fn, x, targets)
        self.loss = self.terms.value
        # the gradient pass: store delta a_l (Linear outputs) and delta x_l (activation outputs)
        self.gradient = [torch.zeros_like(p) for p in fmodel.params]
        u = self.terms.grad_output.detach()
        lowest = min(k for k, (layer, _) in enumerate(self._steps) if type(layer) is nn.Linear)
        with torch.no_grad():
            for k in range(len(self._steps) - 1, -1, -1):
                layer, rec = self._steps[k]
                if type(layer) is nn.Linear:
                    rec["delta"] = u
                    self._add_weight_terms(rec, u, rec["x"], self.gradient)
                    if k == lowest:
                        break
                    u = u @ rec["w"]
                elif "d1" in rec:
                    rec["delta"] = u
                    u = u * rec["d1"]
                else:
                    u = u.reshape(rec["in_shape"])

    @staticmethod
    def _add_weight_terms(rec: dict[str, Any], u: Tensor, x: Tensor, out: Sequence[Any]) -> None:
        """``out[W] += u^T x`` and ``out[b] += sum u`` over every leading dimension."""
        u2 = u.reshape(-1, u.shape[-1])
        iw, ib = rec["iw"], rec["ib"]
        if iw is not None and out[iw] is not None:
            out[iw].addmm_(u2.T, x.reshape(-1, x.shape[-1]))
        if ib is not None and out[ib] is not None:
            out[ib].add_(u2.sum(0))

    def hvp_into(self, tangents: Sequence[Tensor | None], out: Sequence[Any]) -> None:
        r"""Add :math:`Hv` into ``out`` (one buffer or ``None`` per parameter, in place).

        Args:
            tangents: :math:`v` in parameter shapes (``None`` for zero blocks).
            out: Buffers in parameter shapes; ``None`` skips a parameter.
        """
        with torch.no_grad():
            # forward: R a_l at Linear outputs, R x at every layer input
            rx: Tensor | None = None
            r_in: list[Tensor | None] = []
            for layer, rec in self._steps:
                r_in.append(rx)
                if type(layer) is nn.Linear:
                    rx = self._linear_tangent(rec, rx, tangents)
                elif rx is None:
                    continue
                elif "d1" in rec:
                    rx = rx * rec["d1"]
                elif isinstance(layer, _RESHAPES):
                    rx = layer(rx)
            if rx is None:  # v does not reach the output: H v = 0 from the output term too
                ru = torch.zeros_like(self.z)
            else:
                ru = self.terms.hessian_matmat(rx)
            # backward: R delta, and the blocks of H v at every Linear layer
            for k in range(len(self._steps) - 1, -1, -1):
                layer, rec = self._steps[k]
                if type(layer) is nn.Linear:
                    self._add_weight_terms(rec, ru, rec["x"], out)
                    iw, rk = rec["iw"], r_in[k]
                    if rk is not None and iw is not None and out[iw] is not None:
                        d = rec["delta"]
                        out[iw].addmm_(d.reshape(-1, d.shape[-1]).T, rk.reshape(-1, rk.shape[-1]))
                    if k == 0:
                        break
                    ru = ru @ rec["w"]
                    vw = tangents[iw] if iw is not None else None
                    if vw is not None:
                        ru = ru.add_(rec["delta"] @ vw)
                elif "d1" in rec:
                    ru = ru * rec["d1"]
                    if r_in[k] is not None and rec["d2"] is not None:
                        ru.addcmul_(rec["d2"] * r_in[k], rec["delta"])
                else:
                    ru = ru.reshape(rec["in_shape"])

    @staticmethod
    def _linear_tangent(
        rec: dict[str, Any], rx: Tensor | None, tangents: Sequence[Tensor | None]
    ) -> Tensor | None:
        r""":math:`R a = W\,Rx + V x + c` (``None`` if every term is zero)."""
        vw = tangents[rec["iw"]] if rec["iw"] is not None else None
        vb = tangents[rec["ib"]] if rec["ib"] is not None else None
        out = F.linear(rx, rec["w"], vb) if rx is not None else None
        if vw is not None:
            term = F.linear(rec["x"], vw, vb if out is None else None)
            out = term if out is None else out.add_(term)
        elif out is None and vb is not None:
            shape = (*rec["x"].shape[:-1], rec["w"].shape[0])
            out = vb.expand(shape).clone()
        return out
