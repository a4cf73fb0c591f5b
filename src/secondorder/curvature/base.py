r"""Curvature operators: linear operators on the flat parameters, built from (model, loss, data).

Every curvature matrix :math:`C` here is a sum over batches,

.. math::
    C = \sum_b w_b \, C_b, \qquad
    w_b = \begin{cases} D_b / D & \text{reduction "mean"} \\ 1 & \text{reduction "sum"}\end{cases}

where :math:`C_b` is the curvature of the loss on batch :math:`b` and :math:`D_b` the
normaliser of its mean (:math:`D = \sum_b D_b`): the number of samples, of non-ignored targets,
the sum of the targets' class weights, ... as the loss defines it (:mod:`.weighting`), so that
the operator on several batches equals the operator on the concatenated batch. Batches with
:math:`w_b = 0` (every target ignored) are skipped. The loop over batches lives here;
subclasses implement ``_prepare`` (work done once per batch: the forward pass and the
linearisation) and ``_apply`` (one product on one batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg.operator import BlockDiagonal, LinearOperator
from .linearization import EngineInfo
from .model import Batch, FunctionalModel, as_batches, autocast_disabled
from .vocabulary import canonical_engine
from .weighting import BatchWeights, batch_weights

__all__ = ["CurvatureOperator", "allreduce_sum", "global_count"]


def allreduce_sum(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Sum ``tensors`` over a process group with one flat all-reduce (identity for None).

    Args:
        tensors: Tensors of one dtype and device.
        group: A ``torch.distributed`` process group, or None.

    Returns:
        The summed tensors (new tensors with the input shapes) or ``tensors`` unchanged.
    """
    if group is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    nccl = torch.distributed.get_backend(group) == "nccl"
    buf = flat if nccl else flat.cpu().clone()
    torch.distributed.all_reduce(buf, group=group)
    flat = buf.to(flat.device)
    sizes = [t.numel() for t in tensors]
    return [part.view(t.shape) for part, t in zip(flat.split(sizes), tensors)]


def global_count(local: int, group: Any) -> int:
    """The sum of ``local`` over a process group (``local`` itself if ``group`` is None).

    Args:
        local: This rank's count.
        group: A ``torch.distributed`` process group, or None.

    Returns:
        The global count.
    """
    if group is None:
        return local
    (total,) = allreduce_sum([torch.tensor([float(local)], dtype=torch.float64)], group)
    return int(total.item())


