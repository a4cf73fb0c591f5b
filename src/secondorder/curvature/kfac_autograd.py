r"""K-FAC's layer cotangents by autograd, for models the per-sample graph engine refuses.

Where :func:`~.engines.factors.factor_linearization` refuses a model (a step it has no
per-sample rule for, e.g. the matrix products of hand-written attention, or a module without a
layer rule such as ``nn.TransformerEncoderLayer``), one forward pass of the whole batch with
forward hooks on every module that has a layer rule with a Kronecker form
(:meth:`~.layers.Rule.kronecker_shared`) records each such module's input and output; one
batched backward of the ``K`` output columns to those outputs gives their cotangents
:math:`g_k` (shape ``(K, *out)``). The rule turns them into the same
:class:`~.engines.factors.LayerCotangents` as the graph engine, so the factors are defined and
accumulated identically.

Such a module must be called once per forward pass. ``nn.MultiheadAttention`` reads its
projections directly; :class:`~.kfac_attention.AttentionRecorder` evaluates it by its composite
forward with each projection (a row block of the packed ``in_proj_weight``, ``out_proj``)
recorded as a Linear map, each call checked against the module's own output (else the
forward pass is repeated without recording). Inputs are sample-major
(``(N, ...)``); the Linear layers of a ``batch_first=False`` ``nn.TransformerEncoderLayer`` or
``nn.TransformerDecoderLayer`` are read as ``(T, N, d)``; a layer whose sample dimension does
not have the batch's size gets no Kronecker block.

**Tied parameters.** A Kronecker block is the curvature of one use of its parameter. A
parameter gets Kronecker blocks only if the recorded uses partition it (one use, or disjoint row
blocks) and the autograd graph of the output has exactly as many edges into it (counted on the
graph, so a direct read such as ``x @ emb.weight.T`` or a second module holding it counts);
otherwise every block touching it is dropped and it gets its exact diagonal.

Parameters outside those blocks (norms, tied parameters, modules that are never called as
modules) get their exact diagonal
:math:`\sum_r \sum_k (J_r^\top F_r[:, k])^{\odot 2}` from
:func:`~.diagonal_paths.row_factor_diagonal` with the batch's columns. Models whose samples
interact (BatchNorm with batch statistics) are refused: the factors assume independent
samples. Dropout in training mode (modules, ``F.dropout``, attention's ``dropout_p``) is
allowed: the cotangents are those of the one forward pass, whose masks the diagonals' pass
replays (the caller runs both in
:func:`~secondorder.curvature.random_state.one_draw_per_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from .diagonal_paths import row_factor_diagonal
from .engines.factors import LayerCotangents
from .kfac_attention import AttentionRecorder
from .kfac_factors import Factor, output_columns
from .layers import Rule, rule_for
from .layers.linear import LinearRule
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel
from .per_sample import DiagonalInfo, coupling

__all__ = ["RowCotangents", "autograd_layers"]

_SEQUENCE_FIRST = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_LINEAR = LinearRule()


@dataclass
class RowCotangents(LayerCotangents):
    """:class:`LayerCotangents` of a row block: ``rows[p]`` is its first row in parameter ``p``."""

    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class _Use:
    """One recorded use of parameters: a hooked module's call or an attention projection."""

    name: str
    module: nn.Module
    rule: Any
    params: dict[str, int]
    x: Tensor  # sample-major input
    out: Tensor  # the output in the graph
    batch_dim: int  # of ``out``
    rows: dict[str, int]
    ctx: dict[str, Any] = field(default_factory=dict)

    def extent(self, name: str, numel: int) -> tuple[int, int]:
        """The flat range ``[start, stop)`` of parameter ``name`` this use covers."""
        out = self.out.shape[-1]
        if not self.rows:
            return 0, numel
        if name == "bias":
            return self.rows["bias"], self.rows["bias"] + out
        d = self.x.shape[-1]
        return self.rows["weight"] * d, (self.rows["weight"] + out) * d


def _has_form(rule: Any) -> bool:
    cls = type(rule)
    return not (
        cls.kronecker_shared is Rule.kronecker_shared
        and cls.kronecker is Rule.kronecker
        and cls.kronecker_indices is Rule.kronecker_indices
    )


