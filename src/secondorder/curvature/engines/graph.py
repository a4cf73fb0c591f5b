r"""The model's computation as a graph: :math:`Jv` and :math:`J^\top u` node by node.

The model is traced once by ``torch.fx`` (:mod:`.trace`: modules with a layer rule, torch's own
modules and modules with hooks stay whole, as leaves; custom modules are traced through; traces
that an out-of-place, grad-enabled evaluation could get wrong are refused), so residual
additions, concatenations, reshapes, a module called twice, parameters read directly and
torch functions between layers are nodes of one graph. One forward pass evaluates every node
that depends on the parameters as a step (:mod:`.steps`) keeping what its products need:

- a module with a rule (:mod:`..layers`) by its rule; activations called as functions
  (``torch.relu``, ``F.silu``, ...) by the rule of their module (one activation table);
- sums, products, concatenations, reshapes and other linear functions by op rules (:mod:`.ops`),
  matrix products and splits (:mod:`.bilinear`) and attention (:mod:`.sdpa`; torch's attention
  and transformer modules are traced through by :mod:`.decompose`);
- any other node by autograd on that node alone
  (:class:`~secondorder.curvature.engines.steps.AutogradStep`).

``nn.Sequential`` is a chain of such nodes. After the forward pass, the rewrites of
:mod:`.memory` move activations behind max-pooling, apply them in place where their operand is
fresh and unshared, and mark the ``Linear, activation, Linear`` triples that the bottom of a
reverse pass computes in column blocks; the products are unchanged.

:math:`Jv` runs the steps forward, :math:`J^\top u` backward (skipping steps that reach no
requested parameter); no autograd graph of the model is kept. The first linearisation of a
model also evaluates the model itself and compares the outputs, so a trace that does not
reproduce the model (Python side effects, aliasing of in-place operations, randomness) is never
used. Where tracing fails (data-dependent control flow) or the check fails, the whole model goes
through :class:`~secondorder.curvature.linearization.AutogradLinearization`; the attribute
``path`` of the result says which path ran (``"graph"`` or ``"autograd"``) and
``fallback_reason`` why.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..layers import rule_for
from ..layers.reshape import ReshapeRule
from ..linearization import AutogradLinearization, Linearization
from ..model import FunctionalModel
from ..random_state import GeneratorState, replay
from ..running_stats import frozen_running_stats
from .memory import BottomTriple, find_triples, in_place_activations, pool_activations
from .ops import BUILDERS, module_of, op_kind
from .step_base import accumulate
from .steps import (
    AutogradStep,
    CatStep,
    LinearStep,
    ParamStep,
    ProductStep,
    ReshapeStep,
    RuleStep,
    Step,
    SumStep,
    TupleItemStep,
    flat_tensors,
)
from .trace import CACHE, trace

__all__ = ["GraphLinearization", "graph_linearization", "trace"]

_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "stride", "type", "__len__"}
_METADATA_FUNCS = {getattr, len, torch.numel}


class _Unsupported(Exception):
    """The traced graph cannot be linearised node by node (the message says why)."""


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, Tensor) else obj


def _is_float(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class GraphLinearization(Linearization):
    """Linearisation of a traced model, node by node (see the module docstring).

    Args:
        fmodel: The model as a function of its parameters.
        graph: Its fx graph (:func:`trace`).
        inputs: Positional inputs of the batch.
        leaves: Tensors holding the parameter values.

    Raises:
        _Unsupported: Where the graph cannot be evaluated node by node (the caller falls back).
    """

    path = "graph"
    fallback_reason: str | None = None
    #: Whether the memory rewrites of :mod:`.memory` apply (they keep Jv and J^T u, not what
    #: second-order products need: a subclass for those turns them off).
    memory_rewrites: bool = True

    def __init__(
        self,
        fmodel: FunctionalModel,
        graph: fx.Graph,
        inputs: tuple[Any, ...],
        leaves: list[Tensor],
    ) -> None:
        self.leaves = leaves
        self._fmodel = fmodel
        self._model = fmodel.model
        self._env: dict[fx.Node, Any] = {}
        self._mask: dict[fx.Node, int] = {}  # active nodes -> bit mask of the parameters above
        self.steps: list[tuple[fx.Node, Step]] = []
        self.autograd_nodes: list[str] = []
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(inputs) > len(placeholders):
            raise _Unsupported(f"{len(inputs)} inputs for {len(placeholders)} placeholders")
        with fmodel.differentiable(), torch.no_grad():
            out_node = None
            for node in graph.nodes:
                if node.op == "placeholder":
                    k = placeholders.index(node)
                    if k < len(inputs):
                        self._env[node] = inputs[k]
                    elif node.args:
                        self._env[node] = node.args[0]
                    else:
                        raise _Unsupported(f"no value for the model argument {node.target}")
                elif node.op == "output":
                    out_node = node.args[0]
                else:
                    self._evaluate(node)
        if not isinstance(out_node, fx.Node) or not isinstance(self._env.get(out_node), Tensor):
            raise _Unsupported("the model does not return one tensor")
        self.output_node = out_node  # the node whose value is the model output
        self.z = self._env[out_node]
        # memory-saving rewrites (engines/memory.py): the products stay the same
        self._triples: dict[fx.Node, BottomTriple] = {}
        if self.memory_rewrites:
            self.steps = pool_activations(self.steps, self._env, out_node)
            self.steps = in_place_activations(self.steps, out_node)
            self._triples = find_triples(self.steps, out_node)
        index = {n: k for k, (n, _) in enumerate(self.steps)}
        # after which step each active node's tangent is no longer needed
        self._last_use: dict[int, list[fx.Node]] = {}
        last: dict[fx.Node, int] = {}
        for k, (_, step) in enumerate(self.steps):
            for inp in step.inputs:
                last[inp] = k
        for n, k in last.items():
            if n is not out_node:
                self._last_use.setdefault(k, []).append(n)
        self._index = index
        # keep only what the products need: values of the nodes are dropped
        self._env = {}

    def split_output_step(self) -> Step | None:
        """Remove the last step when it computes the output from one input; return it.

        The linearisation then ends at that step's input (``output_node`` and ``z`` become its
        node and value; ``output_node`` is None when the input depends on no parameter), so a
        caller can apply the removed step itself (:mod:`..fused_head`). None, and nothing
        changed, when the output is not computed that way.
        """
        if not self.steps or self.steps[-1][0] is not self.output_node:
            return None
        node, step = self.steps[-1]
        x = getattr(step, "ctx", {}).get("x")
        if len(step.inputs) > 1 or not isinstance(x, Tensor) or node in self._triples:
            return None
        self.steps.pop()
        self.output_node = step.inputs[0] if step.inputs else None  # type: ignore[assignment]
        self.z = x
        return step

    @property
    def batched_products(self) -> str:  # type: ignore[override]
        """``"loop"`` if a node differentiated by autograd loops over columns, else ``"vmap"``."""
        loops = any(getattr(step, "batched_products", "vmap") == "loop" for _, step in self.steps)
        return "loop" if loops else "vmap"

    # ----------------------------------------------------------------- forward
    def _active(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a in self._mask

    def _args(self, node: fx.Node, subst: dict[fx.Node, Any] | None = None) -> tuple[Any, Any]:
        def value(n: fx.Node) -> Any:
            return subst[n] if subst is not None and n in subst else self._env[n]

        return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)

    def _value(self, a: Any) -> Any:
        return self._env[a] if isinstance(a, fx.Node) else a

    def _param(self, name: str) -> int | None:
        return self._fmodel.alias.get(name)

    def _add(self, node: fx.Node, step: Step, value: Any, own: int = 0) -> None:
        mask = own
        for inp in step.inputs:
            mask |= self._mask[inp]
        self._env[node] = value
        self._mask[node] = mask
        self.steps.append((node, step))
        step.name = node.name

    def _evaluate(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            i = self._param(str(node.target))
            if i is None:
                self._env[node] = _fetch(self._model, str(node.target))
            else:
                self._add(node, ParamStep(i), self.leaves[i].detach(), 1 << i)
            return
        inputs = [a for a in node.all_input_nodes if a in self._mask]
        if node.op == "call_module":
            self._module(node, inputs)
            return
        if not inputs:
            self._env[node] = self._call(node)
            return
        if (node.op == "call_method" and node.target in _METADATA_METHODS) or (
            node.op == "call_function" and node.target in _METADATA_FUNCS
        ):  # sizes, dtypes, ...: constants unless they hold a value of the parameters (``.T``)
            value = self._call(node)
            if not any(_is_float(v) for v in flat_tensors(value)):
                self._env[node] = value
                return
        self._function(node, inputs)

    def _call(self, node: fx.Node, subst: dict[fx.Node, Any] | None = None) -> Any:
        args, kwargs = self._args(node, subst)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        assert callable(node.target)
        return node.target(*args, **kwargs)

    def _module(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        prefix = str(node.target)
        module = self._model.get_submodule(prefix)
        rule, _ = rule_for(module)
        own = {
            n: self._param(f"{prefix}.{n}") for n, p in module._parameters.items() if p is not None
        }
        x = node.args[0] if node.args else None
        simple = len(node.args) == 1 and not node.kwargs and isinstance(x, fx.Node)
        if (
            rule is not None and simple and (_is_float(self._env[x]) or not rule.float_input)  # type: ignore[index]
        ):
            trainable = {n: i for n, i in own.items() if i is not None}
            if not trainable and not inputs:
                self._env[node] = self._call_module(module, node)
                return
            values = {
                n: (self.leaves[i].detach() if i is not None else module._parameters[n])
                for n, i in own.items()
            }
            out, ctx = rule.forward(module, self._env[x], values)  # type: ignore[index]
            mask = sum(1 << i for i in trainable.values())
            step = RuleStep(module, rule, ctx, inputs, trainable)
            if isinstance(rule, ReshapeRule) and not inputs:
                return
            self._add(node, step, out, mask)
            return
        names = [
            (n, self._param(f"{prefix}.{n}"))
            for n, _ in module.named_parameters(remove_duplicate=False)
        ]
        trainable_all = [(n, i) for n, i in names if i is not None]
        if not trainable_all and not inputs:
            self._env[node] = self._call_module(module, node)
            return
        self._autograd(node, inputs, module, trainable_all)

    def _call_module(self, module: nn.Module, node: fx.Node) -> Any:
        args, kwargs = self._args(node)
        return module(*args, **kwargs)

    def _autograd(
        self,
        node: fx.Node,
        inputs: list[fx.Node],
        module: nn.Module | None = None,
        params: Sequence[tuple[str, int]] = (),
    ) -> None:
        # a later evaluation (the PCH's modified residual) runs after the values are dropped,
        # and draws the random numbers of the first (a dropout inside the node)
        held = {n: self._env[n] for n in node.all_input_nodes if n not in inputs}
        start = GeneratorState.now(self._fmodel.device)
        calls = [0]

        def call(values: list[Any], p_leaves: list[Tensor]) -> Any:
            subst = {**held, **dict(zip(inputs, values))}
            later = GeneratorState.now(start.device) if calls[0] else None
            calls[0] += 1
            start.restore()
            try:
                if module is None:
                    return self._call(node, subst)
                args, kwargs = self._args(node, subst)
                pdict = {n: p for (n, _), p in zip(params, p_leaves)}
                return functional_call(module, pdict, args, kwargs)
            finally:
                if later is not None:
                    later.restore()

        plist = [(i, self.leaves[i]) for _, i in params]
        step = AutogradStep(inputs, call, [self._env[n] for n in inputs], plist)
        if not any(step._out_mask):
            self._env[node] = step.value
            return
        self.autograd_nodes.append(node.name)
        self._add(node, step, step.value, sum(1 << i for _, i in params))

    def _function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        args: Any = node.args
        first = args[0] if args else None
        if (
            node.target is operator.getitem
            and isinstance(first, fx.Node)
            and isinstance(self._env[first], (tuple, list))
            and isinstance(args[1], int)
        ):
            item = TupleItemStep([first], args[1], len(self._env[first]))
            self._add(node, item, self._env[first][args[1]])
            return
        kind = op_kind(node, self._active)
        in_float = all(_is_float(self._env[n]) for n in inputs)
        if kind in BUILDERS:  # steps of other modules (matrix products, attention, splits)
            built = None
            if in_float:
                built = BUILDERS[kind](node, self._value, self._active, lambda: self._call(node))
            if built is None:
                self._autograd(node, inputs)
            else:
                self._add(node, built[0], built[1])
            return
        # a module's function is evaluated once, by its rule (dropout draws its mask there)
        call = kind is not None and kind != "module" and in_float
        value: Any = self._call(node) if call else None
        if kind is None or not in_float or (call and not _is_float(value)):
            self._autograd(node, inputs)
            return
        edges: list[Any] = [a for a in args if self._active(a)]
        step: Step
        if kind == "sum":
            target = node.target
            signs = [1.0, -1.0 if target in (operator.sub, torch.sub, "sub") else 1.0]
            if target in (operator.neg, torch.neg, "neg"):
                signs = [-1.0]
            slots = [k for k, a in enumerate(args) if self._active(a)]
            shapes = [self._env[args[k]].shape for k in slots]  # type: ignore[index]
            step = SumStep(edges, [signs[k] for k in slots], shapes, value.shape)
        elif kind == "product":
            vals = [self._env[a] if isinstance(a, fx.Node) else a for a in args]
            divide = node.target in (operator.truediv, torch.div, "div")
            step = ProductStep(edges, vals, [self._active(a) for a in args], divide)
        elif kind == "cat":
            seq = args[0]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            assert isinstance(dim, int) and isinstance(seq, (list, tuple))
            vals = [self._env[a] if isinstance(a, fx.Node) else a for a in seq]
            step = CatStep(
                [a for a in seq if self._active(a)],
                [self._active(a) for a in seq],
                [v.shape for v in vals],
                dim % value.ndim,
                value.dtype,
            )
        elif kind == "reshape":
            step = ReshapeStep(edges, self._env[edges[0]].shape, value.shape)
        elif kind == "linear":
            x_node = edges[0]
            # the other arguments' values now: the products run after the values are dropped
            held = {n: self._env[n] for n in node.all_input_nodes if n is not x_node}

            def f(a: Tensor, node: fx.Node = node, x_node: Any = x_node, held: Any = held) -> Any:
                return self._call(node, {**held, x_node: a})

            step = LinearStep(edges, f, self._env[x_node])
        else:  # a function computed by the rule of its module
            module = module_of(node)
            rule = rule_for(module)[0] if module is not None else None
            if module is None or rule is None:
                self._autograd(node, inputs)
                return
            value, ctx = rule.forward(module, self._env[edges[0]], {})
            step = RuleStep(module, rule, ctx, edges, {})
        self._add(node, step, value)

    # -------------------------------------------------------------- products
    def jvp(self, tangents: Sequence[Tensor | None], batched: bool = False) -> Tensor | None:
        r"""Return :math:`Jv` (shape of ``z``, or ``(K, *z.shape)``), or None if it is zero."""
        env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for k, (node, step) in enumerate(self.steps):
                tin = [env.get(n) for n in step.inputs]
                env[node] = step.jvp(tin, tangents, batched)
                for n in self._last_use.get(k, ()):
                    env.pop(n, None)
        return env.get(self.output_node)

    def _reverse(self, cotangent: Tensor, grads: dict[int, Tensor], batched: bool) -> None:
        requested = 0
        for i in grads:
            requested |= 1 << i
        cots: dict[fx.Node, Any] = {self.output_node: cotangent}
        with torch.no_grad():
            for node, step in reversed(self.steps):
                u = cots.pop(node, None)
                if u is None or not (self._mask[node] & requested):
                    continue
                triple = self._triples.get(node)
                if triple is not None and triple.applies(self._mask, requested, batched):
                    triple.vjp(u, grads)  # the bottom of the pass in column blocks
                    continue
                need = [bool(self._mask[n] & requested) for n in step.inputs]
                for n, g in zip(step.inputs, step.vjp(u, need, grads, batched)):
                    if g is not None:
                        cots[n] = accumulate(cots.get(n), g)

    def vjp(
        self, cotangent: Tensor, indices: Sequence[int] | None = None, batched: bool = False
    ) -> list[Tensor]:
        r"""Return :math:`J^\top u` in parameter shapes (``(K, *shape)`` if batched)."""
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        lead = cotangent.shape[:1] if batched else ()
        bufs = {i: self.leaves[i].new_zeros(*lead, *self.leaves[i].shape) for i in idx}
        self._reverse(cotangent, bufs, batched)
        return [bufs[i] for i in idx]

    def vjp_into(
        self, cotangent: Tensor, out: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        r"""Add :math:`J^\top u` into ``out`` (one buffer per requested parameter) in place."""
        idx = list(range(len(self.leaves))) if indices is None else list(indices)
        self._reverse(cotangent, dict(zip(idx, out)), False)


def _reference_output(
    fmodel: FunctionalModel, leaves: list[Tensor], inputs: tuple[Any, ...]
) -> Any:
    """The model's own output (running statistics left as they were)."""
    with torch.no_grad(), frozen_running_stats(fmodel.model):
        return fmodel([leaf.detach() for leaf in leaves], inputs)


