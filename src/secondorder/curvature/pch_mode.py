r"""The positive-curvature Hessian (PCH) for any architecture: a modified double backward.

The Hessian of a loss differs from the GGN by *residual* terms
:math:`\sum_k \delta_k \nabla^2 (f)_k` of every nonlinearity :math:`f` in the network, weighted by
the gradient :math:`\delta = \nabla_{f} L` of its output. For an elementwise activation the
residual is diagonal, :math:`\operatorname{diag}(\delta \odot f''(a))`, and the PCH (Dangel et
al., 2020) replaces it by :math:`\operatorname{diag}(\rho(\delta \odot f''(a)))` with
:math:`\rho(r) = \max(r, 0)` (``"clip"``) or :math:`|r|` (``"abs"``).

A Hessian-vector product by double backward meets that residual at exactly one place: when it
differentiates the activation's backward :math:`g \mapsto g \odot f'(a)` with respect to
:math:`a`, which gives :math:`\cdot \odot g \odot f''(a)`, and :math:`g` there is
:math:`\delta`. :func:`positive_curvature_mode` is a ``TorchFunctionMode`` that, while a graph
is recorded, replaces the elementwise activations it knows by autograd functions whose backward
is itself an autograd function with that derivative modified. Hessian-vector products through
the recorded graph then apply the modified Hessian. Where every parameter tensor enters one
layer that is linear in it (``Linear``, convolutions, affine maps), the diagonal block of a
parameter tensor equals the PCH block that :mod:`~secondorder.curvature.blockwise`
backpropagates module by module: the bilinear parameter-input terms, which the modification
leaves untouched, only couple different blocks.

Intercepted: ``sigmoid``, ``tanh``, ``silu``, ``gelu``, ``softplus``, ``elu``, ``celu``,
``selu``, ``mish``, ``softsign``, ``logsigmoid``, ``hardswish``, ``tanhshrink`` (functions, tensor
methods and the modules that call them, in place or not). Piecewise-linear activations (ReLU,
max-pooling) have no residual.
Any other nonlinearity (products of activations, normalisation, attention) keeps its exact
second-order term, so the PSD guarantee only holds for networks whose nonlinearities are all
intercepted, with a convex loss.

The graph engine computes the same modified products without recording a graph:
``Hessian(model, loss_fn, data, modify="clip"|"abs")`` (:mod:`.engines.second_order`, which
applies :func:`modify_residual` to every elementwise activation's :math:`\delta \odot f''` and
evaluates nodes without a rule again under this mode); the double backward here remains for
models it cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .._checks import check_choice
from .vocabulary import PCH_MODIFICATIONS

__all__ = ["MODIFICATIONS", "modify_residual", "positive_curvature_mode"]

MODIFICATIONS = PCH_MODIFICATIONS

_INTERCEPTED: set[Any] = {
    torch.sigmoid,
    torch.Tensor.sigmoid,
    torch.special.expit,
    torch.tanh,
    torch.Tensor.tanh,
    F.sigmoid,
    F.tanh,
    F.silu,
    F.gelu,
    F.softplus,
    F.elu,
    F.celu,
    F.selu,
    F.mish,
    F.softsign,
    F.logsigmoid,
    F.hardswish,
    F.tanhshrink,  # a - tanh(a) in Python: the mode is off inside an intercepted call
}


def modify_residual(r: Tensor, modify: str) -> Tensor:
    r""":math:`\rho(r)`: :math:`\max(r, 0)` for ``"clip"``, :math:`|r|` for ``"abs"``."""
    return r.clamp_min(0) if modify == "clip" else r.abs()


_modify = modify_residual


def _derivatives(fn: Callable[[Tensor], Tensor], a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value, first and second derivative of the elementwise function ``fn`` at ``a``."""
    with torch.enable_grad():
        leaf = a.detach().requires_grad_(True)
        y = fn(leaf)
        (d1,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), leaf)
        else:
            d2 = torch.zeros_like(leaf)
    return y.detach(), d1.detach(), d2.detach()


