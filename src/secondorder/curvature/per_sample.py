r"""Per-row gradients for the exact diagonals: which path computes them, and the batch path.

The diagonals of :mod:`.diagonal` need, for every row :math:`r` of the loss (a sample, or a
position for cross-entropy on ``(N, C, *d)`` outputs) and a few output-space columns :math:`s`,
the vector-Jacobian product :math:`J_r^\top s` with :math:`J_r = \partial z_r / \partial\theta`.

**What a per-row quantity means.** :math:`z_r` is row :math:`r` of the model's output *on the
whole batch*, and :math:`J_r` its derivative through the whole batch. When the samples do not
interact this is the derivative of the sample evaluated alone. When they do, through
BatchNorm's batch statistics in training mode (or without running statistics), :math:`J_r`
includes the dependence of the statistics on :math:`\theta` through every sample, and a
Dropout layer in training mode draws one mask for the batch, as one training forward pass
does. With this definition :math:`\sum_r J_r^\top \nabla^2\ell_r J_r` is the batch's GGN, so
the diagonals always equal ``GGN(...).to_dense().diagonal()`` (with the same dropout mask).

**Paths.** Three ways compute the same numbers:

- ``"kronecker"``: per-sample layer rules over the graph engine (see :mod:`.diagonal_paths`);
- ``"vmap"``: :func:`torch.func.vmap` over samples, each evaluated alone; valid only when the
  samples do not interact, which is checked twice: no module that couples them
  (:func:`coupling`), and the outputs of the samples evaluated alone equal the batch's
  outputs (a forward that mixes samples some other way fails this);
- ``"batch"``: one forward pass of the whole batch with an autograd graph, then batched
  backward passes with one cotangent per (row, column) (one per column where a backward has no
  batching rule). It costs about :math:`N` times more than ``"vmap"`` but works for every model
  autograd can differentiate: coupled samples, randomness, and layers without batching rules
  for per-sample ``vmap`` (GRU and LSTM's fused kernels, in-place updates of running
  statistics).

The diagonals try ``"kronecker"`` and ``"vmap"`` where they apply and fall back to ``"batch"``
otherwise; :class:`DiagonalInfo` reports which path ran on each batch and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .linearization import batched_grad
from .losses import LossTerms, loss_terms
from .model import Batch, FunctionalModel

__all__ = [
    "DiagonalInfo",
    "batch_factor_squares",
    "batch_loss_gradient_squares",
    "coupling",
    "outputs_agree",
    "sample_dims",
    "single_sample",
    "take_samples",
]

# elements of the largest intermediate (columns x (outputs + parameters)) of one batch backward
_BATCH_ELEMENTS = 2**22


@dataclass
class DiagonalInfo:
    """Which path computed a diagonal on each batch (see the module docstring).

    Attributes:
        paths: One entry per batch: ``"kronecker"``, ``"vmap"`` or ``"batch"``.
        reasons: One entry per batch: why the faster paths were not taken (``None`` if the
            path is the first that applies).
    """

    paths: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The one path of every batch, or ``"mixed"``."""
        distinct = set(self.paths)
        return distinct.pop() if len(distinct) == 1 else "mixed"

    @property
    def fallback(self) -> bool:
        """Whether some batch fell back to the ``"batch"`` path."""
        return "batch" in self.paths

    def record(self, path: str, reason: str | None = None) -> None:
        """Append one batch's path and reason."""
        self.paths.append(path)
        self.reasons.append(reason)


def coupling(model: nn.Module, *, dropout: bool = True) -> str | None:
    """Why the samples of a batch interact in ``model``'s forward pass, or ``None``.

    Known couplings: BatchNorm using batch statistics (training mode, or no running
    statistics) and Dropout in training mode with ``p > 0`` (randomness: one mask per batch).

    Args:
        model: The module.
        dropout: Whether Dropout in training mode counts. It does for paths that evaluate
            samples alone (each would draw its own mask); a path that runs the whole batch
            with one mask held fixed (K-FAC's reverse passes) keeps the samples apart.

    Returns:
        A description naming the first such submodule, or ``None``.
    """
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or not module.track_running_stats
        ):
            return f"{where} ({type(module).__name__}) normalises with batch statistics"
        if (
            dropout
            and isinstance(module, nn.modules.dropout._DropoutNd)
            and module.training
            and module.p > 0
        ):
            return f"{where} ({type(module).__name__}) is in training mode with p={module.p}"
    return None


