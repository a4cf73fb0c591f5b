r"""How the exact diagonals are computed: per-sample ``vmap`` products, or Kronecker factors.

Both compute, for one batch, :math:`\sum_r \sum_{k} (J_r^\top S_r[:, k])^{\odot 2}` for the
factor rows :math:`S_r` of :mod:`~secondorder.curvature.diagonal` (the GGN's loss-Hessian
factor, or the loss gradient for the empirical Fisher).

**Kronecker fast path.** When the model is an ``nn.Sequential`` whose selected parameters all
belong to ``nn.Linear`` layers with inputs of shape ``(N, d)`` (one row per sample, no tied
parameters), the per-sample gradient of a weight is an outer product, :math:`J_n^\top s =
g_n x_n^\top` with :math:`g_n` the gradient with respect to the layer's output and
:math:`x_n` its input, so

.. math::
    \sum_n \sum_c \big(g_{nc} x_n^\top\big)^{\odot 2}
    = \Big(\sum_c g_{\cdot c}^{\odot 2}\Big)^\top x^{\odot 2},
    \qquad \text{bias: } \sum_n \sum_c g_{nc}^{\odot 2},

one matrix product per layer after one batched backward of the :math:`C` (GGN) or one
(empirical Fisher) cotangents: per-sample gradients are never formed.

The fast path is a separate function (:func:`_kron_diagonal`) with the reference's semantics;
``tests/curvature/test_diagonal.py`` checks it equal to the ``vmap`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .linearization import sequential_layers
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel
from .per_sample import (
    DiagonalInfo,
    batch_factor_squares,
    coupling,
    outputs_agree,
    sample_dims,
    single_sample,
    take_samples,
)
from .probes import ProbedForward, probed_forward

# elements of the largest intermediate (samples x columns x parameters) of one vmap call
_CHUNK_ELEMENTS = 2**22


def sample_chunks(n: int, per_sample: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Ranges ``(a, b)`` of ``n`` samples: ``chunk_size`` each, or bounded by _CHUNK_ELEMENTS."""
    step = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def row_factor_diagonal(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batch: Batch,
    factor: Callable[[LossTerms], Tensor],
    chunk_size: int | None,
    info: DiagonalInfo,
) -> tuple[Tensor, float]:
    r""":math:`\sum_r \sum_c (J_r^\top F_r[:, c])^{\odot 2}` on one batch, and the scale :math:`s`.

    ``factor(terms)`` returns :math:`F` of shape ``(R, C, K)`` (rows, output entries per row,
    columns); rows are ordered sample-major, ``R = N m`` with ``m`` rows per sample. The path
    taken (:mod:`.per_sample`) is appended to ``info``.
    """
    coupled = coupling(fmodel.model)
    if coupled is not None:  # samples interact: only the batch path is exact
        info.record("batch", coupled)
        return batch_factor_squares(fmodel, loss_fn, batch, factor, chunk_size)
    n = batch.size
    params = [p.detach() for p in fmodel.params]
    probed = _kron_forward(fmodel, batch)  # the Kronecker path's forward serves both
    if probed is not None:
        z = probed.z.detach()
    else:
        with torch.no_grad():
            z = fmodel(params, batch.inputs)
    if not isinstance(z, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
    terms = loss_terms(loss_fn, z, batch.targets)
    if not terms.has_likelihood:
        raise ValueError(
            f"{loss_fn!r} has no likelihood on this batch (targets of type "
            f"{type(batch.targets).__name__}); exact diagonals need tensor targets"
        )
    rows = terms.to_rows(z)
    if z.ndim == 0 or z.shape[0] != n or rows.ndim != 2 or rows.shape[0] % n != 0:
        raise ValueError(
            f"per-sample diagonals need outputs with a leading batch dimension of size {n} "
            f"(the batch size), got outputs of shape {tuple(z.shape)}"
        )
    S = factor(terms).detach()  # (R, C, K)
    m, C, K = rows.shape[0] // n, S.shape[1], S.shape[2]
    if m == 1 and probed is not None:
        fast = _kron_diagonal(fmodel, probed, terms, S)
        if fast is not None:
            info.record("kronecker")
            return fast, terms.scale
    # cotangents: for sample i, row j, column k the z-shaped tensor holding S[i m + j, :, k] in
    # row j of sample i and zeros elsewhere; built for the whole batch via from_rows
    eye = torch.eye(m, dtype=S.dtype, device=S.device)
    blocks = torch.einsum("njck,jl->jknlc", S.reshape(n, m, C, K), eye)  # (m, K, N, m, C)
    cot = terms.from_rows(blocks.reshape(m * K, n * m, C)).movedim(1, 0)  # (N, mK, *z_i)
    cot = cot.reshape(n, m * K, 1, *z.shape[1:])
    dims = sample_dims(batch.inputs, n)

    def one_sample(inputs: tuple[Any, ...], cotangents: Tensor) -> tuple[Any, Tensor]:
        def f(*ps: Tensor) -> Tensor:
            return fmodel(ps, single_sample(inputs, dims))

        out, pullback = vjp(f, *params)[:2]
        return vmap(pullback)(cotangents), out  # (mK, *shape) per parameter; (1, *z_i)

    total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    reason = None
    try:
        for a, b in sample_chunks(n, m * K * fmodel.dim, chunk_size):
            grads, outs = vmap(one_sample, in_dims=(dims, 0))(
                take_samples(batch.inputs, dims, a, b), cot[a:b]
            )
            if not outputs_agree(outs.reshape(z[a:b].shape), z[a:b]):
                reason = "the outputs of samples evaluated alone differ from the batch's"
                break
            accumulate_squares(total, grads, fmodel.numels)
    except (RuntimeError, ValueError, NotImplementedError) as err:  # no per-sample vmap rule
        reason = f"per-sample vmap failed ({type(err).__name__}: {str(err)[:200]})"
    if reason is not None:
        info.record("batch", reason)
        return batch_factor_squares(fmodel, loss_fn, batch, factor, chunk_size)
    info.record("vmap")
    return total, terms.scale


def _linear_layers(fmodel: FunctionalModel) -> list[tuple[str, nn.Module]] | None:
    """The Sequential's layers if every selected parameter belongs to an ``nn.Linear``.

    ``None`` for other models, other parameters, or tied parameters.
    """
    layers = sequential_layers(fmodel.model)
    if layers is None or len(fmodel.alias) != len(fmodel.params):  # tied names share an index
        return None
    covered = {
        fmodel.alias[prefix + name]
        for prefix, layer in layers
        if type(layer) is nn.Linear
        for name in ("weight", "bias")
        if prefix + name in fmodel.alias
    }
    return layers if covered == set(range(len(fmodel.params))) else None


def _kron_forward(fmodel: FunctionalModel, batch: Batch) -> ProbedForward | None:
    """The forward pass with probes after the Linear layers, where the fast path applies."""
    layers = _linear_layers(fmodel)
    if layers is None or len(batch.inputs) != 1 or not isinstance(batch.inputs[0], Tensor):
        return None
    x = batch.inputs[0]
    return probed_forward(fmodel, layers, x, lambda m: type(m) is nn.Linear, lambda m: 2)


def _kron_diagonal(
    fmodel: FunctionalModel, probed: ProbedForward, terms: LossTerms, S: Tensor
) -> Tensor | None:
    r""":math:`\sum_n \sum_k (J_n^\top S_n[:, k])^{\odot 2}` from ``nn.Linear`` Kronecker factors.

    See the module docstring. ``S`` has shape ``(N, C, K)`` (one row per sample).
    """
    grads = probed.output_gradients(terms.from_rows(S.permute(2, 0, 1)))  # (K, N, out) each
    total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    parts = total.split(list(fmodel.numels))
    for (prefix, _, xin), g in zip(probed.recorded, grads):
        g2 = g.square().sum(0)  # (N, out): sum over the K cotangent columns
        iw, ib = fmodel.alias.get(prefix + "weight"), fmodel.alias.get(prefix + "bias")
        if iw is not None:
            parts[iw].view(g2.shape[1], xin.shape[1]).addmm_(g2.T, xin.square())
        if ib is not None:
            parts[ib].add_(g2.sum(0))
    return total


def accumulate_squares(total: Tensor, grads: Sequence[Tensor], numels: Sequence[int]) -> None:
    """``total += sum over the leading dimensions of grads**2``, parameter by parameter."""
    for out, g in zip(total.split(list(numels)), grads):
        out += g.reshape(-1, out.numel()).square().sum(0)