class _ModifiedActivation(torch.autograd.Function):
    """``y = fn(a)`` whose backward's derivative with respect to ``a`` is modified."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, fn: Callable[[Tensor], Tensor], modify: str) -> Tensor:
        y, d1, d2 = _derivatives(fn, a)
        ctx.save_for_backward(a, d1, d2)
        ctx.modify = modify
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        a, d1, d2 = ctx.saved_tensors
        return _ModifiedBackward.apply(g, a, d1, d2, ctx.modify), None, None


class _ModifiedBackward(torch.autograd.Function):
    r"""``(g, a) -> g * f'(a)`` with the derivative in ``a`` replaced by :math:`\rho(g f''(a))`."""

    generate_vmap_rule = True  # batched products (is_grads_batched) vmap the double backward

    @staticmethod
    def forward(g: Tensor, a: Tensor, d1: Tensor, d2: Tensor, modify: str) -> Tensor:
        return g * d1

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        g, _, d1, d2, modify = inputs
        ctx.save_for_backward(g, d1, d2)
        ctx.modify = modify

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        g, d1, d2 = ctx.saved_tensors
        return gg * d1, gg * _modify(g * d2, ctx.modify), None, None, None


# in-place functions and their out-of-place versions
_INPLACE: dict[Any, Any] = {
    torch.sigmoid_: torch.sigmoid,
    torch.Tensor.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    torch.Tensor.tanh_: torch.tanh,
    F.elu_: F.elu,
    torch.celu_: F.celu,
    torch.selu_: F.selu,
}


class positive_curvature_mode(TorchFunctionMode):
    """Record graphs whose double backward applies the PCH residuals (module docstring).

    Use it around the forward pass (and the first backward with ``create_graph=True``) of a
    Hessian-vector product; products through the recorded graph apply the modified Hessian.

    In-place activations (``inplace=True``, ``sigmoid_``, ``elu_``, ...) are computed out of
    place on a copy and written into their input, so they give the out-of-place result.

    Args:
        modify: ``"clip"`` or ``"abs"``.

    Raises:
        ValueError: For another ``modify``.

    Example:
        >>> import torch
        >>> from secondorder.curvature.pch import positive_curvature_mode
        >>> x = torch.tensor([0.5, -2.0], requires_grad=True)
        >>> with positive_curvature_mode("abs"):
        ...     (g,) = torch.autograd.grad(torch.sigmoid(x).sum(), x, create_graph=True)
        >>> (hv,) = torch.autograd.grad(g, x, torch.ones(2))  # |sigma''(x)| instead of sigma''
        >>> bool((hv >= 0).all())
        True
    """

    def __init__(self, modify: str) -> None:
        check_choice("modify", modify, MODIFICATIONS)
        super().__init__()
        self.modify = modify

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        inplace = func in _INPLACE
        if func in _INTERCEPTED:
            # the functional form's inplace flag: a keyword, or a positional True after the input
            flags = [i for i, v in enumerate(args) if i > 0 and v is True]
            if kwargs.pop("inplace", False) or flags:
                inplace = True
                args = tuple(v for i, v in enumerate(args) if i not in flags)
        if (func in _INTERCEPTED or inplace) and args and isinstance(args[0], Tensor):
            a, rest = args[0], tuple(args[1:])
            if a.dtype.is_floating_point:
                plain = _INPLACE.get(func, func)

                def fn(t: Tensor) -> Tensor:
                    return plain(t, *rest, **kwargs)

                if not inplace:
                    return _ModifiedActivation.apply(a, fn, self.modify)
                # out of place on a copy (the function keeps its input for the backward),
                # then written into the input as the in-place call would
                return a.copy_(_ModifiedActivation.apply(a.clone(), fn, self.modify))
        return func(*args, **kwargs)
