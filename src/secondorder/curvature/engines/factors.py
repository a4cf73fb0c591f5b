r"""Per-sample layer quantities from the graph engine's reverse pass (diagonals, low-rank GGN).

For a model whose parameters all sit in layers with per-sample hooks (:class:`~..layers.Rule`:
``per_sample_param_vjp``, ``sq_param_vjp``, ``kronecker``) and whose computation keeps the
samples apart, one reverse pass of :math:`K` output cotangent columns :math:`u_k` (each holding
one row per sample) over the steps of a
:class:`~secondorder.curvature.engines.graph.GraphLinearization` gives every such layer's output
cotangents :math:`g_k`. Row :math:`n` of :math:`g_k` is the cotangent that sample :math:`n`'s
row of :math:`u_k` alone sends to the layer, so the layer's rule turns it into sample
:math:`n`'s parameter cotangent :math:`J_n^\top u_{kn}` without per-sample backward passes.

**When it is exact.** The Jacobian of every step must be block-diagonal over the samples (the
leading index): :func:`support` accepts rule steps whose rule says so (``Rule.rowwise``), sums
and products whose active operands have the output's leading size (no broadcasting of one
value across samples), concatenations along another dimension and reshapes keeping the leading
size; any other step (autograd nodes, indexing, parameters read directly), a parameter outside
a layer with the hooks, or one used by two steps (tied weights, a layer called twice) refuses,
and the caller takes its reference path. Values computed from the inputs alone may mix the
samples: they are constants of the linearisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..layers import Rule, rule_for
from ..model import FunctionalModel
from ..per_sample import coupling
from .graph import GraphLinearization, graph_linearization
from .memory import InPlaceActivationStep, PooledActivationStep
from .step_base import accumulate
from .steps import CatStep, ProductStep, ReshapeStep, RuleStep, SumStep
from .trace import trace

__all__ = [
    "LayerCotangents",
    "column_chunk",
    "factor_linearization",
    "layer_cotangents",
    "support",
]

_COLUMN_ELEMENTS = 2**22  # columns x largest saved tensor of one reverse pass (locality)


def has_hooks(rule: Rule) -> bool:
    """Whether ``rule`` overrides :meth:`~..layers.Rule.per_sample_param_vjp`."""
    return type(rule).per_sample_param_vjp is not Rule.per_sample_param_vjp


@dataclass
class LayerCotangents:
    """One layer step's output cotangents for the K columns.

    Attributes:
        name: The fx node's name.
        module: The module.
        rule: Its layer rule.
        ctx: The rule's context from the forward pass.
        params: Parameter name -> index in the ``FunctionalModel``.
        u: Output cotangents, shape ``(K, N, *out)``.
    """

    name: str
    module: nn.Module
    rule: Rule
    ctx: dict[str, Any]
    params: dict[str, int]
    u: Tensor

    def per_sample(self) -> dict[str, Tensor] | None:
        """Per-sample parameter cotangents ``{name: (N, K, *shape)}`` (see the rule)."""
        return self.rule.per_sample_param_vjp(self.module, self.ctx, self.u, list(self.params))

    def squares(self) -> dict[str, Tensor] | None:
        """Their squares summed over samples and columns, ``{name: shape}``."""
        return self.rule.sq_param_vjp(self.module, self.ctx, self.u, list(self.params))

    def kronecker(self) -> Tensor | None:
        """The layer's input rows if its per-sample cotangents are outer products, else None."""
        return self.rule.kronecker(self.module, self.ctx)