def _hooked_modules(
    fmodel: FunctionalModel,
) -> list[tuple[str, nn.Module, Any, dict[str, int], int]]:
    """``(name, module, rule, {param name: index}, sample dim)`` of the Kronecker modules.

    Sample dim 1: a Linear layer of a ``batch_first=False`` transformer layer.
    """
    found = []
    seq_first = {
        f"{prefix}.{child}" if prefix else child
        for prefix, m in fmodel.model.named_modules()
        if isinstance(m, _SEQUENCE_FIRST) and not m.self_attn.batch_first
        for child, _ in m.named_children()
    }
    for prefix, module in fmodel.model.named_modules():
        rule, _ = rule_for(module)
        if rule is None or not _has_form(rule):
            continue
        own = {
            n: fmodel.alias[f"{prefix}.{n}" if prefix else n]
            for n, _ in module.named_parameters(recurse=False)
            if (f"{prefix}.{n}" if prefix else n) in fmodel.alias
        }
        if own and set(own) <= {"weight", "bias"}:
            found.append((prefix, module, rule, own, 1 if prefix in seq_first else 0))
    return found


def _leaf_uses(z: Tensor, leaves: list[Tensor]) -> list[int]:
    """The number of edges of ``z``'s autograd graph into each leaf."""
    where = {id(leaf): i for i, leaf in enumerate(leaves)}
    counts = [0] * len(leaves)
    seen: set[Any] = set()
    stack = [z.grad_fn] if z.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for child, _ in fn.next_functions:
            if child is None:
                continue
            var = getattr(child, "variable", None)
            if var is not None:
                i = where.get(id(var))
                if i is not None:
                    counts[i] += 1
            else:
                stack.append(child)
    return counts


def _accepted(uses: list[_Use], fmodel: FunctionalModel, edges: list[int]) -> list[_Use]:
    """The uses whose parameters they partition, each as often as the graph uses it."""
    kept = list(uses)
    while True:
        spans: dict[int, list[tuple[int, int]]] = {}
        for u in kept:
            for name, i in u.params.items():
                spans.setdefault(i, []).append(u.extent(name, fmodel.numels[i]))
        bad = set()
        for i, sp in spans.items():
            sp.sort()
            tiles = all(a[1] == b[0] for a, b in pairwise(sp))
            whole = sp[0][0] == 0 and sp[-1][1] == fmodel.numels[i]
            if not (tiles and whole and edges[i] == len(sp)):
                bad.add(i)
        if not bad:
            return kept
        kept = [u for u in kept if not set(u.params.values()) & bad]


