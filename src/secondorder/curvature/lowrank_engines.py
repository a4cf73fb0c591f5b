r"""How the low-rank GGN's columns are built: the ``"kron"`` and ``"autograd"`` engines.

- ``"kron"`` (``nn.Sequential`` of supported layers whose selected parameters all belong to
  ``nn.Linear`` layers with inputs of shape ``(N, d)`` or to ``nn.Conv1d``/``nn.Conv2d`` layers
  with ``groups=1`` and zero padding given by numbers): one batched backward of the
  :math:`C' + 1` cotangents :math:`[S_{\cdot, c'}]` and :math:`[\nabla \ell]` through zero
  probes added to the layers' outputs gives every sample's output gradients :math:`f_{n c'}` and
  :math:`h_n` of each such layer. For a Linear layer with inputs :math:`x_n` the kernels are
  :math:`(J_n^\top s)^\top (J_m^\top s') = (x_n^\top x_m + 1)(f_{ns}^\top f_{ms'})` (weight plus
  bias); :math:`V` is never formed; cost :math:`O(D^2 d)` per layer. A convolution's output
  gradients :math:`f_{nc'} \in \mathbb{R}^{\mathrm{out} \times P}` over its :math:`P` output
  positions do not factor so: with the unfolded input patches
  :math:`\tilde x_n \in \mathbb{R}^{\mathrm{in} k \times P}` the weight's column is
  :math:`f_{nc'} \tilde x_n^\top` (shape ``(out, in k)``) and the bias's :math:`f_{nc'} 1_P`, so
  the layer's rows of :math:`V` (``D x out in k``) and of the per-sample gradients are formed by
  one batched matmul per chunk of samples; cost :math:`O(D^2\, \mathrm{out}\, \mathrm{in}\, k)`.
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
from torch import Tensor, nn

from .linearization import sequential_layers
from .losses import LossTerms, loss_terms
from .lowrank_columns import (
    KRON_CONV,
    Columns,
    ExplicitColumns,
    LinearColumns,
    conv_weight_rows,
    kron_conv,
)
from .model import Batch, FunctionalModel
from .probes import probed_forward

_CHUNK = 256  # columns per batched backward in the autograd engine

Factor = Callable[[LossTerms, float], tuple[Tensor, Tensor]]


class Built(NamedTuple):
    """The columns of :math:`V`, the weighted loss and the sample owning each column."""

    columns: list[Columns]
    loss: Tensor
    column_sample: Tensor


def kron_layers(fmodel: FunctionalModel) -> list[tuple[str, nn.Module]] | None:
    """The layers of ``fmodel`` when the kron engine covers every selected parameter, else None."""
    layers = sequential_layers(fmodel.model)
    if layers is None:
        return None
    counts: dict[int, int] = {}
    for i in fmodel.alias.values():
        counts[i] = counts.get(i, 0) + 1
    if any(c > 1 for c in counts.values()):  # tied parameters: kernels are not additive
        return None
    covered = set()
    for prefix, layer in layers:
        if type(layer) is nn.Linear or kron_conv(layer):
            covered |= {
                fmodel.alias[prefix + n] for n in ("weight", "bias") if prefix + n in fmodel.alias
            }
    return layers if covered == set(range(len(fmodel.params))) else None


def kron_columns(
    fmodel: FunctionalModel,
    loss_fn: object,
    layers: list[tuple[str, nn.Module]],
    batches: Sequence[Batch],
    weights: Sequence[float],
    factor: Factor,
) -> Built | None:
    """The kron engine; None where a batch's inputs or loss rows do not fit it."""
    alias = fmodel.alias
    per_layer: dict[str, list[tuple[Tensor, ...]]] = {}
    kinds: dict[str, nn.Module] = {}
    loss, Cp = None, 0
    for batch, weight in zip(batches, weights):
        if len(batch.inputs) != 1 or not isinstance(batch.inputs[0], Tensor):
            return None
        fwd = probed_forward(
            fmodel,
            layers,
            batch.inputs[0],
            lambda m: type(m) is nn.Linear or kron_conv(m),
            lambda m: 2 if type(m) is nn.Linear else 2 + KRON_CONV[type(m)],
        )
        if fwd is None:
            return None
        terms = loss_terms(loss_fn, fwd.z.detach(), batch.targets)
        S, grad_rows = factor(terms, weight)
        if S.shape[0] != batch.size:
            return None
        Cp = S.shape[-1]
        # cotangents: column c' of every sample's factor, then the per-sample gradients
        cot = torch.cat([S.permute(2, 0, 1), grad_rows.unsqueeze(0)])  # (C'+1, N, C)
        grads = fwd.output_gradients(terms.from_rows(cot))
        for (prefix, layer, xin), g in zip(fwd.recorded, grads):
            kinds[prefix] = layer
            part = _layer_part(prefix + "weight" in alias, layer, xin, g)
            per_layer.setdefault(prefix, []).append(part)
        value = terms.value * weight
        loss = value if loss is None else loss + value
    assert loss is not None
    columns: list[Columns] = []
    shapes = [p.shape for p in fmodel.params]
    for prefix, parts in per_layer.items():
        joined = [torch.cat(t) for t in zip(*parts)]
        w, b = alias.get(prefix + "weight"), alias.get(prefix + "bias")
        if type(kinds[prefix]) is nn.Linear:
            columns.append(LinearColumns(w, b, *joined))
            continue
        Vw, Gw, Vb, Gb = joined
        if w is not None:
            columns.append(ExplicitColumns(w, shapes[w], Vw, Gw))
        if b is not None:
            columns.append(ExplicitColumns(b, shapes[b], Vb, Gb))
    num_samples = sum(b.size for b in batches)
    column_sample = torch.arange(num_samples, device=fmodel.device).repeat_interleave(Cp)
    return Built(columns, loss.detach(), column_sample)


def _layer_part(with_weight: bool, layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    r"""One batch's share of a layer's columns from its output gradients.

    Args:
        with_weight: Whether the layer's weight is selected.
        layer: The Linear or convolution layer.
        x: Its input, shape ``(N, d)`` or ``(N, in, *spatial)``.
        g: Its output gradients for the :math:`C'` factor columns and the gradient,
            shape ``(C' + 1, N, out, *spatial)``.

    Returns:
        Linear: ``(X, F, H)`` of shapes ``(N, d)``, ``(N, C', out)``, ``(N, out)``.
        Convolution: the rows of :math:`V` and of the per-sample gradients for the weight,
        ``(N C', out in k)`` and ``(N, out in k)`` (empty if it is not selected), then for
        the bias, ``(N C', out)`` and ``(N, out)``.
    """
    if type(layer) is nn.Linear:
        return x, g[:-1].transpose(0, 1), g[-1]
    K, N, out = g.shape[:3]
    g = g.reshape(K, N, out, -1).transpose(0, 1)  # (N, C' + 1, out, P)
    if with_weight:
        rows = conv_weight_rows(layer, x, g)
        Vw, Gw = rows[:, :-1].reshape(N * (K - 1), -1), rows[:, -1].contiguous()
    else:
        Vw = Gw = g.new_empty(N, 0)
    sums = g.sum(-1)  # (N, C' + 1, out)
    return Vw, Gw, sums[:, :-1].reshape(N * (K - 1), out), sums[:, -1].contiguous()


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