def _static_check(fmodel: FunctionalModel, masks: bool = False) -> str | None:
    """Why the traced graph cannot serve (before any forward pass), or None.

    Refusing here keeps a model that cannot serve from running a forward pass that draws
    random numbers or updates running statistics before its reference path runs. ``masks``:
    Dropout in training mode is allowed (:func:`factor_linearization`).
    """
    if len(fmodel.alias) != len(fmodel.params):
        return "parameters are tied (one parameter under several names)"
    coupled = coupling(fmodel.model, dropout=not masks)
    if coupled is not None:
        return coupled
    graph, reason = trace(fmodel.model)
    if graph is None:
        return f"the model cannot be traced: {reason}"
    covered: set[int] = set()
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) in fmodel.alias:
            return f"parameter {node.target} is read directly"
        if node.op != "call_module":
            continue
        prefix = str(node.target)
        module = fmodel.model.get_submodule(prefix)
        rule, why = rule_for(module)
        if rule is None or type(rule).rowwise is Rule.rowwise:
            return f"{prefix} ({type(module).__name__}): {why or 'samples may interact'}"
        mine = {
            fmodel.alias[f"{prefix}.{n}"]
            for n, _ in module.named_parameters(remove_duplicate=False)
            if f"{prefix}.{n}" in fmodel.alias
        }
        if not mine:
            continue
        if not has_hooks(rule) or mine & covered:
            why = "no per-sample rule" if not has_hooks(rule) else "called twice"
            return f"{prefix} ({type(module).__name__}): {why}"
        covered |= mine
    if covered != set(range(len(fmodel.params))):
        return "parameters outside layers with per-sample rules"
    return None


def _leading(shapes: list[Any], out: Any) -> bool:
    """Whether every shape has the output's rank and leading size."""
    return len(out) >= 1 and all(len(s) == len(out) and s[0] == out[0] for s in shapes)


def support(lin: GraphLinearization, num_samples: int, num_params: int) -> str | None:
    """Why the per-sample layer cotangents of ``lin`` would not be exact, or None.

    Args:
        lin: The graph linearisation of one batch.
        num_samples: The batch size :math:`N`.
        num_params: The number of selected parameters.

    Returns:
        None, or a reason naming the first step that mixes samples or is not covered.
    """
    owners: dict[int, str] = {}
    for node, step in lin.steps:
        where = f"node {node.name} ({step.kind})"
        if isinstance(step, RuleStep):
            if not step.rule.rowwise(step.module, step.ctx):
                return f"{where} may mix the samples"
            if step.params and not has_hooks(step.rule):
                return f"{where} has no per-sample rule"
            for i in step.params.values():
                if i in owners:
                    return f"a parameter is used by {owners[i]} and {node.name}"
                owners[i] = node.name
        elif isinstance(step, (InPlaceActivationStep, PooledActivationStep)):
            # memory rewrites of an activation (and the max-pooling after it): elementwise, and
            # in place only on fresh cotangents that no other step reads
            parts = [step.act, getattr(step, "pool", step.act)]
            if not all(p.rule.rowwise(p.module, p.ctx) for p in parts):
                return f"{where} may mix the samples"
        elif isinstance(step, SumStep):
            if not _leading([tuple(s) for s in step.shapes], tuple(step.out)):
                return f"{where} broadcasts a value across samples"
        elif isinstance(step, ProductStep):
            shapes = [tuple(v.shape) if isinstance(v, Tensor) else () for v in step.values]
            out = torch.broadcast_shapes(*shapes)
            active = [s for s, a in zip(shapes, step.active) if a]
            if not _leading(active, tuple(out)):
                return f"{where} broadcasts a value across samples"
        elif isinstance(step, CatStep):
            if step.dim == 0 or not _leading([tuple(s) for s in step.shapes], step.shapes[0]):
                return f"{where} concatenates along the samples"
        elif isinstance(step, ReshapeStep):
            before, after = tuple(step.in_shape), tuple(step.out_shape)
            if not (before and after and before[0] == after[0]):
                return f"{where} reshapes across samples"
        else:
            return f"{where} has no per-sample rule"
    if set(owners) != set(range(num_params)):
        return "parameters outside layers with per-sample rules"
    if lin.z.ndim == 0 or lin.z.shape[0] != num_samples:
        return f"outputs of shape {tuple(lin.z.shape)} for a batch of {num_samples}"
    return None


