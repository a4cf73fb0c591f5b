r"""Exact diagonals of curvature matrices where they are cheap, from per-sample products.

For the core losses (cross-entropy, MSE, BCE-with-logits; see :mod:`.losses`) the loss of a batch
decomposes over independent rows, :math:`L = s \sum_r \ell_r(z_r)`, and each row's output Hessian
has a symmetric factor :math:`\nabla^2 \ell_r = S_r S_r^\top` with :math:`C` columns. Then

.. math::
    \operatorname{diag}(G) = s \sum_r \sum_{c=1}^{C} \big(J_r^\top S_r[:, c]\big)^{\odot 2},
    \qquad
    \operatorname{diag}(F_{\mathrm{emp}}) = s \sum_r \big(J_r^\top \nabla \ell_r\big)^{\odot 2},

with :math:`J_r = \partial z_r / \partial \theta` and :math:`\odot 2` the elementwise square. Each
term is one vector-Jacobian product of a single sample's outputs. They are computed with
:mod:`torch.func`: a ``vmap`` over the samples of a ``vmap`` over the cotangents of one
:func:`torch.func.vjp` of the model called (through :func:`torch.func.functional_call`) on that
sample alone. The cost is about :math:`C` gradients for the GGN diagonal and one for the
empirical-Fisher diagonal, in chunks of samples that bound the memory. Where the samples
interact (BatchNorm with batch statistics, Dropout in training mode, a forward that mixes
samples) or ``vmap`` has no rule for a layer (GRU, LSTM), the products are taken through the
whole batch instead (:mod:`.per_sample`, which also defines the per-row quantities for coupled
samples); the result is the same diagonal of the operator, at about :math:`N` times the cost.

The fast path from the layers' per-sample rules over the graph engine's steps (``nn.Linear``,
convolutions and normalisations in any traced model that keeps the samples apart) and the
per-sample ``vmap`` path are in :mod:`.diagonal_paths`.

Over several batches the diagonals combine like the operators
(:class:`~secondorder.curvature.base.CurvatureOperator`): weights :math:`D_b / D` for
``reduction="mean"`` (:math:`D_b` the normaliser of batch :math:`b`'s mean, see
:mod:`.weighting`) and 1 for ``"sum"``, so the result equals the diagonal of the operator on
the concatenated batch. With a ``process_group`` (data-parallel training), each rank passes its
shard; the weighted sums and the normalisers are all-reduced (one flat all-reduce) and the
result is normalised by the global normaliser, so every rank gets the diagonal of the global
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .._checks import LIKELIHOOD_LOSSES, check_chunk_size
from ..linalg.precision import full_precision
from .base import allreduce_sum
from .diagonal_paths import accumulate_squares, row_factor_diagonal, sample_chunks
from .losses import supports_likelihood
from .model import Batch, FunctionalModel, as_batches
from .per_sample import (
    DiagonalInfo,
    batch_loss_gradient_squares,
    coupling,
    outputs_agree,
    sample_dims,
    single_sample,
    take_samples,
)
from .weighting import batch_normaliser

__all__ = [
    "DiagonalInfo",
    "empirical_fisher_diagonal",
    "ggn_diagonal",
    "per_sample_gradient_diagonal",
]


def _check_likelihood(loss_fn: Any, what: str) -> None:
    if not supports_likelihood(loss_fn):
        raise ValueError(
            f"{what} needs a loss with a likelihood: {LIKELIHOOD_LOSSES}; got "
            f"{loss_fn!r}. For other losses use per_sample_gradient_diagonal, or the dense "
            "diagonal of a small operator (GGN(...).to_dense().diagonal())"
        )


def _combine(
    loss_fn: Any,
    data: Any,
    per_batch: Callable[[Batch], tuple[Tensor, float]],
    process_group: Any = None,
    by_samples: bool = False,
) -> Tensor:
    r"""Weight per-batch diagonals like the operators: ``D_b / D`` (mean) or 1 (sum).

    .. math::
        d = \frac{1}{D} \sum_{\text{ranks}} \sum_b D_b\, s_b\, d_b \ (\text{mean}), \qquad
        d = \sum_{\text{ranks}} \sum_b s_b\, d_b \ (\text{sum}),

    with :math:`D_b` the normaliser of batch :math:`b`'s mean (:mod:`.weighting`; the batch
    size with ``by_samples``) and :math:`D` its sum on all ranks of ``process_group`` (one flat
    all-reduce of the sums and the count). Batches with :math:`D_b = 0` are skipped.

    Raises:
        ValueError: If ``data`` holds no batch, or every target is ignored.
    """
    if by_samples:
        mean = getattr(loss_fn, "reduction", "mean") == "mean"
    else:
        mean = getattr(loss_fn, "reduction", "mean") != "sum"
    total: Tensor | None = None
    count = 0.0
    for batch in as_batches(data):
        norm = batch_normaliser(loss_fn, batch.targets) if not by_samples else None
        norm = float(batch.size) if norm is None else norm
        if mean and norm == 0:  # every target ignored: nothing to add
            continue
        d, scale = per_batch(batch)
        d = d * (scale * norm if mean else scale)
        count += norm
        total = d if total is None else total + d
    if total is None:
        if count == 0 and not by_samples:
            raise ValueError(
                f"{type(loss_fn).__name__}: every target of the data is ignored: the mean loss "
                "is 0/0"
            )
        raise ValueError("data: expected at least one batch, got none")
    if process_group is not None:
        counted = torch.tensor([count], dtype=total.dtype, device=total.device)
        (reduced,) = allreduce_sum([torch.cat([total, counted])], process_group)
        total, count = reduced[:-1], float(reduced[-1])
    return total / count if mean else total


@overload
def ggn_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def ggn_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[True],
) -> tuple[Tensor, DiagonalInfo]: ...


@full_precision
def ggn_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, DiagonalInfo]:
    r"""The exact diagonal of the generalised Gauss-Newton matrix (= exact Fisher) for core losses.

    .. math::
        \operatorname{diag}(G) = \sum_b w_b\, s_b \sum_{r} \sum_{c=1}^{C}
        \big(J_r^\top S_r[:, c]\big)^{\odot 2},
        \qquad S_r S_r^\top = \nabla^2_{z_r} \ell_r,

    with :math:`L_b = s_b \sum_r \ell_r` the batch loss over rows (see :mod:`.losses`), the
    factors from ``LossTerms.symmetric_factor()`` and :math:`w_b` the batch weights of the
    operators. It equals ``GGN(model, loss_fn, data).to_dense().diagonal()`` at the cost of about
    :math:`C` gradients (one vector-Jacobian product per output dimension and sample, batched
    with :func:`torch.func.vmap`).

    Args:
        model: Any ``nn.Module`` (coupled samples: see :mod:`.per_sample`).
        loss_fn: ``nn.CrossEntropyLoss`` (no class weights), ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` (no weights), reduction ``"mean"`` or ``"sum"``.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        params: Optional subset of the model's parameters (default: all with requires_grad).
        chunk_size: Samples per vectorised call (default: as many as keep the intermediate
            ``samples x columns x parameters`` below :math:`2^{22}` elements).
        process_group: A ``torch.distributed`` process group (default: ``None``, one
            process); each rank passes its shard and gets the diagonal of the global batch.
        dtype: The dtype the diagonal is computed in (default: float32 for a bfloat16 or
            float16 model, else the parameters'; see
            :class:`~secondorder.curvature.base.CurvatureOperator`).
        return_info: Also return a :class:`~secondorder.curvature.per_sample.DiagonalInfo`
            naming the path that ran on each batch (``"kronecker"``, ``"vmap"`` or the
            ``"batch"`` fallback) and why.

    Returns:
        The diagonal, shape ``(n,)`` in the order of the flat parameter vector (with
        ``return_info``, the pair ``(diagonal, info)``).

    Raises:
        ValueError: For a loss without a likelihood, outputs without a batch dimension, no
            batch at all, or an invalid ``chunk_size``.

    Example:
        >>> import torch, secondorder as so
        >>> from secondorder.curvature.diagonal import ggn_diagonal
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> d = ggn_diagonal(model, loss_fn, (X, y))
        >>> bool(torch.allclose(d, so.GGN(model, loss_fn, (X, y)).to_dense().diagonal()))
        True
    """
    _check_likelihood(loss_fn, "ggn_diagonal")
    check_chunk_size(chunk_size)
    fmodel = FunctionalModel(model, params, dtype)
    info = DiagonalInfo()
    d = _combine(
        loss_fn,
        data,
        lambda b: row_factor_diagonal(
            fmodel, loss_fn, fmodel.cast_batch(b), lambda t: t.symmetric_factor(), chunk_size, info
        ),
        process_group,
    )
    return (d, info) if return_info else d


@overload
def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[True],
) -> tuple[Tensor, DiagonalInfo]: ...


@full_precision
def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, DiagonalInfo]:
    r"""The exact diagonal of the empirical Fisher, the scaled sum of squared per-row gradients.

    .. math::
        \operatorname{diag}(F_{\mathrm{emp}}) = \sum_b w_b\, s_b \sum_r
        \big(\nabla_\theta \ell_r\big)^{\odot 2}
        = \sum_b w_b\, s_b \sum_r \big(J_r^\top \nabla_{z_r} \ell_r(y_r)\big)^{\odot 2},

    with the same normalisation as ``Fisher(model, loss_fn, data, kind="empirical")`` (rows and
    :math:`s_b` as in :mod:`.losses`: one row per position, every index but the class dimension 1
    for cross-entropy and every index but the last for MSE and BCE). Costs about one gradient.

    Args:
        model: Any ``nn.Module`` (coupled samples: see :mod:`.per_sample`).
        loss_fn: ``nn.CrossEntropyLoss`` (no class weights), ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` (no weights), reduction ``"mean"`` or ``"sum"``.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        params: Optional subset of the model's parameters (default: all with requires_grad).
        chunk_size: Samples per vectorised call (default: automatic, see :func:`ggn_diagonal`).
        process_group: A ``torch.distributed`` process group (default: ``None``, one
            process); each rank passes its shard and gets the diagonal of the global batch.
        dtype: The dtype the diagonal is computed in (default: float32 for a bfloat16 or
            float16 model, else the parameters'; see
            :class:`~secondorder.curvature.base.CurvatureOperator`).
        return_info: Also return a :class:`~secondorder.curvature.per_sample.DiagonalInfo`
            naming the path that ran on each batch (``"kronecker"``, ``"vmap"`` or the
            ``"batch"`` fallback) and why.

    Returns:
        The diagonal, shape ``(n,)`` (with ``return_info``, the pair ``(diagonal, info)``).

    Raises:
        ValueError: For a loss without a likelihood, outputs without a batch dimension, no
            batch at all, or an invalid ``chunk_size``.
    """
    _check_likelihood(loss_fn, "empirical_fisher_diagonal")
    check_chunk_size(chunk_size)
    fmodel = FunctionalModel(model, params, dtype)
    info = DiagonalInfo()
    d = _combine(
        loss_fn,
        data,
        lambda b: row_factor_diagonal(
            fmodel,
            loss_fn,
            fmodel.cast_batch(b),
            lambda t: t.per_row_gradients().unsqueeze(-1),
            chunk_size,
            info,
        ),
        process_group,
    )
    return (d, info) if return_info else d


@overload
def per_sample_gradient_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def per_sample_gradient_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = ...,
    chunk_size: int | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype | None = ...,
    return_info: Literal[True],
) -> tuple[Tensor, DiagonalInfo]: ...


@full_precision
def per_sample_gradient_diagonal(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Sequence[Tensor] | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, DiagonalInfo]:
    r"""Diagonal of the empirical Fisher of per-sample losses, for any loss callable.

    With :math:`l_i(\theta)` = ``loss_fn(z[i:i+1], y[i:i+1])``, the loss of row :math:`i` of
    the outputs ``z`` of the whole batch (for samples that do not interact, the loss of sample
    :math:`i` evaluated alone, ``loss_fn(model(x_i[None]), y_i[None])``, which is how it is
    computed then; see :mod:`.per_sample`),

    .. math::
        d = \frac{1}{N} \sum_{i=1}^N \big(\nabla_\theta l_i\big)^{\odot 2}
        \quad (\text{reduction "mean"}), \qquad
        d = \sum_{i=1}^N \big(\nabla_\theta l_i\big)^{\odot 2} \quad (\text{"sum"}),

    over all :math:`N` samples of all batches (a loss without a ``reduction`` attribute counts as
    ``"mean"``). This is Martens' (2010, §4.7) preconditioner statistic for losses without a
    known likelihood (e.g. a model returning an objective value); for the core losses
    :func:`empirical_fisher_diagonal` gives the scale that matches the GGN. Inputs and targets
    without the batch's leading dimension (or not tensors) are passed unchanged to every sample.

    Args:
        model: Any ``nn.Module`` (coupled samples: see :mod:`.per_sample`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        params: Optional subset of the model's parameters (default: all with requires_grad).
        chunk_size: Samples per vectorised call (default: automatic).
        process_group: A ``torch.distributed`` process group (default: ``None``, one
            process); each rank passes its shard and gets the diagonal of the global batch.
        dtype: The dtype the diagonal is computed in (default: float32 for a bfloat16 or
            float16 model, else the parameters'; see
            :class:`~secondorder.curvature.base.CurvatureOperator`).
        return_info: Also return a :class:`~secondorder.curvature.per_sample.DiagonalInfo`
            naming the path that ran on each batch (``"kronecker"``, ``"vmap"`` or the
            ``"batch"`` fallback) and why.

    Returns:
        The diagonal, shape ``(n,)`` (with ``return_info``, the pair ``(diagonal, info)``).

    Raises:
        ValueError: For an invalid ``chunk_size``, no batch at all, or a loss returning a
            non-scalar.
    """
    check_chunk_size(chunk_size)
    fmodel = FunctionalModel(model, params, dtype)
    mean = getattr(loss_fn, "reduction", "mean") == "mean"
    info = DiagonalInfo()

    def per_batch(batch: Batch) -> tuple[Tensor, float]:
        n = batch.size
        coupled = coupling(fmodel.model)
        if coupled is not None:  # samples interact: per-row losses of the batch's outputs
            info.record("batch", coupled)
            total = batch_loss_gradient_squares(fmodel, loss_fn, batch, chunk_size)
            return total / n if mean else total, 1.0
        dims = sample_dims(batch.inputs, n)
        t = batch.targets
        tdim = 0 if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == n else None
        params_ = fmodel.values()

        def one_sample(inputs: tuple[Any, ...], target: Any) -> tuple[tuple[Tensor, ...], Any]:
            def loss(ps: list[Tensor]) -> tuple[Tensor, Any]:
                out = fmodel(ps, single_sample(inputs, dims))
                value = loss_fn(out, target.unsqueeze(0) if tdim == 0 else target)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"loss_fn {loss_fn!r} must return a scalar tensor")
                return value.reshape(()), out

            grads, out = grad(loss, has_aux=True)(params_)
            return tuple(grads), out

        with torch.no_grad():
            z = fmodel(params_, batch.inputs)
        check = isinstance(z, Tensor) and z.ndim > 0 and z.shape[0] == n
        total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
        reason = None
        try:
            for a, b in sample_chunks(n, fmodel.dim, chunk_size):
                tb = t[a:b] if tdim == 0 else t
                grads, outs = vmap(one_sample, in_dims=(dims, tdim))(
                    take_samples(batch.inputs, dims, a, b), tb
                )
                if check and not (
                    isinstance(outs, Tensor)
                    and outs.numel() == z[a:b].numel()
                    and outputs_agree(outs.reshape(z[a:b].shape), z[a:b])
                ):
                    reason = "the outputs of samples evaluated alone differ from the batch's"
                    break
                accumulate_squares(total, grads, fmodel.numels)
        except (RuntimeError, NotImplementedError) as err:  # no per-sample vmap rule
            reason = f"per-sample vmap failed ({type(err).__name__}: {str(err)[:200]})"
        if reason is not None:
            info.record("batch", reason)
            total = batch_loss_gradient_squares(fmodel, loss_fn, batch, chunk_size)
        else:
            info.record("vmap")
        # _combine multiplies by N_b (mean) and divides by N: d = (1/N) sum_i
        return total / n if mean else total, 1.0

    d = _combine(
        loss_fn, data, lambda b: per_batch(fmodel.cast_batch(b)), process_group, by_samples=True
    )
    return (d, info) if return_info else d
