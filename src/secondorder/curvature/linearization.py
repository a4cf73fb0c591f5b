r"""The network linearised at one point on one batch: :math:`v \mapsto Jv` and :math:`u \mapsto J^\top u`.

:math:`J = \partial z / \partial \theta` is the Jacobian of the outputs ``z`` (all samples) with
respect to the parameters. One forward pass builds a linearisation; every product reuses it.
Two engines:

- :class:`AutogradLinearization` works for any module. The forward graph is kept, and a backward
  with ``create_graph=True`` against a dummy cotangent :math:`w` builds the graph of the linear
  map :math:`w \mapsto J^\top w` once. :math:`J^\top u` is a retained backward of the forward
  graph; :math:`Jv` is the derivative of :math:`v^\top J^\top w` with respect to :math:`w`,
  a backward of that second graph (no forward pass is repeated).
- :class:`SequentialLinearization` serves ``nn.Sequential`` stacks of common layers. The forward
  pass stores each layer's input (and the activations' derivatives, max-pooling indices), and
  :math:`Jv` runs forward-mode by hand on the stored values: two matrix products per linear
  layer (one for the first), which is the flop floor, and no double backward (slow on CPU for
  convolutions and pooling). :math:`J^\top u` is a retained backward of the forward graph.

Tangents are lists with one entry per parameter (``None`` for a zero block); with ``batched=True``
every entry and every output-space tensor carries a leading column dimension ``K``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from .model import FunctionalModel

__all__ = [
    "AutogradLinearization",
    "SequentialLinearization",
    "backward_into",
    "linearize",
    "sequential_layers",
]

Tangents = Sequence[Tensor | None]


class Linearization:
    """Common interface: outputs ``z`` and products with ``J`` and ``J^T``."""

    z: Tensor
    leaves: list[Tensor]
    _z_graph: Tensor

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
        grads = torch.autograd.grad(
            self._z_graph,
            wrt,
            cotangent,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
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

    def __init__(self, fmodel: FunctionalModel, inputs: tuple[Any, ...], leaves: list[Tensor]):
        self.leaves = leaves
        with torch.enable_grad():
            z = fmodel(leaves, inputs)
            if not isinstance(z, Tensor):
                raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
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
        (jv,) = torch.autograd.grad(
            outs, self._w, tans, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
        return jv


# --------------------------------------------------------------------- Sequential engine
_ELEMENTWISE: dict[type[nn.Module], Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    # derivative of the activation from its input a and output s
    nn.Sigmoid: lambda m, a, s: s * (1 - s),
    nn.Tanh: lambda m, a, s: 1 - s * s,
    nn.ReLU: lambda m, a, s: a > 0,  # a bool mask: 1 byte per entry
    nn.SiLU: lambda m, a, s: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))),
    nn.LeakyReLU: lambda m, a, s: torch.where(a > 0, 1.0, m.negative_slope).to(a.dtype),  # type: ignore[attr-defined]
    nn.ELU: lambda m, a, s: torch.where(a > 0, torch.ones_like(a), s + m.alpha),  # type: ignore[attr-defined]
    nn.Softplus: lambda m, a, s: torch.sigmoid(a * m.beta),  # type: ignore[attr-defined]
    nn.GELU: lambda m, a, s: _gelu_derivative(m, a),
}
_LINEAR_NO_PARAMS = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


def _gelu_derivative(m: nn.Module, a: Tensor) -> Tensor:
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(F.gelu(a, approximate=m.approximate).sum(), a)  # type: ignore[arg-type]
    return d


def _supported(module: nn.Module) -> bool:
    t = type(module)
    if t in _ELEMENTWISE or t in _CONV or t in _MAXPOOL or isinstance(module, _LINEAR_NO_PARAMS):
        return not (t in _CONV and module.padding_mode != "zeros")  # type: ignore[attr-defined]
    if t is nn.Linear:
        return True
    if isinstance(module, nn.Dropout):
        return not module.training or module.p == 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return not module.training and module.track_running_stats
    return False


def sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Flatten nested ``nn.Sequential`` into ``(prefix, layer)`` pairs, or None if unsupported.

    Args:
        model: The module.

    Returns:
        The leaf layers with their parameter-name prefixes, or ``None`` when ``model`` is not a
        (nested) ``nn.Sequential`` of layers the hand-written forward mode supports, or a layer
        carries forward hooks.
    """
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> bool:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            return all(visit(child, f"{prefix}{name}.") for name, child in module.named_children())
        if module._forward_hooks or module._forward_pre_hooks or not _supported(module):
            return False
        layers.append((prefix, module))
        return True

    return layers if visit(model, "") else None