def autograd_layers(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batch: Batch,
    factor: Factor,
    weight: float,
    diagonals: bool = True,
) -> tuple[list[LayerCotangents], Tensor, set[int]]:
    """The Kronecker layers' cotangents of one batch, and the other parameters' diagonals.

    Args:
        fmodel: The model as a function of its parameters.
        loss_fn: The loss.
        batch: The batch.
        factor: ``factor(terms, weight) -> (row factors (R, C, K), per_row)``.
        weight: The batch's weight.
        diagonals: Whether to compute the other parameters' diagonals (else zeros).

    Returns:
        The layers (each with cotangents ``u`` of shape ``(K, N, ...)``, sample-major), the
        exact diagonal of the matrix over all parameters (flat; read only at parameters outside
        the layers), and the indices of the parameters the layers cover.

    Raises:
        ValueError: If the samples interact (BatchNorm with batch statistics), or a hooked
            module is called more than once.
    """
    why = coupling(fmodel.model, dropout=False)  # dropout: one mask per batch, replayed
    if why is not None:
        raise ValueError(f"K-FAC needs samples that do not interact; here {why}")
    modules = _hooked_modules(fmodel)
    recorder = AttentionRecorder(fmodel)
    leaves = fmodel.leaves()
    z, records = _forward(fmodel, batch, leaves, modules, recorder)
    pieces = recorder.pieces
    if not recorder.agrees:  # the composite attention must reproduce the module's output
        recorder.modules, pieces = {}, []
        z, records = _forward(fmodel, batch, leaves, modules, recorder)
    twice = [name for name, rec in records.items() if len(rec) > 1]
    names = [p.name for p in pieces]
    twice += [n for n in names if names.count(n) > 1]
    if twice:
        raise ValueError(f"K-FAC: module {twice[0]!r} is called more than once per forward pass")
    uses = _uses(modules, records, pieces, batch.size)
    uses = _accepted(uses, fmodel, _leaf_uses(z, leaves))
    terms: LossTerms = loss_terms(loss_fn, z.detach(), batch.targets)
    F, per_row = factor(terms, weight)
    F = F.detach()
    U = output_columns(terms, F, per_row, batch.size)  # (K, *z.shape)
    outs = [u.out for u in uses]
    grads: list[Tensor | None] = [None] * len(outs)
    if outs:
        try:
            grads = list(
                torch.autograd.grad(
                    [z], outs, [U], retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            )
        except RuntimeError:  # no batching rule for a backward: one column at a time
            cols = [
                torch.autograd.grad([z], outs, [u], retain_graph=True, allow_unused=True) for u in U
            ]
            grads = [
                None if cols[0][i] is None else torch.stack([c[i] for c in cols])  # type: ignore[misc]
                for i in range(len(outs))
            ]
    layers: list[LayerCotangents] = []
    covered: set[int] = set()
    for use, g in zip(uses, grads):
        u = g.detach() if g is not None else U.new_zeros(U.shape[0], *use.out.shape)
        if use.batch_dim == 1:
            u = u.transpose(1, 2)
        if use.rows:
            layers.append(
                RowCotangents(use.name, use.module, use.rule, use.ctx, use.params, u, use.rows)
            )
        else:
            layers.append(LayerCotangents(use.name, use.module, use.rule, use.ctx, use.params, u))
        covered |= set(use.params.values())
    diag = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    if diagonals and len(covered) < len(fmodel.params):
        diag, _ = row_factor_diagonal(fmodel, loss_fn, batch, lambda _t: F, None, DiagonalInfo())
    return layers, diag, covered


def _forward(
    fmodel: FunctionalModel,
    batch: Batch,
    leaves: list[Tensor],
    modules: list[tuple[str, nn.Module, Any, dict[str, int], int]],
    recorder: AttentionRecorder,
) -> tuple[Tensor, dict[str, list[tuple[Tensor, Tensor]]]]:
    """The output at ``leaves`` with each hooked module's (input, output) recorded."""
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, *_ in modules}
    handles = []
    for name, module, *_ in modules:

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                records[name].append((args[0].detach(), out))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad(), recorder:
            z = fmodel(leaves, batch.inputs)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
    return z, records


def _uses(
    modules: list[tuple[str, nn.Module, Any, dict[str, int], int]],
    records: dict[str, list[tuple[Tensor, Tensor]]],
    pieces: list[Any],
    size: int,
) -> list[_Use]:
    """The recorded uses with a Kronecker form whose sample dimension has the batch's size."""
    found: list[_Use] = []
    for name, module, rule, own, sdim in modules:
        rec = records[name]
        if not rec or not rec[0][1].requires_grad:
            continue
        x, out = rec[0]
        if sdim == 1:
            if x.ndim != 3:
                continue
            x = x.transpose(0, 1)
        found.append(_Use(name, module, rule, own, x, out, sdim, {}))
    for p in pieces:
        ctx = {"x": p.x, "w": p.weight}
        found.append(
            _Use(p.name, p.module, _LINEAR, p.params, p.x, p.out, p.batch_dim, p.rows, ctx)
        )
    kept = []
    for use in found:
        if use.x.ndim == 0 or use.x.shape[0] != size:
            continue
        if not use.ctx:
            params = {
                n: None if getattr(use.module, n, None) is None else getattr(use.module, n).detach()
                for n in ("weight", "bias")
            }
            with torch.no_grad():
                _, use.ctx = use.rule.forward(use.module, use.x, params)
        shape = list(use.out.shape)
        if use.batch_dim == 1:
            shape[0], shape[1] = shape[1], shape[0]
        probe = use.x.new_zeros((), dtype=use.out.dtype).expand(1, *shape)
        if (
            use.rule.kronecker_shared(use.module, use.ctx, probe) is None
            and use.rule.kronecker_indices(use.module, use.ctx, probe) is None
        ):
            continue  # no Kronecker form for these inputs: a diagonal instead
        kept.append(use)
    return kept