def factor_linearization(
    fmodel: FunctionalModel, inputs: tuple[Any, ...], num_samples: int, masks: bool = False
) -> tuple[GraphLinearization | None, str | None]:
    """The graph linearisation of one batch where its per-sample layer cotangents are exact.

    Models whose samples interact (:func:`~secondorder.curvature.per_sample.coupling`: BatchNorm
    by batch statistics, Dropout in training mode), modules without a layer rule or one that
    keeps samples apart, and parameters outside layers with per-sample rules are refused on the
    traced graph before any forward pass; where the forward pass runs and the steps refuse,
    the random state is restored.

    With ``masks``, Dropout in training mode is allowed: its rule draws one mask for the whole
    batch and holds it, so the linearisation keeps the samples apart; the caller must replay
    that draw in every other pass it combines with this one
    (:func:`~secondorder.curvature.random_state.one_draw_per_batch`).

    Args:
        fmodel: The model as a function of its parameters.
        inputs: Positional inputs of the batch.
        num_samples: The batch size.
        masks: Whether Dropout in training mode (one fixed mask per batch) is allowed.

    Returns:
        ``(lin, None)``, or ``(None, reason)`` (checked on the traced graph first, so a model
        that cannot serve costs no forward pass in most cases).
    """
    why = _static_check(fmodel, masks)
    if why is not None:
        return None, why
    rng = torch.get_rng_state()  # a refused forward must not change what the fallback draws
    cuda = torch.cuda.get_rng_state(fmodel.device) if fmodel.device.type == "cuda" else None
    lin = graph_linearization(fmodel, inputs, fmodel.leaves())  # leaves: its fallback needs them
    if isinstance(lin, GraphLinearization):
        why = support(lin, num_samples, len(fmodel.params))
    else:
        why = getattr(lin, "fallback_reason", None) or "the graph engine does not apply"
    if why is None and isinstance(lin, GraphLinearization):
        return lin, None
    torch.set_rng_state(rng)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, fmodel.device)
    return None, why


def layer_cotangents(lin: GraphLinearization, cotangents: Tensor) -> list[LayerCotangents]:
    """Output cotangents of every layer step holding parameters, by one reverse pass.

    The reverse pass of :class:`~.graph.GraphLinearization` (``_reverse``), keeping each layer
    step's output cotangent instead of its parameter cotangent.

    Args:
        lin: A linearisation accepted by :func:`support`.
        cotangents: ``K`` output cotangents, shape ``(K, *z.shape)``.

    Returns:
        One entry per layer step that the cotangents reach, in reverse order of the graph.
    """
    cots: dict[fx.Node, Tensor] = {lin.output_node: cotangents}
    found: list[LayerCotangents] = []
    with torch.no_grad():
        for node, step in reversed(lin.steps):
            u = cots.pop(node, None)
            if u is None:
                continue
            if isinstance(step, RuleStep) and step.params:
                found.append(
                    LayerCotangents(node.name, step.module, step.rule, step.ctx, step.params, u)
                )
            if not step.inputs:
                continue
            for n, g in zip(step.inputs, step.vjp(u, [True] * len(step.inputs), {}, True)):
                if g is not None:
                    cots[n] = accumulate(cots.get(n), g)
    return found


def column_chunk(lin: GraphLinearization) -> int:
    """Cotangent columns per reverse pass (quantities that add up over columns).

    The largest saved tensor times the columns stays below ``_COLUMN_ELEMENTS``, so that wide
    activations are swept in cache-sized pieces.
    """
    largest = max(
        (
            t.numel()
            for _, step in lin.steps
            if isinstance(step, RuleStep)
            for t in step.ctx.values()
            if isinstance(t, Tensor)
        ),
        default=1,
    )
    return max(1, _COLUMN_ELEMENTS // max(1, largest))
