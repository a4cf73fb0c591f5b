r"""Rules for the torch functions and tensor methods a traced ``forward`` calls between layers.

Each op rule sees the node's *active* inputs (values that depend on the parameters) and treats
every other argument as a constant:

- ``sum``: ``a + b``, ``a - b``, ``-a`` (with broadcasting): :math:`dy = \pm da \pm db`, the
  cotangent summed back to each input's shape;
- ``product``: ``a * b``, ``a / c`` (``c`` constant): :math:`dy = da\, b + a\, db`;
- ``cat``: concatenation, :math:`dy = [da, db]`, the cotangent split;
- ``reshape``: ``view``, ``reshape``, ``flatten``, ``squeeze``, ``unsqueeze``, ``contiguous``;
- ``linear``: any other function linear in its one active input (indexing, ``permute``,
  ``transpose``, ``mean``, ``sum``, ``expand``, average pooling with options given as graph
  values, ``F.embedding`` in its weight): :math:`dy = f(dx)` (columns
  by ``torch.vmap``), :math:`dx = f^\top u` by ``torch.func.vjp`` of :math:`f` (linear, so its
  pullback does not depend on the point);
- ``module``: ``torch.relu``, ``F.silu``, ``x.tanh()``, ``F.max_pool2d``, ``F.avg_pool2d``,
  ``F.adaptive_avg_pool2d``, ... by the layer rule of the matching module (one activation
  table; the rule also tells the per-sample engines that the step keeps samples apart);
- ``matmul``, ``linear_fn``, ``split`` (:mod:`.bilinear`): matrix products (``@``, ``matmul``,
  ``mm``, ``bmm``, ``addmm``, ``baddbmm``, two-operand ``einsum``) and ``F.linear`` with any
  operand active, and ``split``/``chunk``/``unbind``;
- ``attention`` (:mod:`.sdpa`, :mod:`.mha`): ``F.scaled_dot_product_attention`` without dropout
  and the attention of ``nn.MultiheadAttention``'s decomposition (:mod:`.decompose`).

:data:`BUILDERS` makes the steps of the kinds defined outside :mod:`.steps`.

:func:`op_kind` returns the kind of a node, or ``None`` (the node is differentiated by autograd).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.reshape import dropout_module
from . import bilinear, mha, sdpa
from .step_base import Step

__all__ = ["BUILDERS", "FUNCTION_MODULES", "IN_PLACE", "module_of", "op_kind"]

_SUM_FUNCS = {operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.neg}
_SUM_METHODS = {"add", "sub", "neg"}
_PRODUCT_FUNCS = {operator.mul, operator.truediv, torch.mul, torch.div}
_PRODUCT_METHODS = {"mul", "div"}
_CAT_FUNCS = {torch.cat, torch.concat}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "unflatten"}
_ATTENTION_FUNCS = {F.scaled_dot_product_attention, mha.multi_head_attention}
_LINEAR_FUNCS = {
    operator.getitem,
    torch.permute,
    torch.transpose,
    torch.mean,
    torch.sum,
    torch.narrow,
    torch.select,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_LINEAR_METHODS = {
    "permute",
    "transpose",
    "t",
    "mean",
    "sum",
    "expand",
    "expand_as",
    "narrow",
    "select",
    "__getitem__",
}

_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_ARGS = (
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)

#: functions and methods computed by the rule of a module: (module factory, argument names after
#: the input, in order); activations of the table, max- and average pooling
FUNCTION_MODULES: dict[Any, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    torch.relu: (nn.ReLU, ()),
    F.relu: (nn.ReLU, ("inplace",)),
    torch.tanh: (nn.Tanh, ()),
    F.tanh: (nn.Tanh, ()),
    torch.sigmoid: (nn.Sigmoid, ()),
    F.sigmoid: (nn.Sigmoid, ()),
    F.silu: (nn.SiLU, ("inplace",)),
    F.gelu: (nn.GELU, ("approximate",)),
    F.elu: (nn.ELU, ("alpha", "inplace")),
    F.softplus: (nn.Softplus, ("beta", "threshold")),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")),
    "relu": (nn.ReLU, ()),
    "tanh": (nn.Tanh, ()),
    "sigmoid": (nn.Sigmoid, ()),
    F.max_pool1d: (nn.MaxPool1d, _POOL_ARGS),
    F.max_pool2d: (nn.MaxPool2d, _POOL_ARGS),
    F.max_pool3d: (nn.MaxPool3d, _POOL_ARGS),
    # average pooling: linear, by its rule (which says it keeps batched samples apart)
    F.avg_pool1d: (nn.AvgPool1d, _AVG_ARGS[:-1]),
    F.avg_pool2d: (nn.AvgPool2d, _AVG_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _AVG_ARGS),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
    # dropout: one fixed mask per forward pass (layers/reshape.py)
    F.dropout: (dropout_module(nn.Dropout), ("p", "training", "inplace")),
    F.dropout1d: (dropout_module(nn.Dropout1d), ("p", "training", "inplace")),
    F.dropout2d: (dropout_module(nn.Dropout2d), ("p", "training", "inplace")),
    F.dropout3d: (dropout_module(nn.Dropout3d), ("p", "training", "inplace")),
}


def module_of(node: Any) -> nn.Module | None:
    """The module whose rule computes a function node of :data:`FUNCTION_MODULES`, or None."""
    factory, names = FUNCTION_MODULES[node.target]
    kwargs = dict(zip(names, node.args[1:]))
    kwargs.update(node.kwargs)
    kwargs.pop("inplace", None)  # evaluated out of place (checked by the trace)
    if kwargs.pop("return_indices", False):
        return None
    if any(hasattr(v, "op") for v in kwargs.values()):
        return None
    return factory(**kwargs)


#: in-place operations and their out-of-place counterparts (evaluated out of place)
IN_PLACE: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
}


def _is_float(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


_EMBEDDING_DEFAULTS = {
    "padding_idx": None,
    "max_norm": None,
    "scale_grad_by_freq": False,
    "sparse": False,
}


def _plain_embedding(node: Any, active: Callable[[Any], bool]) -> bool:
    """Whether a node is ``F.embedding(indices, weight)`` with constant indices and no option.

    ``padding_idx`` is refused: PyTorch's forward and reverse derivatives disagree there.
    """
    args, kwargs = node.args, node.kwargs
    options = {k: v for k, v in kwargs.items() if k != "norm_type"}  # used with max_norm only
    if len(args) != 2 or any(_EMBEDDING_DEFAULTS.get(k, 0) != v for k, v in options.items()):
        return False
    return not (hasattr(args[0], "op") and active(args[0])) and hasattr(args[1], "op")


def op_kind(node: Any, active: Callable[[Any], bool]) -> str | None:
    """The op rule serving an fx ``call_function``/``call_method`` node, or None.

    Args:
        node: The fx node (in-place targets already replaced by out-of-place ones).
        active: Whether an argument node depends on the parameters.

    Returns:
        ``"sum"``, ``"product"``, ``"cat"``, ``"reshape"``, ``"linear"``, ``"module"``, or
        ``None`` when no rule applies (the node goes to autograd).
    """
    target, args, kwargs = node.target, node.args, node.kwargs
    method = node.op == "call_method"
    act_args = [a for a in args if hasattr(a, "op") and active(a)]
    if (target in _SUM_FUNCS or (method and target in _SUM_METHODS)) and not kwargs:
        return "sum" if len(args) <= 2 else None
    if (target in _PRODUCT_FUNCS or (method and target in _PRODUCT_METHODS)) and not kwargs:
        if len(args) != 2:
            return None
        divides = target in (operator.truediv, torch.div) or target == "div"
        return None if divides and active(args[1]) else "product"
    if target in _CAT_FUNCS:
        return "cat" if len(args) >= 1 and isinstance(args[0], (list, tuple)) else None
    if target in bilinear.MATMUL_FUNCS or target in bilinear.ADD_MATMUL_FUNCS:
        return "matmul"
    if target is torch.einsum or (method and target in bilinear.MATMUL_METHODS):
        return "matmul"
    if target is F.linear:
        return "linear_fn"
    if target in _ATTENTION_FUNCS:
        return "attention"
    entry = FUNCTION_MODULES.get(target) if not isinstance(target, str) or method else None
    if entry is not None and len(args) <= 1 + len(entry[1]) and set(kwargs) <= set(entry[1]):
        return "module"
    if target is F.embedding:  # linear in the weight (its second argument)
        return "linear" if _plain_embedding(node, active) else None
    if len(act_args) != 1 or any(
        hasattr(v, "op") and active(v) for v in kwargs.values()
    ):  # one active input, the others constants
        return None
    if args[0] is not act_args[0]:
        return None
    if target in _RESHAPE_FUNCS or (method and target in _RESHAPE_METHODS):
        return "reshape"
    if target in bilinear.SPLIT_FUNCS or (method and target in bilinear.SPLIT_METHODS):
        return "split"
    if target in _LINEAR_FUNCS or (method and target in _LINEAR_METHODS):
        return "linear"
    if target is getattr and len(args) == 2 and args[1] in ("T", "mT"):
        return "linear"
    return None


def _evaluated(build: Callable[..., Step | None]) -> Callable[..., tuple[Step, Any] | None]:
    """A builder of a step whose node is evaluated as it is (``call()``)."""

    def make(node: Any, env_value: Callable[[Any], Any], active: Any, call: Any) -> Any:
        value = call()
        leaves = value if isinstance(value, (tuple, list)) else (value,)
        if not leaves or not all(_is_float(v) for v in leaves):
            return None
        step = build(node, env_value, active, value)
        return None if step is None else (step, value)

    return make


def _attention(node: Any, env_value: Callable[[Any], Any], active: Any, call: Any) -> Any:
    build = mha.build_mha if node.target is mha.multi_head_attention else sdpa.build_attention
    step = build(node, env_value, active, None)
    return None if not isinstance(step, sdpa.AttentionStep) else (step, step.value())


#: kind -> ``build(node, env_value, active, call)`` returning ``(step, value)`` or None (the node
#: goes to autograd); ``env_value`` maps an argument to its value, ``call()`` evaluates the node
BUILDERS: dict[str, Callable[..., tuple[Step, Any] | None]] = {
    "matmul": _evaluated(bilinear.build_bilinear),
    "linear_fn": _evaluated(bilinear.build_linear_fn),
    "split": _evaluated(bilinear.build_split),
    "attention": _attention,
}