class _LazyOutput(Sequence[Tensor]):
    """Parameter-shaped views into one flat zero buffer, allocated on first access.

    A product's output is first touched by its reverse pass, so allocating it then keeps it
    out of the forward pass's (tangent) memory peak.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        start: tuple[Tensor, float] | None = None,
    ) -> None:
        self._shapes = list(shapes)
        self._sizes = [s.numel() for s in self._shapes]
        self._dtype, self._device = dtype, device
        self._start = start  # (x, shift): the buffer starts as shift * x instead of zeros
        self._flat: Tensor | None = None
        self._views: list[Tensor] = []

    def flat(self) -> Tensor:
        """The flat buffer (allocated now if no product touched it)."""
        if self._flat is None:
            if self._start is not None:
                self._flat = torch.mul(self._start[0], self._start[1])
            else:
                self._flat = torch.zeros(sum(self._sizes), dtype=self._dtype, device=self._device)
            parts = self._flat.split(self._sizes)
            self._views = [v.view(shape) for v, shape in zip(parts, self._shapes)]
        return self._flat

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, i: Any) -> Any:
        self.flat()
        return self._views[i]

    def __iter__(self) -> Iterator[Tensor]:
        self.flat()
        return iter(self._views)


class CurvatureOperator(LinearOperator):
    """Base class of symmetric curvature operators over a model's trainable parameters.

    Args:
        model: Any ``nn.Module``; it is called as ``model(*inputs)``. A model compiled by
            ``torch.compile`` is evaluated through the module underneath
            (:func:`~secondorder.curvature.model.unwrap_compiled`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with reduction ``"mean"`` or ``"sum"``.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        params: Optional subset of the model's parameters (default: all with requires_grad).
        cache: Keep every batch's linearisation for reuse in all products (default: True for a
            list of batches or a single batch; False for a re-iterable such as a DataLoader, which
            is then streamed: one forward pass per batch and product).
        check_deterministic: For streamed data, apply the operator twice to one vector when it
            is built and raise if the results differ (data augmentation, shuffling, Dropout or
            BatchNorm in training mode make the operator ill-defined).
        engine: How ``J v`` is computed: ``"auto"``, ``"graph"``, ``"sequential"`` (an alias
            of ``"graph"``) or ``"autograd"``, chosen by
            :func:`~secondorder.curvature.engines.dispatch.select`.
        process_group: A ``torch.distributed`` process group for data-parallel use (``None``:
            one process). Each rank holds its shard of the data; every product, the loss and
            the gradient are all-reduced (one flat all-reduce each) and normalised by the global
            normaliser (:mod:`.weighting`), so every rank sees the operator of the global batch.
        dtype: The dtype of the operator (:attr:`dtype`): of its vectors, its products, the
            loss and the gradient. Default: float32 for a bfloat16 or float16 model, else the
            parameters' dtype. In another dtype than the parameters', the model is evaluated
            through a copy cast to ``dtype`` at the current parameter values, with the
            batches' floating-point inputs and targets cast too
            (:class:`~secondorder.curvature.model.FunctionalModel`): products are exact in
            ``dtype`` at the low-precision parameters. Any enclosing ``torch.autocast`` is
            switched off while the operator computes.

    Raises:
        ValueError: For empty data, a model without trainable parameters, bad arguments, data
            whose every target is ignored, or a generic loss callable that is neither a mean
            nor a sum over samples (:mod:`.weighting`).
        TypeError: For a ``dtype`` that is not a real floating-point ``torch.dtype``.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: Sequence[Tensor] | None = None,
        cache: bool | None = None,
        check_deterministic: bool = True,
        engine: str = "auto",
        process_group: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        engine = canonical_engine(engine)
        self.fmodel = FunctionalModel(model, params, dtype)
        with autocast_disabled():
            self._build_operator(
                model, loss_fn, data, cache, check_deterministic, engine, process_group
            )

    def _build_operator(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        cache: bool | None,
        check_deterministic: bool,
        engine: str,
        process_group: Any,
    ) -> None:
        super().__init__((self.fmodel.dim, self.fmodel.dim), self.fmodel.dtype, self.fmodel.device)
        self.loss_fn = loss_fn
        self.engine = engine
        self.reduction = getattr(loss_fn, "reduction", "mean")
        self.process_group = process_group
        batches = as_batches(data)
        self._streamed = not isinstance(batches, list) if cache is None else not cache
        self._batches = batches
        self._states: list[tuple[Any, float]] | None = None
        self._loss: Tensor | None = None
        self._gradient: Tensor | None = None
        # one pass over the data (a streamed loader included) counts the normalisers
        blist = list(batches) if not self._streamed else []
        self._weighting: BatchWeights = batch_weights(
            loss_fn, blist if not self._streamed else batches, self.fmodel, process_group
        )
        if not self._streamed:
            self.local_num_samples = self._weighting.local_samples
            self.num_samples = self._global_count(self.local_num_samples)
            weighted = [(b, self._weight(b)) for b in blist]
            cast = self.fmodel.cast_batch
            self._states = [(self._prepare(cast(b)), w) for b, w in weighted if w != 0.0]
        else:
            self.local_num_samples = self._weighting.local_samples  # counted in the same pass
            self.num_samples = self._global_count(self.local_num_samples)
            if check_deterministic:
                self._check_deterministic()

    # ---------------------------------------------------------------- subclass hooks
    def _prepare(self, batch: Batch) -> Any:
        """Do the per-batch work shared by all products (forward pass, linearisation)."""
        raise NotImplementedError

    def _apply(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        batched: bool,
    ) -> list[Tensor]:
        """Return the product's blocks ``indices`` (all if None) for one batch, unweighted."""
        raise NotImplementedError

    def _apply_into(
        self,
        state: Any,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        out: Sequence[Tensor],
        weight: float,
    ) -> None:
        """Add ``weight`` times one batch's product (blocks ``indices``) into the views ``out``.

        The default calls :meth:`_apply`; subclasses accumulate in place (no extra copies).
        """
        for o, p in zip(out, self._apply(state, tangents, indices, False)):
            o.add_(p, alpha=weight)

    def _batch_loss_and_grad(self, state: Any) -> tuple[Tensor, list[Tensor]]:
        """Loss value and gradient (parameter shapes) of one batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ distribution
    def _global_count(self, local: int) -> int:
        return global_count(local, self.process_group)

    def _allreduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum ``tensors`` over the process group with a single flat all-reduce."""
        return allreduce_sum(tensors, self.process_group)

    # ---------------------------------------------------------------------- batches
    def _weight(self, batch: Batch) -> float:
        r"""The batch's weight :math:`w_b` (:mod:`.weighting`)."""
        return self._weighting.weight(batch)

    def _iter_states(self) -> Iterator[tuple[Any, float]]:
        if self._states is not None:
            yield from self._states
            return
        for batch in self._batches:
            weight = self._weight(batch)
            if weight != 0.0:  # every target ignored: nothing to add (its own mean is 0/0)
                yield self._prepare(self.fmodel.cast_batch(batch)), weight

    def _check_deterministic(self) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.shape[0], generator=gen, dtype=self.dtype).to(self.device)
        first, second = self._matvec(v), self._matvec(v)
        if not torch.allclose(first, second, rtol=1e-5, atol=1e-7):
            raise RuntimeError(
                f"{type(self).__name__}: two products with the same vector differ (max abs "
                f"difference {(first - second).abs().max().item():.3e}); the data or the model is "
                "not deterministic. Common causes: data augmentation or shuffling in the data "
                "loader, drop_last with a shuffled sampler, Dropout or BatchNorm in training mode "
                "(call model.eval()). Pass check_deterministic=False to skip this check."
            )

    # ------------------------------------------------------------------- products
    def _accumulate(
        self, tangents: list[Tensor | None], indices: Sequence[int] | None, batched: bool
    ) -> list[Tensor]:
        """Sum the weighted per-batch products (blocks ``indices``; all if None), all-reduced."""
        if not batched:
            return self.fmodel_views(self._accumulate_flat(tangents, indices), indices)
        total: list[Tensor] | None = None
        for state, weight in self._iter_states():
            part = self._apply(state, tangents, indices, batched)
            if total is None:
                total = [p * weight if weight != 1.0 else p for p in part]
            else:
                for t, p in zip(total, part):
                    t.add_(p, alpha=weight)
        if total is None:  # every batch of this rank has weight 0
            idx = range(len(self.fmodel.params)) if indices is None else indices
            K = next(t.shape[0] for t in tangents if t is not None)
            total = [
                torch.zeros(K, *self.fmodel.shapes[i], dtype=self.dtype, device=self.device)
                for i in idx
            ]
        return self._allreduce(total)

    def _accumulate_flat(
        self,
        tangents: list[Tensor | None],
        indices: Sequence[int] | None,
        start: tuple[Tensor, float] | None = None,
    ) -> Tensor:
        r"""Like :meth:`_accumulate` for one vector, written into one flat buffer in place.

        With ``start = (x, shift)`` the buffer starts as ``shift * x`` (one process only), so
        a damped product :math:`(C + \lambda I) x` costs no separate addition.
        """
        idx = range(len(self.fmodel.params)) if indices is None else indices
        shapes = [self.fmodel.shapes[i] for i in idx]
        views = _LazyOutput(shapes, self.dtype, self.device, start)
        for state, weight in self._iter_states():
            self._apply_into(state, tangents, indices, views, weight)
        flat = views.flat()
        if self.process_group is not None:
            (flat,) = self._allreduce([flat])
        return flat

    def fmodel_views(self, flat: Tensor, indices: Sequence[int] | None) -> list[Tensor]:
        """Split a flat vector over the blocks ``indices`` (all if None) into parameter shapes."""
        idx = range(len(self.fmodel.params)) if indices is None else indices
        sizes = [self.fmodel.numels[i] for i in idx]
        return [v.view(self.fmodel.shapes[i]) for v, i in zip(flat.split(sizes), idx)]

    def _matvec(self, x: Tensor) -> Tensor:
        return self._accumulate_flat(list(self.fmodel.unflatten(x)), None)

    def _matvec_plus(self, x: Tensor, shift: float) -> Tensor:
        if self.process_group is not None or x.dtype != self.dtype:  # shift after all-reduce
            return super()._matvec_plus(x, shift)
        return self._accumulate_flat(list(self.fmodel.unflatten(x)), None, start=(x, shift))

    def _matmat(self, X: Tensor) -> Tensor:
        tangents = [t.movedim(-1, 0) for t in self.fmodel.unflatten(X)]  # (K, *shape) each
        out = self._accumulate(list(tangents), None, batched=True)
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1).T

    def matvec(self, x: Any) -> Any:
        """Apply the operator to a flat vector/matrix, or to a list in parameter shapes.

        Args:
            x: ``(n,)``, ``(n, k)``, or a list of tensors shaped like the parameters.

        Returns:
            The product in the same format as ``x``.
        """
        with autocast_disabled():
            return self._matvec_any(x)

    def _matvec_any(self, x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            if len(x) != len(self.fmodel.params):
                raise ValueError(
                    f"expected a list of {len(self.fmodel.params)} tensors in parameter shapes, "
                    f"got {len(x)}"
                )
            for i, (t, shape) in enumerate(zip(x, self.fmodel.shapes)):
                if not isinstance(t, Tensor) or t.shape != shape:
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"entry {i}: expected shape {tuple(shape)}, got {got}")
            y = super().matvec(self.fmodel.flatten(x))
            return self.fmodel.unflatten(y)
        return super().matvec(x)

    # ----------------------------------------------------------------- extras
    @property
    def loss(self) -> Tensor:
        """The loss on the operator's data at the operator's parameters (computed once)."""
        if self._loss is None:
            self._compute_loss_and_gradient()
        assert self._loss is not None
        return self._loss

    def gradient(self) -> Tensor:
        r"""The flat gradient :math:`\nabla_\theta L` on the operator's data (computed once).

        Returns:
            The gradient, shape ``(n,)``; reuses the cached forward passes.
        """
        if self._gradient is None:
            self._compute_loss_and_gradient()
        assert self._gradient is not None
        return self._gradient

    def _compute_loss_and_gradient(self) -> None:
        with autocast_disabled():
            self._loss_and_gradient()

    def _loss_and_gradient(self) -> None:
        loss: Tensor | None = None
        grad: list[Tensor] | None = None
        for state, weight in self._iter_states():
            value, g = self._batch_loss_and_grad(state)
            loss = value * weight if loss is None else loss + value * weight
            if grad is None:
                grad = [gi * weight for gi in g]
            else:
                for t, gi in zip(grad, g):
                    t.add_(gi, alpha=weight)
        if loss is None or grad is None:  # every batch of this rank has weight 0
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            grad = [
                torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.fmodel.shapes
            ]
        loss_and_grad = self._allreduce([loss.detach().reshape(1).to(grad[0].dtype), *grad])
        self._loss = loss_and_grad[0].reshape(()).to(loss.dtype)
        self._gradient = self.fmodel.flatten(loss_and_grad[1:])

    @property
    def engine_info(self) -> list[EngineInfo]:
        """Which engine computes each cached batch's products, and where it fell back.

        One :class:`~secondorder.curvature.linearization.EngineInfo` per batch kept by the
        operator (batches with weight 0 are not kept); empty for streamed data
        (``cache=False``), whose batches are linearised anew for every product.
        """
        if self._states is None:
            return []
        return [self._engine_info(state) for state, _ in self._states]

    def _engine_info(self, state: Any) -> EngineInfo:
        lin = getattr(state, "lin", None)
        return EngineInfo.of(lin) if lin is not None else EngineInfo("autograd")

    def block(self, index: int) -> LinearOperator:
        """The diagonal block of parameter tensor ``index`` (rows and columns of that tensor).

        Args:
            index: Position of the parameter in ``self.fmodel.params``.

        Returns:
            A symmetric operator of size ``numel(param)``; its products only compute what that
            block needs (zero tangents elsewhere).

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < len(self.fmodel.params):
            raise IndexError(f"block index must be in [0, {len(self.fmodel.params)}), got {index}")
        return _ParameterBlock(self, index)

    def block_diagonal(self) -> BlockDiagonal:
        """The block-diagonal restriction: one block per parameter tensor, zeros elsewhere.

        Returns:
            A :class:`~secondorder.linalg.BlockDiagonal` of the blocks :meth:`block`.
        """
        return BlockDiagonal([self.block(i) for i in range(len(self.fmodel.params))])


class _ParameterBlock(LinearOperator):
    """Diagonal block of one parameter tensor of a curvature operator."""

    SELF_ADJOINT = True

    def __init__(self, parent: CurvatureOperator, index: int) -> None:
        n = parent.fmodel.numels[index]
        super().__init__((n, n), parent.dtype, parent.device)
        self.parent = parent
        self.index = index
        self.IS_PSD = parent.IS_PSD

    def _tangents(self, x: Tensor, batched: bool) -> list[Tensor | None]:
        shape = self.parent.fmodel.shapes[self.index]
        tangents: list[Tensor | None] = [None] * len(self.parent.fmodel.params)
        tangents[self.index] = x.T.reshape(x.shape[1], *shape) if batched else x.view(shape)
        return tangents

    def _matvec(self, x: Tensor) -> Tensor:
        return self.parent._accumulate_flat(self._tangents(x, False), [self.index])

    def _matmat(self, X: Tensor) -> Tensor:
        (out,) = self.parent._accumulate(self._tangents(X, True), [self.index], batched=True)
        return out.reshape(X.shape[1], -1).T
