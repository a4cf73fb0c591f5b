r"""How the low-rank GGN's columns are built: the ``"sequential"`` and ``"autograd"`` engines.

- ``"sequential"`` (formerly ``"kron"``; any traced model whose selected parameters all sit in
  layers with per-sample rules and whose steps keep the samples apart, see
  :mod:`~secondorder.curvature.engines.factors`: ``nn.Linear`` layers, ``nn.Conv1d``/
  ``nn.Conv2d`` with ``groups=1``, in an ``nn.Sequential`` or a custom module): one reverse
  pass of the :math:`C' + 1` cotangents :math:`[S_{\cdot, c'}]` and :math:`[\nabla \ell]` over
  the graph engine's steps gives every such layer's output cotangents :math:`f_{n c'}` and
  :math:`h_n` for every sample. For a Linear layer with inputs :math:`x_n` of shape ``(N, d)``
  the kernels are :math:`(J_n^\top s)^\top (J_m^\top s') = (x_n^\top x_m + 1)(f_{ns}^\top
  f_{ms'})` (weight plus bias); :math:`V` is never formed; cost :math:`O(D^2 d)` per layer.
  Other layers (a Linear on inputs ``(N, T, d)``, convolutions) give their rows of :math:`V`
  and of the per-sample gradients from the rule's per-sample cotangents (for a convolution
  :math:`f_{nc'} \tilde x_n^\top` with the unfolded input patches :math:`\tilde x_n`); cost
  :math:`O(D^2 \cdot \text{parameters of the layer})`.
- ``"autograd"`` (any module): :math:`V` and the per-sample gradients are formed explicitly
  (``P x (D + N)``) by batched vector-Jacobian products of the whole batch; cost
  :math:`O(D^2 P)`. Meant for small models and tests.

Both take ``factor(terms, weight) -> (S, grad_rows)``: the scaled loss-Hessian factor rows
``(R, C, C')`` and per-row gradient rows ``(R, C)`` of one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .engines.factors import LayerCotangents, factor_linearization, layer_cotangents
from .losses import LossTerms, loss_terms
from .lowrank_columns import Columns, ExplicitColumns, LinearColumns
from .model import Batch, FunctionalModel

_CHUNK = 256  # columns per batched backward in the autograd engine

Factor = Callable[[LossTerms, float], tuple[Tensor, Tensor]]


class Built(NamedTuple):
    """The columns of :math:`V`, the weighted loss and the sample owning each column."""

    columns: list[Columns]
    loss: Tensor
    column_sample: Tensor


def kron_columns(
    fmodel: FunctionalModel,
    loss_fn: object,
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
) -> tuple[Built | None, str | None]:
    """The per-sample layer engine, or ``(None, reason)`` where a batch does not fit it."""
    parts: dict[tuple[str, ...], list[tuple[Tensor, ...]]] = {}
    layers: dict[tuple[str, ...], LayerCotangents] = {}
    loss, Cp = None, 0
    for batch, weight in zip(batches, weights):
        lin, why = factor_linearization(fmodel, batch.inputs, batch.size)
        if lin is None:
            return None, why
        terms = loss_terms(loss_fn, lin.z, batch.targets)
        S, grad_rows = factor(terms, weight)
        if S.shape[0] != batch.size:
            return None, f"{S.shape[0]} loss rows for {batch.size} samples (one per sample)"
        Cp = S.shape[-1]
        # cotangents: column c' of every sample's factor, then the per-sample gradients
        cot = torch.cat([S.permute(2, 0, 1), grad_rows.unsqueeze(0)])  # (C'+1, N, C)
        for layer in layer_cotangents(lin, terms.from_rows(cot)):
            part = _layer_part(layer)
            if part is None:
                return None, f"node {layer.name}: no per-sample formula for its inputs"
            key: tuple[str, ...] = (layer.name, "kron" if len(part) == 3 else "rows")
            layers.setdefault(key, layer)
            parts.setdefault(key, []).append(part)
        value = terms.value * weight
        loss = value if loss is None else loss + value
    assert loss is not None
    covered = [i for key in parts for i in layers[key].params.values()]
    if any(len(p) != len(batches) for p in parts.values()) or sorted(covered) != list(
        range(len(fmodel.params))
    ):
        return None, "a layer's cotangents are zero on some batch, or its form changes"
    columns: list[Columns] = []
    shapes = [p.shape for p in fmodel.params]
    for key, layer_parts in parts.items():
        joined = [torch.cat(t) for t in zip(*layer_parts)]
        params = layers[key].params
        if key[1] == "kron":
            columns.append(LinearColumns(params.get("weight"), params.get("bias"), *joined))
            continue
        for k, i in enumerate(params.values()):
            columns.append(ExplicitColumns(i, shapes[i], joined[2 * k], joined[2 * k + 1]))
    num_samples = sum(b.size for b in batches)
    column_sample = torch.arange(num_samples, device=fmodel.device).repeat_interleave(Cp)
    return Built(columns, loss.detach(), column_sample), None


def _layer_part(layer: LayerCotangents) -> tuple[Tensor, ...] | None:
    r"""One batch's share of a layer's columns from its output cotangents.

    Args:
        layer: The layer step with cotangents ``u`` of shape ``(C' + 1, N, *out)``: the
            :math:`C'` factor columns, then the per-sample gradients.

    Returns:
        Kronecker form (a Linear layer on inputs ``(N, d)``): ``(X, F, H)`` of shapes
        ``(N, d)``, ``(N, C', out)``, ``(N, out)``. Otherwise, per parameter of the layer in
        order, the rows of :math:`V` ``(N C', numel)`` and of the per-sample gradients
        ``(N, numel)``. None if the rule has no per-sample formula for these inputs.
    """
    x, u = layer.kronecker(), layer.u
    if x is not None:
        return x, u[:-1].transpose(0, 1), u[-1]
    rows = layer.per_sample()
    if rows is None:
        return None
    out: list[Tensor] = []
    for name in layer.params:
        r = rows[name]  # (N, C' + 1, *shape)
        N, K = r.shape[:2]
        r = r.reshape(N, K, -1)
        out += [r[:, :-1].reshape(N * (K - 1), -1), r[:, -1].contiguous()]
    return tuple(out)


def explicit_columns(
    fmodel: FunctionalModel,
    loss_fn: object,
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
) -> Built:
    """The autograd engine: :math:`V` and the per-sample gradients by batched VJPs.

    Raises:
        TypeError: If the model does not return a tensor.
        ValueError: If a batch's loss rows do not divide into its samples.
    """
    fm = fmodel
    Vs: list[list[Tensor]] = [[] for _ in fm.params]
    Gs: list[list[Tensor]] = [[] for _ in fm.params]
    owners, loss, offset = [], None, 0
    for batch, weight in zip(batches, weights):
        leaves = fm.leaves()
        with torch.enable_grad():
            z = fm(leaves, batch.inputs)
        if not isinstance(z, Tensor):
            raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
        terms = loss_terms(loss_fn, z.detach(), batch.targets)
        S, grad_rows = factor(terms, weight)
        R, C, Cp = S.shape
        n = batch.size
        if R % n != 0:
            raise ValueError(
                f"LowRankGGN: the loss has {R} rows for a batch of {n} samples; expected a "
                "multiple of the batch size, to assign rows to samples"
            )
        row_sample = torch.arange(R, device=S.device) // (R // n)
        # factor columns (r, c'): S[r, :, c'] placed in row r; then one column per sample
        eye = torch.eye(R, dtype=S.dtype, device=S.device)
        fac = (eye[:, None, :, None] * S.permute(0, 2, 1)[:, :, None, :]).reshape(R * Cp, R, C)
        mask = (row_sample[None, :] == torch.arange(n, device=S.device)[:, None]).to(S.dtype)
        cot = terms.from_rows(torch.cat([fac, mask[:, :, None] * grad_rows[None]]))
        chunks = [
            torch.autograd.grad(
                z, leaves, c, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            for c in cot.split(_CHUNK)
        ]
        for i, p in enumerate(fm.params):
            rows = torch.cat(
                [
                    g[i].reshape(len(c), -1) if g[i] is not None else p.new_zeros(len(c), p.numel())
                    for g, c in zip(chunks, cot.split(_CHUNK))
                ]
            )
            Vs[i].append(rows[: R * Cp])
            Gs[i].append(rows[R * Cp :])
        owners.append((offset + row_sample).repeat_interleave(Cp))
        offset += n
        value = terms.value * weight
        loss = value if loss is None else loss + value
    assert loss is not None
    columns: list[Columns] = [
        ExplicitColumns(i, p.shape, torch.cat(Vs[i]), torch.cat(Gs[i]))
        for i, p in enumerate(fm.params)
    ]
    return Built(columns, loss.detach(), torch.cat(owners))
