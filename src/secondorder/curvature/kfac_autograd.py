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

Such a module must be called once per forward pass. Parameters outside those modules (norms,
parameters read directly such as ``nn.MultiheadAttention``'s ``in_proj_weight``, modules that
are never called as modules) get their exact diagonal
:math:`\sum_r \sum_k (J_r^\top F_r[:, k])^{\odot 2}` from
:func:`~.diagonal_paths.row_factor_diagonal` with the batch's columns. Models whose samples
interact (BatchNorm with batch statistics) are refused: the factors assume independent
samples. Dropout in training mode (modules, ``F.dropout``, attention's ``dropout_p``) is
allowed: the cotangents are those of the one forward pass, whose masks the diagonals' pass
replays (the caller runs both in
:func:`~secondorder.curvature.random_state.one_draw_per_batch`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .diagonal_paths import row_factor_diagonal
from .engines.factors import LayerCotangents
from .kfac_factors import Factor, output_columns
from .layers import Rule, rule_for
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel
from .per_sample import DiagonalInfo, coupling

__all__ = ["autograd_layers"]


def _hooked_modules(fmodel: FunctionalModel) -> list[tuple[str, nn.Module, Any, dict[str, int]]]:
    """``(name, module, rule, {param name: index})`` of modules with a Kronecker-capable rule."""
    found = []
    for prefix, module in fmodel.model.named_modules():
        rule, _ = rule_for(module)
        if rule is None or (
            type(rule).kronecker_shared is Rule.kronecker_shared
            and type(rule).kronecker is Rule.kronecker
        ):
            continue
        own = {
            n: fmodel.alias[f"{prefix}.{n}" if prefix else n]
            for n, _ in module.named_parameters(recurse=False)
            if (f"{prefix}.{n}" if prefix else n) in fmodel.alias
        }
        if own and set(own) <= {"weight", "bias"}:
            found.append((prefix, module, rule, own))
    return found


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
        The layers (each with cotangents ``u`` of shape ``(K, *out)``), the exact diagonal of
        the matrix over all parameters (flat; read only at parameters outside the layers), and
        the indices of the parameters the layers cover.

    Raises:
        ValueError: If the samples interact (BatchNorm with batch statistics), or a hooked
            module is called more than once.
    """
    why = coupling(fmodel.model, dropout=False)  # dropout: one mask per batch, replayed
    if why is not None:
        raise ValueError(f"K-FAC needs samples that do not interact; here {why}")
    modules = _hooked_modules(fmodel)
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, *_ in modules}
    handles = []
    for name, module, _, _ in modules:

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                records[name].append((args[0].detach(), out))

        handles.append(module.register_forward_hook(hook))
    leaves = fmodel.leaves()
    try:
        with torch.enable_grad():
            z = fmodel(leaves, batch.inputs)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
    twice = [name for name, rec in records.items() if len(rec) > 1]
    if twice:
        raise ValueError(f"K-FAC: module {twice[0]!r} is called more than once per forward pass")
    terms: LossTerms = loss_terms(loss_fn, z.detach(), batch.targets)
    F, per_row = factor(terms, weight)
    F = F.detach()
    U = output_columns(terms, F, per_row, batch.size)  # (K, *z.shape)
    used = [
        (name, module, rule, own)
        for name, module, rule, own in modules
        if records[name] and records[name][0][1].requires_grad
    ]
    outs = [records[name][0][1] for name, *_ in used]
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
    for (name, module, rule, own), g in zip(used, grads):
        x = records[name][0][0]
        params = {
            n: None if getattr(module, n, None) is None else getattr(module, n).detach()
            for n in ("weight", "bias")
        }
        with torch.no_grad():
            _, ctx = rule.forward(module, x, params)
        u = g.detach() if g is not None else U.new_zeros(U.shape[0], *outs[0].shape)
        if rule.kronecker_shared(module, ctx, u) is None:
            continue  # no Kronecker form for these inputs: a diagonal instead
        layers.append(LayerCotangents(name, module, rule, ctx, own, u))
        covered |= set(own.values())
    diag = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    if diagonals and len(covered) < len(fmodel.params):
        diag, _ = row_factor_diagonal(fmodel, loss_fn, batch, lambda _t: F, None, DiagonalInfo())
    return layers, diag, covered