def sample_dims(inputs: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """``vmap`` in_dims for ``inputs``: 0 for tensors (nested ones too) of leading size ``n``.

    Args:
        inputs: The model's positional inputs (tensors, tuples, mappings ...).
        n: The batch size.

    Returns:
        A pytree like ``inputs`` with ``0`` or ``None`` at every leaf.
    """
    leaves, spec = tree_flatten(inputs)
    dims = [0 if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n else None for x in leaves]
    return tuple(tree_unflatten(dims, spec))


def _zip_map(fn: Callable[[Any, Any], Any], values: Any, dims: Any) -> Any:
    leaves, spec = tree_flatten(values)
    dim_leaves = tree_flatten(dims)[0]  # None is a leaf of torch's pytrees
    return tree_unflatten([fn(v, d) for v, d in zip(leaves, dim_leaves, strict=True)], spec)


def take_samples(inputs: tuple[Any, ...], dims: tuple[Any, ...], a: int, b: int) -> Any:
    """Samples ``a:b`` of the batched leaves of ``inputs`` (the others unchanged)."""
    return _zip_map(lambda v, d: v[a:b] if d == 0 else v, inputs, dims)


def single_sample(inputs: tuple[Any, ...], dims: tuple[Any, ...]) -> Any:
    """Inside ``vmap``: give the batched leaves of one sample back a batch dimension of 1."""
    return _zip_map(lambda v, d: v.unsqueeze(0) if d == 0 else v, inputs, dims)


def outputs_agree(alone: Tensor, batch: Tensor) -> bool:
    r"""Whether the outputs of the samples evaluated alone equal the batch's outputs.

    Compared to a tolerance of :math:`\sqrt{\epsilon}` of the dtype, relative to the largest
    output, to allow for the rounding of batched and per-sample kernels.
    """
    if alone.shape != batch.shape:
        return False
    tol = torch.finfo(batch.dtype).eps ** 0.5 if batch.is_floating_point() else 0.0
    scale = float(batch.abs().max()) if batch.numel() else 0.0
    return bool(torch.allclose(alone, batch, rtol=tol, atol=tol * max(scale, 1.0)))


def _accumulate_squares(total: Tensor, grads: Any, numels: list[int], count: int) -> None:
    for out, g, numel in zip(total.split(numels), grads, numels):
        if g is not None:
            out += g.reshape(count, numel).square().sum(0)


def batch_factor_squares(
    fmodel: FunctionalModel,
    loss_fn: Any,
    batch: Batch,
    factor: Callable[[LossTerms], Tensor],
    chunk_size: int | None = None,
) -> tuple[Tensor, float]:
    r""":math:`\sum_r \sum_k (J_r^\top S_r[:, k])^{\odot 2}` by the ``"batch"`` path, and :math:`s`.

    One forward pass of the whole batch with a graph; the loss terms and the factor ``S`` (shape
    ``(R, C, K)`` from ``factor(terms)``) are computed from its outputs, so a random forward
    (Dropout) uses one mask for both. Then batched backward passes with the cotangents
    :math:`S_r[:, k]` placed in row :math:`r` (zeros elsewhere), ``chunk_size`` rows at a time.

    Args:
        fmodel: The model as a function of its parameters.
        loss_fn: A loss with a likelihood.
        batch: The batch.
        factor: Returns ``S`` of shape ``(R, C, K)`` from the loss terms.
        chunk_size: Rows per backward (default: bounded by :math:`2^{22}` elements).

    Returns:
        The unscaled sum (shape ``(dim,)``) and the loss's scale :math:`s`.

    Raises:
        TypeError: If the model does not return a tensor.
        ValueError: If the loss has no likelihood on this batch.
    """
    leaves = fmodel.leaves()
    with torch.enable_grad():
        z = fmodel(leaves, batch.inputs)
    if not isinstance(z, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(z).__name__}")
    terms = loss_terms(loss_fn, z.detach(), batch.targets)
    if not terms.has_likelihood:
        raise ValueError(
            f"{loss_fn!r} has no likelihood on this batch (targets of type "
            f"{type(batch.targets).__name__}); exact diagonals need tensor targets"
        )
    S = factor(terms).detach()  # (R, C, K)
    R, C, K = S.shape
    total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    step = chunk_size or max(1, _BATCH_ELEMENTS // max(K * (z.numel() + fmodel.dim), 1))
    owner = DiagonalInfo()  # carries the batched_products flag of batched_grad
    for a in range(0, R, step):
        b = min(a + step, R)
        rows = S.new_zeros(b - a, K, R, C)
        index = torch.arange(b - a, device=S.device)
        rows[index, :, a + index] = S[a:b].permute(0, 2, 1)  # row a+i holds S[a+i, :, k]
        cot = terms.from_rows(rows.reshape((b - a) * K, R, C))
        grads = batched_grad(owner, [z], leaves, [cot], True)
        _accumulate_squares(total, grads, list(fmodel.numels), (b - a) * K)
    return total, terms.scale


def batch_loss_gradient_squares(
    fmodel: FunctionalModel, loss_fn: Any, batch: Batch, chunk_size: int | None = None
) -> Tensor:
    r""":math:`\sum_i (\nabla_\theta l_i)^{\odot 2}` by the ``"batch"`` path.

    :math:`l_i` = ``loss_fn(z[i:i+1], y[i:i+1])``, the loss of row :math:`i` of the outputs
    ``z`` of the whole batch (targets without the batch's leading dimension are passed whole);
    for samples that do not interact, the loss of sample :math:`i` evaluated alone.

    Args:
        fmodel: The model as a function of its parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch: The batch.
        chunk_size: Samples per backward (default: bounded by :math:`2^{22}` elements).

    Returns:
        The sum, shape ``(dim,)``.

    Raises:
        ValueError: If the loss does not return a scalar, or the outputs have no batch dimension.
    """
    n = batch.size
    t = batch.targets
    tdim = 0 if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == n else None
    leaves = fmodel.leaves()
    with torch.enable_grad():
        z = fmodel(leaves, batch.inputs)
        if not isinstance(z, Tensor) or z.ndim == 0 or z.shape[0] != n:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"per-sample gradients need outputs with a leading batch dimension of size {n}, "
                f"got {got}"
            )
        values = []
        for i in range(n):
            value = loss_fn(z[i : i + 1], t[i : i + 1] if tdim == 0 else t)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"loss_fn {loss_fn!r} must return a scalar tensor")
            values.append(value.reshape(()))
        losses = torch.stack(values)
    total = torch.zeros(fmodel.dim, dtype=fmodel.dtype, device=fmodel.device)
    step = chunk_size or max(1, _BATCH_ELEMENTS // max(fmodel.dim, 1))
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    owner = DiagonalInfo()
    for a in range(0, n, step):
        b = min(a + step, n)
        grads = batched_grad(owner, [losses], leaves, [eye[a:b]], True)
        _accumulate_squares(total, grads, list(fmodel.numels), b - a)
    return total