def _agrees(z: Tensor, ref: Any) -> bool:
    """Whether the traced graph's output ``z`` reproduces the model's output ``ref``."""
    if not isinstance(ref, Tensor) or ref.shape != z.shape:
        return False
    tol = 1e-10 if ref.dtype == torch.float64 else 1e-4
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    return bool(((z - ref).abs() <= tol * scale).all())


def graph_linearization(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    leaves: list[Tensor],
    cls: type[GraphLinearization] | None = None,
) -> Linearization:
    """The graph engine's linearisation, or the whole-model autograd one where it cannot run.

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of one batch.
        leaves: Leaf tensors holding the parameter values.
        cls: The class of the graph's linearisation (default :class:`GraphLinearization`; the
            Hessian's :class:`~.second_order.SecondOrderGraph` keeps what residuals need).

    Returns:
        A :class:`GraphLinearization` (``path == "graph"``), or an
        :class:`~secondorder.curvature.linearization.AutogradLinearization` with
        ``path == "autograd"`` and ``fallback_reason`` set.
    """
    with replay(inputs):  # inside an optimizer step: the step's draw for this batch
        return _graph_linearization(fmodel, inputs, leaves, cls)


def _graph_linearization(
    fmodel: FunctionalModel,
    inputs: tuple[Any, ...],
    leaves: list[Tensor],
    cls: type[GraphLinearization] | None,
) -> Linearization:
    model = fmodel.model
    graph, reason = trace(model)
    if graph is not None:
        fingerprint, stored, verified = CACHE[model]
        # the model's own output first: its running statistics are restored before the graph's
        # forward pass saves them for its products, and so is the random state (a forward that
        # draws random numbers draws the same ones as without the check)
        rng = GeneratorState.now(fmodel.device)
        ref = None if verified else _reference_output(fmodel, leaves, inputs)
        rng.restore()
        try:
            lin = (cls or GraphLinearization)(fmodel, graph, inputs, leaves)
        except _Unsupported as e:
            reason = f"the traced graph cannot be linearised: {e}"
        else:
            if verified:
                return lin
            if _agrees(lin.z, ref):
                CACHE[model] = (fingerprint, stored, True)
                return lin
            reason = "the traced graph does not reproduce the model's output"
            CACHE[model] = (fingerprint, reason, False)
        rng.restore()
    fallback: Any = AutogradLinearization(fmodel, inputs, leaves)
    fallback.path = "autograd"
    fallback.fallback_reason = reason
    return fallback
