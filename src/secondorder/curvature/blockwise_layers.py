r"""The layers of the block-diagonal engine: which ``nn.Sequential`` it takes, one class per kind.

Which modules it takes comes from the layer-rule registry (:mod:`.layers`): a module with a rule
whose class is in :data:`LAYERS`. The engine stays ``nn.Sequential``-only: it backpropagates
matrices (blocks of the curvature) along a chain of layers, which a graph with branches would
have to sum over paths.

Each layer stores what one forward pass needs for the backward recursion of
:mod:`~secondorder.curvature.blockwise`: its input Jacobian applied forwards and backwards,
the parameter Jacobian, and the residual (second-derivative) term of an activation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn import grad as nn_grad
from torch.nn.modules.dropout import _DropoutNd

from .activations import activation_derivatives
from .layers import RULES, Rule, rule_for
from .layers.conv import ConvRule
from .layers.conv import padding as conv_padding
from .layers.elementwise import ElementwiseRule
from .layers.linear import LinearRule
from .layers.pooling import AveragePoolRule, MaxPoolRule
from .layers.reshape import DropoutRule, ReshapeRule, draws_mask
from .model import FunctionalModel

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
# a convolution's weight products use an im2col matrix of its input if it has at least this many
# input features per output (below, the convolution backward is cheaper) and fits this size
_PATCH_MIN_FEATURES = 64
_PATCH_MAX_NUMEL = 2**25


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be a layer of the engine, or None if it can.

    One source of truth: the layer-rule registry (:func:`~.layers.rule_for`) decides whether a
    module is computed exactly, and :data:`LAYERS` which of its rules the engine implements.
    """
    rule, why = rule_for(module)
    if rule is None:
        return why
    if type(rule) not in LAYERS:
        return f"the engine has no layer for its rule ({type(rule).__name__})"
    if draws_mask(module):
        return "Dropout in training mode draws a new mask on every pass"
    return None


def supported_layers() -> str:
    """The module types the engine takes, from the registry (for error messages)."""
    names = [t.__name__ for t, rule in RULES.items() if type(rule) in LAYERS]
    return ", ".join(names) + " (zero padding; Dropout in eval mode or with p=0)"


def sequential_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf layers of a (nested) ``nn.Sequential`` with their parameter-name prefixes.

    Args:
        model: The network.

    Returns:
        ``(prefix, layer)`` pairs in execution order; a layer's parameters are named
        ``prefix + "weight"`` and ``prefix + "bias"``.

    Raises:
        ValueError: If ``model`` is not an ``nn.Sequential``, or a layer is not supported (the
            message names the layer, its type and the supported types).
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ValueError(
            f"the block-diagonal curvature engine needs an nn.Sequential of supported layers, "
            f"got {type(model).__name__}; supported layers: {supported_layers()}"
        )
    layers: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            if module._forward_hooks or module._forward_pre_hooks:
                raise ValueError(f"nested Sequential {prefix.rstrip('.')!r} has forward hooks")
            for name, child in module._modules.items():  # repeated instances run repeatedly
                if child is not None:
                    visit(child, f"{prefix}{name}.")
            return
        reason = _unsupported_reason(module)
        if reason is not None:
            raise ValueError(
                f"layer {prefix.rstrip('.')!r} ({type(module).__name__}) is not supported by the "
                f"block-diagonal curvature engine: {reason}. Supported layers: {supported_layers()}"
            )
        layers.append((prefix, module))

    visit(model, "")
    if not layers:
        raise ValueError("the nn.Sequential has no layers")
    return layers


def parameter_layers(
    specs: list[tuple[str, nn.Module]], fmodel: FunctionalModel
) -> list[tuple[int, str]]:
    """The layer and role (``"weight"``/``"bias"``) of every trainable parameter.

    Raises:
        ValueError: If a parameter is shared between layers or belongs to no layer.
    """
    names: dict[int, list[str]] = {}
    for name, index in fmodel.alias.items():
        names.setdefault(index, []).append(name)
    shared = [v for v in names.values() if len(v) > 1]
    if shared:
        raise ValueError(
            f"parameters shared between layers are not supported by the module-wise engine, "
            f"got {shared[0]} (engine='autograd' handles them)"
        )
    layer_of: list[tuple[int, str] | None] = [None] * len(fmodel.params)
    for j, (prefix, _) in enumerate(specs):
        for role in ("weight", "bias"):
            position = fmodel.alias.get(prefix + role)
            if position is not None:
                layer_of[position] = (j, role)
    stray = [fmodel.names[i] for i, where in enumerate(layer_of) if where is None]
    if stray:
        raise ValueError(
            f"parameters {stray} are not the weight or bias of a layer of the Sequential "
            f"(engine='autograd' handles them)"
        )
    return [where for where in layer_of if where is not None]


