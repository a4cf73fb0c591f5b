r"""Tracing a model for the graph engine: ``torch.fx`` with layers as leaves, checked and cached.

:func:`trace` records the model's ``forward`` as an fx graph in which modules with a layer rule,
torch's own modules and modules with hooks or an instance-level ``forward`` stay whole (leaves),
and custom modules are traced through, as are torch's attention and transformer modules, by the
forwards of :mod:`.decompose`. A trace is refused (the caller falls back to whole-model
autograd) when fx cannot trace the model (data-dependent control flow), when the model or a
global hook would be skipped, when a node is recorded with gradients disabled (``torch.no_grad()``
in ``forward``: fx records no grad mode), when ``forward`` calls tensor gradient hooks, or when an
in-place operation overwrites a value that is read elsewhere or a view (an out-of-place
evaluation could then differ). In-place operations that pass are rewritten out of place.
A trace is cached per model together with a fingerprint of its modules (identity, training
flag, hooks, plain attributes, which a trace bakes in), and retraced when it changes.
"""

from __future__ import annotations

import functools
import operator
import types
import weakref
from typing import Any

import torch
from torch import fx, nn

from ..layers import rule_for
from .decompose import decomposition
from .ops import IN_PLACE

__all__ = ["CACHE", "trace"]

_VIEW_NAMES = {
    *("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "transpose"),
    *("permute", "t", "expand", "narrow", "select", "detach", "view_as", "expand_as"),
}
_GRAD_METHODS = {
    "register_hook",
    "retain_grad",
    "requires_grad_",
    "register_post_accumulate_grad_hook",
}
# model -> (fingerprint, graph or reason, verified)
CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any, bool]] = weakref.WeakKeyDictionary()


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


class _Tracer(fx.Tracer):
    """Leaves: modules with a rule or hooks, torch's modules; notes nodes made without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.without_grad: list[str] = []

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if not torch.is_grad_enabled():  # inside torch.no_grad() in forward: fx records no mode
            self.without_grad.append(node.name)
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if rule_for(m)[0] is not None or _hooked(m) or "forward" in vars(m):
            return True
        if decomposition(m) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        f = decomposition(m)
        if f is not None and rule_for(m)[0] is None:  # torch's attention modules, traced through
            forward = functools.partial(f, m)
        return super().call_module(m, forward, args, kwargs)


def _mutated_input(node: fx.Node, model: nn.Module) -> Any:
    """The argument an in-place node overwrites, or None for an out-of-place node."""
    if node.op == "call_module":
        inplace = getattr(model.get_submodule(str(node.target)), "inplace", False)
        return node.args[0] if inplace and node.args else None
    if node.op == "call_method" and str(node.target).endswith("_"):
        return node.args[0]
    if node.op == "call_function" and (node.target in IN_PLACE or node.kwargs.get("inplace")):
        return node.args[0]
    return None


def _check_in_place(graph: fx.Graph, model: nn.Module) -> str | None:
    """Why evaluating ``graph``'s in-place nodes out of place could differ, or None."""
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _GRAD_METHODS:
            return f"the forward calls Tensor.{node.target}, which the products would not honour"
        arg = _mutated_input(node, model)
        if arg is None:
            continue
        viewish = isinstance(arg, fx.Node) and (
            arg.op in ("placeholder", "get_attr")
            or str(arg.target).split(".")[-1] in _VIEW_NAMES
            or arg.target is operator.getitem
            or (
                arg.op == "call_module"
                and isinstance(
                    model.get_submodule(str(arg.target)),
                    (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout),
                )
            )
        )
        if not isinstance(arg, fx.Node) or len(arg.users) != 1 or viewish:
            return (
                f"the in-place node {node.name} overwrites {arg}, which is read elsewhere or a "
                "view of another value"
            )
    return None


def _out_of_place(graph: fx.Graph) -> None:
    """Replace in-place calls by their out-of-place forms (safe after :func:`_check_in_place`)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in IN_PLACE:
            node.target = IN_PLACE[node.target]
        elif node.op == "call_method" and str(node.target).endswith("_"):
            node.target = str(node.target)[:-1]
        if node.op != "call_module" and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, functools.partial)


def _settings(m: nn.Module) -> tuple[tuple[str, str], ...]:
    """The module's plain attributes and functions: a trace bakes them in; a change retraces."""
    return tuple(
        (k, repr(v) if not isinstance(v, _FUNCTIONS) else f"function {id(v)}")
        for k, v in vars(m).items()
        if not k.startswith("_")
        and isinstance(v, (bool, int, float, str, tuple, type(None), *_FUNCTIONS))
    )


def _trace_root(tracer: _Tracer, model: nn.Module) -> fx.Graph:
    """``tracer.trace(model)``; a root attention module is traced by its decomposition.

    fx traces ``type(root).forward``: for the root, the class is swapped, for the duration of the
    trace only, for a subclass whose ``forward`` is the decomposition.
    """
    f = decomposition(model)
    if f is None or rule_for(model)[0] is not None:
        return tracer.trace(model)
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": f})
    try:
        return tracer.trace(model)
    finally:
        model.__class__ = cls


def trace(model: nn.Module) -> tuple[fx.Graph | None, str | None]:
    """Trace ``model`` into an fx graph (once per model state), or say why it cannot be.

    Args:
        model: Any module.

    Returns:
        ``(graph, None)`` or ``(None, reason)``.
    """
    fingerprint = tuple(
        (id(m), m.training, _hooked(m), "forward" in vars(m), _settings(m)) for m in model.modules()
    )
    cached = CACHE.get(model)
    if cached is not None and cached[0] == fingerprint:
        stored = cached[1]
        return (stored, None) if isinstance(stored, fx.Graph) else (None, stored)
    reason: str | None = None
    graph: Any = None
    if _hooked(model) or "forward" in vars(model):
        reason = "the model has hooks or an instance-level forward"
    elif nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        reason = "global module hooks are registered"
    else:
        tracer = _Tracer()
        try:
            with torch.enable_grad():
                graph = _trace_root(tracer, model)
        except Exception as e:  # any tracing failure means: not traceable
            reason = f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e})"
        else:
            reason = _check_in_place(graph, model)
            if tracer.without_grad:
                reason = f"the forward computes {tracer.without_grad[:3]} with gradients disabled"
            if reason is None:
                _out_of_place(graph)
    CACHE[model] = (fingerprint, graph if reason is None else reason, False)
    return (graph, None) if reason is None else (None, reason)