class SequentialLinearization(Linearization):
    """Linearisation of an ``nn.Sequential`` by hand-written forward mode (module docstring).

    Args:
        fmodel: The model as a function of its parameters (an ``nn.Sequential``).
        layers: Its leaf layers from :func:`sequential_layers`.
        inputs: A single input tensor in a tuple.
        leaves: Leaf tensors holding the parameter values (``requires_grad=True``).
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        layers: list[tuple[str, nn.Module]],
        inputs: tuple[Any, ...],
        leaves: list[Tensor],
    ):
        self.leaves = leaves
        values = fmodel.parameter_dict(leaves)
        self._steps: list[tuple[nn.Module, dict[str, Any]]] = []
        x = inputs[0]
        with torch.enable_grad():
            for prefix, layer in layers:
                x = self._forward_layer(layer, prefix, x, values, leaves, fmodel.alias)
        self._z_graph = x
        self.z = x.detach()

    def _forward_layer(
        self,
        layer: nn.Module,
        prefix: str,
        x: Tensor,
        values: dict[str, Tensor],
        leaves: list[Tensor],
        alias: dict[str, int],
    ) -> Tensor:
        t = type(layer)
        rec: dict[str, Any] = {"x": x.detach()}

        def param(name: str) -> tuple[Tensor | None, int | None]:
            full = prefix + name
            if full in alias:  # trainable (tied names included)
                return leaves[alias[full]], alias[full]
            return values.get(full), None  # frozen, or absent (bias=False)

        if t is nn.Linear or t in _CONV:
            (w, rec["iw"]), (b, rec["ib"]) = param("weight"), param("bias")
            rec["w"] = w.detach() if w is not None else None
            if t is nn.Linear:
                out = F.linear(x, w, b)
            else:
                conv_kw = dict(
                    stride=layer.stride,
                    padding=layer.padding,  # type: ignore[attr-defined]
                    dilation=layer.dilation,
                    groups=layer.groups,
                )  # type: ignore[attr-defined]
                rec["kw"] = conv_kw
                out = _CONV[t](x, w, b, **conv_kw)
        elif t in _ELEMENTWISE:
            out = layer(x)
            rec["d"] = _ELEMENTWISE[t](layer, x.detach(), out.detach())
        elif t in _MAXPOOL:
            m = layer
            out, idx = _MAXPOOL[t](
                x,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,  # type: ignore[attr-defined]
                ceil_mode=m.ceil_mode,
                return_indices=True,
            )  # type: ignore[attr-defined]
            rec["idx"] = idx
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            (w, rec["iw"]), (b, rec["ib"]) = param("weight"), param("bias")
            var, mean = layer.running_var, layer.running_mean
            assert var is not None and mean is not None
            out = F.batch_norm(x, mean, var, w, b, False, 0.0, layer.eps)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            inv = (var + layer.eps).rsqrt()
            rec["xhat"] = (x.detach() - mean.view(shape)) * inv.view(shape)
            rec["scale"] = (inv * (w.detach() if w is not None else 1.0)).view(shape)
            rec["shape"] = shape
        else:  # parameter-free linear layers, eval-mode dropout
            out = layer(x)
        rec["out_shape"] = out.shape
        self._steps.append((layer, rec))
        return out

    def jvp(self, tangents: Tangents, batched: bool = False) -> Tensor | None:  # noqa: D102
        dx: Tensor | None = None
        K = next(t.shape[0] for t in tangents if t is not None) if batched else 0
        with torch.no_grad():
            for layer, rec in self._steps:
                dx = self._jvp_layer(layer, rec, dx, tangents, K, batched)
        return dx

    def _jvp_layer(
        self,
        layer: nn.Module,
        rec: dict[str, Any],
        dx: Tensor | None,
        tangents: Tangents,
        K: int,
        batched: bool,
    ) -> Tensor | None:
        t = type(layer)
        if t is nn.Linear or t in _CONV:
            dw = tangents[rec["iw"]] if rec["iw"] is not None else None
            db = tangents[rec["ib"]] if rec["ib"] is not None else None
            out: Tensor | None = None
            if t is nn.Linear:
                if dx is not None:
                    out = F.linear(dx, rec["w"])
                if dw is not None:
                    term = rec["x"] @ dw.transpose(-1, -2)
                    out = term if out is None else out + term
                if db is not None:
                    shape = rec["out_shape"]
                    bias = db.view(K, *([1] * (len(shape) - 1)), -1) if batched else db
                    if out is None:
                        out = bias.expand(K, *shape) if batched else bias.expand(shape)
                    else:
                        out = out + bias
                return out
            conv, kw = _CONV[t], rec["kw"]
            if dx is not None:
                out = (
                    conv(dx.flatten(0, 1), rec["w"], None, **kw)
                    if batched
                    else conv(dx, rec["w"], None, **kw)
                )
                if batched:
                    out = out.unflatten(0, (K, -1))
            if dw is not None:
                term = self._conv_param_jvp(conv, kw, rec["x"], dw, db, K, batched)
                out = term if out is None else out + term
            elif db is not None:
                term = _bias_map(db, rec["out_shape"], K, batched)
                out = term if out is None else out + term
            return out
        if dx is None:
            return None
        if t in _ELEMENTWISE:
            return rec["d"] * dx
        if t in _MAXPOOL:
            idx = rec["idx"]
            if batched:
                dx, idx = dx.flatten(0, 1), idx.repeat(K, *([1] * (idx.ndim - 1)))
            out = dx.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            return out.unflatten(0, (K, -1)) if batched else out
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            out = dx * rec["scale"]
            dw = tangents[rec["iw"]] if rec["iw"] is not None else None
            db = tangents[rec["ib"]] if rec["ib"] is not None else None
            shape = rec["shape"]
            if dw is not None:
                out = out + rec["xhat"] * (dw.view(K, *shape) if batched else dw.view(shape))
            if db is not None:
                out = out + (db.view(K, *shape) if batched else db.view(shape))
            return out
        if batched:  # parameter-free linear layers act per sample
            return layer(dx.flatten(0, 1)).unflatten(0, (K, -1))
        return layer(dx)

    @staticmethod
    def _conv_param_jvp(
        conv: Callable[..., Tensor],
        kw: dict[str, Any],
        x: Tensor,
        dw: Tensor,
        db: Tensor | None,
        K: int,
        batched: bool,
    ) -> Tensor:
        if not batched:
            return conv(x, dw, db, **kw)
        if kw["groups"] == 1:
            out_ch = dw.shape[1]
            y = conv(x, dw.flatten(0, 1), db.flatten(0, 1) if db is not None else None, **kw)
            return y.unflatten(1, (K, out_ch)).transpose(0, 1)
        cols = [conv(x, dw[k], db[k] if db is not None else None, **kw) for k in range(K)]
        return torch.stack(cols)


def _bias_map(db: Tensor, out_shape: torch.Size, K: int, batched: bool) -> Tensor:
    """The output tangent of a bias alone: ``db`` broadcast over samples and positions."""
    spatial = (1,) * (len(out_shape) - 2)
    if batched:
        return db.view(K, 1, -1, *spatial).expand(K, *out_shape)
    return db.view(1, -1, *spatial).expand(out_shape)


def linearize(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    leaves: list[Tensor],
    engine: str = "auto",
) -> Linearization:
    """Linearise ``fmodel`` at ``leaves`` on ``inputs`` with the chosen engine.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of one batch.
        leaves: Leaf tensors holding the parameter values.
        engine: ``"auto"`` (hand-written forward mode for supported ``nn.Sequential`` models,
            autograd otherwise), ``"sequential"`` or ``"autograd"``.

    Returns:
        The linearisation.

    Raises:
        ValueError: For an unknown engine, or ``"sequential"`` on an unsupported model.
    """
    if engine not in ("auto", "sequential", "autograd"):
        raise ValueError(f"engine must be 'auto', 'sequential' or 'autograd', got {engine!r}")
    if engine != "autograd":
        layers = sequential_layers(fmodel.model)
        if layers is not None and len(inputs) == 1 and isinstance(inputs[0], Tensor):
            return SequentialLinearization(fmodel, layers, inputs, leaves)
        if engine == "sequential":
            raise ValueError(
                f"engine='sequential' needs an nn.Sequential of supported layers called on one "
                f"tensor; {type(fmodel.model).__name__} is not (use engine='auto')"
            )
    return AutogradLinearization(fmodel, inputs, leaves)