# ------------------------------------------------------------------------------ layers
# Tangents carry a leading column dimension K: an input tangent has shape (K, N, *in).
class Layer:
    """One layer during one forward pass: the values it stored and its local derivatives."""

    roles: dict[str, int]  # trainable parameter role ("weight"/"bias") -> parameter index
    residual_capable = False

    def __init__(self, module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> None:
        self.module = module
        self.weight = weight
        self.bias = bias
        self.roles = {}

    def forward(self, x: Tensor, second: bool) -> Tensor:
        """The layer's output; stores what the derivatives need (``second``: residual too)."""
        raise NotImplementedError

    def jvp(self, t: Tensor) -> Tensor:
        """Input Jacobian times tangents ``(K, N, *in)`` -> ``(K, N, *out)``."""
        raise NotImplementedError

    def vjp(self, u: Tensor) -> Tensor:
        """Transposed input Jacobian times cotangents ``(K, N, *out)`` -> ``(K, N, *in)``."""
        raise NotImplementedError

    def param_jvp(self, role: str, v: Tensor) -> Tensor:
        """Parameter Jacobian of ``role`` times ``(K, *param)`` -> ``(K, N, *out)``."""
        raise NotImplementedError

    def param_vjp(self, role: str, u: Tensor) -> Tensor:
        """Transposed parameter Jacobian of ``role`` times ``(K, N, *out)`` -> ``(K, *param)``."""
        raise NotImplementedError

    def param_vjp_plus(self, role: str, u: Tensor, v: Tensor, beta: float) -> Tensor:
        """``param_vjp(role, u) + beta * v``, with ``v`` shaped like the result.

        Layers whose parameter VJP is a matrix product override this to fuse the sum into it.
        """
        return torch.add(self.param_vjp(role, u), v, alpha=beta)

    def residual(self, delta: Tensor) -> Tensor | None:
        """Diagonal of the residual term for the output gradient ``delta`` (None if zero)."""
        return None


class _Linear(Layer):
    def __init__(self, module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__(module, weight, bias)
        assert weight is not None
        self.w = weight

    def forward(self, x: Tensor, second: bool) -> Tensor:
        self.x2 = x.reshape(-1, x.shape[-1])  # (M, in), M = N * prod(middle dims)
        self.mid = x.shape[1:-1]
        return F.linear(x, self.w, self.bias)

    def jvp(self, t: Tensor) -> Tensor:
        return F.linear(t, self.w)

    def vjp(self, u: Tensor) -> Tensor:
        return u @ self.w

    def param_jvp(self, role: str, v: Tensor) -> Tensor:
        K = v.shape[0]
        if role == "weight":  # v: (K, out, in) -> (K, M, out)
            out = torch.matmul(self.x2, v.transpose(1, 2))
            return out.view(K, -1, *self.mid, v.shape[1])
        n = self.x2.shape[0] // max(1, math.prod(self.mid))
        return v.view(K, 1, *([1] * len(self.mid)), -1).expand(K, n, *self.mid, v.shape[1])

    def param_vjp(self, role: str, u: Tensor) -> Tensor:
        u2 = u.reshape(u.shape[0], -1, u.shape[-1])  # (K, M, out)
        if role == "weight":
            return u2.transpose(1, 2) @ self.x2
        return u2.sum(1)

    def param_vjp_plus(self, role: str, u: Tensor, v: Tensor, beta: float) -> Tensor:
        if role != "weight":
            return super().param_vjp_plus(role, u, v, beta)
        u2 = u.reshape(u.shape[0], -1, u.shape[-1])  # (K, M, out)
        if u2.shape[0] == 1:  # beta v + u^T x as one GEMM reading v (no separate pass)
            return torch.addmm(v[0], u2[0].T, self.x2, beta=beta).unsqueeze(0)
        x2 = self.x2.expand(u2.shape[0], *self.x2.shape)
        return torch.baddbmm(v, u2.transpose(1, 2), x2, beta=beta)


class _Conv(Layer):
    def __init__(self, module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> None:
        super().__init__(module, weight, bias)
        assert weight is not None
        self.w = weight
        m: Any = module
        self.d = _CONV[type(m)]
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[self.d - 1]
        self.conv_input = (
            nn_grad.conv1d_input,
            nn_grad.conv2d_input,
            nn_grad.conv3d_input,
        )[self.d - 1]
        self.conv_weight = (
            nn_grad.conv1d_weight,
            nn_grad.conv2d_weight,
            nn_grad.conv3d_weight,
        )[self.d - 1]
        padding = conv_padding(m)  # numeric (the registry refuses an asymmetric 'same')
        self.kw = dict(stride=m.stride, padding=padding, dilation=m.dilation, groups=m.groups)

    def forward(self, x: Tensor, second: bool) -> Tensor:
        if x.ndim != self.d + 2:
            raise ValueError(
                f"{type(self.module).__name__} needs batched inputs of {self.d + 2} dimensions, "
                f"got shape {tuple(x.shape)}"
            )
        self.x = x
        y = self.conv(x, self.w, self.bias, **self.kw)
        self.in_shape = x.shape
        self.out_shape = y.shape
        self._patches: Tensor | None = None
        # the weight's vector-Jacobian product as one matrix product with the im2col matrix of
        # the input, when that beats the convolution backward (many input features per output)
        features = math.prod(self.w.shape[1:])
        self._use_patches = (
            self.d <= 2
            and self.kw["groups"] == 1
            and features >= _PATCH_MIN_FEATURES
            and features * y[0, 0].numel() * x.shape[0] <= _PATCH_MAX_NUMEL
        )
        return y

    def jvp(self, t: Tensor) -> Tensor:
        return self.conv(t.flatten(0, 1), self.w, None, **self.kw).unflatten(0, t.shape[:2])

    def vjp(self, u: Tensor) -> Tensor:
        K = u.shape[0]
        size = (K * self.in_shape[0], *self.in_shape[1:])
        out = self.conv_input(size, self.w, u.flatten(0, 1), **self.kw)
        return out.unflatten(0, (K, -1))

    def param_jvp(self, role: str, v: Tensor) -> Tensor:
        K = v.shape[0]
        if role == "bias":
            shape = (K, 1, v.shape[1]) + (1,) * self.d
            return v.view(shape).expand(K, *self.out_shape)
        if self.kw["groups"] == 1:
            y = self.conv(self.x, v.flatten(0, 1), None, **self.kw)  # (N, K*out, *o)
            return y.unflatten(1, (K, -1)).transpose(0, 1)
        return torch.stack([self.conv(self.x, v[k], None, **self.kw) for k in range(K)])

    def param_vjp(self, role: str, u: Tensor) -> Tensor:
        K = u.shape[0]
        if role == "bias":
            return u.sum(dim=(1, *range(3, u.ndim)))
        wshape = tuple(self.w.shape)
        if self._use_patches:
            if self._patches is None:
                self._patches = self._patch_matrix()
            u2 = u.transpose(1, 2).reshape(K * wshape[0], -1)  # (K*out, N*L)
            return (u2 @ self._patches.T).view(K, *wshape)
        if self.kw["groups"] == 1:
            g = self.conv_weight(
                self.x, (K * wshape[0], *wshape[1:]), u.transpose(0, 1).flatten(1, 2), **self.kw
            )
            return g.view(K, *wshape)
        return torch.stack([self.conv_weight(self.x, wshape, u[k], **self.kw) for k in range(K)])

    def _patch_matrix(self) -> Tensor:
        """The im2col matrix of the input: ``(in * prod(kernel), N * prod(out spatial))``."""
        x = self.x if self.d == 2 else self.x.unsqueeze(2)
        pad = self.kw["padding"]
        kernel: tuple[int, ...] = tuple(self.w.shape[2:])
        stride, dilation = self.kw["stride"], self.kw["dilation"]
        if self.d == 1:
            kernel, stride, dilation, pad = (1, *kernel), (1, *stride), (1, *dilation), (0, *pad)
        if any(pad):
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        spans = [dl * (k - 1) + 1 for dl, k in zip(dilation, kernel)]
        p = x.unfold(2, spans[0], stride[0]).unfold(3, spans[1], stride[1])
        p = p[..., :: dilation[0], :: dilation[1]]  # (N, C, Ho, Wo, kh, kw)
        return p.permute(1, 4, 5, 0, 2, 3).reshape(math.prod(self.w.shape[1:]), -1)


class _Elementwise(Layer):
    residual_capable = True

    def forward(self, x: Tensor, second: bool) -> Tensor:
        y, self.d1, self.d2 = activation_derivatives(self.module, x, second)
        return y

    def jvp(self, t: Tensor) -> Tensor:
        return t * self.d1

    def vjp(self, u: Tensor) -> Tensor:
        return u * self.d1

    def residual(self, delta: Tensor) -> Tensor | None:
        return None if self.d2 is None else delta * self.d2


class _MaxPool(Layer):
    def forward(self, x: Tensor, second: bool) -> Tensor:
        m: Any = self.module
        d = _MAXPOOL[type(m)]
        if x.ndim != d + 2:
            raise ValueError(
                f"{type(m).__name__} needs batched inputs of {d + 2} dimensions, "
                f"got shape {tuple(x.shape)}"
            )
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
        if d > 1 and x.device.type == "cpu":  # CPU: the channels-last kernel is the fast one
            fmt = torch.channels_last if d == 2 else torch.channels_last_3d
            x_in = x.contiguous(memory_format=fmt)
        else:
            x_in = x
        y, idx = pool(
            x_in, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
            return_indices=True,
        )  # fmt: skip
        y = y.contiguous()
        self.idx = idx.flatten(2).contiguous()  # (N, C, P_out) into the flattened input
        self.in_shape = x.shape
        self.out_shape = y.shape
        return y

    def jvp(self, t: Tensor) -> Tensor:
        K = t.shape[0]
        out = t.flatten(3).gather(3, self.idx.expand(K, *self.idx.shape))
        return out.view(K, *self.out_shape)

    def vjp(self, u: Tensor) -> Tensor:
        K = u.shape[0]
        n, c = self.in_shape[:2]
        out = u.new_zeros(K, n, c, math.prod(self.in_shape[2:]))
        out.scatter_add_(3, self.idx.expand(K, *self.idx.shape), u.flatten(3))
        return out.view(K, *self.in_shape)


class _Reshape(Layer):
    """Flatten, Unflatten, Identity and inactive Dropout: a per-sample reshape."""

    def forward(self, x: Tensor, second: bool) -> Tensor:
        m = self.module
        dim = getattr(m, "start_dim", getattr(m, "dim", None))
        if isinstance(m, (nn.Flatten, nn.Unflatten)) and dim is not None and dim % x.ndim == 0:
            raise ValueError(
                f"{type(m).__name__} acting on dimension 0 mixes the samples of a batch; "
                f"the block-diagonal engine needs per-sample layers"
            )
        y = x if isinstance(m, (nn.Identity, _DropoutNd)) else m(x)
        self.in_shape = x.shape[1:]
        self.out_shape = y.shape[1:]
        return y

    def jvp(self, t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:2], *self.out_shape)

    def vjp(self, u: Tensor) -> Tensor:
        return u.reshape(*u.shape[:2], *self.in_shape)


class _LinearParamFree(Layer):
    """Average pooling: linear, so its Jacobian is the layer itself (adjoint by autograd)."""

    def forward(self, x: Tensor, second: bool) -> Tensor:
        y = self.module(x)
        self.in_shape = x.shape
        return y

    def jvp(self, t: Tensor) -> Tensor:
        return self.module(t.flatten(0, 1)).unflatten(0, t.shape[:2])

    def vjp(self, u: Tensor) -> Tensor:
        K = u.shape[0]
        with torch.enable_grad():
            z = u.new_zeros(K * self.in_shape[0], *self.in_shape[1:]).requires_grad_(True)
            (g,) = torch.autograd.grad(self.module(z), z, u.flatten(0, 1))
        return g.unflatten(0, (K, -1))


#: the layer rules whose modules the engine backpropagates matrices through, with its class
LAYERS: dict[type[Rule], type[Layer]] = {
    LinearRule: _Linear,
    ConvRule: _Conv,
    ElementwiseRule: _Elementwise,
    MaxPoolRule: _MaxPool,
    AveragePoolRule: _LinearParamFree,
    ReshapeRule: _Reshape,
    DropoutRule: _Reshape,  # in eval mode or with p = 0 (a random one is refused)
}


def make_layer(module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> Layer:
    """The :class:`Layer` of a supported ``module`` with its (detached) ``weight`` and ``bias``."""
    rule = rule_for(module)[0]
    assert rule is not None
    return LAYERS[type(rule)](module, weight, bias)
