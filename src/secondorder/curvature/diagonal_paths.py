r"""How the exact diagonals are computed: per-sample ``vmap`` products, or Kronecker factors.

Both compute, for one batch, :math:`\sum_r \sum_{k} (J_r^\top S_r[:, k])^{\odot 2}` for the
factor rows :math:`S_r` of :mod:`~secondorder.curvature.diagonal` (the GGN's loss-Hessian
factor, or the loss gradient for the empirical Fisher).

**Per-sample layer fast path.** When every selected parameter sits in a layer whose rule has
per-sample hooks (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``; see
:mod:`~secondorder.curvature.engines.factors`) of a traced model that keeps the samples apart
(``nn.Sequential`` or a custom module: residual additions, reshapes, functional activations),
one reverse pass of the :math:`mC` (GGN) or :math:`m` (empirical Fisher) cotangent columns
(:math:`m` loss rows per sample, each column holding one row of every sample) over the graph
engine's steps gives every such layer's output cotangents :math:`g_{nc}`, and its rule the
squared per-sample parameter cotangents. For a Linear layer with inputs :math:`x_n` of shape
``(N, d)`` the per-sample gradient is an outer product, :math:`J_n^\top s = g_n x_n^\top`, so

.. math::
    \sum_n \sum_c \big(g_{nc} x_n^\top\big)^{\odot 2}
    = \Big(\sum_c g_{\cdot c}^{\odot 2}\Big)^\top x^{\odot 2},
    \qquad \text{bias: } \sum_n \sum_c g_{nc}^{\odot 2},

one matrix product per layer; otherwise (inputs ``(N, T, d)``, convolutions) the rule forms
the layer's per-sample cotangents in chunks of samples. Models where some parameter is not
covered, or a step may mix the samples, take the ``vmap`` path.

The fast path is a separate function (:func:`_kron_diagonal`) with the reference's semantics;
``tests/curvature/test_diagonal.py`` checks it equal to the ``vmap`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .engines.factors import column_chunk, factor_linearization, layer_cotangents
from .engines.graph import GraphLinearization
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
    params = fmodel.values()
    lin = _factor_forward(fmodel, batch)  # the fast path's forward serves both
    if lin is not None:
        z = lin.z
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
    # cotangents: for row j and column k the z-shaped tensor holding S[i m + j, :, k] in row j of
    # every sample i (zeros elsewhere): (mK, *z.shape), built for the whole batch via from_rows
    eye = torch.eye(m, dtype=S.dtype, device=S.device)
    blocks = torch.einsum("njck,jl->jknlc", S.reshape(n, m, C, K), eye)  # (m, K, N, m, C)
    columns = terms.from_rows(blocks.reshape(m * K, n * m, C))
    if lin is not None:
        fast = _kron_diagonal(fmodel, lin, columns)
        if fast is not None:
            info.record("kronecker")
            return fast, terms.scale
    cot = columns.movedim(1, 0).reshape(n, m * K, 1, *z.shape[1:])  # (N, mK, 1, *z_i)
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


def _factor_forward(fmodel: FunctionalModel, batch: Batch) -> GraphLinearization | None:
    """The graph engine's forward pass of one batch, where the fast path is exact, else None."""
    return factor_linearization(fmodel, batch.inputs, batch.size)[0]


def _kron_diagonal(
    fmodel: FunctionalModel, lin: GraphLinearization, columns: Tensor
) -> Tensor | None:
    r""":math:`\sum_n \sum_k (J_n^\top u_{kn})^{\odot 2}` from the layers' per-sample rules.

    See the module docstring. ``columns`` holds the cotangent columns ``(K', *z.shape)``, each
    with one row per sample (:math:`K' = mK` for :math:`m` loss rows per sample). None if a
    layer's rule has no formula for its inputs.
    """
    total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    parts = total.split(list(fmodel.numels))
    for chunk in columns.split(column_chunk(lin)):  # squares add up over the columns
        for layer in layer_cotangents(lin, chunk):
            squares = layer.squares()
            if squares is None:
                return None
            for name, i in layer.params.items():
                parts[i].add_(squares[name].reshape(-1))
    return total


def accumulate_squares(total: Tensor, grads: Sequence[Tensor], numels: Sequence[int]) -> None:
    """``total += sum over the leading dimensions of grads**2``, parameter by parameter."""
    for out, g in zip(total.split(list(numels)), grads):
        out += g.reshape(-1, out.numel()).square().sum(0)
